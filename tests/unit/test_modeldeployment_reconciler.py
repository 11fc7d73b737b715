"""The ModelDeployment reconciler without a cluster: what it reads from children and TrainingJobs, the runbook
order of its writes (against an in-memory stand-in for ``kube``), and one whole pass."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flownexus import kube
from flownexus.api.modeldeployment import ModelDeploymentSpec, ModelDeploymentStatus
from flownexus.api.neuralcluster import NeuralClusterSpec
from flownexus.builders.modeldeployment import ServingContext
from flownexus.canary import DeploymentView, Event, Observed, Plan, now_str
from flownexus.prometheus import CanarySelector, NoData, PrometheusError, QueryResult
from flownexus.reconcilers import modeldeployment as rec
from tests.factories import model_deployment, neural_cluster, training_job

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
Manifest = dict[str, Any]


class FakeKube:
    """An in-memory API: objects by (kind, namespace, name), and every write in order."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], Manifest] = {}
        self.calls: list[tuple[str, str, str]] = []  # (verb, kind, name)
        self.status_writes: list[Manifest] = []

    def put(self, obj: Manifest) -> None:
        meta = obj["metadata"]
        self.objects[(obj["kind"], meta.get("namespace", "default"), meta["name"])] = copy.deepcopy(obj)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Manifest | None:
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def ensure(self, manifest: Manifest, *, patch_existing: bool = True) -> Manifest:
        self.calls.append(("ensure", manifest["kind"], manifest["metadata"]["name"]))
        key = (manifest["kind"], manifest["metadata"]["namespace"], manifest["metadata"]["name"])
        merged = _merge(self.objects.get(key, {}), manifest)
        self.objects[key] = merged
        return merged

    def patch(self, api_version: str, kind: str, namespace: str, name: str, body: Manifest) -> Manifest:
        self.calls.append(("patch", kind, name))
        key = (kind, namespace, name)
        self.objects[key] = _merge(self.objects[key], body)
        return self.objects[key]

    def delete(self, api_version: str, kind: str, namespace: str, name: str, **_: Any) -> bool:
        self.calls.append(("delete", kind, name))
        return self.objects.pop((kind, namespace, name), None) is not None

    def patch_status(self, api_version: str, kind: str, namespace: str, name: str, status: Manifest) -> None:
        self.calls.append(("status", kind, name))
        self.status_writes.append(status)
        obj = self.objects[(kind, namespace, name)]
        obj["status"] = _merge(obj.get("status") or {}, status)


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeKube:
    api = FakeKube()
    for verb in ("get", "ensure", "patch", "delete", "patch_status"):
        monkeypatch.setattr(kube, verb, getattr(api, verb))
    nc = neural_cluster(**{"spec.prometheusUrl": "http://prometheus.monitoring.svc:9090", "status": {"phase": "Ready"}})
    api.put(nc)
    return api


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


def ready_deployment(fake: FakeKube, name: str, version: str, replicas: int) -> None:
    obj = fake.objects[("Deployment", "default", name)]
    obj["metadata"]["generation"] = 1
    obj["spec"]["replicas"] = obj["spec"].get("replicas", replicas)
    n = obj["spec"]["replicas"]
    obj["status"] = {
        "observedGeneration": 1,
        "replicas": n,
        "updatedReplicas": n,
        "readyReplicas": n,
        "availableReplicas": n,
    }
    assert obj["spec"]["template"]["metadata"]["labels"]["flownexus.io/version"] == version


class Prom:
    """A MetricsProvider with fixed answers: error-rate queries, then p99 queries."""

    def __init__(self, error_rate: QueryResult, p99: QueryResult) -> None:
        self.error_rate, self.p99 = error_rate, p99
        self.queries: list[str] = []

    def query(self, promql: str) -> QueryResult:
        self.queries.append(promql)
        return self.p99 if promql.startswith("histogram_quantile") else self.error_rate


def run(fake: FakeKube, obj: Manifest, prom: Prom | None = None, now: datetime = T0) -> tuple[Plan, list[Event]]:
    """One pass with ``obj``'s spec; the status is whatever earlier passes wrote."""
    existing = fake.objects.get(("ModelDeployment", "default", obj["metadata"]["name"]))
    fake.put({**obj, "status": existing.get("status", {})} if existing else obj)
    body = fake.get("flownexus.io/v1alpha1", "ModelDeployment", "default", obj["metadata"]["name"])
    assert body is not None
    events: list[Event] = []

    def emit(event: Event) -> None:
        events.append(event)
        fake.calls.append(("event", event.type, event.reason))

    plan = rec.run_pass(
        body,
        ModelDeploymentSpec.model_validate(body["spec"]),
        emit,
        provider_factory=lambda url: prom or Prom(0.0, 1.0),
        now=now,
    )
    return plan, events


def current(fake: FakeKube) -> Manifest:
    obj = fake.get("flownexus.io/v1alpha1", "ModelDeployment", "default", "digits")
    assert obj is not None
    return obj


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
    source, why, final = rec.resolve_source(spec, "default")
    assert (source is not None) is ok
    if not ok:
        assert final and why.startswith("spec.model.archivePath")


def test_status_patch_sends_cleared_fields_as_null() -> None:
    st = ModelDeploymentStatus.model_validate(
        {"phase": "RolledBack", "history": [{"version": "2", "outcome": "RolledBack", "at": now_str(T0)}]}
    )
    patch = rec.status_patch(st)
    assert "canary" in patch and patch["canary"] is None  # removes the canary a merge patch would keep
    assert patch["history"] == [{"version": "2", "outcome": "RolledBack", "at": now_str(T0)}]  # no nulls in lists


# ---- the executor: runbook order ---------------------------------------------------------------------


def test_rollback_runbook_order(fake: FakeKube) -> None:
    obj = md("2.0.0", tj="digits-v2")
    fake.put(validated_tj())
    fake.put(validated_tj("digits-v2", "2.0.0"))
    run(fake, md("1.0.0"))  # first version
    ready_deployment(fake, "digits-stable", "1.0.0", 2)
    run(fake, md("1.0.0"))  # Available
    run(fake, obj)  # canary starts
    assert current(fake)["status"]["phase"] == "Canary"
    ready_deployment(fake, "digits-canary", "2.0.0", 1)
    assert fake.objects[("Service", "default", "digits")]["spec"]["selector"] == {
        "flownexus.io/modeldeployment": "digits"
    }
    bad = Prom(error_rate=0.5, p99=10.0)
    fake.calls.clear()
    for minute in (1, 2, 3):
        _, events = run(fake, obj, bad, T0 + timedelta(minutes=minute, seconds=1))
    assert current(fake)["status"]["phase"] == "RolledBack"
    last_stable = max(i for i, call in enumerate(fake.calls) if call == ("ensure", "Deployment", "digits-stable"))
    runbook = fake.calls[last_stable + 1 :]
    assert runbook == [
        ("patch", "Service", "digits"),  # 1. all traffic to stable
        ("event", "Warning", "RolledBack"),  # 2. an Event with the failing values
        ("patch", "Deployment", "digits-canary"),  # 3. canary to zero
        ("status", "ModelDeployment", "digits"),  # 4. status RolledBack, written once
    ]
    assert fake.objects[("Service", "default", "digits")]["spec"]["selector"] == {
        "flownexus.io/modeldeployment": "digits",
        "flownexus.io/track": "stable",
    }
    assert fake.objects[("Deployment", "default", "digits-canary")]["spec"]["replicas"] == 0
    assert events[-1].reason == "RolledBack" and events[-1].type == "Warning"
    status = current(fake)["status"]
    assert "canary" not in status and status["lastAnalysis"]["errorRate"] == 0.5
    assert status["history"][-1]["outcome"] == "RolledBack"
    assert len(bad.queries) == 6 and all('hostname=~"digits-canary-.+"' in q.lower() for q in bad.queries)
    assert all('ModelVersion="2.0.0"' in q for q in bad.queries if q.startswith("histogram_quantile"))


def test_never_fights_the_hpa(fake: FakeKube) -> None:
    fake.put(validated_tj())
    run(fake, md())
    stable = fake.objects[("Deployment", "default", "digits-stable")]
    assert stable["spec"]["replicas"] == 2  # the first create sets minReplicas
    stable["spec"]["replicas"] = 7  # the HPA scales up
    ready_deployment(fake, "digits-stable", "1.0.0", 7)
    run(fake, md())
    assert fake.objects[("Deployment", "default", "digits-stable")]["spec"]["replicas"] == 7
    assert ("HorizontalPodAutoscaler", "default", "digits-stable") in fake.objects
    # autoscaling off: the spec's replicas are the operator's to set, and the HPA goes
    run(fake, md(**{"spec.autoscaling.enabled": False, "spec.serving.replicas": 3}))
    assert fake.objects[("Deployment", "default", "digits-stable")]["spec"]["replicas"] == 3
    assert ("HorizontalPodAutoscaler", "default", "digits-stable") not in fake.objects


def test_a_full_good_rollout_through_passes(fake: FakeKube) -> None:
    fake.put(validated_tj())
    fake.put(validated_tj("digits-v2", "2.0.0"))
    run(fake, md())
    ready_deployment(fake, "digits-stable", "1.0.0", 2)
    run(fake, md())
    assert current(fake)["status"]["endpoint"] == "http://digits.default.svc:8080/predictions/digits"
    steps = {"spec.rollout.steps": [20, 60]}
    obj = md("2.0.0", tj="digits-v2", **steps)
    run(fake, obj)
    ready_deployment(fake, "digits-canary", "2.0.0", 1)
    good = Prom(error_rate=0.0, p99=12.0)
    run(fake, obj, good, T0 + timedelta(minutes=1))
    assert current(fake)["status"]["canary"]["weight"] == 60
    run(fake, obj, good, T0 + timedelta(minutes=2))
    assert current(fake)["status"]["phase"] == "Promoting"
    stable = fake.objects[("Deployment", "default", "digits-stable")]
    assert stable["spec"]["template"]["metadata"]["labels"]["flownexus.io/version"] == "2.0.0"
    ready_deployment(fake, "digits-stable", "2.0.0", 2)
    stable["metadata"]["generation"] = stable["status"]["observedGeneration"] = 2
    run(fake, obj, good, T0 + timedelta(minutes=2, seconds=10))
    status = current(fake)["status"]
    assert status["phase"] == "Available" and "canary" not in status
    assert ("Deployment", "default", "digits-canary") not in fake.objects
    assert [h["outcome"] for h in status["history"]] == ["Deployed", "Retired", "Promoted"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and status["observedGeneration"] == 1


def test_no_prometheus_url_is_no_data(fake: FakeKube) -> None:
    fake.objects[("NeuralCluster", "default", "demo")]["spec"].pop("prometheusUrl")
    fake.put(validated_tj())
    fake.put(validated_tj("digits-v2", "2.0.0"))
    run(fake, md())
    ready_deployment(fake, "digits-stable", "1.0.0", 2)
    run(fake, md())
    obj = md("2.0.0", tj="digits-v2")
    run(fake, obj)
    run(fake, obj, None, T0 + timedelta(minutes=1))
    status = current(fake)["status"]
    assert status["phase"] == "Canary" and status["lastAnalysis"]["outcome"] == "NoData"
    assert "no prometheusUrl" in status["lastAnalysis"]["message"]


def test_cluster_missing_writes_status_only(fake: FakeKube) -> None:
    del fake.objects[("NeuralCluster", "default", "demo")]
    plan, _ = run(fake, md())
    assert plan.status.phase == "Pending" and plan.status.reason == "ClusterNotReady"
    assert [c[0] for c in fake.calls] == ["event", "status"]  # no child is touched


def test_measure_turns_rejected_queries_into_no_data() -> None:
    class Rejecting:
        def query(self, promql: str) -> QueryResult:
            raise PrometheusError("Prometheus rejected the query: parse error")

    obj = md()
    spec = ModelDeploymentSpec.model_validate(obj["spec"])
    ctx = ServingContext(obj, spec, NeuralClusterSpec.model_validate(neural_cluster()["spec"]), "demo-artifacts")
    m = rec.measure(Rejecting(), ctx, CanarySelector("digits", "digits-canary-"))
    assert isinstance(m.error_rate, NoData) and "parse error" in m.error_rate.reason
    assert isinstance(m.latency_p99_ms, NoData)


def test_observed_is_only_what_decide_needs() -> None:
    # Observed has defaults for everything but the clock, so tests and the reconciler build it the same way.
    assert Observed(now=T0).source is None
