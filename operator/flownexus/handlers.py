"""Kopf registrations only: each handler parses the object, calls a reconciler, writes status once."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, cast

import kopf
from pydantic import BaseModel, ValidationError

from . import GROUP, VERSION, kube
from .api.common import format_validation_error
from .api.neuralcluster import NeuralClusterSpec, NeuralClusterStatus
from .api.trainingjob import TrainingJobSpec, TrainingJobStatus
from .builders.trainingjob import TrainingContext
from .metrics import instrumented
from .reconcilers import neuralcluster as nc_reconciler
from .reconcilers import trainingjob as tj_reconciler
from .settings import Settings

log = logging.getLogger(__name__)
_SETTINGS: Settings | None = None
POD_OWNED_STATUS = {"progress", "best_metrics", "latest_checkpoint"}
ACTIVE_TJ_PHASES = {"Pending", "Created", "Running", "Restarting", "Validating"}


def configure(settings: Settings) -> None:
    """Remember the process settings for the startup handler."""
    global _SETTINGS
    _SETTINGS = settings


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Kopf's bookkeeping goes to annotations so that our status stays exactly the typed schema.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 8
    log.info(
        "flownexus operator starting (%s)",
        "cluster-wide" if _SETTINGS is None or _SETTINGS.cluster_wide else ", ".join(_SETTINGS.namespaces),
    )


def parse_spec(model: type[BaseModel], spec: Any, body: Any) -> Any:
    """Parse a spec through the API model; a spec that can never work is a PermanentError with the paths."""
    try:
        return model.model_validate(dict(spec))
    except ValidationError as exc:
        lines = format_validation_error(exc)
        kopf.warn(body, reason="InvalidSpec", message="; ".join(lines))
        raise kopf.PermanentError("invalid spec: " + "; ".join(lines)) from exc


# Indexes keep per-cluster counts in memory, fed by watch events (no polling).
@kopf.index(GROUP, VERSION, "trainingjobs")
def active_jobs_by_cluster(spec: kopf.Spec, status: kopf.Status, namespace: str | None, name: str, **_: Any) -> Any:
    if dict(status).get("phase", "Pending") in ACTIVE_TJ_PHASES:
        return {(namespace, dict(spec).get("clusterRef", {}).get("name")): name}
    return None


@kopf.index(GROUP, VERSION, "modeldeployments")
def deployments_by_cluster(spec: kopf.Spec, namespace: str | None, name: str, **_: Any) -> Any:
    return {(namespace, dict(spec).get("clusterRef", {}).get("name")): name}


@kopf.on.create(GROUP, VERSION, "neuralclusters")
@kopf.on.update(GROUP, VERSION, "neuralclusters")
@kopf.on.resume(GROUP, VERSION, "neuralclusters")
@kopf.timer(GROUP, VERSION, "neuralclusters", interval=60, idle=30)
@instrumented("NeuralCluster")
def reconcile_neuralcluster(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    patch: kopf.Patch,
    namespace: str | None,
    name: str,
    **kwargs: Any,
) -> None:
    active_jobs_by_cluster: kopf.Index[Any, str] = kwargs["active_jobs_by_cluster"]
    deployments_by_cluster: kopf.Index[Any, str] = kwargs["deployments_by_cluster"]
    parsed = parse_spec(NeuralClusterSpec, spec, body)
    current = NeuralClusterStatus.model_validate(dict(status))
    key = (namespace, name)
    outcome = nc_reconciler.reconcile(
        dict(body),
        parsed,
        current,
        active_jobs=len(active_jobs_by_cluster.get(key, [])),
        deployments=len(deployments_by_cluster.get(key, [])),
    )
    patch.status.update(outcome.status.to_wire())
    if outcome.waiting_for:
        kopf.info(body, reason="Waiting", message=outcome.waiting_for)
        raise kopf.TemporaryError(f"Waiting for {outcome.waiting_for}", delay=15)
    if current.phase != "Ready":
        kopf.info(body, reason="Ready", message=f"artifact store {outcome.status.artifact_claim} is available")


def run_trainingjob(body: dict[str, Any], active_jobs: kopf.Index[Any, str] | None) -> None:
    """One reconcile pass of a TrainingJob: observe, decide, act, write status once."""
    meta = body["metadata"]
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    status = TrainingJobStatus.model_validate(body.get("status") or {})
    try:
        spec = TrainingJobSpec.model_validate(body["spec"])
    except ValidationError as exc:
        lines = format_validation_error(exc)
        kube.patch_status(
            f"{GROUP}/{VERSION}",
            "TrainingJob",
            namespace,
            name,
            {"phase": "Failed", "reason": "InvalidSpec", "message": "; ".join(lines), "observedGeneration": generation},
        )
        kopf.warn(cast(kopf.Body, body), reason="InvalidSpec", message="; ".join(lines))
        raise kopf.PermanentError("invalid spec: " + "; ".join(lines)) from exc
    cluster_spec, claim, problem = nc_reconciler.cluster_for(namespace, spec.cluster_ref.name)
    ctx = (
        TrainingContext(owner=body, spec=spec, cluster=cluster_spec, artifact_claim=claim)
        if cluster_spec is not None and claim is not None
        else None
    )
    running = set(active_jobs.get((namespace, spec.cluster_ref.name), [])) if active_jobs is not None else set()
    running.discard(name)
    limit = cluster_spec.limits if cluster_spec is not None else None
    observed = tj_reconciler.observe(
        ctx,
        status,
        problem,
        capacity_free=limit is None or len(running) < limit.max_concurrent_training_jobs,
        max_workers=limit.max_workers_per_job if limit is not None else 1 << 30,
        namespace=namespace,
        name=name,
    )
    plan = tj_reconciler.decide(spec, status, observed, generation)
    if ctx is not None:
        tj_reconciler.execute(ctx, plan)
    # Rank 0 owns the live fields (it patches them itself); never overwrite them with what we read earlier.
    kube.patch_status(
        f"{GROUP}/{VERSION}",
        "TrainingJob",
        namespace,
        name,
        plan.status.model_dump(by_alias=True, exclude_none=True, mode="json", exclude=POD_OWNED_STATUS),
    )
    for event_type, reason, message in plan.events:
        (kopf.warn if event_type == "Warning" else kopf.info)(cast(kopf.Body, body), reason=reason, message=message)
    if plan.requeue_after is not None:
        raise kopf.TemporaryError(f"{plan.status.reason}: {plan.status.message}", delay=plan.requeue_after)
    if plan.status.reason == "WaitingForCapacity":
        raise kopf.TemporaryError("waiting for capacity", delay=30)


@kopf.on.create(GROUP, VERSION, "trainingjobs")
@kopf.on.update(GROUP, VERSION, "trainingjobs", field="spec")
@kopf.on.resume(GROUP, VERSION, "trainingjobs")
@instrumented("TrainingJob")
def reconcile_trainingjob(body: kopf.Body, **kwargs: Any) -> None:
    run_trainingjob(dict(body), kwargs.get("active_jobs_by_cluster"))


def _ttl_pending(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    run_policy = dict(spec).get("runPolicy") or {}
    return run_policy.get("ttlSecondsAfterFinished") is not None and dict(status).get("phase") in (
        tj_reconciler.FINISHED
    )


# Only finished jobs with a TTL have this timer: it deletes them when their time is up.
@kopf.timer(GROUP, VERSION, "trainingjobs", interval=15, when=_ttl_pending)
def expire_trainingjob(body: kopf.Body, **kwargs: Any) -> None:
    with contextlib.suppress(kopf.TemporaryError):
        run_trainingjob(dict(body), kwargs.get("active_jobs_by_cluster"))


@kopf.on.event(
    "batch", "v1", "jobs", labels={"app.kubernetes.io/part-of": "flownexus", "flownexus.io/trainingjob": kopf.PRESENT}
)
@instrumented("TrainingJob")
def on_training_child_job(labels: kopf.Labels, namespace: str | None, type: str | None, **kwargs: Any) -> None:
    """A worker or validator Job changed: re-run its TrainingJob's pass (event-driven, no polling)."""
    if namespace is None:
        return
    tj = kube.get(f"{GROUP}/{VERSION}", "TrainingJob", namespace, labels["flownexus.io/trainingjob"])
    if tj is None or ((tj.get("status") or {}).get("phase") in tj_reconciler.FINISHED and type != "DELETED"):
        return
    with contextlib.suppress(kopf.TemporaryError):  # the TrainingJob's own handler owns retries
        run_trainingjob(tj, kwargs.get("active_jobs_by_cluster"))


# ModelDeployment registrations live in their own module; importing it registers them with Kopf.
from . import handlers_modeldeployment as _modeldeployment  # noqa: E402,F401
