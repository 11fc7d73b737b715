"""spec.autoscaling.targetRequestsPerSecond against a real API server: the KEDA ScaledObject that replaces our
HPA, the switch back, and a cluster that does not serve ScaledObjects.

The ScaledObject CRD installed here is a minimal one of our own (KEDA's group, version, kind and plural; a schema
that keeps every field): the subject is what the operator writes and in what order, not KEDA's validation. No
KEDA runs; where its HPA matters the test creates it as KEDA would (owned by the ScaledObject, with its labels).
The CRD is installed for one test at a time and removed after it: the other tests see a cluster without KEDA.
"""

from __future__ import annotations

import contextlib
import time
import urllib.error
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from dev.localcluster import envtest
from tests.realapi.conftest import OPERATOR_SA, Harness, chart_rbac
from tests.realapi.test_chart_rbac import _used
from tests.realapi.test_modeldeployment_passes import PROM, deployment_ready, serving_v1, start_canary

from flownexus.modeldeployment.keda import CONDITION, ApiScaledObjects

pytestmark = pytest.mark.realapi
CRD_NAME = "scaledobjects.keda.sh"
MINIMAL_SCALED_OBJECT_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": CRD_NAME},
    "spec": {
        "group": "keda.sh",
        "scope": "Namespaced",
        "names": {"kind": "ScaledObject", "listKind": "ScaledObjectList", "plural": "scaledobjects",
                  "singular": "scaledobject"},
        "versions": [{"name": "v1alpha1", "served": True, "storage": True, "subresources": {"status": {}},
                      "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
    },
}  # fmt: skip
RATE_QUERY = 'sum(rate(flownexus_edge_requests_total{ModelName="digits",Hostname=~"digits-stable-.+"}[1m]))'


@contextlib.contextmanager
def scaled_objects_served(plane: envtest.ControlPlane) -> Iterator[None]:
    """The minimal ScaledObject CRD for the duration; removed after, and waited for until it is not served."""
    envtest.install_crds(plane, [MINIMAL_SCALED_OBJECT_CRD])
    try:
        yield
    finally:
        envtest.admin_request(plane, "DELETE", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}")
        deadline = time.monotonic() + 60
        while True:
            try:
                envtest.admin_request(plane, "GET", "/apis/keda.sh/v1alpha1")
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    break
            assert time.monotonic() < deadline, "the ScaledObject CRD is still served a minute after its deletion"
            time.sleep(0.2)


def condition(h: Harness) -> dict[str, Any] | None:
    conds = h.get("ModelDeployment", "digits")["status"].get("conditions") or []
    return next((c for c in conds if c["type"] == CONDITION), None)


def with_keda_reads(h: Harness) -> Harness:
    h.md.scaled_objects = ApiScaledObjects(h.client, ttl_s=0)  # the operator's wiring, asking discovery every pass
    return h


def keda_hpa(h: Harness, so: dict[str, Any]) -> dict[str, Any]:
    """The HPA KEDA makes from a ScaledObject: its name from horizontalPodAutoscalerConfig, the ScaledObject's
    labels, owned by it."""
    meta = so["metadata"]
    return h.create({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["name"],
                     "labels": {**meta["labels"], "app.kubernetes.io/managed-by": "keda-operator"},
                     "ownerReferences": [{"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
                                          "name": meta["name"], "uid": meta["uid"], "controller": True}]},
        "spec": {"scaleTargetRef": so["spec"]["scaleTargetRef"], "minReplicas": 2, "maxReplicas": 10,
                 "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                              "target": {"type": "Utilization", "averageUtilization": 70}}}]},
    })  # fmt: skip


def test_a_request_rate_gives_a_scaled_object_and_unsetting_it_gives_back_the_hpa_with_a_minimal_crd(
    harness_factory: Callable[..., Harness], control_plane: envtest.ControlPlane
) -> None:
    """Under the chart's rights (glob mode: its ClusterRole), so that a missing or unused keda.sh grant fails."""
    with scaled_objects_served(control_plane):
        h = with_keda_reads(harness_factory(operator_rbac="glob"))
        auto = {"targetRequestsPerSecond": 20, "targetMemoryUtilization": 80, "scaleUpStabilization": "0s"}
        serving_v1(h, **{"spec.autoscaling": auto})
        owner = h.get("ModelDeployment", "digits")
        so = h.get("ScaledObject", "digits-stable")
        (ref,) = so["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["uid"], ref["controller"]) == ("ModelDeployment", owner["metadata"]["uid"], True)
        spec = so["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "digits-stable"}
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 10)
        assert spec["advanced"]["horizontalPodAutoscalerConfig"] == {
            "name": "digits-stable-keda",
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 0},
                "scaleDown": {"stabilizationWindowSeconds": 300},
            },
        }
        assert spec["triggers"] == [
            {"type": "cpu", "metricType": "Utilization", "metadata": {"value": "70"}},
            {"type": "memory", "metricType": "Utilization", "metadata": {"value": "80"}},
            {"type": "prometheus", "metricType": "AverageValue",
             "metadata": {"serverAddress": PROM["spec.prometheusUrl"], "query": RATE_QUERY, "threshold": "20"}},
        ]  # fmt: skip
        assert not h.exists("HorizontalPodAutoscaler", "digits-stable")
        cond = condition(h)
        assert cond is not None and (cond["status"], cond["reason"]) == ("True", "ScaledObject")

        # KEDA makes its HPA and scales the stable Deployment; the operator neither claims nor fights either,
        # and a canary follows the stable Deployment's count.
        keda_hpa(h, so)
        h.user.request(
            "PATCH", f"/apis/apps/v1/namespaces/{h.ns}/deployments/digits-stable/scale",
            query={"fieldManager": "horizontal-pod-autoscaler"}, body={"spec": {"replicas": 6}},
            content_type="application/merge-patch+json",
        )  # fmt: skip
        deployment_ready(h, "digits-stable")
        h.reconcile("ModelDeployment", "digits")
        start_canary(h, rollout={"steps": [50]})
        status = h.get("ModelDeployment", "digits")["status"]
        assert not [c for c in status.get("conditions") or [] if c["type"] == "Stalled"], status["conditions"]
        assert h.get("Deployment", "digits-stable")["spec"]["replicas"] == 6
        assert h.get("Deployment", "digits-canary")["spec"]["replicas"] == 6  # 50 %: as many as stable has
        assert h.exists("HorizontalPodAutoscaler", "digits-stable-keda")

        # Unset: the ScaledObject goes (KEDA's HPA with it, by the garbage collector) and our HPA comes back.
        h.patch("ModelDeployment", "digits", {"spec": {"autoscaling": {"targetRequestsPerSecond": None}}})
        h.reconcile("ModelDeployment", "digits")
        assert not h.exists("ScaledObject", "digits-stable")
        hpa = h.get("HorizontalPodAutoscaler", "digits-stable")
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu", "memory"]
        assert condition(h) is None
        h.reconcile("ModelDeployment", "digits")  # and nothing more to do about it
        assert h.exists("HorizontalPodAutoscaler", "digits-stable") and not h.exists("ScaledObject", "digits-stable")

        # The chart grants exactly the ScaledObject verbs the operator used, and none was refused.
        used, refused = _used(h.plane, f"system:serviceaccount:{h.ns}:{OPERATOR_SA}")
        assert refused == []
        (role,) = [d for d in chart_rbac(h.ns, f"watchNamespaces={{{h.ns}*}}") if d["kind"] == "ClusterRole"]
        granted = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
        assert {g for g in granted if g[0] == "scaledobjects"} == {u for u in used if u[0] == "scaledobjects"}


def test_without_keda_the_hpa_stands_in_with_a_condition_and_keda_takes_over_once_installed_with_a_minimal_crd(
    harness: Harness, control_plane: envtest.ControlPlane
) -> None:
    h = with_keda_reads(harness)
    serving_v1(h, **{"spec.autoscaling": {"targetRequestsPerSecond": 20}})
    cond = condition(h)
    assert cond is not None and (cond["status"], cond["reason"]) == ("False", "KEDANotServed")
    assert cond["message"].startswith(
        "spec.autoscaling.targetRequestsPerSecond (20) needs KEDA (keda.sh/v1alpha1 ScaledObject), which this "
        "cluster does not serve"
    )
    warnings = [e for e in h.events("KEDANotServed") if e["type"] == "Warning"]
    assert len(warnings) == 1, warnings
    hpa = h.get("HorizontalPodAutoscaler", "digits-stable")
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    # The rest goes on: a canary starts.
    start_canary(h)
    assert h.get("ModelDeployment", "digits")["status"]["phase"] == "Canary"
    assert len(h.events("KEDANotServed")) == 1  # said once, not every pass

    with scaled_objects_served(control_plane):
        h.reconcile("ModelDeployment", "digits")
        assert h.exists("ScaledObject", "digits-stable")
        assert not h.exists("HorizontalPodAutoscaler", "digits-stable")
        cond = condition(h)
        assert cond is not None and (cond["status"], cond["reason"]) == ("True", "ScaledObject")
        assert h.get("ModelDeployment", "digits")["status"]["phase"] == "Canary"
