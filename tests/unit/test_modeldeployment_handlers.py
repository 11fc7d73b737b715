"""The Kopf registrations for ModelDeployment: when the timer and the child-Deployment watch run a pass."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from flownexus import handlers_modeldeployment as h
from flownexus import kube
from tests.factories import model_deployment


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    ran: list[tuple[str, str]] = []
    monkeypatch.setattr(h, "run_modeldeployment", lambda ns, name: ran.append((ns, name)))
    return ran


def tick(obj: dict[str, Any]) -> None:
    """What Kopf does: the timer runs only for objects its ``when`` filter admits."""
    if h._rollout_under_way(spec=obj["spec"], status=obj.get("status", {})):
        h.tick_modeldeployment(namespace="default", name="digits")


AVAILABLE = {"phase": "Available", "stable": {"version": "1.0.0"}}


@pytest.mark.parametrize(
    ("status", "version", "runs"),
    [
        ({}, "1.0.0", True),  # new: waits for its model
        (AVAILABLE, "1.0.0", False),  # idle: nothing to query, nothing to write
        (AVAILABLE, "2.0.0", True),  # a new version
        ({**AVAILABLE, "phase": "Canary", "canary": {"version": "2.0.0"}}, "2.0.0", True),
        ({**AVAILABLE, "phase": "Promoting"}, "2.0.0", True),
    ],
)
def test_the_timer_runs_a_pass_only_when_something_is_under_way(
    passes: list[tuple[str, str]], status: dict[str, Any], version: str, runs: bool
) -> None:
    tick(model_deployment(**{"spec.model.version": version, "status": status}))
    assert passes == ([("default", "digits")] if runs else [])


def test_the_timer_ignores_an_invalid_spec(passes: list[tuple[str, str]]) -> None:
    tick(model_deployment(**{"spec.rollout.steps": [50, 10]}))
    assert passes == []


@pytest.mark.parametrize(
    ("phase", "event", "runs"),
    [
        ("Available", "MODIFIED", False),
        ("Progressing", "MODIFIED", True),
        ("Promoting", None, True),
        ("Canary", "DELETED", True),
    ],
)
def test_child_deployment_events_wake_only_waiting_deployments(
    monkeypatch: pytest.MonkeyPatch, passes: list[tuple[str, str]], phase: str, event: str | None, runs: bool
) -> None:
    monkeypatch.setattr(kube, "get", lambda *a: model_deployment(status={"phase": phase}))
    h.on_serving_deployment(labels={"flownexus.io/modeldeployment": "digits"}, namespace="default", type=event)
    assert passes == ([("default", "digits")] if runs else [])


def test_an_invalid_spec_fails_with_the_field_path(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = model_deployment(**{"spec.serving.batchSize": 0})
    bad["metadata"]["generation"] = 4
    written: list[dict[str, Any]] = []
    warned: list[str] = []
    monkeypatch.setattr(kube, "get", lambda *a: bad)
    monkeypatch.setattr(kube, "patch_status", lambda *a: written.append(a[-1]))
    monkeypatch.setattr(kopf, "warn", lambda body, reason, message: warned.append(message))
    with pytest.raises(kopf.PermanentError, match=r"spec\.serving\.batchSize"):
        h.run_modeldeployment("default", "digits")
    assert written == [
        {"phase": "Failed", "reason": "InvalidSpec", "message": written[0]["message"], "observedGeneration": 4}
    ]
    assert "spec.serving.batchSize" in warned[0]


@pytest.mark.parametrize(
    ("shown", "replicas", "ready", "runs"),
    [
        ({"version": "1.0.0", "replicas": 1, "readyReplicas": 1}, 1, 1, False),  # up to date: an idle deployment
        ({"version": "1.0.0", "replicas": 1, "readyReplicas": 1}, 2, 1, True),  # the HPA scaled it up
        ({"version": "1.0.0", "replicas": 2, "readyReplicas": 1}, 2, 2, True),  # the new pod became ready
    ],
)
def test_child_deployment_events_refresh_stale_replica_counts(
    monkeypatch: pytest.MonkeyPatch,
    passes: list[tuple[str, str]],
    shown: dict[str, Any],
    replicas: int,
    ready: int,
    runs: bool,
) -> None:
    monkeypatch.setattr(kube, "get", lambda *a: model_deployment(status={"phase": "Available", "stable": shown}))
    labels = {"flownexus.io/modeldeployment": "digits", "flownexus.io/track": "stable"}
    deployment = {"spec": {"replicas": replicas}, "status": {"readyReplicas": ready}}
    h.on_serving_deployment(labels=labels, namespace="default", type="MODIFIED", **deployment)
    assert passes == ([("default", "digits")] if runs else [])
