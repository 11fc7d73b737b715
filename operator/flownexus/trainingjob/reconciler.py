"""One TrainingJob pass: observe (children from the cache, capacity from the admission queue), decide
(:mod:`.decide`), and turn the plan into actions for the shared loop."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from ..api.trainingjob import TrainingJobSpec, TrainingJobStatus
from ..meta import Manifest, parse_time
from ..neuralcluster.reconciler import ClusterView, cluster_view
from ..runtime.cache import Cache, controller_uid
from ..runtime.client import Client
from ..runtime.controller import Action, Apply, Delete, Emit, Outcome, Patch, parse_spec
from ..store import dataset_problem
from .children import (
    TrainingContext,
    build_service,
    build_trainer_rbac,
    build_validator_job,
    build_worker_job,
    champion_paths,
    resolve_served_latency,
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
ERROR_CHARS = 1000  # of a pod's error or an Event's message copied into status
POD_GRACE_S = 5.0  # the Job controller's first try at creating pods


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
            TrainingContext(
                owner=obj, spec=spec, cluster=cluster.spec, artifact_claim=cluster.claim, store=cluster.store
            )
            if cluster.spec is not None and (cluster.claim is not None or cluster.store is not None)
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
        w_state = job_state(worker)
        worker_error, retryable = "", True
        if worker is not None and w_state is JobState.FAILED and status.phase not in FINISHED:
            worker_error, retryable = self._worker_error(namespace, worker)
        create_error = ""
        if status.phase not in FINISHED:
            pending = validator if v_state is JobState.STARTING else worker if w_state is JobState.STARTING else None
            if pending is not None and _pods_missing(pending):
                create_error = self._failed_create(namespace, pending)
        return Observed(
            cluster_ready=cluster.ready,
            cluster_problem=cluster.problem,
            store_problem=(dataset_problem(spec.dataset, cluster.spec) or "") if cluster.spec is not None else "",
            queue_position=position,
            max_workers=limits.max_workers_per_job if limits is not None else 1 << 30,
            worker_job=w_state,
            previous_attempt_present=previous is not None,
            worker_failure=job_failure_reason(worker),
            validator_job=v_state,
            verdict=verdict,
            now=datetime.now(UTC),
            create_error=create_error,
            worker_error=worker_error,
            worker_retryable=retryable,
        )

    def _owned_job(self, owner: Manifest, name: str) -> Manifest | None:
        """Our Job of that name; one that another owner holds counts as missing (the loop then reports it)."""
        job = self.cache.get("Job", owner["metadata"]["namespace"], name)
        return job if job is not None and controller_uid(job) == owner["metadata"]["uid"] else None

    def _failed_create(self, namespace: str, job: Manifest) -> str:
        """The Job controller's newest FailedCreate Event for this Job (by uid): why its pods are refused."""
        selector = f"involvedObject.uid={job['metadata']['uid']},reason=FailedCreate"
        events = self.client.list("Event", namespace, field_selector=selector)
        if not events:
            return ""
        newest = max(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        return str(newest.get("message") or "")[:ERROR_CHARS]

    def _terminations(self, namespace: str, job: Manifest) -> list[tuple[Manifest, Manifest]]:
        """(pod, terminated container state) of the pods of *this* Job (by its uid), as the API lists them."""
        uid = job["metadata"]["uid"]
        pods = self.client.list("Pod", namespace, label_selector=f"batch.kubernetes.io/controller-uid={uid}")
        out = []
        for pod in pods:
            status = pod.get("status") or {}
            for cs in status.get("containerStatuses") or []:
                if (cs.get("state") or {}).get("terminated"):
                    out.append((pod, cs["state"]["terminated"]))
            # A failed init container (the validator's first step) says why the pod never got further; a
            # succeeded one is not a verdict: only the pod's last container has the final word.
            for cs in status.get("initContainerStatuses") or []:
                terminated = (cs.get("state") or {}).get("terminated") or {}
                if terminated and terminated.get("exitCode") != 0:
                    out.append((pod, terminated))
        return out

    def _worker_error(self, namespace: str, job: Manifest) -> tuple[str, bool]:
        """What the failed attempt's pods said last (their termination messages), and whether a restart
        could help: a trainer that found its input wrong says ``retryable: false``."""
        said: list[tuple[str, bool]] = []
        for pod, terminated in self._terminations(namespace, job):
            index = pod["metadata"].get("annotations", {}).get("batch.kubernetes.io/job-completion-index", "?")
            message = str(terminated.get("message") or "").strip()
            if not message or terminated.get("exitCode") == 0:
                continue
            try:
                parsed = json.loads(message)
                text, retryable = str(parsed["error"]), bool(parsed.get("retryable", True))
            except (json.JSONDecodeError, KeyError, TypeError):
                text, retryable = message.splitlines()[-1], True  # the last log line (FallbackToLogsOnError)
            said.append((f"worker {index}: {text}"[:ERROR_CHARS], retryable))
        if not said:
            return "", True
        said.sort(key=lambda item: item[1])  # an input error first: it decides
        return said[0][0], said[0][1]

    def _termination_message(self, namespace: str, job: Manifest) -> dict[str, Any] | None:
        """The verdict the validator wrote (the newest pod's), read only from pods of *this* validator Job."""
        newest_first = sorted(
            self._terminations(namespace, job),
            key=lambda t: t[0]["metadata"].get("creationTimestamp") or "",
            reverse=True,
        )
        for _, terminated in newest_first:
            if terminated.get("message"):
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
                out.append(Apply(build_validator_job(self._validator_context(ctx)), create_only=True))
        if plan.suspend_attempt is not None:
            job = worker_job_name(name, plan.status.attempt)
            out.append(Patch("Job", job, {"spec": {"suspend": plan.suspend_attempt}}))
        out += [Emit(event_type, reason, message) for event_type, reason, message in plan.events]
        if plan.delete_self:
            out.append(Delete(KIND, name))
        return out

    def _validator_context(self, ctx: TrainingContext) -> TrainingContext:
        """The validator's context, resolved from the cache at the moment it starts: where the model of
        spec.validation.champion's ModelDeployment lies, and the serving settings the latency gate uses."""
        champion = ctx.spec.validation.champion
        md = self.cache.get("ModelDeployment", ctx.namespace, champion.model_deployment) if champion else None
        paths = None
        if champion is not None:
            md_store = None
            if md is not None:
                cluster_ref = ((md.get("spec") or {}).get("clusterRef") or {}).get("name", "")
                md_store = cluster_view(self.cache, ctx.namespace, cluster_ref).store
            paths = champion_paths(champion.model_deployment, md, md_store, ctx.store)
        serving = (md.get("spec") or {}).get("serving") if md is not None else None
        served = resolve_served_latency(ctx.spec.validation.served_latency, serving)
        validation = ctx.spec.validation.model_copy(update={"served_latency": served})
        return replace(ctx, champion=paths, spec=ctx.spec.model_copy(update={"validation": validation}))


def _pods_missing(job: Manifest) -> bool:
    """Fewer pods than the Job wants, a few seconds after it was created (the Job controller's first try)."""
    st, spec = job.get("status") or {}, job.get("spec") or {}
    present = sum(int(st.get(k) or 0) for k in ("active", "succeeded", "failed", "terminating"))
    created = parse_time(job["metadata"].get("creationTimestamp"))
    young = created is not None and (datetime.now(UTC) - created).total_seconds() < POD_GRACE_S
    return present < int(spec.get("parallelism", 1)) and not young


def _remaining(ctx: TrainingContext, plan: Plan) -> int | None:
    deadline = ctx.spec.run_policy.active_deadline_seconds
    started = parse_time(plan.status.start_time)
    if deadline and started:
        return int(deadline - (datetime.now(UTC) - started).total_seconds())
    return None
