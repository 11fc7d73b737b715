"""Errors reach the TrainingJob's status, against a real API server: a child the API server refuses, pods
the Job controller cannot create, and a worker's own error (its termination message)."""

from __future__ import annotations

import json
import time

import pytest
from tests.factories import neural_cluster, training_job
from tests.realapi.conftest import Harness

from flownexus.runtime.client import ApiError
from flownexus.trainingjob import reconciler

pytestmark = pytest.mark.realapi


def condition(h: Harness, name: str, type_: str) -> dict[str, str] | None:
    conditions = h.get("TrainingJob", name)["status"].get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), None)


def test_a_job_the_api_server_refuses_stalls_the_trainingjob_with_its_answer_until_it_lands(harness: Harness) -> None:
    h = harness
    h.ready_cluster(neural_cluster())
    quotas = f"/api/v1/namespaces/{h.ns}/resourcequotas"
    hard = {"count/jobs.batch": "0"}
    h.user.request("POST", quotas, body={"metadata": {"name": "no-jobs"}, "spec": {"hard": hard}})
    # What the quota controller writes; admission counts against it.
    h.user.request(
        "PATCH", f"{quotas}/no-jobs/status", body={"status": {"hard": hard, "used": {"count/jobs.batch": "0"}}},
        content_type="application/merge-patch+json",
    )  # fmt: skip
    h.create(training_job("digits"))

    with pytest.raises(ApiError) as refused:
        h.reconcile("TrainingJob", "digits")
    assert refused.value.status == 403
    stalled = condition(h, "digits", "Stalled")
    assert stalled is not None and stalled["status"] == "True" and stalled["reason"] == "ChildRejected"
    assert "Job digits-a1" in stalled["message"] and "exceeded quota" in stalled["message"], stalled
    assert [e["message"] for e in h.events("ChildRejected")] == [stalled["message"]]
    assert not h.exists("Job", "digits-a1")

    h.user.request("DELETE", f"{quotas}/no-jobs")
    h.reconcile("TrainingJob", "digits")
    assert h.exists("Job", "digits-a1")
    assert condition(h, "digits", "Stalled") is None


def test_pods_the_job_controller_cannot_create_stall_the_trainingjob_with_its_reason(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    monkeypatch.setattr(reconciler, "POD_GRACE_S", 0.0)
    h.ready_cluster(neural_cluster())
    h.create(training_job("digits"))
    h.reconcile("TrainingJob", "digits")
    job = h.get("Job", "digits-a1")
    refusal = (
        'Error creating: pods "digits-a1-0-7xk2p" is forbidden: violates PodSecurity "restricted:latest": '
        'unrestricted capabilities (container "trainer" must set securityContext.capabilities.drop=["ALL"])'
    )
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    h.create(
        {   # as the Job controller records it
            "apiVersion": "v1", "kind": "Event", "metadata": {"name": "digits-a1.refused"},
            "involvedObject": {"apiVersion": "batch/v1", "kind": "Job", "name": "digits-a1", "namespace": h.ns,
                               "uid": job["metadata"]["uid"]},
            "reason": "FailedCreate", "type": "Warning", "message": refusal,
            "source": {"component": "job-controller"}, "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
    )  # fmt: skip
    requeue = h.reconcile("TrainingJob", "digits")
    assert requeue is not None and requeue <= 30  # looked at again while the pods are missing
    status = h.get("TrainingJob", "digits")["status"]
    stalled = condition(h, "digits", "Stalled")
    assert stalled is not None and stalled["status"] == "True" and stalled["reason"] == "FailedCreate"
    assert "violates PodSecurity" in stalled["message"] and status["reason"] == "FailedCreate"
    assert len(h.events("FailedCreate")) == 2  # the Job controller's, and ours on the TrainingJob

    h.job_running("digits-a1")
    h.reconcile("TrainingJob", "digits")
    stalled = condition(h, "digits", "Stalled")
    assert stalled is not None and stalled["status"] == "False"
    assert h.get("TrainingJob", "digits")["status"]["phase"] == "Running"


def _failed_pod(h: Harness, job: str, index: int, message: str) -> None:
    uid = h.get("Job", job)["metadata"]["uid"]
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{job}-{index}-abcde", "labels": {"batch.kubernetes.io/controller-uid": uid},
                     "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
        "spec": {"containers": [{"name": "trainer", "image": "trainer"}], "restartPolicy": "Never"},
    }  # fmt: skip
    h.create(pod)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    terminated = {"exitCode": 1, "reason": "Error", "message": message, "startedAt": stamp, "finishedAt": stamp}
    h.set_status("Pod", pod["metadata"]["name"], {
        "phase": "Failed",
        "containerStatuses": [{"name": "trainer", "image": "trainer", "imageID": "", "ready": False,
                               "restartCount": 0, "state": {"terminated": terminated}}],
    })  # fmt: skip


def test_a_workers_input_error_fails_the_trainingjob_at_once_with_its_message(harness: Harness) -> None:
    h = harness
    h.ready_cluster(neural_cluster())
    h.create(training_job("digits", **{"spec.runPolicy.maxRestarts": 3}))
    h.reconcile("TrainingJob", "digits")
    error = "InputError: dataset.path: 'data/nope.csv' does not exist in the artifact store"
    _failed_pod(h, "digits-a1", 0, json.dumps({"error": error, "retryable": False}))
    _failed_pod(h, "digits-a1", 1, "RuntimeError: connection reset by peer\n")  # another rank, plain log tail
    h.job_finished("digits-a1", "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    h.reconcile("TrainingJob", "digits")
    status = h.get("TrainingJob", "digits")["status"]
    assert status["phase"] == "Failed" and status["reason"] == "InputError"
    assert "worker 0: InputError: dataset.path: 'data/nope.csv' does not exist" in status["message"]
    assert status["attempt"] == 1 and not h.exists("Job", "digits-a2")


def test_a_workers_retryable_error_restarts_and_names_the_rank(harness: Harness) -> None:
    h = harness
    h.ready_cluster(neural_cluster())
    h.create(training_job("digits", **{"spec.runPolicy.maxRestarts": 3}))
    h.reconcile("TrainingJob", "digits")
    _failed_pod(h, "digits-a1", 1, json.dumps({"error": "RuntimeError: NCCL timeout", "retryable": True}))
    h.job_finished("digits-a1", "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    h.reconcile("TrainingJob", "digits")
    status = h.get("TrainingJob", "digits")["status"]
    assert status["phase"] == "Restarting" and status["attempt"] == 2
    assert "worker 1: RuntimeError: NCCL timeout" in status["message"]
