"""Kopf registrations for ModelDeployment (imported by ``handlers``).

The canary advances on a short timer that exists only while something is under way (its ``when`` filter
is ``canary.wants_tick``, so idle deployments cost nothing). The state lives in status, so the timer needs
no memory of its own and a restarted operator simply resumes; each tick compares ``now`` with
``status.canary.stepStartedAt`` / ``lastAnalysis.time`` to decide whether an analysis is due.
``TemporaryError(delay=…)`` would instead tie the canary's clock to Kopf's retry bookkeeping of one
handler, which an update in the middle of a rollout resets.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, cast

import kopf
from pydantic import ValidationError

from . import API_VERSION, GROUP, VERSION, kube
from .api.common import format_validation_error
from .api.modeldeployment import ModelDeploymentSpec, ModelDeploymentStatus
from .builders.modeldeployment import MD_LABEL, TRACK_LABEL
from .canary import Event, Phase, wants_tick
from .metrics import instrumented
from .reconcilers import modeldeployment as md_reconciler

TICK_S = 10.0
KIND = "ModelDeployment"
# Kopf runs an object's own handlers one at a time, but its timer and the child-Deployment events can
# overlap with them: one lock per ModelDeployment keeps to one pass (one transition) at a time.
_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


def _emitter(body: dict[str, Any]) -> md_reconciler.Emit:
    def emit(event: Event) -> None:
        post = kopf.warn if event.type == "Warning" else kopf.info
        post(cast(kopf.Body, body), reason=event.reason, message=event.message)

    return emit


def run_modeldeployment(namespace: str, name: str) -> None:
    """One pass on the freshest copy of the object (a timer's body may lag behind our last status write)."""
    with _lock_for(namespace, name):
        body = kube.get(API_VERSION, KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        try:
            spec = ModelDeploymentSpec.model_validate(body["spec"])
        except ValidationError as exc:
            lines = format_validation_error(exc)
            kube.patch_status(
                API_VERSION,
                KIND,
                namespace,
                name,
                {
                    "phase": Phase.FAILED.value,
                    "reason": "InvalidSpec",
                    "message": "; ".join(lines),
                    "observedGeneration": body["metadata"].get("generation"),
                },
            )
            kopf.warn(cast(kopf.Body, body), reason="InvalidSpec", message="; ".join(lines))
            raise kopf.PermanentError("invalid spec: " + "; ".join(lines)) from exc
        md_reconciler.run_pass(body, spec, _emitter(body))


@kopf.on.create(GROUP, VERSION, "modeldeployments")
@kopf.on.update(GROUP, VERSION, "modeldeployments", field="spec")
@kopf.on.resume(GROUP, VERSION, "modeldeployments")
@instrumented(KIND)
def reconcile_modeldeployment(namespace: str | None, name: str, **_: Any) -> None:
    if namespace is not None:
        run_modeldeployment(namespace, name)


def _rollout_under_way(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    """The timer's filter: a rollout under way or something to wait for; idle deployments get no timer."""
    try:
        return wants_tick(
            ModelDeploymentSpec.model_validate(dict(spec)), ModelDeploymentStatus.model_validate(dict(status))
        )
    except ValidationError:
        return False  # the create/update handler reports an invalid spec


@kopf.timer(GROUP, VERSION, "modeldeployments", interval=TICK_S, initial_delay=TICK_S, when=_rollout_under_way)
def tick_modeldeployment(namespace: str | None, name: str, **_: Any) -> None:
    """Advance a rollout or a wait by at most one transition."""
    if namespace is not None:
        _instrumented_pass(namespace, name)


@instrumented(KIND)
def _instrumented_pass(namespace: str, name: str) -> None:
    run_modeldeployment(namespace, name)


def _replicas_stale(md_status: dict[str, Any], track: str | None, spec: Any, status: Any) -> bool:
    """Whether status.stable / status.canary shows other replica counts than the Deployment has now (the HPA
    scaled an idle deployment, a pod died): the pass then only rewrites them."""
    shown = md_status.get(track or "") if track in ("stable", "canary") else None
    if not isinstance(shown, dict):
        return False
    now = (int((spec or {}).get("replicas", 1)), int((status or {}).get("readyReplicas") or 0))
    return (shown.get("replicas"), shown.get("readyReplicas") or 0) != now


@kopf.on.event("apps", "v1", "deployments", labels={"app.kubernetes.io/part-of": "flownexus", MD_LABEL: kopf.PRESENT})
def on_serving_deployment(
    labels: kopf.Labels,
    namespace: str | None,
    type: str | None,
    spec: kopf.Spec | None = None,
    status: kopf.Status | None = None,
    **_: Any,
) -> None:
    """A serving Deployment changed: re-run the pass when someone waits for it (readiness), it vanished, or the
    replica counts in status are out of date."""
    if namespace is None:
        return
    name = labels[MD_LABEL]
    md = kube.get(API_VERSION, KIND, namespace, name)
    if md is None:
        return
    md_status = md.get("status") or {}
    phase = md_status.get("phase")
    stale = _replicas_stale(md_status, labels.get(TRACK_LABEL), spec, status)
    if type == "DELETED" or stale or phase in (Phase.PROGRESSING.value, Phase.PROMOTING.value):
        with contextlib.suppress(kopf.PermanentError):  # reported by the ModelDeployment's own handler
            _instrumented_pass(namespace, name)
