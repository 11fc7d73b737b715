"""The TrainingJob life cycle as a pure decision: every phase and transition, and restarts in each."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flownexus.api.trainingjob import TrainingJobSpec, TrainingJobStatus
from flownexus.trainingjob.decide import JobState, Observed, decide, job_state
from tests.factories import training_job

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
OK = Observed(
    cluster_ready=True,
    cluster_problem="",
    queue_position=None,
    max_workers=8,
    worker_job=JobState.MISSING,
    previous_attempt_present=False,
    worker_failure="",
    validator_job=JobState.MISSING,
    verdict=None,
    now=NOW,
)


def spec(**overrides: Any) -> TrainingJobSpec:
    return TrainingJobSpec.model_validate(training_job(**overrides)["spec"])


def status(**fields: Any) -> TrainingJobStatus:
    return TrainingJobStatus.model_validate(fields)


def cond(st: TrainingJobStatus, type_: str) -> str | None:
    return next((c.status for c in st.conditions if c.type == type_), None)


def test_new_job_creates_attempt_one() -> None:
    plan = decide(spec(), status(), OK, 1)
    assert plan.create_attempt == 1 and plan.status.attempt == 1
    assert plan.status.phase == "Created" and cond(plan.status, "Created") == "True"
    assert plan.events and plan.events[0][1] == "Created"


@pytest.mark.parametrize(
    ("observed", "reason"),
    [
        (replace(OK, cluster_ready=False, cluster_problem="NeuralCluster demo does not exist"), "ClusterNotReady"),
        (replace(OK, queue_position=2), "WaitingForCapacity"),
        (replace(OK, max_workers=1), "TooManyWorkers"),
    ],
)
def test_waits_in_pending_never_fails(observed: Observed, reason: str) -> None:
    plan = decide(spec(), status(), observed, 1)
    assert plan.status.phase == "Pending" and plan.status.reason == reason
    assert plan.create_attempt is None


def test_suspended_before_start_creates_nothing() -> None:
    plan = decide(spec(**{"spec.runPolicy.suspend": True}), status(), OK, 1)
    assert plan.status.phase == "Suspended" and plan.create_attempt is None


def test_running_attempt() -> None:
    plan = decide(spec(), status(attempt=1, phase="Created"), replace(OK, worker_job=JobState.RUNNING), 1)
    assert plan.status.phase == "Running" and cond(plan.status, "Running") == "True"


def test_worker_failure_restarts_the_whole_gang_as_a_new_attempt() -> None:
    obs = replace(OK, worker_job=JobState.FAILED, worker_failure="BackoffLimitExceeded")
    plan = decide(spec(**{"spec.runPolicy.maxRestarts": 2}), status(attempt=1, phase="Running"), obs, 1)
    assert plan.status.attempt == 2 and plan.delete_attempt == 1
    assert plan.create_attempt is None  # not while the old gang's pods may still run
    assert plan.status.phase == "Restarting" and cond(plan.status, "Restarting") == "True"
    assert "resumes from the latest checkpoint" in (plan.status.message or "")


def test_the_next_attempt_waits_until_the_previous_jobs_pods_are_gone() -> None:
    restarting = status(attempt=2, phase="Restarting", reason="WorkerFailed")
    waiting = decide(spec(), restarting, replace(OK, previous_attempt_present=True), 1)
    assert waiting.create_attempt is None and waiting.delete_attempt == 1
    assert waiting.status.phase == "Restarting" and "once the pods of attempt 1 are gone" in (
        waiting.status.message or ""
    )
    gone = decide(spec(), restarting, OK, 1)
    assert gone.create_attempt == 2


def test_the_queue_position_is_in_status_while_waiting_and_cleared_on_admission() -> None:
    waiting = decide(spec(), status(), replace(OK, queue_position=3), 1)
    assert waiting.status.queue_position == 3 and "number 3 in the queue" in (waiting.status.message or "")
    admitted = decide(spec(), waiting.status, OK, 1)
    assert admitted.status.queue_position is None and admitted.create_attempt == 1


@pytest.mark.parametrize(
    "observed",
    [
        replace(OK, cluster_ready=False, cluster_problem="NeuralCluster demo is not Ready yet"),
        replace(OK, max_workers=1),
    ],
)
def test_admission_checks_do_not_pin_a_running_job(observed: Observed) -> None:
    plan = decide(spec(), status(attempt=1, phase="Running"), replace(observed, worker_job=JobState.RUNNING), 1)
    assert plan.status.phase == "Running"


def test_a_validator_that_finished_without_a_verdict_fails_the_gate() -> None:
    obs = replace(OK, worker_job=JobState.SUCCEEDED, validator_job=JobState.SUCCEEDED, verdict=None)
    plan = decide(spec(), status(attempt=1, phase="Validating"), obs, 1)
    assert plan.status.phase == "Failed" and plan.status.reason == "ValidatorError"


def test_restart_limit_fails_with_the_reason() -> None:
    obs = replace(OK, worker_job=JobState.FAILED, worker_failure="BackoffLimitExceeded")
    plan = decide(spec(**{"spec.runPolicy.maxRestarts": 1}), status(attempt=2, phase="Running"), obs, 1)
    assert plan.status.phase == "Failed" and plan.status.reason == "RestartLimitExceeded"
    assert plan.create_attempt is None and cond(plan.status, "Failed") == "True"
    assert plan.events[-1][0] == "Warning"


def test_suspend_and_resume_a_running_attempt() -> None:
    running = replace(OK, worker_job=JobState.RUNNING)
    plan = decide(spec(**{"spec.runPolicy.suspend": True}), status(attempt=1, phase="Running"), running, 2)
    assert plan.suspend_attempt is True and plan.status.phase == "Suspended"
    suspended = replace(OK, worker_job=JobState.SUSPENDED)
    plan = decide(spec(), status(attempt=1, phase="Suspended"), suspended, 3)
    assert plan.suspend_attempt is False and plan.status.phase == "Running"


def test_trained_job_starts_the_validator() -> None:
    plan = decide(spec(), status(attempt=1, phase="Running"), replace(OK, worker_job=JobState.SUCCEEDED), 1)
    assert plan.create_validator and plan.status.phase == "Validating"
    assert cond(plan.status, "Trained") == "True"


def test_passed_validation_succeeds() -> None:
    verdict = {
        "passed": True,
        "failed": [],
        "testAccuracy": 0.97,
        "latencyP95Ms": 0.4,
        "modelArchive": "/artifacts/default/digits/digits.mar",
    }
    obs = replace(OK, worker_job=JobState.SUCCEEDED, validator_job=JobState.SUCCEEDED, verdict=verdict)
    plan = decide(spec(), status(attempt=1, phase="Validating"), obs, 1)
    assert plan.status.phase == "Succeeded" and cond(plan.status, "Validated") == "True"
    assert plan.status.validation is not None and plan.status.validation.accuracy == 0.97
    assert plan.status.artifacts is not None and plan.status.artifacts.model_archive.endswith(".mar")


def test_failed_validation_names_every_threshold() -> None:
    failures = ["minAccuracy: test accuracy 0.610 < 0.99", "maxOverfittingGap: train - test 0.08 > 0.05"]
    verdict = {"passed": False, "failed": failures}
    obs = replace(OK, worker_job=JobState.SUCCEEDED, validator_job=JobState.SUCCEEDED, verdict=verdict)
    plan = decide(spec(), status(attempt=1, phase="Validating"), obs, 1)
    assert plan.status.phase == "Failed" and plan.status.reason == "ValidationFailed"
    assert cond(plan.status, "Validated") == "False"
    assert "minAccuracy" in (plan.status.message or "") and "maxOverfittingGap" in (plan.status.message or "")


def test_deadline_exceeded_fails_and_stops_pods() -> None:
    started = (NOW - timedelta(seconds=100)).strftime("%Y-%m-%dT%H:%M:%SZ")
    plan = decide(
        spec(**{"spec.runPolicy.activeDeadlineSeconds": 60}),
        status(attempt=1, phase="Running", startTime=started),
        replace(OK, worker_job=JobState.RUNNING),
        1,
    )
    assert plan.status.reason == "DeadlineExceeded" and plan.delete_attempt == 1


def test_ttl_after_finished() -> None:
    done = (NOW - timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    s = status(attempt=1, phase="Succeeded", completionTime=done)
    assert decide(spec(**{"spec.runPolicy.ttlSecondsAfterFinished": 10}), s, OK, 1).delete_self
    plan = decide(spec(**{"spec.runPolicy.ttlSecondsAfterFinished": 60}), s, OK, 1)
    assert not plan.delete_self and plan.requeue_after == pytest.approx(30)


@pytest.mark.parametrize("phase", ["Created", "Running", "Restarting", "Validating", "Suspended"])
def test_restarted_operator_resumes_without_recreating(phase: str) -> None:
    """After an operator restart the same status and children lead to no duplicate attempt."""
    worker = JobState.SUSPENDED if phase == "Suspended" else JobState.RUNNING
    validator = JobState.RUNNING if phase == "Validating" else JobState.MISSING
    s = spec(**{"spec.runPolicy.suspend": phase == "Suspended"})
    plan = decide(s, status(attempt=2, phase=phase), replace(OK, worker_job=worker, validator_job=validator), 1)
    assert plan.create_attempt is None and plan.status.attempt == 2


def test_job_state_reads_conditions() -> None:
    assert job_state(None) is JobState.MISSING
    assert job_state({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}) is JobState.SUCCEEDED
    assert job_state({"status": {"conditions": [{"type": "Failed", "status": "True"}]}}) is JobState.FAILED
    assert job_state({"spec": {"suspend": True}, "status": {}}) is JobState.SUSPENDED
    assert job_state({"spec": {"parallelism": 2}, "status": {"active": 2, "ready": 2}}) is JobState.RUNNING
    assert job_state({"spec": {"parallelism": 2}, "status": {"active": 2, "ready": 1}}) is JobState.STARTING


def test_gang_not_yet_running_stays_created_and_running_never_flips_back() -> None:
    starting = replace(OK, worker_job=JobState.STARTING)
    assert decide(spec(), status(attempt=1, phase="Created"), starting, 1).status.phase == "Created"
    assert decide(spec(), status(attempt=2, phase="Restarting"), starting, 1).status.phase == "Restarting"
    assert decide(spec(), status(attempt=1, phase="Running"), starting, 1).status.phase == "Running"


def test_job_deadline_failure_is_final_not_a_restart() -> None:
    obs = replace(OK, worker_job=JobState.FAILED, worker_failure="DeadlineExceeded: Job was active longer")
    plan = decide(spec(**{"spec.runPolicy.activeDeadlineSeconds": 600}), status(attempt=1, phase="Running"), obs, 1)
    assert plan.status.reason == "DeadlineExceeded" and plan.create_attempt is None


@pytest.mark.parametrize("validator", [JobState.STARTING, JobState.RUNNING, JobState.SUSPENDED])
def test_unfinished_validator_is_waited_for(validator: JobState) -> None:
    obs = replace(OK, worker_job=JobState.SUCCEEDED, validator_job=validator)
    plan = decide(spec(), status(attempt=1, phase="Validating"), obs, 1)
    assert plan.status.phase == "Validating" and plan.status.validation is None


def test_an_input_error_fails_the_job_at_once_with_the_workers_message() -> None:
    failed = replace(
        OK,
        worker_job=JobState.FAILED,
        worker_failure="BackoffLimitExceeded",
        worker_error="worker 0: InputError: dataset.path: 'data/missing.csv' does not exist in the artifact store",
        worker_retryable=False,
    )
    plan = decide(spec(), status(phase="Running", attempt=1), failed, 1)
    assert plan.status.phase == "Failed" and plan.status.reason == "InputError"
    assert "data/missing.csv" in (plan.status.message or "")
    assert plan.status.attempt == 1 and plan.create_attempt is None and plan.delete_attempt is None


def test_a_retryable_worker_error_restarts_and_its_message_is_in_status() -> None:
    failed = replace(
        OK, worker_job=JobState.FAILED, worker_failure="BackoffLimitExceeded", worker_error="worker 1: boom"
    )
    plan = decide(spec(), status(phase="Running", attempt=1), failed, 1)
    assert plan.status.phase == "Restarting" and plan.status.attempt == 2
    assert "worker 1: boom" in (plan.status.message or "")


def test_pods_the_job_controller_cannot_create_stall_the_job_with_its_reason_then_clear() -> None:
    refused = replace(
        OK,
        worker_job=JobState.STARTING,
        create_error='pods "digits-a1-0-x" is forbidden: violates PodSecurity "restricted:latest"',
    )
    plan = decide(spec(), status(phase="Created", attempt=1), refused, 1)
    assert cond(plan.status, "Stalled") == "True" and plan.status.reason == "FailedCreate"
    assert "violates PodSecurity" in (plan.status.message or "")
    assert [e[1] for e in plan.events] == ["FailedCreate"]
    assert plan.requeue_after is not None and plan.requeue_after <= 30
    again = decide(spec(), plan.status, refused, 1)
    assert again.events == []  # one Event per new message, not one per pass
    created = decide(spec(), plan.status, replace(OK, worker_job=JobState.RUNNING), 1)
    assert cond(created.status, "Stalled") == "False" and created.status.phase == "Running"
