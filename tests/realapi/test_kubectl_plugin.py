"""`kubectl flownexus` (flownexus.cli) against a real API server, with the operator's real passes in between:
pause/resume, promote/abort/retry acknowledged in status, status (and --watch), history, TrainingJob suspend,
and errors that name the object. `predict` needs serving pods (a kubelet): tests/e2e covers the request.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from tests.factories import training_job
from tests.realapi.conftest import Harness
from tests.realapi.test_modeldeployment_passes import T0, StubPrometheus, serving_v1, start_canary

from flownexus.cli import FIELD_MANAGER, run

pytestmark = pytest.mark.realapi


def plugin(h: Harness, *args: str) -> tuple[int, str]:
    """Run the plugin as a user would (its own kubeconfig client); exit status and stdout."""
    out = io.StringIO()
    code = run(["--kubeconfig", str(h.plane.kubeconfig), "-n", h.ns, *args], out)
    return code, out.getvalue()


def in_background(h: Harness, *args: str) -> Callable[[], tuple[int, str]]:
    """Start the plugin in a thread (it waits on a watch); the returned function joins it."""
    result: list[tuple[int, str]] = []
    thread = threading.Thread(target=lambda: result.append(plugin(h, *args)), daemon=True)
    thread.start()

    def join() -> tuple[int, str]:
        thread.join(timeout=60)
        assert result, f"kubectl flownexus {' '.join(args)} did not finish"
        return result[0]

    return join


def until(check: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def md_status(h: Harness) -> dict[str, Any]:
    return dict(h.get("ModelDeployment", "digits").get("status") or {})


def condition(status: dict[str, Any], type_: str) -> str | None:
    return next((c["status"] for c in status.get("conditions") or [] if c["type"] == type_), None)


def managers(obj: dict[str, Any]) -> dict[str, str]:
    return {m["manager"]: str(m.get("fieldsV1")) for m in obj["metadata"].get("managedFields") or []}


def test_pause_holds_the_canary_and_resume_restarts_its_step(harness: Harness) -> None:
    h = harness
    prom = StubPrometheus()
    clock = serving_v1(h, prom)
    start_canary(h)
    code, out = plugin(h, "pause", "digits")
    assert (code, out) == (0, "ModelDeployment digits paused (spec.rollout.paused=true)\n")
    obj = h.get("ModelDeployment", "digits")
    assert obj["spec"]["rollout"]["paused"] is True
    assert "f:paused" in managers(obj)[FIELD_MANAGER]  # a merge patch under the plugin's own field manager

    clock.now = T0 + timedelta(minutes=5)
    h.reconcile("ModelDeployment", "digits")
    st = md_status(h)
    assert st["phase"] == "Canary" and st["reason"] == "Paused" and condition(st, "Paused") == "True"
    assert st["canary"]["step"] == 0 and prom.queries == []  # held: not analysed, not stepped
    code, out = plugin(h, "status", "mdep/digits")
    assert code == 0 and "yes (spec.rollout.paused)" in out and "holds step 1/10 at 5%" in out

    assert plugin(h, "resume", "digits")[0] == 0
    clock.now = T0 + timedelta(minutes=6)
    h.reconcile("ModelDeployment", "digits")
    st = md_status(h)
    assert st["reason"] == "Resumed" and condition(st, "Paused") == "False"
    assert st["canary"]["stepStartedAt"] == clock.now.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_promote_waits_for_the_operator_and_prints_its_record(harness: Harness) -> None:
    h = harness
    serving_v1(h)
    start_canary(h)
    join = in_background(h, "promote", "digits", "--wait", "30")
    action = until(lambda: h.get("ModelDeployment", "digits")["spec"]["rollout"].get("action"), "the action")
    assert action["name"] == "promote" and action["id"].startswith("kubectl-")
    h.reconcile("ModelDeployment", "digits")
    code, out = join()
    assert code == 0, out
    assert f"promote Applied: promoted by spec.rollout.action promote (id {action['id']}) at step 1/10" in out
    st = md_status(h)
    assert st["phase"] == "Promoting" and [a["id"] for a in st["actions"]] == [action["id"]]
    # The same manifest again (what Git re-applies): handled ids are never repeated.
    h.reconcile("ModelDeployment", "digits")
    assert [a["id"] for a in md_status(h)["actions"]] == [action["id"]]


def test_abort_then_retry_from_the_command_line(harness: Harness) -> None:
    h = harness
    serving_v1(h)
    start_canary(h)
    assert plugin(h, "abort", "digits", "--wait", "0")[0] == 0
    h.reconcile("ModelDeployment", "digits")
    st = md_status(h)
    assert st["phase"] == "RolledBack" and st["actions"][-1]["result"] == "Applied"
    assert h.get("Deployment", "digits-canary")["spec"]["replicas"] == 0
    code, out = plugin(h, "history", "digits")
    rolled_back = next(line for line in out.splitlines() if line.startswith("2.0.0"))
    assert code == 0 and "RolledBack" in rolled_back and "aborted by spec.rollout.action abort" in rolled_back

    assert plugin(h, "retry", "digits", "--wait", "0")[0] == 0
    h.reconcile("ModelDeployment", "digits")
    assert md_status(h)["reason"] == "RetiringCanary"  # the rolled-back canary Deployment goes first
    h.collect_garbage("Deployment", "digits-canary")
    h.reconcile("ModelDeployment", "digits")
    st = md_status(h)
    assert st["phase"] == "Canary" and st["canary"]["version"] == "2.0.0" and st["canary"]["step"] == 0
    assert [a["name"] for a in st["actions"]] == ["abort", "retry"]


def test_an_action_that_does_not_apply_exits_1_with_the_operators_reason(harness: Harness) -> None:
    h = harness
    serving_v1(h)
    join = in_background(h, "promote", "digits", "--wait", "30")
    until(lambda: h.get("ModelDeployment", "digits")["spec"]["rollout"].get("action"), "the action")
    h.reconcile("ModelDeployment", "digits")
    code, out = join()
    assert code == 1 and "promote Ignored: no canary under analysis (phase Available)" in out


def test_status_watch_prints_a_line_per_change(harness: Harness) -> None:
    h = harness
    serving_v1(h)
    join = in_background(h, "status", "digits", "--watch", "--timeout", "8")
    time.sleep(1)  # the watch is open
    start_canary(h)
    code, out = join()
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["NAME", "STABLE", "CANARY"]
    # Each track shows its revision: version@template digest.
    name, stable, no_canary = lines[1].split()[:3]
    assert (name, no_canary) == ("digits", "-") and stable.startswith("1.0.0@") and "Available" in lines[1]
    canary = [line for line in lines[2:] if line.startswith("digits")]
    assert canary, out
    name, stable, new, weight, step = canary[-1].split()[:5]
    assert (name, weight, step) == ("digits", "5%", "1/10") and stable.startswith("1.0.0@") and new.startswith("2.0.0@")


def test_trainingjob_suspend_status_and_history(harness: Harness) -> None:
    h = harness
    h.create(training_job("digits"))
    assert plugin(h, "pause", "tj/digits") == (0, "TrainingJob digits suspended (spec.runPolicy.suspend=true)\n")
    assert h.get("TrainingJob", "digits")["spec"]["runPolicy"]["suspend"] is True
    code, out = plugin(h, "status", "tj/digits")
    assert code == 0 and "yes (spec.runPolicy.suspend)" in out
    assert plugin(h, "resume", "tj/digits")[0] == 0
    assert h.get("TrainingJob", "digits")["spec"]["runPolicy"]["suspend"] is False
    code, out = plugin(h, "history", "tj/digits")
    assert code == 0 and out.startswith("Attempts: 0\nValidation: not validated yet")
    code, out = plugin(h, "status")
    assert code == 0 and "trainingjobs:" in out and "digits" in out


def test_errors_name_the_object(harness: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    h = harness
    assert plugin(h, "status", "mdep/nope")[0] == 1
    assert f"error: ModelDeployment nope in namespace {h.ns}: not found" in capsys.readouterr().err
    assert plugin(h, "promote", "nope", "--wait", "0")[0] == 1
    assert f"patching ModelDeployment nope in namespace {h.ns}: not found" in capsys.readouterr().err
    h.create(training_job("digits"))
    assert plugin(h, "promote", "tj/digits")[0] == 1
    assert "promote does not apply to a TrainingJob (TrainingJob digits)" in capsys.readouterr().err
