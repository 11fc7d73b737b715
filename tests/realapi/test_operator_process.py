"""The operator as users run it (`python -m flownexus`, Kopf watches, the work queues) against a real API
server: watch events drive the passes, and a quiet object costs no requests at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from tests.factories import neural_cluster, training_job
from tests.realapi.conftest import OPERATOR_SA, REPO, Harness, chart_rbac, install, token_kubeconfig

pytestmark = pytest.mark.realapi


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def operator(harness: Harness) -> Iterator[subprocess.Popen[bytes]]:
    """The operator as the chart installs it for one namespace: its ServiceAccount's token, its Role."""
    log = harness.plane.root / f"operator-{harness.ns}.log"
    install(harness.user, chart_rbac(harness.ns, f"watchNamespaces={{{harness.ns}}}"))
    kubeconfig = token_kubeconfig(
        harness.plane, harness.ns, OPERATOR_SA, harness.plane.root / f"operator-{harness.ns}.kubeconfig"
    )
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONPATH": f"{REPO / 'operator'}"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flownexus", "--namespace", harness.ns, "--metrics-port", "0", "--health-port", "0"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    yield proc
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.returncode not in (0, -signal.SIGINT, 130):
        print(log.read_text()[-4000:])


def phase(h: Harness, kind: str, name: str) -> str | None:
    obj = h.user.get(kind, h.ns, name)
    return ((obj or {}).get("status") or {}).get("phase")


def test_watch_events_drive_the_trainingjob_and_quiet_objects_cost_no_requests(
    harness: Harness, operator: subprocess.Popen[bytes]
) -> None:
    h = harness
    h.create(neural_cluster())
    h.create(training_job("digits"))
    wait_for("the NeuralCluster to be Ready", lambda: phase(h, "NeuralCluster", "demo") == "Ready")
    wait_for("attempt 1's Job", lambda: h.exists("Job", "digits-a1"))
    wait_for("phase Created", lambda: phase(h, "TrainingJob", "digits") == "Created")
    h.job_running("digits-a1")  # what the Job controller reports once every pod runs
    wait_for("phase Running", lambda: phase(h, "TrainingJob", "digits") == "Running", timeout=10)
    counted = lambda: h.get("NeuralCluster", "demo")["status"]["activeTrainingJobs"] == 1  # noqa: E731
    wait_for("the cluster to count the job", counted)

    time.sleep(2)  # let the echoes of our own writes come back through the watches
    mark = h.plane.audit_lines()
    # Rank 0 reports an epoch: its own fields only; nothing for the operator to decide.
    h.set_status("TrainingJob", "digits", {"progress": {"epoch": 3, "loss": 0.5}})
    time.sleep(5)
    requests = h.operator_requests(mark)
    assert requests == [], [(r["verb"], r["requestURI"]) for r in requests]
    assert operator.poll() is None, "the operator exited"

    # Kopf keeps no bookkeeping on our objects: a copy made with `kubectl get -o yaml` is an ordinary new object.
    meta = h.get("TrainingJob", "digits")["metadata"]
    assert not meta.get("finalizers"), meta.get("finalizers")
    assert not [a for a in meta.get("annotations") or {} if "kopf" in a or "last-handled" in a], meta.get("annotations")

    # The user deletes the running Job: the watch brings the pass that recreates it.
    h.user.request("DELETE", f"/apis/batch/v1/namespaces/{h.ns}/jobs/digits-a1")
    wait_for("attempt 1's Job again", lambda: h.exists("Job", "digits-a1"))

    # Everything above ran with the chart's rights for one namespace: not one request was refused.
    user = f"system:serviceaccount:{h.ns}:{OPERATOR_SA}"
    refused = [
        (e["verb"], e["requestURI"])
        for e in h.plane.audit_events()
        if e.get("stage") == "ResponseComplete"
        and (e.get("user") or {}).get("username") == user
        and (e.get("responseStatus") or {}).get("code") == 403
    ]
    assert refused == []
