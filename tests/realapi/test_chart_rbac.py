"""The chart's ClusterRole is enough for every write path: the passes run as its ServiceAccount
(impersonated), against the real API server's RBAC, and any missing grant fails with a 403."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tests.realapi.conftest import Harness, chart_rbac
from tests.realapi.test_modeldeployment_passes import StubPrometheus, serving_v1, start_canary
from tests.realapi.test_trainingjob_passes import started

pytestmark = pytest.mark.realapi


def test_the_chart_grants_no_secrets_and_no_pod_deletes() -> None:
    (role, _) = chart_rbac("x")
    for rule in role["rules"]:
        assert "secrets" not in rule["resources"]
        if "pods" in rule["resources"]:
            assert rule["verbs"] == ["list"]


def test_a_trainingjob_life_runs_under_the_charts_rights(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory(operator_rbac=True)
    started(h, **{"spec.runPolicy.ttlSecondsAfterFinished": 0})
    h.job_finished("digits-a1", "Failed", "BackoffLimitExceeded", "worker 0 exited 1")
    h.reconcile("TrainingJob", "digits")  # restart: foreground delete of attempt 1
    h.collect_garbage("Job", "digits-a1")
    h.reconcile("TrainingJob", "digits")  # attempt 2 (apply of Job, Service, RBAC for the pods)
    h.job_running("digits-a2")
    h.reconcile("TrainingJob", "digits")
    h.job_finished("digits-a2", "Complete")
    h.reconcile("TrainingJob", "digits")  # validator Job
    h.job_finished("digits-validate", "Complete")
    h.reconcile("TrainingJob", "digits")  # reads the validator's pods; no verdict: Failed
    assert h.get("TrainingJob", "digits")["status"]["phase"] == "Failed"
    h.reconcile("TrainingJob", "digits")  # TTL 0: deletes itself
    assert not h.exists("TrainingJob", "digits")


def test_a_rollout_and_its_rollback_run_under_the_charts_rights(harness_factory: Callable[..., Harness]) -> None:
    from datetime import timedelta

    h = harness_factory(operator_rbac=True)
    clock = serving_v1(h, StubPrometheus(error_rate=0.5))
    start_canary(h, rollout={"failedChecksBeforeRollback": 1})
    clock.now = clock.now + timedelta(minutes=1, seconds=1)
    h.reconcile("ModelDeployment", "digits")
    assert h.get("ModelDeployment", "digits")["status"]["phase"] == "RolledBack"
    h.patch("ModelDeployment", "digits", {"spec": {"autoscaling": {"enabled": False}}})
    h.reconcile("ModelDeployment", "digits")  # deletes the HPA
    assert not h.exists("HorizontalPodAutoscaler", "digits-stable")
