"""Reconcile a TrainingJob: a pure decision (observed world in, plan out) and a small executor.

The decision is a function of the spec, the last status and what the children look like now, so it
is table-tested without a cluster and a restarted operator picks up exactly where it was.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from .. import API_VERSION, kube
from ..api.trainingjob import Artifacts, TrainingJobSpec, TrainingJobStatus, ValidationResult
from ..builders.common import Manifest, now, set_condition
from ..builders.trainingjob import (
    TrainingContext,
    build_config_map,
    build_service,
    build_trainer_rbac,
    build_validator_job,
    build_worker_job,
    validator_job_name,
    worker_job_name,
)

log = logging.getLogger(__name__)
FINISHED = {"Succeeded", "Failed"}


class JobState(Enum):
    """What a child Job is doing, as far as the decision is concerned."""

    MISSING = "Missing"
    SUSPENDED = "Suspended"
    STARTING = "Starting"  # exists, but not every pod of the gang is running yet
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


def job_state(job: Manifest | None) -> JobState:
    if job is None:
        return JobState.MISSING
    conditions = {c["type"]: c["status"] for c in (job.get("status") or {}).get("conditions") or []}
    if conditions.get("Complete") == "True":
        return JobState.SUCCEEDED
    if conditions.get("Failed") == "True":
        return JobState.FAILED
    if job.get("spec", {}).get("suspend"):
        return JobState.SUSPENDED
    ready = (job.get("status") or {}).get("ready") or 0
    if ready < (job.get("spec") or {}).get("parallelism", 1):
        return JobState.STARTING
    return JobState.RUNNING


def job_failure_reason(job: Manifest | None) -> str:
    for c in ((job or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == "Failed" and c["status"] == "True":
            return f"{c.get('reason', 'Failed')}: {c.get('message', '')}".strip(": ")
    return "a worker failed"


@dataclass(frozen=True)
class Observed:
    """What the reconciler saw this pass."""

    cluster_ready: bool
    cluster_problem: str
    capacity_free: bool  # below the NeuralCluster's concurrent-job limit (or already running)
    max_workers: int
    worker_job: JobState
    worker_failure: str
    validator_job: JobState
    verdict: dict[str, Any] | None  # the validator's termination message, once it has finished
    now: datetime


@dataclass
class Plan:
    """What to do this pass: children to create or change, the status to write, Events to post."""

    status: TrainingJobStatus
    create_attempt: int | None = None
    suspend_attempt: bool | None = None
    delete_attempt: int | None = None
    create_validator: bool = False
    delete_validator: bool = False
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    requeue_after: float | None = None
    delete_self: bool = False


def _parse_time(value: str | None) -> datetime | None:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) if value else None


def _phase(plan: Plan, phase: str, reason: str, message: str, generation: int | None) -> None:
    st = plan.status
    if st.phase != phase:
        plan.events.append(("Warning" if phase == "Failed" else "Normal", reason, message))
    st.phase = phase  # type: ignore[assignment]
    st.reason, st.message = reason, message
    conds = st.conditions
    conds = set_condition(conds, "Running", phase == "Running", reason, message, generation)
    conds = set_condition(conds, "Suspended", phase == "Suspended", reason, message, generation)
    if phase in FINISHED:
        conds = set_condition(conds, "Succeeded", phase == "Succeeded", reason, message, generation)
        conds = set_condition(conds, "Failed", phase == "Failed", reason, message, generation)
        conds = set_condition(conds, "Ready", phase == "Succeeded", reason, message, generation)
    st.conditions = conds


def decide(spec: TrainingJobSpec, status: TrainingJobStatus, obs: Observed, generation: int | None) -> Plan:
    """One step of the TrainingJob life cycle; see docs/TRAININGJOB.md for the diagram."""
    plan = Plan(status=status.model_copy(deep=True))
    st = plan.status
    st.observed_generation = generation

    if st.phase in FINISHED:
        return _after_finish(spec, plan, obs)

    if not obs.cluster_ready:
        _phase(plan, "Pending", "ClusterNotReady", obs.cluster_problem, generation)
        plan.requeue_after = 15
        return plan
    if spec.distributed.workers > obs.max_workers:
        _phase(
            plan,
            "Pending",
            "TooManyWorkers",
            f"spec.distributed.workers: {spec.distributed.workers} exceeds the NeuralCluster's "
            f"limits.maxWorkersPerJob ({obs.max_workers})",
            generation,
        )
        return plan

    attempt = st.attempt or 0
    if attempt == 0:
        if spec.run_policy.suspend:
            _phase(plan, "Suspended", "Suspended", "spec.runPolicy.suspend is true; nothing started", generation)
            return plan
        if not obs.capacity_free:
            _phase(
                plan,
                "Pending",
                "WaitingForCapacity",
                "the NeuralCluster's limits.maxConcurrentTrainingJobs is reached; waiting",
                generation,
            )
            return plan
        st.attempt = 1
        st.start_time = st.start_time or now()
        st.conditions = set_condition(st.conditions, "Created", True, "Created", "attempt 1 created", generation)
        plan.create_attempt = 1
        _phase(plan, "Created", "Created", "attempt 1 of the worker gang created", generation)
        return plan

    deadline = spec.run_policy.active_deadline_seconds
    started = _parse_time(st.start_time)
    if deadline and started and (obs.now - started).total_seconds() > deadline:
        plan.delete_attempt = attempt
        plan.delete_validator = True
        return _fail(
            plan, "DeadlineExceeded", f"ran longer than spec.runPolicy.activeDeadlineSeconds ({deadline}s)", generation
        )

    if st.phase == "Validating" or obs.worker_job is JobState.SUCCEEDED:
        return _validation_step(plan, obs, generation)

    if obs.worker_job is JobState.MISSING:
        plan.create_attempt = attempt  # deleted behind our back, or the create did not land: converge
        return plan
    if spec.run_policy.suspend:
        if obs.worker_job is not JobState.SUSPENDED:
            plan.suspend_attempt = True
        _phase(
            plan, "Suspended", "Suspended", "spec.runPolicy.suspend is true; pods stopped, checkpoints kept", generation
        )
        return plan
    if obs.worker_job is JobState.SUSPENDED:
        plan.suspend_attempt = False
        _phase(plan, "Running", "Resumed", f"attempt {attempt} resumed from the latest checkpoint", generation)
        return plan
    if obs.worker_job is JobState.FAILED:
        if obs.worker_failure.startswith("DeadlineExceeded"):
            return _fail(
                plan,
                "DeadlineExceeded",
                f"ran longer than spec.runPolicy.activeDeadlineSeconds ({deadline}s)",
                generation,
            )
        if attempt > spec.run_policy.max_restarts:
            return _fail(
                plan,
                "RestartLimitExceeded",
                f"attempt {attempt} failed ({obs.worker_failure}) and spec.runPolicy.maxRestarts "
                f"({spec.run_policy.max_restarts}) is used up",
                generation,
            )
        st.attempt = attempt + 1
        plan.create_attempt = attempt + 1
        st.conditions = set_condition(
            st.conditions,
            "Restarting",
            True,
            "WorkerFailed",
            f"attempt {attempt} failed: {obs.worker_failure}",
            generation,
        )
        _phase(
            plan,
            "Restarting",
            "WorkerFailed",
            f"attempt {attempt} failed ({obs.worker_failure}); attempt {attempt + 1} resumes from the latest "
            "checkpoint",
            generation,
        )
        return plan
    if obs.worker_job is JobState.STARTING and st.phase != "Running":
        # Keep Created / Restarting until the whole gang runs; once Running, pods finishing one by one
        # at the end must not flip the phase back.
        if st.phase not in ("Created", "Restarting"):
            _phase(plan, "Created", "Starting", f"attempt {attempt}: worker pods are starting", generation)
        return plan
    st.conditions = set_condition(st.conditions, "Restarting", False, "Running", "", generation)
    _phase(plan, "Running", "Training", f"attempt {attempt} is training", generation)
    return plan


def _validation_step(plan: Plan, obs: Observed, generation: int | None) -> Plan:
    st = plan.status
    if st.phase != "Validating":
        st.conditions = set_condition(
            st.conditions, "Trained", True, "TrainingComplete", f"attempt {st.attempt} finished training", generation
        )
    if obs.validator_job is JobState.MISSING:
        plan.create_validator = True
        _phase(plan, "Validating", "Validating", "the validator Job measures the model", generation)
        return plan
    if obs.validator_job not in (JobState.SUCCEEDED, JobState.FAILED):
        _phase(plan, "Validating", "Validating", "the validator Job measures the model", generation)
        return plan
    verdict = obs.verdict or {}
    if obs.validator_job is JobState.FAILED or "error" in verdict:
        return _fail(
            plan, "ValidatorError", f"the validator could not run: {verdict.get('error', 'Job failed')}", generation
        )
    st.validation = ValidationResult(
        passed=bool(verdict.get("passed")),
        accuracy=verdict.get("testAccuracy"),
        rmse=verdict.get("testRmse"),
        r2=verdict.get("testR2"),
        latency_p50_ms=verdict.get("latencyP50Ms"),
        latency_p95_ms=verdict.get("latencyP95Ms"),
        latency_p99_ms=verdict.get("latencyP99Ms"),
        train_val_gap=verdict.get("trainValGap"),
        converged=verdict.get("converged"),
        failed_thresholds=list(verdict.get("failed") or []),
    )
    run_dir = verdict.get("runDir")
    st.artifacts = Artifacts(
        model_archive=verdict.get("modelArchive"),
        report=f"{run_dir}/report.md" if run_dir else None,
        metadata=f"{run_dir}/metadata.json" if run_dir else None,
        metrics=f"{run_dir}/metrics.jsonl" if run_dir else None,
    )
    if st.validation.passed:
        st.conditions = set_condition(
            st.conditions, "Validated", True, "ThresholdsMet", "every validation threshold holds", generation
        )
        st.completion_time = now()
        _phase(plan, "Succeeded", "Validated", "training finished and every validation threshold holds", generation)
        return plan
    failed = "; ".join(st.validation.failed_thresholds) or "a threshold failed"
    st.conditions = set_condition(st.conditions, "Validated", False, "ThresholdsFailed", failed, generation)
    return _fail(plan, "ValidationFailed", f"validation failed: {failed}", generation)


def _fail(plan: Plan, reason: str, message: str, generation: int | None) -> Plan:
    plan.status.completion_time = now()
    _phase(plan, "Failed", reason, message, generation)
    return plan


def _after_finish(spec: TrainingJobSpec, plan: Plan, obs: Observed) -> Plan:
    ttl = spec.run_policy.ttl_seconds_after_finished
    finished = _parse_time(plan.status.completion_time)
    if ttl is not None and finished is not None:
        left = ttl - (obs.now - finished).total_seconds()
        if left <= 0:
            plan.delete_self = True
        else:
            plan.requeue_after = left
    return plan


# ---- executor: the only part that does I/O ---------------------------------------------------------


def _termination_message(namespace: str, job_name: str) -> dict[str, Any] | None:
    pods = kube.list_objects("v1", "Pod", namespace, label_selector=f"job-name={job_name}")
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (cs.get("state") or {}).get("terminated")
            if terminated and terminated.get("message"):
                try:
                    parsed: dict[str, Any] = json.loads(terminated["message"])
                    return parsed
                except json.JSONDecodeError:
                    return {"error": terminated["message"][-500:]}
    return None


def observe(
    ctx: TrainingContext | None,
    status: TrainingJobStatus,
    cluster_problem: str,
    capacity_free: bool,
    max_workers: int,
    namespace: str,
    name: str,
) -> Observed:
    attempt = status.attempt or 0
    worker = kube.get("batch/v1", "Job", namespace, worker_job_name(name, attempt)) if attempt else None
    validator = kube.get("batch/v1", "Job", namespace, validator_job_name(name)) if attempt else None
    v_state = job_state(validator)
    verdict = (
        _termination_message(namespace, validator_job_name(name))
        if v_state in (JobState.SUCCEEDED, JobState.FAILED)
        else None
    )
    return Observed(
        cluster_ready=ctx is not None,
        cluster_problem=cluster_problem,
        capacity_free=capacity_free,
        max_workers=max_workers,
        worker_job=job_state(worker),
        worker_failure=job_failure_reason(worker),
        validator_job=v_state,
        verdict=verdict,
        now=datetime.now(UTC),
    )


def execute(ctx: TrainingContext, plan: Plan) -> None:
    """Make the children match the plan; every write is idempotent."""
    ns, name = ctx.namespace, ctx.name
    if plan.create_attempt is not None or plan.create_validator:
        for manifest in [*build_trainer_rbac(ctx), build_config_map(ctx), build_service(ctx)]:
            kube.ensure(manifest, patch_existing=False)
    if plan.delete_attempt is not None:
        kube.delete("batch/v1", "Job", ns, worker_job_name(name, plan.delete_attempt))
    if plan.delete_validator:
        kube.delete("batch/v1", "Job", ns, validator_job_name(name))
    if plan.create_attempt is not None:
        deadline = ctx.spec.run_policy.active_deadline_seconds
        started = _parse_time(plan.status.start_time)
        remaining = None
        if deadline and started:
            remaining = int(deadline - (datetime.now(UTC) - started).total_seconds())
        kube.ensure(build_worker_job(ctx, plan.create_attempt, remaining), patch_existing=False)
    if plan.suspend_attempt is not None:
        kube.ensure(
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"name": worker_job_name(name, plan.status.attempt), "namespace": ns},
                "spec": {"suspend": plan.suspend_attempt},
            }
        )
    if plan.create_validator:
        kube.ensure(build_validator_job(ctx), patch_existing=False)
    if plan.delete_self:
        kube.delete(API_VERSION, "TrainingJob", ns, name)
