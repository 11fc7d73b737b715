"""The TrainingJob life cycle as a pure decision: spec, last status and what the children look like in,
a plan out. Table-tested without a cluster; a restarted operator takes the same decision from the same status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from ..api.trainingjob import Artifacts, TrainingJobSpec, TrainingJobStatus, ValidationResult
from ..meta import Manifest, now, parse_time, set_condition

FINISHED = {"Succeeded", "Failed"}
# While pods are missing, how often to look for the Job controller's FailedCreate (it changes no Job field).
POD_CHECK_S = 10.0


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


# ---- reading TrainingJobs as stored (for admission and the NeuralCluster's counts) -------------------


def _attempt(tj: Manifest) -> int:
    return int((tj.get("status") or {}).get("attempt") or 0)


def _stored_phase(tj: Manifest) -> str:
    return str((tj.get("status") or {}).get("phase") or "")


def cluster_of(tj: Manifest) -> str:
    return str(((tj.get("spec") or {}).get("clusterRef") or {}).get("name") or "")


def uses_capacity(tj: Manifest) -> bool:
    """Admitted and not finished: an attempt exists (running, restarting, validating)."""
    return _attempt(tj) >= 1 and _stored_phase(tj) not in FINISHED


def is_waiting(tj: Manifest) -> bool:
    spec = tj.get("spec") or {}
    suspended = bool((spec.get("runPolicy") or {}).get("suspend"))
    return (
        _attempt(tj) == 0
        and _stored_phase(tj) not in FINISHED
        and not suspended
        and not tj["metadata"].get("deletionTimestamp")
    )


@dataclass(frozen=True)
class Observed:
    """What the reconciler saw this pass."""

    cluster_ready: bool
    cluster_problem: str
    # None: admitted (a slot of limits.maxConcurrentTrainingJobs is ours); n: n-th in the cluster's queue.
    queue_position: int | None
    max_workers: int
    worker_job: JobState
    previous_attempt_present: bool  # the Job of attempt - 1 still exists (its pods may still run)
    worker_failure: str
    validator_job: JobState
    verdict: dict[str, Any] | None  # the validator's termination message, once it has finished
    now: datetime
    # Why the Job controller cannot create the pods of the current attempt or validator (its FailedCreate
    # Event: Pod Security, quota, a missing ServiceAccount); empty while it can.
    create_error: str = ""
    # A failed attempt's own words (a worker's termination message), and whether a restart could help.
    worker_error: str = ""
    worker_retryable: bool = True
    # The spec asks for something the NeuralCluster's store cannot give (a dataset URI in another bucket or kind
    # of store): both are immutable, so the job fails before it starts.
    store_problem: str = ""


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

    attempt = st.attempt or 0
    if attempt == 0:
        return _admit(spec, plan, obs, generation)
    # Admission checks (cluster ready, workers within limits) are over once an attempt exists: a running
    # job is never pinned by a later change of its NeuralCluster.

    deadline = spec.run_policy.active_deadline_seconds
    started = parse_time(st.start_time)
    if deadline and started and (obs.now - started).total_seconds() > deadline:
        plan.delete_attempt = attempt
        plan.delete_validator = True
        return _fail(
            plan, "DeadlineExceeded", f"ran longer than spec.runPolicy.activeDeadlineSeconds ({deadline}s)", generation
        )

    if st.phase == "Validating" or obs.worker_job is JobState.SUCCEEDED:
        return _validation_step(plan, obs, generation)

    if obs.worker_job is JobState.MISSING:
        if obs.previous_attempt_present:
            # Like JobSet: the next gang starts only once the old one is gone, so two rank 0s never share
            # the run directory.
            plan.delete_attempt = attempt - 1
            _phase(
                plan,
                "Restarting",
                st.reason or "WorkerFailed",
                f"attempt {attempt} starts once the pods of attempt {attempt - 1} are gone",
                generation,
            )
            return plan
        if not obs.cluster_ready:
            _phase(plan, st.phase or "Created", "ClusterNotReady", obs.cluster_problem, generation)
            plan.requeue_after = 15
            return plan
        plan.create_attempt = attempt  # a new attempt, deleted behind our back, or the create did not land
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
        failure = f"{obs.worker_failure}; {obs.worker_error}" if obs.worker_error else obs.worker_failure
        if obs.worker_error and not obs.worker_retryable:
            # The trainer says its input is wrong: every restart would fail the same way.
            return _fail(plan, "InputError", f"attempt {attempt}: {obs.worker_error}", generation)
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
                f"attempt {attempt} failed ({failure}) and spec.runPolicy.maxRestarts "
                f"({spec.run_policy.max_restarts}) is used up",
                generation,
            )
        st.attempt = attempt + 1
        plan.delete_attempt = attempt  # foreground: the Job goes only after its pods; then attempt + 1 starts
        st.conditions = set_condition(
            st.conditions,
            "Restarting",
            True,
            "WorkerFailed",
            f"attempt {attempt} failed: {failure}",
            generation,
        )
        _phase(
            plan,
            "Restarting",
            "WorkerFailed",
            f"attempt {attempt} failed ({failure}); attempt {attempt + 1} resumes from the latest "
            "checkpoint once its pods are gone",
            generation,
        )
        return plan
    if obs.worker_job is JobState.STARTING and st.phase != "Running":
        # Keep Created / Restarting until the whole gang runs; once Running, pods finishing one by one
        # at the end must not flip the phase back.
        if _pods_refused(plan, obs, f"attempt {attempt}", generation):
            return plan
        if st.phase not in ("Created", "Restarting") or st.reason == "FailedCreate":
            _phase(plan, "Created", "Starting", f"attempt {attempt}: worker pods are starting", generation)
        plan.requeue_after = POD_CHECK_S  # the Job controller's refusals change nothing we watch
        return plan
    _pods_refused(plan, obs, f"attempt {attempt}", generation)
    st.conditions = set_condition(st.conditions, "Restarting", False, "Running", "", generation)
    _phase(plan, "Running", "Training", f"attempt {attempt} is training", generation)
    return plan


def _pods_refused(plan: Plan, obs: Observed, who: str, generation: int | None) -> bool:
    """``Stalled=True, reason FailedCreate`` with the Job controller's words while it cannot create pods;
    the condition turns False once it can. True while the pods are refused."""
    st = plan.status
    stalled = next((c for c in st.conditions if c.type == "Stalled"), None)
    if obs.create_error:
        message = f"{who}: the Job controller cannot create pods: {obs.create_error}"
        if stalled is None or stalled.status != "True" or stalled.message != message:
            plan.events.append(("Warning", "FailedCreate", message))
        st.conditions = set_condition(st.conditions, "Stalled", True, "FailedCreate", message, generation)
        st.reason, st.message = "FailedCreate", message
        plan.requeue_after = POD_CHECK_S
        return True
    if stalled is not None and stalled.reason == "FailedCreate" and stalled.status == "True":
        created = f"{who}: pods created"
        st.conditions = set_condition(st.conditions, "Stalled", False, "PodsCreated", created, generation)
    return False


def _admit(spec: TrainingJobSpec, plan: Plan, obs: Observed, generation: int | None) -> Plan:
    """Before the first attempt: suspended, cluster not ready, too many workers, or waiting in the queue."""
    st = plan.status
    if obs.store_problem:
        return _fail(plan, "InvalidDataset", obs.store_problem, generation)
    if spec.run_policy.suspend:
        _phase(plan, "Suspended", "Suspended", "spec.runPolicy.suspend is true; nothing started", generation)
        return plan
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
    if obs.queue_position is not None:
        st.queue_position = obs.queue_position
        _phase(
            plan,
            "Pending",
            "WaitingForCapacity",
            f"number {obs.queue_position} in the queue: the NeuralCluster's limits.maxConcurrentTrainingJobs "
            "is reached",
            generation,
        )
        plan.requeue_after = 60
        return plan
    st.queue_position = None
    st.attempt = 1
    st.start_time = st.start_time or now()
    st.conditions = set_condition(st.conditions, "Created", True, "Created", "attempt 1 created", generation)
    plan.create_attempt = 1
    _phase(plan, "Created", "Created", "attempt 1 of the worker gang created", generation)
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
        if not _pods_refused(plan, obs, "the validator", generation):
            _phase(plan, "Validating", "Validating", "the validator Job measures the model", generation)
            if obs.validator_job is JobState.STARTING:
                plan.requeue_after = POD_CHECK_S
        return plan
    if obs.verdict is None and obs.validator_job is JobState.SUCCEEDED:
        return _fail(plan, "ValidatorError", "the validator finished without writing a verdict", generation)
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
        model_latency_p95_ms=verdict.get("modelLatencyP95Ms"),
        balanced_accuracy=verdict.get("balancedAccuracy"),
        baseline_trivial=(verdict.get("baselines") or {}).get("trivial"),
        baseline_linear=(verdict.get("baselines") or {}).get("linear"),
        champion_score=(verdict.get("champion") or {}).get("score"),
        overfitting_gap=verdict.get("overfittingGap"),
        macro_f1=verdict.get("macroF1"),
        roc_auc=verdict.get("rocAuc"),
        accuracy_interval=verdict.get("accuracyInterval"),
        converged=verdict.get("converged"),
        cross_validation_mean=(verdict.get("crossValidation") or {}).get("mean"),
        cross_validation_std=(verdict.get("crossValidation") or {}).get("std"),
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
    finished = parse_time(plan.status.completion_time)
    if ttl is not None and finished is not None:
        left = ttl - (obs.now - finished).total_seconds()
        if left <= 0:
            plan.delete_self = True
        else:
            plan.requeue_after = left
    return plan
