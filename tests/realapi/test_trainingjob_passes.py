"""TrainingJob passes against a real API server: every write path of the TrainingJob life cycle."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from tests.factories import model_deployment, neural_cluster, training_job
from tests.realapi.conftest import Harness

from flownexus.trainingjob.children import CONFIG_ANNOTATION

pytestmark = pytest.mark.realapi


def started(h: Harness, name: str = "digits", **overrides: object) -> None:
    """A Ready cluster and a TrainingJob whose first attempt's gang runs."""
    if not h.exists("NeuralCluster", "demo"):
        h.ready_cluster(neural_cluster())
    h.create(training_job(name, **overrides))  # type: ignore[arg-type]
    h.reconcile("TrainingJob", name)
    assert h.exists("Job", f"{name}-a1")
    h.job_running(f"{name}-a1")
    h.reconcile("TrainingJob", name)
    assert h.get("TrainingJob", name)["status"]["phase"] == "Running"


def test_suspend_and_resume_of_a_running_trainingjob_reach_its_job(harness: Harness) -> None:
    h = harness
    started(h)
    h.patch("TrainingJob", "digits", {"spec": {"runPolicy": {"suspend": True}}})
    h.reconcile("TrainingJob", "digits")
    assert h.get("Job", "digits-a1")["spec"]["suspend"] is True
    status = h.get("TrainingJob", "digits")["status"]
    assert status["phase"] == "Suspended"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Suspended"] == "True"

    h.patch("TrainingJob", "digits", {"spec": {"runPolicy": {"suspend": False}}})
    h.reconcile("TrainingJob", "digits")
    assert h.get("Job", "digits-a1")["spec"]["suspend"] is False
    assert h.get("TrainingJob", "digits")["status"]["phase"] == "Running"
    assert not h.exists("Job", "digits-a2")  # resuming is not a restart


def test_a_name_taken_by_another_owner_is_reported_and_never_taken_over(harness: Harness) -> None:
    h = harness
    h.ready_cluster(neural_cluster())
    foreign = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "digits-workers", "labels": {"team": "someone-else"}},
        "spec": {"selector": {"app": "theirs"}, "ports": [{"port": 80}]},
    }
    before = h.create(foreign)
    h.create(training_job("digits"))
    h.reconcile("TrainingJob", "digits")

    after = h.get("Service", "digits-workers")
    assert after["spec"]["selector"] == {"app": "theirs"}
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]  # not even touched
    assert not h.exists("Job", "digits-a1")
    status = h.get("TrainingJob", "digits")["status"]
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "OwnershipConflict"
    assert "Service" in stalled["message"] and "digits-workers" in stalled["message"]
    assert "no controller" in stalled["message"]
    assert len(h.events("OwnershipConflict")) == 1

    # The owner removes theirs: the job proceeds and the condition goes.
    h.user.request("DELETE", f"/api/v1/namespaces/{h.ns}/services/digits-workers")
    h.reconcile("TrainingJob", "digits")
    assert h.exists("Job", "digits-a1")
    status = h.get("TrainingJob", "digits")["status"]
    assert not any(c["type"] == "Stalled" for c in status["conditions"])


def test_a_queue_with_limit_one_runs_five_jobs_one_at_a_time_first_come_first_served(harness: Harness) -> None:
    h = harness
    h.ready_cluster(neural_cluster(**{"spec.limits.maxConcurrentTrainingJobs": 1}))
    names = [f"job-{i}" for i in range(5)]
    for name in names:
        h.create(training_job(name, **{"spec.runPolicy.maxRestarts": 0}))
    order: list[str] = []
    for _ in names:
        for name in reversed(names):  # passes in any order: the queue decides, not the pass order
            h.reconcile("TrainingJob", name)
        running = [n for n in names if h.get("TrainingJob", n)["status"].get("attempt", 0) >= 1 and n not in order]
        assert len(running) == 1, f"exactly one job may use the one slot, got {running}"
        order.append(running[0])
        waiting = [n for n in names if n not in order]
        positions = [h.get("TrainingJob", n)["status"].get("queuePosition") for n in waiting]
        assert positions == list(range(1, len(waiting) + 1))
        assert all(h.get("TrainingJob", n)["status"]["reason"] == "WaitingForCapacity" for n in waiting)
        h.job_finished(f"{running[0]}-a1", "Failed", "BackoffLimitExceeded", "a worker failed")
        h.reconcile("TrainingJob", running[0])
        assert h.get("TrainingJob", running[0])["status"]["phase"] == "Failed"
    assert order == names


def test_a_gang_restart_starts_only_when_the_old_gang_is_gone(harness: Harness) -> None:
    h = harness
    started(h)
    h.job_finished("digits-a1", "Failed", "BackoffLimitExceeded", "worker 1 exited 1")
    h.reconcile("TrainingJob", "digits")
    status = h.get("TrainingJob", "digits")["status"]
    assert status["attempt"] == 2 and status["phase"] == "Restarting"
    old = h.get("Job", "digits-a1")
    assert old["metadata"].get("deletionTimestamp")  # foreground: held until its pods are gone
    assert "foregroundDeletion" in old["metadata"]["finalizers"]
    for _ in range(2):
        h.reconcile("TrainingJob", "digits")
        assert not h.exists("Job", "digits-a2"), "attempt 2 must not start while attempt 1 terminates"
    h.collect_garbage("Job", "digits-a1")
    h.reconcile("TrainingJob", "digits")
    assert h.exists("Job", "digits-a2")


def test_concurrent_passes_of_one_trainingjob_create_one_attempt(harness: Harness) -> None:
    h = harness
    h.ready_cluster(neural_cluster())
    h.create(training_job("digits"))
    h.sync()
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def one_pass() -> None:
        barrier.wait()
        try:
            h.controller.run_pass("TrainingJob", h.ns, "digits")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one_pass) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    status = h.get("TrainingJob", "digits")["status"]
    assert status["attempt"] == 1
    jobs = [j["metadata"]["name"] for j in h.client.list("Job", h.ns)]
    assert jobs == ["digits-a1"]
    assert len(h.events("Created")) == 1  # the passes that lost the status race posted nothing


def test_a_running_job_is_not_pinned_by_later_changes_of_its_cluster(harness: Harness) -> None:
    h = harness
    started(h)
    h.patch("NeuralCluster", "demo", {"spec": {"limits": {"maxWorkersPerJob": 1}}})
    h.set_status("NeuralCluster", "demo", {"phase": "Pending"})
    h.reconcile("TrainingJob", "digits")
    assert h.get("TrainingJob", "digits")["status"]["phase"] == "Running"


def test_a_quiet_pass_sends_no_request(harness: Harness) -> None:
    h = harness
    started(h)
    h.reconcile("TrainingJob", "digits")  # settles anything left from the start
    h.reconcile("NeuralCluster", "demo")  # now counts the running job
    h.sync()
    before_rv = h.get("TrainingJob", "digits")["metadata"]["resourceVersion"]
    mark = h.plane.audit_lines()
    for _ in range(3):
        h.controller.run_pass("TrainingJob", h.ns, "digits")
        h.controller.run_pass("NeuralCluster", h.ns, "demo")
    requests = h.operator_requests(mark)
    assert requests == [], [(r["verb"], r["requestURI"]) for r in requests]  # read from the cache, nothing to write
    assert h.get("TrainingJob", "digits")["metadata"]["resourceVersion"] == before_rv


def test_validator_verdict_is_read_only_from_the_validator_jobs_own_pods(harness: Harness) -> None:
    h = harness
    started(h)
    h.job_finished("digits-a1", "Complete")
    h.reconcile("TrainingJob", "digits")
    assert h.get("TrainingJob", "digits")["status"]["phase"] == "Validating"
    validator = h.get("Job", "digits-validate")
    # A pod that only wears the label cannot forge the verdict.
    forged = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "forged", "labels": {"job-name": "digits-validate"}},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }
    h.create(forged)
    h.set_status(
        "Pod",
        "forged",
        {"containerStatuses": [{"name": "c", "image": "busybox", "imageID": "", "ready": False, "restartCount": 0,
                                "state": {"terminated": {"exitCode": 0, "message": '{"passed": true}'}}}]},
    )  # fmt: skip
    h.job_finished("digits-validate", "Complete")
    h.reconcile("TrainingJob", "digits")
    status = h.get("TrainingJob", "digits")["status"]
    assert status["reason"] == "ValidatorError", status
    assert "without writing a verdict" in status["message"]
    assert validator["metadata"]["uid"]
    assert not any(c["type"] == "Validated" and c["status"] == "True" for c in status["conditions"])


def validator_config(h: Harness) -> dict[str, Any]:
    annotations = h.get("Job", "digits-validate")["spec"]["template"]["metadata"]["annotations"]
    return dict(json.loads(annotations[CONFIG_ANNOTATION]))


def test_the_validator_alone_learns_the_run_dir_of_the_champions_served_model(harness: Harness) -> None:
    h = harness
    h.create(model_deployment("served", **{"spec.serving.batchSize": 4, "spec.serving.maxBatchDelayMs": 15}))
    h.set_status(
        "ModelDeployment",
        "served",
        {"phase": "Available", "stable": {"version": "1.0.0", "archive": f"{h.ns}/old-0123abcd/model-store/old.mar"}},
    )
    started(h, **{"spec.validation.champion": {"modelDeployment": "served", "tolerance": 0.01}})
    workers = h.get("Job", "digits-a1")["spec"]["template"]["metadata"]["annotations"][CONFIG_ANNOTATION]
    assert "champion" not in json.loads(workers)["paths"]
    h.job_finished("digits-a1", "Complete")
    h.reconcile("TrainingJob", "digits")
    config = validator_config(h)
    assert config["paths"]["championRunDir"] == f"{h.ns}/old-0123abcd"
    assert config["paths"]["championVersion"] == "1.0.0"
    assert config["validation"]["champion"] == {"modelDeployment": "served", "tolerance": 0.01}
    # The latency gate serves the candidate as the champion's ModelDeployment serves.
    assert config["validation"]["servedLatency"]["batchSize"] == 4
    assert config["validation"]["servedLatency"]["maxBatchDelayMs"] == 15


def test_a_champion_that_serves_nothing_yet_is_reported_absent_to_the_validator(harness: Harness) -> None:
    h = harness
    started(h, **{"spec.validation.champion": {"modelDeployment": "not-there"}})
    h.job_finished("digits-a1", "Complete")
    h.reconcile("TrainingJob", "digits")
    config = validator_config(h)
    assert "does not exist" in config["paths"]["championAbsent"]
    assert "championRunDir" not in config["paths"]
