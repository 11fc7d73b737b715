"""The ModelDeployment reconciler's pure parts: what it reads from children and TrainingJobs, and the runbook
order of its actions. Its passes against a real API server are in tests/realapi."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flownexus.api.modeldeployment import ModelDeploymentSpec, ModelDeploymentStatus
from flownexus.api.neuralcluster import NeuralClusterSpec
from flownexus.modeldeployment import reconciler as rec
from flownexus.modeldeployment.children import ServingContext
from flownexus.modeldeployment.decide import DeploymentView, Measurement, Observed, decide, now_str
from flownexus.prometheus import CanarySelector, PrometheusError, QueryResult, Rejected
from flownexus.runtime.cache import Cache
from flownexus.runtime.controller import Action, Apply, Emit
from tests.factories import model_deployment, neural_cluster, training_job

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
Manifest = dict[str, Any]


def validated_tj(name: str = "digits", version: str = "1.0.0") -> Manifest:
    return training_job(
        name,
        **{
            "spec.output": {"modelName": "digits", "version": version},
            "status": {
                "phase": "Succeeded",
                "conditions": [{"type": "Validated", "status": "True"}],
                "validation": {"passed": True, "accuracy": 0.97, "latencyP95Ms": 1.5},
                "artifacts": {"modelArchive": f"/artifacts/default/{name}/model-store/digits.mar"},
            },
        },
    )


def md(version: str = "1.0.0", tj: str = "digits", **overrides: Any) -> Manifest:
    obj = model_deployment(
        **{
            "spec.model": {"trainingJobRef": {"name": tj}, "version": version},
            "spec.rollout.interval": "1m",
            **overrides,
        }
    )
    obj["metadata"].update(uid="uid-1", generation=1)
    return obj


class Prom:
    """A MetricsProvider with fixed answers: error-rate queries, then p99 queries."""

    def __init__(self, error_rate: QueryResult, p99: QueryResult) -> None:
        self.error_rate, self.p99 = error_rate, p99
        self.queries: list[str] = []

    def query(self, promql: str) -> QueryResult:
        self.queries.append(promql)
        return self.p99 if promql.startswith("histogram_quantile") else self.error_rate


# ---- pure observations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dep", "expected"),
    [
        (None, None),
        (
            {
                "metadata": {"generation": 2},
                "spec": {"replicas": 3, "template": {"metadata": {"labels": {"flownexus.io/version": "1.0.0"}}}},
                "status": {
                    "observedGeneration": 2,
                    "replicas": 3,
                    "updatedReplicas": 3,
                    "readyReplicas": 3,
                    "availableReplicas": 3,
                },
            },
            DeploymentView(replicas=3, ready=3, version="1.0.0", rolled_out=True),
        ),
        (  # the HPA scaled it up and the new pod is still loading the model: no rollout
            {
                "metadata": {"generation": 2},
                "spec": {"replicas": 2, "template": {"metadata": {"labels": {"flownexus.io/version": "1.0.0"}}}},
                "status": {
                    "observedGeneration": 2,
                    "replicas": 2,
                    "updatedReplicas": 2,
                    "readyReplicas": 1,
                    "availableReplicas": 1,
                },
            },
            DeploymentView(replicas=2, ready=1, version="1.0.0", rolled_out=True),
        ),
        (  # the controller has not seen the new template yet
            {
                "metadata": {"generation": 3},
                "spec": {"replicas": 3, "template": {"metadata": {"labels": {"flownexus.io/version": "2.0.0"}}}},
                "status": {"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "readyReplicas": 3},
            },
            DeploymentView(replicas=3, ready=3, version="2.0.0", rolled_out=False),
        ),
        (  # old pods still around
            {
                "metadata": {"generation": 3},
                "spec": {"replicas": 2, "template": {"metadata": {"labels": {}}}},
                "status": {
                    "observedGeneration": 3,
                    "replicas": 3,
                    "updatedReplicas": 2,
                    "readyReplicas": 3,
                    "availableReplicas": 3,
                    "conditions": [
                        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "m"}
                    ],
                },
            },
            DeploymentView(replicas=2, ready=3, version=None, rolled_out=False, failure="m"),
        ),
    ],
)
def test_deployment_view(dep: Manifest | None, expected: DeploymentView | None) -> None:
    assert rec.deployment_view(dep) == expected


@pytest.mark.parametrize(
    ("status", "problem", "final"),
    [
        (None, "does not exist", False),
        ({"phase": "Running"}, "is not Validated yet (phase Running)", False),
        ({"phase": "Succeeded", "conditions": [{"type": "Validated", "status": "False"}]}, "not Validated", False),
        ({"phase": "Failed", "reason": "ValidationFailed", "message": "accuracy 0.5 < 0.85"}, "accuracy 0.5", True),
        (
            {"phase": "Succeeded", "conditions": [{"type": "Validated", "status": "True"}]},
            "has no status.artifacts.modelArchive",
            True,
        ),
        (
            {
                "phase": "Succeeded",
                "conditions": [{"type": "Validated", "status": "True"}],
                "artifacts": {"modelArchive": "/etc/passwd.mar"},
            },
            "is not under /artifacts",
            True,
        ),
    ],
)
def test_only_a_validated_trainingjob_is_servable(status: Manifest | None, problem: str, final: bool) -> None:
    tj = None if status is None else training_job(status=status)
    source, why, is_final = rec.source_from_training_job("1.0.0", "digits", tj)
    assert source is None and problem in why and is_final is final
    assert why.startswith("spec.model.trainingJobRef: TrainingJob digits")


def test_a_validated_trainingjob_gives_its_archive_version_and_metrics() -> None:
    source, why, _ = rec.source_from_training_job("1.0.0", "digits", validated_tj(version="1.2.3"))
    assert why == "" and source is not None
    assert source.archive == "default/digits/model-store/digits.mar"
    assert source.archive_version == "1.2.3" and source.training_job == "digits"
    assert source.metrics == {"accuracy": 0.97, "latencyP95Ms": 1.5}


@pytest.mark.parametrize(("path", "ok"), [("models/digits.mar", True), ("../../etc/x.mar", False)])
def test_archive_path_stays_inside_the_store(path: str, ok: bool) -> None:
    spec = ModelDeploymentSpec.model_validate(md(**{"spec.model": {"archivePath": path, "version": "1.0.0"}})["spec"])
    source, why, final = rec.resolve_source(spec, Cache(), "default")
    assert (source is not None) is ok
    if not ok:
        assert final and why.startswith("spec.model.archivePath")


def test_the_rollback_runbook_is_the_order_of_the_actions() -> None:
    """Record first (the loop), then: stable, all traffic to stable, the Event, canary to zero."""
    obj = md("2.0.0", tj="digits-v2")
    spec = ModelDeploymentSpec.model_validate(obj["spec"])
    ctx = ServingContext(obj, spec, NeuralClusterSpec.model_validate(neural_cluster()["spec"]), "demo-artifacts")
    st = ModelDeploymentStatus.model_validate(
        {"phase": "Canary", "stable": {"version": "1.0.0", "archive": "a/1.mar"},
         "canary": {"version": "2.0.0", "archive": "a/2.mar", "weight": 20, "step": 0, "failedChecks": 2,
                    "stepStartedAt": now_str(T0)}}
    )  # fmt: skip
    canary = DeploymentView(replicas=1, ready=1, version="2.0.0", rolled_out=True)
    stable = DeploymentView(replicas=2, ready=2, version="1.0.0", rolled_out=True)
    bad = Measurement(error_rate=0.5, latency_p99_ms=10.0)
    observed = Observed(now=T0 + timedelta(minutes=1), stable=stable, canary=canary, measurement=bad)
    plan = decide(spec, st, observed, 1)
    assert plan.status.phase == "RolledBack"
    todo = rec.actions(ctx, plan, observed)
    steps = [(type(a).__name__, _target(a)) for a in todo]
    tail = steps[steps.index(("Apply", "Deployment")) + 1 :]
    assert tail == [("Apply", "Service"), ("Emit", "RolledBack"), ("Patch", "Deployment")]
    service = next(a for a in todo if isinstance(a, Apply) and a.manifest["kind"] == "Service")
    assert service.manifest["spec"]["selector"]["flownexus.io/track"] == "stable"


def _target(action: Action) -> str:
    if isinstance(action, Apply):
        return str(action.manifest["kind"])
    return action.reason if isinstance(action, Emit) else action.kind


def test_a_pending_deployment_creates_no_children() -> None:
    obj = md()
    spec = ModelDeploymentSpec.model_validate(obj["spec"])
    ctx = ServingContext(obj, spec, NeuralClusterSpec.model_validate(neural_cluster()["spec"]), "demo-artifacts")
    plan = decide(spec, ModelDeploymentStatus(), Observed(now=T0, source=None, source_problem="not yet"), 1)
    assert [type(a).__name__ for a in rec.actions(ctx, plan, Observed(now=T0))] == ["Emit"]


def test_measure_marks_queries_prometheus_rejects_with_its_error_and_the_query() -> None:
    class Rejecting:
        def query(self, promql: str) -> QueryResult:
            raise PrometheusError("Prometheus rejected the query: parse error")

    obj = md()
    spec = ModelDeploymentSpec.model_validate(obj["spec"])
    ctx = ServingContext(obj, spec, NeuralClusterSpec.model_validate(neural_cluster()["spec"]), "demo-artifacts")
    m = rec.measure(Rejecting(), ctx, CanarySelector("digits", "digits-canary-"))
    assert isinstance(m.error_rate, Rejected) and "parse error" in m.error_rate.reason
    assert "query: " in m.error_rate.reason and isinstance(m.latency_p99_ms, Rejected)


def test_observed_is_only_what_decide_needs() -> None:
    # Observed has defaults for everything but the clock, so tests and the reconciler build it the same way.
    assert Observed(now=T0).source is None
