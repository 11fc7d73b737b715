"""spec.rollout.smokeTraffic against a real API server: the operator (with the chart's RBAC) creates one smoke
Job per canary step, which the API server accepts (and whose pod template passes Pod Security ``restricted``
admission), replaces it at the next step, brings it back when it goes missing, and deletes it on promotion
and on rollback. There is no Job controller here: the subject is what the operator writes."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from tests.factories import neural_cluster
from tests.realapi.conftest import Harness
from tests.realapi.test_modeldeployment_passes import (
    T0,
    StubPrometheus,
    deployment_ready,
    md,
    serving_v1,
    start_canary,
)

from flownexus.runtime.client import ApiError, path

pytestmark = pytest.mark.realapi
SMOKE = {"requestsPerSecond": 3, "request": '{"inputs": [[0, 1, 2]]}'}
ROLLOUT = {"spec.rollout.smokeTraffic": SMOKE, "spec.rollout.steps": [20, 60]}


def smoke_jobs(h: Harness) -> dict[str, Any]:
    jobs = h.user.list("Job", h.ns)
    return {
        j["metadata"]["name"]: j
        for j in jobs
        if (j["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "smoke-traffic"
    }


def restricted(h: Harness) -> None:
    """What a cluster that enforces Pod Security ``restricted`` in the namespace has."""
    labels = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    h.user.request(
        "PATCH", f"/api/v1/namespaces/{h.ns}", body={"metadata": {"labels": labels}},
        content_type="application/merge-patch+json",
    )  # fmt: skip


def create_pod_from(h: Harness, job: dict[str, Any], name: str) -> None:
    """The pod the Job controller would create from the template (admission judges pods, not Jobs)."""
    template = job["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **template["metadata"]},
        "spec": template["spec"],
    }
    h.user.request("POST", path("Pod", h.ns), body=pod, kind="Pod")


def test_one_smoke_job_per_step_accepted_by_the_api_server_and_gone_after_promotion(
    harness_factory: Callable[..., Harness],
) -> None:
    h = harness_factory(operator_rbac=True)
    restricted(h)
    clock = serving_v1(h, StubPrometheus(error_rate=0.0, p99=12.0), **ROLLOUT)
    assert smoke_jobs(h) == {}  # no canary, no smoke traffic
    start_canary(h)

    # Step 1/2: its Job, the canary Service it sends to, one Event.
    jobs = smoke_jobs(h)
    assert list(jobs) == ["digits-smoke-s0"]
    job = jobs["digits-smoke-s0"]
    assert job["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    assert job["spec"]["activeDeadlineSeconds"] > 0 and job["spec"]["ttlSecondsAfterFinished"] > 0
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FLOWNEXUS_SMOKE_URL"] == f"http://digits-canary.{h.ns}.svc:8080/predictions/digits"
    assert env["FLOWNEXUS_SMOKE_BODY"] == SMOKE["request"] and env["FLOWNEXUS_SMOKE_RPS"] == "3"
    service = h.get("Service", "digits-canary")
    assert service["spec"]["selector"] == {"flownexus.io/modeldeployment": "digits", "flownexus.io/track": "canary"}
    # The namespace enforces restricted: the template's pod is admitted, and a non-compliant one is not.
    create_pod_from(h, job, "smoke-pod-check")
    loose = copy.deepcopy(job)
    loose["spec"]["template"]["spec"]["containers"][0]["securityContext"].pop("capabilities")
    with pytest.raises(ApiError) as refused:
        create_pod_from(h, loose, "loose-pod-check")
    assert "restricted" in str(refused.value)

    h.reconcile("ModelDeployment", "digits")  # the same step: nothing new
    assert smoke_jobs(h)["digits-smoke-s0"]["metadata"]["uid"] == job["metadata"]["uid"]
    assert len(h.events("SmokeTraffic")) == 1

    # Step 2/2: the earlier step's Job goes, the new one comes.
    clock.now = T0 + timedelta(minutes=1, seconds=1)
    h.reconcile("ModelDeployment", "digits")
    assert h.get("ModelDeployment", "digits")["status"]["canary"]["step"] == 1
    assert list(smoke_jobs(h)) == ["digits-smoke-s1"]
    assert len(h.events("SmokeTraffic")) == 2

    # Deleted by someone during the step: the next pass brings it back.
    h.user.request("DELETE", path("Job", h.ns, "digits-smoke-s1"), body={"propagationPolicy": "Background"})
    assert smoke_jobs(h) == {}
    h.reconcile("ModelDeployment", "digits")
    assert list(smoke_jobs(h)) == ["digits-smoke-s1"]

    # Promotion ends the smoke traffic.
    clock.now = T0 + timedelta(minutes=2, seconds=2)
    h.reconcile("ModelDeployment", "digits")
    assert h.get("ModelDeployment", "digits")["status"]["phase"] == "Promoting"
    assert smoke_jobs(h) == {}
    deployment_ready(h, "digits-stable")
    h.reconcile("ModelDeployment", "digits")
    assert h.get("ModelDeployment", "digits")["status"]["phase"] == "Available"
    assert smoke_jobs(h) == {}


def test_a_rollback_deletes_the_smoke_job_after_the_runbook(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory(operator_rbac=True)
    clock = serving_v1(h, StubPrometheus(error_rate=0.5), **ROLLOUT)
    start_canary(h)
    assert list(smoke_jobs(h)) == ["digits-smoke-s0"]
    for minute in (1, 2):
        clock.now = T0 + timedelta(minutes=minute, seconds=1)
        h.reconcile("ModelDeployment", "digits")
        assert list(smoke_jobs(h)) == ["digits-smoke-s0"]  # failed checks keep the step, and its traffic
    clock.now = T0 + timedelta(minutes=3, seconds=1)
    mark = h.plane.audit_lines()
    h.reconcile("ModelDeployment", "digits")
    assert h.get("ModelDeployment", "digits")["status"]["phase"] == "RolledBack"
    assert smoke_jobs(h) == {}
    verbs = [(r["verb"], (r.get("objectRef") or {}).get("resource")) for r in h.operator_requests(mark)]
    verbs = [v for v in verbs if v[0] not in ("get", "list", "watch")]
    assert verbs[-2:] == [("patch", "deployments"), ("delete", "jobs")]  # canary to zero, then the smoke Job


@pytest.mark.parametrize(
    ("request_body", "server_refuses", "words"),
    [
        ("[" + "0," * 9000 + "0]", True, "spec.rollout.smokeTraffic.request: Too long"),
        ("{not json", False, "spec.rollout.smokeTraffic: Value error, request: must be a JSON document"),
    ],
)
def test_a_smoke_request_too_long_is_refused_by_the_api_server_and_one_not_json_by_the_operator(
    harness: Harness, request_body: str, server_refuses: bool, words: str
) -> None:
    """Kubernetes' CEL cannot parse JSON: the API server checks the length, the operator the JSON (InvalidSpec,
    naming the field), and it touches no child."""
    h = harness
    h.ready_cluster(neural_cluster())
    obj = md("1.0.0", "digits", **{"spec.rollout.smokeTraffic": {"request": request_body}})
    if server_refuses:
        with pytest.raises(ApiError) as refused:
            h.create(obj)
        assert refused.value.status == 422 and words in str(refused.value)
        return
    h.create(obj)
    h.reconcile("ModelDeployment", "digits")
    status = h.get("ModelDeployment", "digits")["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidSpec")
    assert words in status["message"]
    assert smoke_jobs(h) == {} and not h.exists("Deployment", "digits-stable")
