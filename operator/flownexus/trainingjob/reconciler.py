"""One TrainingJob pass: observe (children from the cache, capacity from the admission queue), decide
(:mod:`.decide`), and turn the plan into actions for the shared loop."""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime
from typing import Any

from ..api.trainingjob import TrainingJobSpec, TrainingJobStatus
from ..meta import Manifest, parse_time
from ..neuralcluster.reconciler import ClusterView, cluster_view
from ..runtime.cache import Cache, controller_uid
from ..runtime.client import Client
from ..runtime.controller import Action, Apply, Delete, Emit, Outcome, Patch, parse_spec
from .children import (
    TrainingContext,
    build_service,
    build_trainer_rbac,
    build_validator_job,
    build_worker_job,
    validator_job_name,
    worker_job_name,
)
from .decide import (
    FINISHED,
    JobState,
    Observed,
    Plan,
    cluster_of,
    decide,
    is_waiting,
    job_failure_reason,
    job_state,
    uses_capacity,
)

log = logging.getLogger(__name__)
KIND = "TrainingJob"
POD_OWNED_STATUS = frozenset({"progress", "bestMetrics", "latestCheckpoint"})


class Admission:
    """The one serialized place that hands out a NeuralCluster's training slots, first come first served.

    Only admitted jobs use capacity; waiting jobs are ordered by creation time (then name). A slot handed
    out here is remembered until the job's status shows its attempt, so two passes running at once never
    both take the last slot.
    """

    def __init__(self, cache: Cache) -> None:
        self._cache = cache
        self._lock = threading.Lock()
        self._reserved: dict[tuple[str, str], set[str]] = {}

    def admit(self, namespace: str, cluster: str, name: str, limit: int) -> int | None:
        """None when ``name`` may start now; otherwise its 1-based place in the queue."""
        with self._lock:
            jobs = {
                tj["metadata"]["name"]: tj
                for tj in self._cache.list(KIND, namespace, where=lambda o: cluster_of(o) == cluster)
            }
            reserved = self._reserved.setdefault((namespace, cluster), set())
            # A reservation ends once the cache shows the attempt, or the job is gone or finished.
            reserved &= {n for n, tj in jobs.items() if is_waiting(tj)}
            active = {n for n, tj in jobs.items() if uses_capacity(tj)} | reserved
            if name in active:
                return None
            waiting = sorted(
                (tj for n, tj in jobs.items() if is_waiting(tj) and n not in reserved),
                key=lambda tj: (tj["metadata"].get("creationTimestamp") or "", tj["metadata"]["name"]),
            )
            names = [tj["metadata"]["name"] for tj in waiting]
            position = names.index(name) if name in names else len(names)
            free = max(0, limit - len(active))
            if position < free:
                reserved.add(name)
                return None
            return position - free + 1

    def waiting_jobs(self, namespace: str, cluster: str) -> list[str]:
        return [
            tj["metadata"]["name"]
            for tj in self._cache.list(KIND, namespace, where=lambda o: cluster_of(o) == cluster and is_waiting(o))
        ]


class TrainingJobReconciler:
    kind = KIND
    pod_owned_status = POD_OWNED_STATUS

    def __init__(self, client: Client, cache: Cache, admission: Admission) -> None:
        self.client = client
        self.cache = cache
        self.admission = admission

    def reconcile(self, obj: Manifest) -> Outcome:
        spec: TrainingJobSpec = parse_spec(TrainingJobSpec, obj)
        status = TrainingJobStatus.model_validate(obj.get("status") or {})
        meta = obj["metadata"]
        namespace = meta["namespace"]
        cluster = cluster_view(self.cache, namespace, spec.cluster_ref.name)
        ctx = (
            TrainingContext(owner=obj, spec=spec, cluster=cluster.spec, artifact_claim=cluster.claim)
            if cluster.spec is not None and cluster.claim is not None
            else None
        )
        observed = self.observe(obj, spec, status, cluster)
        plan = decide(spec, status, observed, meta.get("generation"))
        wire = plan.status.model_dump(by_alias=True, exclude_none=True, mode="json")
        return Outcome(status=wire, actions=self.actions(obj, ctx, plan), requeue_after=plan.requeue_after)

    def observe(
        self, obj: Manifest, spec: TrainingJobSpec, status: TrainingJobStatus, cluster: ClusterView
    ) -> Observed:
        namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        attempt = status.attempt or 0
        limits = cluster.spec.limits if cluster.spec is not None else None
        position = None
        admissible = limits is not None and not spec.run_policy.suspend
        if attempt == 0 and cluster.ready and admissible and status.phase not in FINISHED:
            assert limits is not None
            if spec.distributed.workers <= limits.max_workers_per_job:
                position = self.admission.admit(
                    namespace, spec.cluster_ref.name, name, limits.max_concurrent_training_jobs
                )
        worker = self._owned_job(obj, worker_job_name(name, attempt)) if attempt else None
        previous = self._owned_job(obj, worker_job_name(name, attempt - 1)) if attempt > 1 else None
        validator = self._owned_job(obj, validator_job_name(name)) if attempt else None
        v_state = job_state(validator)
        verdict = None
        if validator is not None and v_state in (JobState.SUCCEEDED, JobState.FAILED) and status.phase not in FINISHED:
            verdict = self._termination_message(namespace, validator)
        return Observed(
            cluster_ready=cluster.ready,
            cluster_problem=cluster.problem,
            queue_position=position,
            max_workers=limits.max_workers_per_job if limits is not None else 1 << 30,
            worker_job=job_state(worker),
            previous_attempt_present=previous is not None,
            worker_failure=job_failure_reason(worker),
            validator_job=v_state,
            verdict=verdict,
            now=datetime.now(UTC),
        )

    def _owned_job(self, owner: Manifest, name: str) -> Manifest | None:
        """Our Job of that name; one that another owner holds counts as missing (the loop then reports it)."""
        job = self.cache.get("Job", owner["metadata"]["namespace"], name)
        return job if job is not None and controller_uid(job) == owner["metadata"]["uid"] else None

    def _termination_message(self, namespace: str, job: Manifest) -> dict[str, Any] | None:
        """The verdict the validator wrote, read only from pods of *this* validator Job (by its uid)."""
        uid = job["metadata"]["uid"]
        pods = self.client.list("Pod", namespace, label_selector=f"batch.kubernetes.io/controller-uid={uid}")
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

    def actions(self, obj: Manifest, ctx: TrainingContext | None, plan: Plan) -> list[Action]:
        """The plan as ordered actions; creations need the NeuralCluster, deletions never do."""
        name = obj["metadata"]["name"]
        out: list[Action] = []
        if plan.delete_attempt is not None:
            out.append(Delete("Job", worker_job_name(name, plan.delete_attempt), "Foreground"))
        if plan.delete_validator:
            out.append(Delete("Job", validator_job_name(name)))
        if ctx is not None:
            if plan.create_attempt is not None or plan.create_validator:
                out += [Apply(m, create_only=True) for m in build_trainer_rbac(ctx)]
                out.append(Apply(build_service(ctx)))
            if plan.create_attempt is not None:
                out.append(Apply(build_worker_job(ctx, plan.create_attempt, _remaining(ctx, plan)), create_only=True))
            if plan.create_validator:
                out.append(Apply(build_validator_job(ctx), create_only=True))
        if plan.suspend_attempt is not None:
            job = worker_job_name(name, plan.status.attempt)
            out.append(Patch("Job", job, {"spec": {"suspend": plan.suspend_attempt}}))
        out += [Emit(event_type, reason, message) for event_type, reason, message in plan.events]
        if plan.delete_self:
            out.append(Delete(KIND, name))
        return out


def _remaining(ctx: TrainingContext, plan: Plan) -> int | None:
    deadline = ctx.spec.run_policy.active_deadline_seconds
    started = parse_time(plan.status.start_time)
    if deadline and started:
        return int(deadline - (datetime.now(UTC) - started).total_seconds())
    return None
