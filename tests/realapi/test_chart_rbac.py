"""The chart's rights (as `helm template` renders them) are enough for every write path: the passes run as
its ServiceAccount (impersonated), against the real API server's RBAC, cluster-wide and with
``watchNamespaces``, and any missing grant fails with a 403."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from dev.localcluster import envtest
from tests.chart import render_chart
from tests.factories import neural_cluster, training_job
from tests.realapi.conftest import OPERATOR_SA, REPO, Harness, chart_rbac, token_kubeconfig
from tests.realapi.test_modeldeployment_passes import StubPrometheus, serving_v1, start_canary

from flownexus.handlers import CHILDREN, PRIMARY
from flownexus.runtime.client import PLURALS, Ref
from flownexus.runtime.controller import CONFLICT_RETRY_S
from flownexus.trainingjob import reconciler

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


def conflicted_pass(h: Harness, kind: str, name: str) -> None:
    """A pass that decides on a cached object that a user changed meanwhile: its status write conflicts,
    and the next pass reads the object afresh (a GET)."""
    h.sync()
    h.patch(kind, name, {"metadata": {"labels": {"touched": str(time.time_ns())}}})
    assert h.controller.run_pass(kind, h.ns, name) == CONFLICT_RETRY_S


def trainingjob_life(h: Harness) -> None:
    """A TrainingJob from creation to its TTL: pods refused once, a failed attempt, a restart, the validator."""
    h.create(neural_cluster())
    conflicted_pass(h, "NeuralCluster", "demo")
    h.reconcile("NeuralCluster", "demo")
    h.create(training_job("digits", **{"spec.runPolicy.ttlSecondsAfterFinished": 0}))
    conflicted_pass(h, "TrainingJob", "digits")
    h.reconcile("TrainingJob", "digits")
    h.reconcile("TrainingJob", "digits")  # the gang is not running yet: looks for the Job controller's FailedCreate
    h.job_running("digits-a1")
    h.reconcile("TrainingJob", "digits")
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


def rollout_and_rollback(h: Harness) -> None:
    """A ModelDeployment serving v1, a canary of v2 rolled back, then autoscaling switched off."""
    clock = serving_v1(h, StubPrometheus(error_rate=0.5))
    start_canary(h, rollout={"failedChecksBeforeRollback": 1})
    clock.now = clock.now + timedelta(minutes=1, seconds=1)
    h.reconcile("ModelDeployment", "digits")
    assert h.get("ModelDeployment", "digits")["status"]["phase"] == "RolledBack"
    h.patch("ModelDeployment", "digits", {"spec": {"autoscaling": {"enabled": False}}})
    h.reconcile("ModelDeployment", "digits")  # deletes the HPA
    assert not h.exists("HorizontalPodAutoscaler", "digits-stable")
    # The user goes back to version 1: the rolled-back canary has no reason to stay.
    h.patch(
        "ModelDeployment", "digits", {"spec": {"model": {"trainingJobRef": {"name": "digits"}, "version": "1.0.0"}}}
    )
    conflicted_pass(h, "ModelDeployment", "digits")
    h.reconcile("ModelDeployment", "digits")
    # Deleted in the foreground: it goes once its pods are gone (the garbage collector's part, played here).
    assert h.get("Deployment", "digits-canary")["metadata"].get("deletionTimestamp")
    h.collect_garbage("Deployment", "digits-canary")
    assert not h.exists("Deployment", "digits-canary")


@pytest.mark.parametrize("scope", [True, "namespaced"])
def test_a_trainingjob_life_runs_under_the_charts_rights(
    harness_factory: Callable[..., Harness], scope: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconciler, "POD_GRACE_S", 0.0)
    trainingjob_life(harness_factory(operator_rbac=scope))


@pytest.mark.parametrize("scope", [True, "namespaced"])
def test_a_rollout_and_its_rollback_run_under_the_charts_rights(
    harness_factory: Callable[..., Harness], scope: object
) -> None:
    rollout_and_rollback(harness_factory(operator_rbac=scope))


def _used(plane: envtest.ControlPlane, user: str) -> tuple[set[tuple[str, str]], list[str]]:
    """(resource[/subresource], verb) of every request ``user`` made, and the ones refused. A server-side
    apply that created its object (201) needed ``create`` as well as ``patch``."""
    used, refused = set(), []
    for event in plane.audit_events():
        # A watch is audited when its response starts; the passes' client acts by impersonation.
        stages = ("ResponseComplete", "ResponseStarted") if event.get("verb") == "watch" else ("ResponseComplete",)
        acting = event.get("impersonatedUser") or event.get("user") or {}
        if event.get("stage") not in stages or acting.get("username") != user:  # type: ignore[union-attr]
            continue
        ref: dict[str, str] = event.get("objectRef") or {}  # type: ignore[assignment]
        if not ref.get("resource"):
            continue  # discovery
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        verb, code = str(event["verb"]), (event.get("responseStatus") or {}).get("code")  # type: ignore[union-attr]
        used.add((resource, verb))
        if verb == "patch" and code == 201:
            used.add((resource, "create"))
        if code == 403:
            refused.append(f"{verb} {event.get('requestURI')}")
    return used, refused


def test_every_grant_of_the_chart_is_used_and_none_is_missing(
    harness_factory: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's real traffic, read from the API server's audit log, against the chart's ClusterRole
    (glob mode, the broadest): both life cycles through the passes, and the operator process's watches."""
    monkeypatch.setattr(reconciler, "POD_GRACE_S", 0.0)
    h = harness_factory(operator_rbac="glob")
    trainingjob_life(h)
    h.user.delete(Ref("NeuralCluster", h.ns, "demo"))  # the rollout brings its own (with a Prometheus)
    rollout_and_rollback(h)
    user = f"system:serviceaccount:{h.ns}:{OPERATOR_SA}"
    kubeconfig = token_kubeconfig(h.plane, h.ns, OPERATOR_SA, h.plane.root / f"grants-{h.ns}.kubeconfig")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONPATH": f"{REPO / 'operator'}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flownexus", "--namespace", f"{h.ns}*", "--metrics-port", "0", "--health-port", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        watched = {PLURALS[k][1] for k in (*PRIMARY, *CHILDREN)} | {"customresourcedefinitions", "namespaces"}
        deadline = time.monotonic() + 30
        while {r for r, v in _used(h.plane, user)[0] if v == "watch"} < watched:
            assert time.monotonic() < deadline, f"the operator watched only {_used(h.plane, user)[0]}"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    used, refused = _used(h.plane, user)
    assert refused == []
    (role,) = [d for d in chart_rbac(h.ns, f"watchNamespaces={{{h.ns}*}}") if d["kind"] == "ClusterRole"]
    granted = {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    # KEDA's ScaledObjects are used only where KEDA is installed: test_modeldeployment_keda.py checks those grants.
    granted = {(res, verb) for res, verb in granted if res != "scaledobjects"}
    # Held only so that the operator may grant them to a job's rank 0 (RBAC's escalation check).
    trainer_role = h.user.get("Role", h.ns, "digits-trainer")
    assert trainer_role is not None
    delegated = {(r, v) for rule in trainer_role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert granted - used - delegated == set()


def test_the_chart_runs_one_operator_replica_that_is_gone_before_the_next_starts() -> None:
    """High availability by restart, not by election: never two operators reconciling at once."""
    (deployment,) = [d for d in render_chart("fnx") if d["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in args if "peering" in a]
