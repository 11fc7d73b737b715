"""Kopf registrations only: each handler parses the object, calls a reconciler, writes status once."""

from __future__ import annotations

import logging
from typing import Any

import kopf
from pydantic import BaseModel, ValidationError

from . import GROUP, VERSION
from .api import KINDS
from .api.common import format_validation_error
from .api.neuralcluster import NeuralClusterSpec, NeuralClusterStatus
from .metrics import instrumented
from .reconcilers import neuralcluster as nc_reconciler
from .settings import Settings

log = logging.getLogger(__name__)
_SETTINGS: Settings | None = None
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
def active_jobs_by_cluster(
    spec: kopf.Spec, status: kopf.Status, namespace: str | None, name: str, **_: Any
) -> Any:
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
        kopf.info(
            body, reason="Ready", message=f"artifact store {outcome.status.artifact_claim} is available"
        )


def registered_kinds() -> list[str]:
    """The kinds this operator watches (for --help and tests)."""
    return [k.plural for k in KINDS]
