"""The chart's rights (as `helm template` renders them) are enough for every write path: the passes run as
its ServiceAccount (impersonated), against the real API server's RBAC, cluster-wide and with
``watchNamespaces``, and any missing grant fails with a 403."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from tests.realapi.conftest import Harness, chart_rbac
from tests.realapi.test_modeldeployment_passes import StubPrometheus, serving_v1, start_canary
from tests.realapi.test_trainingjob_passes import started

pytestmark = pytest.mark.realapi


def _rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for doc in docs if doc["kind"] in ("ClusterRole", "Role") for rule in doc["rules"]]


@pytest.mark.parametrize("values", [(), ("watchNamespaces={team-a,team-b}",), ("watchNamespaces={team-*}",)])
def test_the_chart_grants_no_secrets_and_no_pod_writes(values: tuple[str, ...]) -> None:
    for rule in _rules(chart_rbac("x", *values)):
        assert "secrets" not in rule["resources"]
        if "pods" in rule["resources"]:
            assert rule["verbs"] == ["list"]
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]


def test_watching_named_namespaces_grants_roles_there_and_nothing_cluster_wide() -> None:
    docs = chart_rbac("fnx", "watchNamespaces={team-a,team-b}")
    assert not [d for d in docs if d["kind"].startswith("Cluster")]
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    bindings = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "RoleBinding"}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    for binding in bindings.values():
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "flownexus-operator", "namespace": "fnx"}]
    # A glob cannot be a Role's namespace: then the ClusterRole holds everything, as with all namespaces.
    (glob_role,) = [d for d in chart_rbac("fnx", "watchNamespaces={team-*}") if d["kind"] == "ClusterRole"]
    assert len(glob_role["rules"]) > 2 and not [d for d in chart_rbac("fnx") if d["kind"] == "Role"]


@pytest.mark.parametrize("scope", [True, "namespaced"])
def test_a_trainingjob_life_runs_under_the_charts_rights(
    harness_factory: Callable[..., Harness], scope: object
) -> None:
    h = harness_factory(operator_rbac=scope)
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


@pytest.mark.parametrize("scope", [True, "namespaced"])
def test_a_rollout_and_its_rollback_run_under_the_charts_rights(
    harness_factory: Callable[..., Harness], scope: object
) -> None:
    from datetime import timedelta

    h = harness_factory(operator_rbac=scope)
    clock = serving_v1(h, StubPrometheus(error_rate=0.5))
    start_canary(h, rollout={"failedChecksBeforeRollback": 1})
    clock.now = clock.now + timedelta(minutes=1, seconds=1)
    h.reconcile("ModelDeployment", "digits")
    assert h.get("ModelDeployment", "digits")["status"]["phase"] == "RolledBack"
    h.patch("ModelDeployment", "digits", {"spec": {"autoscaling": {"enabled": False}}})
    h.reconcile("ModelDeployment", "digits")  # deletes the HPA
    assert not h.exists("HorizontalPodAutoscaler", "digits-stable")
