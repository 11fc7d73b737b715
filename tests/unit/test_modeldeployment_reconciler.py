"""The ModelDeployment reconciler's pure parts: what it reads from children and TrainingJobs, and the runbook
order of its actions. Its passes against a real API server are in tests/realapi."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flownexus.api.modeldeployment import ModelDeploymentSpec, ModelDeploymentStatus
from flownexus.api.neuralcluster import NeuralClusterSpec
from flownexus.modeldeployment import keda
from flownexus.modeldeployment import reconciler as rec
from flownexus.modeldeployment.children import ServingContext
from flownexus.modeldeployment.decide import DeploymentView, Measurement, Observed, Plan, decide, now_str
from flownexus.prometheus import CanarySelector, PrometheusError, QueryResult, Rejected
from flownexus.runtime.cache import Cache
from flownexus.runtime.controller import Action, Apply, Delete, Emit, Outcome
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


# ---- spec.autoscaling.targetRequestsPerSecond: KEDA or our HPA -----------------------------------------

PROM_URL = "http://prometheus.monitoring.svc:9090"


@pytest.mark.parametrize(
    ("autoscaling", "url", "served", "exists", "expected"),
    [
        ({}, PROM_URL, True, False, (False, False, "")),
        ({}, PROM_URL, True, True, (False, True, "")),  # the field was unset: ours goes
        ({"targetRequestsPerSecond": 5}, PROM_URL, True, False, (True, False, "ScaledObject")),
        ({"targetRequestsPerSecond": 5}, PROM_URL, True, True, (True, False, "ScaledObject")),
        ({"targetRequestsPerSecond": 5, "enabled": False}, PROM_URL, True, True, (False, True, "")),
        ({"targetRequestsPerSecond": 5}, PROM_URL, False, False, (False, False, "KEDANotServed")),
        ({"targetRequestsPerSecond": 5}, None, True, True, (False, True, "NoPrometheusUrl")),
        ({"targetRequestsPerSecond": 5}, None, False, False, (False, False, "NoPrometheusUrl")),
    ],
)
def test_keda_scales_only_a_request_rate_with_keda_and_a_prometheus(
    autoscaling: Manifest, url: str | None, served: bool, exists: bool, expected: tuple[bool, bool, str]
) -> None:
    spec = ModelDeploymentSpec.model_validate(md(**{"spec.autoscaling": autoscaling})["spec"])
    got = keda.choose(spec, url, served, exists)
    assert (got.scaled_object, got.remove_scaled_object, got.reason) == expected
    assert bool(got.problem) == (expected[2] not in ("", "ScaledObject"))


def _serving_ctx(obj: Manifest, url: str | None = PROM_URL) -> ServingContext:
    spec = ModelDeploymentSpec.model_validate(obj["spec"])
    nc = neural_cluster(**({"spec.prometheusUrl": url} if url else {}))
    return ServingContext(obj, spec, NeuralClusterSpec.model_validate(nc["spec"]), "demo-artifacts")


def _available_plan(obj: Manifest) -> tuple[Plan, Observed]:
    spec = ModelDeploymentSpec.model_validate(obj["spec"])
    st = ModelDeploymentStatus.model_validate(
        {"phase": "Available", "stable": {"version": "1.0.0", "archive": "a/1.mar"}}
    )
    stable = DeploymentView(replicas=2, ready=2, version="1.0.0", rolled_out=True)
    observed = Observed(now=T0, stable=stable)
    return decide(spec, st, observed, 1), observed


def _steps(todo: list[Action]) -> list[tuple[str, str]]:
    out = []
    for a in todo:
        if isinstance(a, Apply):
            out.append(("Apply", f"{a.manifest['kind']} {a.manifest['metadata']['name']}"))
        elif isinstance(a, Delete):
            out.append(("Delete", f"{a.kind} {a.name}"))
    return out


def test_with_keda_our_hpa_goes_first_and_the_scaled_object_comes_after_the_stable_deployment() -> None:
    obj = md("1.0.0", **{"spec.autoscaling": {"targetRequestsPerSecond": 20}})
    plan, observed = _available_plan(obj)
    auto = keda.choose(ModelDeploymentSpec.model_validate(obj["spec"]), PROM_URL, True, False)
    steps = _steps(rec.actions(_serving_ctx(obj), plan, observed, {}, auto))
    assert ("Apply", "HorizontalPodAutoscaler digits-stable") not in steps
    hpa_gone = steps.index(("Delete", "HorizontalPodAutoscaler digits-stable"))
    stable = steps.index(("Apply", "Deployment digits-stable"))
    assert hpa_gone < stable < steps.index(("Apply", "ScaledObject digits-stable"))


def test_unsetting_the_request_rate_deletes_the_scaled_object_before_our_hpa_comes_back() -> None:
    obj = md("1.0.0")
    plan, observed = _available_plan(obj)
    auto = keda.choose(ModelDeploymentSpec.model_validate(obj["spec"]), PROM_URL, True, True)
    steps = _steps(rec.actions(_serving_ctx(obj), plan, observed, {}, auto))
    assert steps.index(("Delete", "ScaledObject digits-stable")) < steps.index(
        ("Apply", "HorizontalPodAutoscaler digits-stable")
    )
    assert not [s for s in steps if s[1].startswith("ScaledObject") and s[0] == "Apply"]


class FakeScaledObjects:
    """An in-memory KEDA: whether it is served, the ScaledObjects that exist, and every read."""

    def __init__(self, served: bool = True, objects: dict[str, Manifest] | None = None) -> None:
        self.is_served, self.objects = served, objects or {}
        self.reads: list[str] = []

    def served(self) -> bool:
        return self.is_served

    def get(self, namespace: str, name: str) -> Manifest | None:
        self.reads.append(name)
        return self.objects.get(name)


def _world(obj: Manifest, url: str | None = PROM_URL) -> Cache:
    """A cache with a Ready NeuralCluster, the validated TrainingJob and ``obj`` serving 1.0.0."""
    cache = Cache()
    nc = neural_cluster(**({"spec.prometheusUrl": url} if url else {}))
    nc["status"] = {"phase": "Ready"}
    for o in (nc, validated_tj(), obj):
        o["metadata"].setdefault("resourceVersion", "1")
        cache.upsert(o)
    return cache


def _serving(**autoscaling: Any) -> Manifest:
    obj = md("1.0.0", **{"spec.autoscaling": autoscaling})
    obj["status"] = {
        "phase": "Available",
        "stable": {"version": "1.0.0", "archive": "default/digits/model-store/digits.mar"},
    }
    return obj


def _condition(outcome: Outcome) -> Manifest | None:
    conds = (outcome.status or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == keda.CONDITION), None)


def _emitted(outcome: Outcome) -> list[tuple[str, str, str]]:
    """The autoscaling Events of a pass (the rollout's own are not the subject here)."""
    reasons = ("ScaledObject", "KEDANotServed", "NoPrometheusUrl")
    return [(a.type, a.reason, a.message) for a in outcome.actions if isinstance(a, Emit) and a.reason in reasons]


def test_a_pass_with_keda_applies_the_scaled_object_and_says_so_once() -> None:
    obj = _serving(targetRequestsPerSecond=20)
    fake = FakeScaledObjects()
    r = rec.ModelDeploymentReconciler(_world(obj), scaled_objects=fake)
    outcome = r.reconcile(obj)
    steps = _steps(outcome.actions)
    assert ("Apply", "ScaledObject digits-stable") in steps
    assert ("Delete", "HorizontalPodAutoscaler digits-stable") in steps
    cond = _condition(outcome)
    assert cond is not None and (cond["status"], cond["reason"]) == ("True", "ScaledObject")
    assert [e[:2] for e in _emitted(outcome)] == [("Normal", "ScaledObject")]
    # The next pass reads the ScaledObject again (it may have been changed or deleted: no watch says so),
    # and posts no second Event.
    obj["status"] = outcome.status
    again = r.reconcile(obj)
    assert not [e for e in _emitted(again) if e[1] == "ScaledObject"]
    assert fake.reads == ["digits-stable", "digits-stable"]


def test_without_keda_the_hpa_scales_on_cpu_and_a_condition_and_warning_say_why() -> None:
    obj = _serving(targetRequestsPerSecond=20)
    fake = FakeScaledObjects(served=False)
    r = rec.ModelDeploymentReconciler(_world(obj), scaled_objects=fake)
    outcome = r.reconcile(obj)
    steps = _steps(outcome.actions)
    assert ("Apply", "HorizontalPodAutoscaler digits-stable") in steps
    assert ("Apply", "Deployment digits-stable") in steps and ("Apply", "Service digits") in steps
    assert not [s for s in steps if "ScaledObject" in s[1]]
    hpa = next(
        a.manifest for a in outcome.actions if isinstance(a, Apply) and a.manifest["kind"] == "HorizontalPodAutoscaler"
    )
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    cond = _condition(outcome)
    assert cond is not None and (cond["status"], cond["reason"]) == ("False", "KEDANotServed")
    expected = (
        "spec.autoscaling.targetRequestsPerSecond (20) needs KEDA (keda.sh/v1alpha1 ScaledObject), which this "
        "cluster does not serve"
    )
    assert cond["message"].startswith(expected)
    assert [e[:2] for e in _emitted(outcome)] == [("Warning", "KEDANotServed")]
    assert outcome.requeue_after is not None and outcome.requeue_after <= rec.RESYNC_S  # KEDA may come
    assert fake.reads == []  # nothing to read where the kind is not served
    obj["status"] = outcome.status
    assert not [e for e in _emitted(r.reconcile(obj)) if e[1] == "KEDANotServed"]


def test_without_a_prometheus_url_the_hpa_stands_in_and_the_condition_names_the_field_and_value() -> None:
    obj = _serving(targetRequestsPerSecond=2.5)
    r = rec.ModelDeploymentReconciler(_world(obj, url=None), scaled_objects=FakeScaledObjects())
    outcome = r.reconcile(obj)
    assert ("Apply", "HorizontalPodAutoscaler digits-stable") in _steps(outcome.actions)
    cond = _condition(outcome)
    assert cond is not None and (cond["status"], cond["reason"]) == ("False", "NoPrometheusUrl")
    assert "spec.autoscaling.targetRequestsPerSecond (2.5)" in cond["message"] and "prometheusUrl" in cond["message"]
    assert [e[:2] for e in _emitted(outcome)] == [("Warning", "NoPrometheusUrl")]


def test_unsetting_the_request_rate_removes_the_condition_and_deletes_our_scaled_object() -> None:
    obj = _serving()
    obj["status"]["conditions"] = [{"type": keda.CONDITION, "status": "True", "reason": "ScaledObject",
                                    "message": "m", "lastTransitionTime": "2026-11-22T12:00:00Z"}]  # fmt: skip
    ours = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
            "metadata": {"name": "digits-stable", "namespace": "default", "uid": "so-1", "resourceVersion": "5",
                         "ownerReferences": [{"kind": "ModelDeployment", "name": "digits", "uid": "uid-1",
                                              "controller": True}]}}  # fmt: skip
    fake = FakeScaledObjects(objects={"digits-stable": ours})
    cache = _world(obj)
    r = rec.ModelDeploymentReconciler(cache, scaled_objects=fake)
    outcome = r.reconcile(obj)
    steps = _steps(outcome.actions)
    assert steps.index(("Delete", "ScaledObject digits-stable")) < steps.index(
        ("Apply", "HorizontalPodAutoscaler digits-stable")
    )
    assert _condition(outcome) is None
    assert cache.get("ScaledObject", "default", "digits-stable") is not None  # where the controller's delete looks
    # Once it is gone, it is read once more, then no more while none is wanted.
    del fake.objects["digits-stable"]
    for _ in range(3):
        assert "ScaledObject digits-stable" not in {s[1] for s in _steps(r.reconcile(obj).actions)}
    assert fake.reads == ["digits-stable", "digits-stable"]


def test_a_foreign_scaled_object_of_that_name_is_never_deleted() -> None:
    obj = _serving()
    foreign = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "digits-stable", "namespace": "default", "uid": "so-2", "resourceVersion": "5"},
    }
    r = rec.ModelDeploymentReconciler(_world(obj), scaled_objects=FakeScaledObjects(objects={"digits-stable": foreign}))
    assert ("Delete", "ScaledObject digits-stable") not in _steps(r.reconcile(obj).actions)


def test_discovery_is_asked_at_most_once_per_ttl() -> None:
    class Discovery:
        calls = 0

        def serves(self, kind: str) -> bool:
            Discovery.calls += 1
            return kind == "ScaledObject"

    now = [0.0]
    so = keda.ApiScaledObjects(Discovery(), ttl_s=60, clock=lambda: now[0])  # type: ignore[arg-type]
    assert so.served() and so.served() and Discovery.calls == 1
    now[0] = 61.0
    assert so.served() and Discovery.calls == 2
