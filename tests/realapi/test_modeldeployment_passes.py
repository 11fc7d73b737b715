"""ModelDeployment passes against a real API server: serving, the canary, promotion and rollback.

Prometheus answers come from ``StubPrometheus`` (a fixed error rate and p99): the real Prometheus path is
covered by tests/integration and tests/e2e; here the subject is what the operator writes, in what order.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tests.factories import model_deployment, neural_cluster, training_job
from tests.realapi.conftest import Harness

from flownexus.prometheus import QueryResult
from flownexus.runtime.controller import Controller

pytestmark = pytest.mark.realapi
T0 = datetime.now(UTC).replace(microsecond=0)
PROM = {"spec.prometheusUrl": "http://prometheus.monitoring.svc:9090"}
CRD = "modeldeployments.flownexus.io"


class StubPrometheus:
    """A stand-in MetricsProvider with fixed answers (error-rate queries, then p99 queries)."""

    def __init__(self, error_rate: QueryResult = 0.0, p99: QueryResult = 10.0) -> None:
        self.error_rate, self.p99 = error_rate, p99
        self.queries: list[str] = []

    def query(self, promql: str) -> QueryResult:
        self.queries.append(promql)
        return self.p99 if promql.startswith("histogram_quantile") else self.error_rate


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def validated(h: Harness, name: str, version: str) -> None:
    h.create(training_job(name, **{"spec.output": {"modelName": "digits", "version": version}}))
    h.set_status(
        "TrainingJob",
        name,
        {
            "phase": "Succeeded",
            "conditions": [{"type": "Validated", "status": "True", "reason": "ThresholdsMet", "message": ""}],
            "validation": {"passed": True, "accuracy": 0.97},
            "artifacts": {"modelArchive": f"/artifacts/{h.ns}/{name}/model-store/digits.mar"},
        },
    )


def md(version: str, tj: str, **overrides: Any) -> dict[str, Any]:
    return model_deployment(
        "digits",
        **{
            "spec.model": {"trainingJobRef": {"name": tj}, "version": version},
            "spec.rollout.interval": "1m",
            **overrides,
        },
    )


def deployment_ready(h: Harness, name: str) -> None:
    dep = h.get("Deployment", name)
    n = dep["spec"].get("replicas", 1)
    h.set_status(
        "Deployment",
        name,
        {"observedGeneration": dep["metadata"]["generation"], "replicas": n, "updatedReplicas": n,
         "readyReplicas": n, "availableReplicas": n},
    )  # fmt: skip


def version_of(h: Harness, name: str) -> str:
    return str(h.get("Deployment", name)["spec"]["template"]["metadata"]["labels"]["flownexus.io/version"])


def serving_v1(h: Harness, prom: StubPrometheus | None = None, **overrides: Any) -> Clock:
    clock = Clock()
    h.md.provider_factory = lambda url: prom or StubPrometheus()
    h.md.clock = clock
    h.ready_cluster(neural_cluster(**PROM))
    validated(h, "digits", "1.0.0")
    validated(h, "digits-v2", "2.0.0")
    h.create(md("1.0.0", "digits", **overrides))
    h.reconcile("ModelDeployment", "digits")
    deployment_ready(h, "digits-stable")
    h.reconcile("ModelDeployment", "digits")
    assert h.get("ModelDeployment", "digits")["status"]["phase"] == "Available"
    return clock


def start_canary(h: Harness, **overrides: Any) -> None:
    h.patch(
        "ModelDeployment",
        "digits",
        {"spec": {"model": {"trainingJobRef": {"name": "digits-v2"}, "version": "2.0.0"}, **overrides}},
    )
    h.reconcile("ModelDeployment", "digits")
    assert h.get("ModelDeployment", "digits")["status"]["phase"] == "Canary"
    deployment_ready(h, "digits-canary")


def writes(h: Harness, since: int) -> list[tuple[str, str]]:
    """The operator's writes as the API server logged them: (verb, resource[/subresource] name)."""
    out = []
    for r in h.operator_requests(since):
        if r["verb"] in ("get", "list", "watch"):
            continue
        ref = r.get("objectRef") or {}
        what = ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        out.append((str(r["verb"]), f"{what} {ref.get('name', '')}".strip()))
    return out


def test_the_rollback_runbook_in_the_api_servers_own_log(harness: Harness) -> None:
    h = harness
    bad = StubPrometheus(error_rate=0.5)
    clock = serving_v1(h, bad)
    start_canary(h)
    assert h.get("Service", "digits")["spec"]["selector"] == {"flownexus.io/modeldeployment": "digits"}
    for minute in (1, 2):
        clock.now = T0 + timedelta(minutes=minute, seconds=1)
        h.reconcile("ModelDeployment", "digits")
    clock.now = T0 + timedelta(minutes=3, seconds=1)
    mark = h.plane.audit_lines()
    h.reconcile("ModelDeployment", "digits")
    assert writes(h, mark) == [
        ("update", "modeldeployments/status digits"),  # 1. record: RolledBack, with the failing values
        ("patch", "services digits"),  # 2. all traffic to stable
        ("create", "events"),  # 3. an Event saying why
        ("patch", "deployments digits-canary"),  # 4. canary to zero
    ]
    status = h.get("ModelDeployment", "digits")["status"]
    assert status["phase"] == "RolledBack" and "canary" not in status
    assert status["lastAnalysis"]["errorRate"] == 0.5 and status["history"][-1]["outcome"] == "RolledBack"
    assert h.get("Service", "digits")["spec"]["selector"]["flownexus.io/track"] == "stable"
    assert h.get("Deployment", "digits-canary")["spec"]["replicas"] == 0
    assert all("digits-canary-" in q for q in bad.queries)


def test_the_hpa_owns_stable_replicas_after_creation(harness: Harness) -> None:
    h = harness
    serving_v1(h)
    stable = h.get("Deployment", "digits-stable")
    assert stable["spec"]["replicas"] == 2  # autoscaling.minReplicas, set once at creation
    owners = {f["manager"]: f for f in stable["metadata"]["managedFields"]}
    assert "f:replicas" in str(owners["flownexus-operator-init"]["fieldsV1"])
    assert "f:replicas" not in str(owners["flownexus-operator"]["fieldsV1"])
    # The HPA scales up through the scale subresource.
    h.user.request(
        "PATCH", f"/apis/apps/v1/namespaces/{h.ns}/deployments/digits-stable/scale",
        query={"fieldManager": "horizontal-pod-autoscaler"}, body={"spec": {"replicas": 7}},
        content_type="application/merge-patch+json",
    )  # fmt: skip
    h.patch("ModelDeployment", "digits", {"spec": {"serving": {"batchSize": 8}}})  # a canary; stable re-applied
    h.reconcile("ModelDeployment", "digits")
    stable = h.get("Deployment", "digits-stable")
    assert stable["spec"]["replicas"] == 7  # the operator's apply of stable left the HPA's count alone
    assert h.exists("HorizontalPodAutoscaler", "digits-stable")
    # Autoscaling off: the replicas are the spec's, and the HPA goes.
    h.patch("ModelDeployment", "digits", {"spec": {"autoscaling": {"enabled": False}, "serving": {"replicas": 3}}})
    h.reconcile("ModelDeployment", "digits")
    assert h.get("Deployment", "digits-stable")["spec"]["replicas"] == 3
    assert not h.exists("HorizontalPodAutoscaler", "digits-stable")


def test_a_good_canary_is_promoted_step_by_step(harness: Harness) -> None:
    h = harness
    clock = serving_v1(h, StubPrometheus(error_rate=0.0, p99=12.0))
    start_canary(h, rollout={"steps": [20, 60]})
    assert h.get("ModelDeployment", "digits")["status"]["endpoint"].startswith("http://digits.")
    clock.now = T0 + timedelta(minutes=1, seconds=1)
    h.reconcile("ModelDeployment", "digits")
    assert h.get("ModelDeployment", "digits")["status"]["canary"]["weight"] == 60
    clock.now = T0 + timedelta(minutes=2, seconds=2)
    h.reconcile("ModelDeployment", "digits")
    assert h.get("ModelDeployment", "digits")["status"]["phase"] == "Promoting"
    assert version_of(h, "digits-stable") == "2.0.0"
    deployment_ready(h, "digits-stable")
    h.reconcile("ModelDeployment", "digits")
    status = h.get("ModelDeployment", "digits")["status"]
    assert status["phase"] == "Available" and "canary" not in status
    # Deleted in the foreground: it goes once its pods are gone (the garbage collector's part, played here).
    assert h.get("Deployment", "digits-canary")["metadata"].get("deletionTimestamp")
    h.collect_garbage("Deployment", "digits-canary")
    assert not h.exists("Deployment", "digits-canary")
    assert [e["outcome"] for e in status["history"]] == ["Deployed", "Retired", "Promoted"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"


def test_a_new_batch_size_starts_a_canary_and_leaves_the_stable_template_alone(harness: Harness) -> None:
    h = harness
    serving_v1(h)
    stable_before = h.get("Deployment", "digits-stable")
    config_before = h.get("ConfigMap", "digits-serving")["data"]
    h.patch("ModelDeployment", "digits", {"spec": {"serving": {"batchSize": 8}}})
    h.reconcile("ModelDeployment", "digits")
    status = h.get("ModelDeployment", "digits")["status"]
    assert status["phase"] == "Canary" and status["canary"]["version"] == "1.0.0"
    assert status["canary"]["templateHash"] != status["stable"]["templateHash"]
    assert status["canary"]["revision"] == f"1.0.0@{status['canary']['templateHash'][:7]}"
    stable = h.get("Deployment", "digits-stable")
    assert stable["spec"]["template"] == stable_before["spec"]["template"]
    assert stable["metadata"]["generation"] == stable_before["metadata"]["generation"]
    assert h.get("ConfigMap", "digits-serving")["data"] == config_before
    canary = h.get("Deployment", "digits-canary")
    assert canary["spec"]["template"]["metadata"]["labels"]["flownexus.io/version"] == "1.0.0"
    volumes = {v["name"]: v for v in canary["spec"]["template"]["spec"]["volumes"]}
    assert volumes["templates"]["configMap"]["name"] == "digits-serving-canary"
    assert '"batchSize": 8' in h.get("ConfigMap", "digits-serving-canary")["data"]["model-settings.json"]
    assert '"batchSize": 32' in config_before["model-settings.json"]
    # kubectl get: the Canary column (status.canary.revision) tells the new template from stable's.
    crd = h.user.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD}")
    columns = {c["name"]: c["jsonPath"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Canary"] == ".status.canary.revision"


def test_the_api_server_refuses_unknown_metric_variables_and_repeated_names(harness: Harness) -> None:
    from flownexus.runtime.client import ApiError, path

    h = harness

    def refused(metrics: list[dict[str, Any]]) -> str:
        obj = md("1.0.0", "digits", **{"spec.rollout.metrics": metrics})
        obj = {**obj, "metadata": {**obj["metadata"], "namespace": h.ns}}
        # Past the operator's own validation (a client that does not know the types): the API server's CEL.
        with pytest.raises(ApiError) as caught:
            h.user.request("POST", path("ModelDeployment", h.ns), body=obj, kind="ModelDeployment")
        assert caught.value.status == 422
        return str(caught.value)

    bad_query = 'rate(x{pod=~"{{pod}}"}[{{window}}])'
    assert "unknown template variables {{pod}}" in refused([{"name": "q", "query": bad_query, "max": 1}])
    assert "set min, max or both" in refused([{"name": "q", "query": "up"}])
    repeated = refused([{"name": "q", "query": "up", "max": 1}, {"name": "q", "query": "up", "min": 0}])
    assert "Duplicate value" in repeated and '"q"' in repeated
    ok = md("1.0.0", "digits", **{"spec.rollout.metrics": [{"name": "q", "query": "x{{pods}}{{window}}", "max": 1}]})
    h.create(ok)


def _crash_after_record(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """One pass that dies right after its status write, before it touches any child."""

    def crash(self: Controller, obj: Any, action: Any) -> None:
        raise RuntimeError("operator killed")

    with monkeypatch.context() as m:
        m.setattr(Controller, "_act", crash)
        with pytest.raises(RuntimeError):
            h.reconcile("ModelDeployment", "digits")


def test_a_crash_between_recording_a_rollback_and_acting_on_it_never_routes_to_the_canary_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    clock = serving_v1(h, StubPrometheus(error_rate=0.5))
    start_canary(h, rollout={"failedChecksBeforeRollback": 1})
    clock.now = T0 + timedelta(minutes=1, seconds=1)
    _crash_after_record(h, monkeypatch)
    assert h.get("ModelDeployment", "digits")["status"]["phase"] == "RolledBack"
    assert "flownexus.io/track" not in h.get("Service", "digits")["spec"]["selector"]  # not acted on yet
    h.reconcile("ModelDeployment", "digits")  # the restarted operator
    assert h.get("Service", "digits")["spec"]["selector"]["flownexus.io/track"] == "stable"
    assert h.get("Deployment", "digits-canary")["spec"]["replicas"] == 0
    assert h.get("ModelDeployment", "digits")["status"]["phase"] == "RolledBack"


def one_step_canary_passing(h: Harness) -> None:
    """Version 2.0.0 as a one-step canary whose analysis passes, and its slot due: the next pass promotes."""
    clock = serving_v1(h, StubPrometheus())
    start_canary(h, rollout={"steps": [50]})
    clock.now = T0 + timedelta(minutes=1, seconds=1)


def test_a_crash_between_recording_a_promotion_and_acting_on_it_never_rolls_stable_back(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    one_step_canary_passing(h)
    _crash_after_record(h, monkeypatch)
    status = h.get("ModelDeployment", "digits")["status"]
    assert status["phase"] == "Promoting" and status["stable"]["version"] == "2.0.0"
    assert version_of(h, "digits-stable") == "1.0.0"  # the crash came before the apply
    seen = []
    for _ in range(3):
        h.reconcile("ModelDeployment", "digits")
        seen.append(version_of(h, "digits-stable"))
    assert seen == ["2.0.0"] * 3


def test_a_crash_between_recording_a_promotion_and_deleting_the_canary_never_lets_the_next_version_reuse_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    one_step_canary_passing(h)
    h.reconcile("ModelDeployment", "digits")  # Promoting: stable rolls to 2.0.0
    deployment_ready(h, "digits-stable")
    _crash_after_record(h, monkeypatch)  # Available (Promoted) recorded; the canary's delete never sent
    old = h.get("Deployment", "digits-canary")
    assert h.get("ModelDeployment", "digits")["status"]["phase"] == "Available"
    validated(h, "digits-v3", "3.0.0")
    h.patch(
        "ModelDeployment", "digits", {"spec": {"model": {"trainingJobRef": {"name": "digits-v3"}, "version": "3.0.0"}}}
    )
    h.reconcile("ModelDeployment", "digits")  # the restarted operator
    left = h.get("Deployment", "digits-canary")
    assert left["metadata"]["uid"] == old["metadata"]["uid"] and left["metadata"].get("deletionTimestamp")
    assert version_of(h, "digits-canary") == "2.0.0"  # never re-templated in place
    assert h.get("ModelDeployment", "digits")["status"]["reason"] == "RetiringCanary"
    h.collect_garbage("Deployment", "digits-canary")
    h.reconcile("ModelDeployment", "digits")
    new = h.get("Deployment", "digits-canary")
    assert new["metadata"]["uid"] != old["metadata"]["uid"] and version_of(h, "digits-canary") == "3.0.0"
    assert h.get("ModelDeployment", "digits")["status"]["phase"] == "Canary"


def test_children_names_taken_by_others_are_reported_and_left_alone(harness: Harness) -> None:
    h = harness
    h.md.provider_factory = lambda url: StubPrometheus()
    h.ready_cluster(neural_cluster(**PROM))
    validated(h, "digits", "1.0.0")
    svc = h.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "digits"},
                    "spec": {"selector": {"app": "theirs"}, "ports": [{"port": 80}]}})  # fmt: skip
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "theirs"}
    hpa = h.create({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                    "metadata": {"name": "digits-stable"},
                    "spec": {"scaleTargetRef": target, "minReplicas": 1, "maxReplicas": 3}})  # fmt: skip
    h.create(md("1.0.0", "digits"))
    h.reconcile("ModelDeployment", "digits")
    status = h.get("ModelDeployment", "digits")["status"]
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "OwnershipConflict"
    assert "Service" in stalled["message"] and "HorizontalPodAutoscaler" in stalled["message"]
    assert h.get("Service", "digits")["metadata"]["resourceVersion"] == svc["metadata"]["resourceVersion"]
    assert (
        h.get("HorizontalPodAutoscaler", "digits-stable")["metadata"]["resourceVersion"]
        == hpa["metadata"]["resourceVersion"]
    )
    assert not h.exists("Deployment", "digits-stable")


def test_without_a_cluster_only_the_status_is_written(harness: Harness) -> None:
    h = harness
    validated(h, "digits", "1.0.0")
    h.create(md("1.0.0", "digits"))
    mark = h.plane.audit_lines()
    h.reconcile("ModelDeployment", "digits")
    assert [w[0] for w in writes(h, mark)] == ["update", "create"]  # status, then its Event
    status = h.get("ModelDeployment", "digits")["status"]
    assert status["reason"] == "ClusterNotReady" and "does not exist" in status["message"]


def test_a_quiet_modeldeployment_pass_sends_no_request(harness: Harness) -> None:
    h = harness
    serving_v1(h)
    h.reconcile("ModelDeployment", "digits")
    h.sync()
    mark = h.plane.audit_lines()
    for _ in range(3):
        h.controller.run_pass("ModelDeployment", h.ns, "digits")
    requests = h.operator_requests(mark)
    assert requests == [], [(r["verb"], r["requestURI"]) for r in requests]  # read from the cache, nothing to write
