"""Bring your own model code, end to end: examples/custom-cnn (a CNN on digits read as 1x8x8 images, written with
flownexus_trainer.sdk) in its own image built from its Containerfile, trained by 2 DDP worker pods, gated by the
unchanged validator, served by a ModelDeployment, and rolled out through the canary path that smoke traffic
(spec.rollout.smokeTraffic) gives the data its analysis reads from a real Prometheus.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import REPO, Cluster, build_image, wait_until
from tests.e2e.test_s3_store import plugin
from tests.e2e.test_trainingjob import TRAIN_TIMEOUT_S, example, wait_phase

pytestmark = pytest.mark.e2e
CUSTOM_TAG = "flownexus/custom-cnn:0.1.0"  # the name examples/custom-cnn/trainingjob.yaml uses


@pytest.fixture(scope="session")
def custom_image(trainer_image: str) -> str:
    """examples/custom-cnn/Containerfile, built FROM the trainer image just built (its harness reference)."""
    return build_image(
        REPO / "examples" / "custom-cnn", "custom-cnn", tag=CUSTOM_TAG, build_args={"BASE": trainer_image}
    )


def md_status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = cluster.get("-n", namespace, "mdep", name).get("status") or {}
    return status


def test_the_custom_cnn_trains_on_two_workers_passes_the_gate_and_a_smoke_tested_canary_promotes(
    cluster: Cluster,
    namespace: str,
    operator: int,
    trainer_image: str,
    server_image: str,
    custom_image: str,
    prometheus: str,
) -> None:
    cluster.apply(example("neuralcluster.yaml", namespace, prometheusUrl=prometheus))
    wait_until(
        "NeuralCluster Ready",
        lambda: (cluster.get("-n", namespace, "nc", "demo").get("status") or {}).get("phase") == "Ready",
        60,
    )
    tj: dict[str, Any] = yaml.safe_load((REPO / "examples" / "custom-cnn" / "trainingjob.yaml").read_text())
    tj["metadata"]["namespace"] = namespace
    assert tj["spec"]["trainer"]["image"] == CUSTOM_TAG and custom_image.startswith("localhost/flownexus/custom-cnn:")
    started = time.monotonic()
    cluster.apply(tj)
    status = wait_phase(cluster, namespace, "digits-cnn", {"Succeeded", "Failed"}, TRAIN_TIMEOUT_S)
    print(f"\n[figure] custom CNN TrainingJob apply -> Succeeded: {time.monotonic() - started:.0f} s")
    assert status["phase"] == "Succeeded", status
    validation = status["validation"]
    assert validation["passed"] is True and validation["accuracy"] >= 0.95, validation
    assert validation["balancedAccuracy"] >= validation["baselineLinear"] - 0.05, validation
    job = cluster.get("-n", namespace, "job", "digits-cnn-a1")
    assert job["status"]["succeeded"] == 2  # both workers ran the user's script under torchrun
    pod = job["spec"]["template"]["spec"]["containers"][0]
    assert pod["image"] == CUSTOM_TAG and "/opt/example/train_cnn.py" in pod["command"]
    assert status["progress"]["epoch"] >= 1  # the SDK reported epochs into status

    # Served like a built-in model, then a change of its serving settings goes through the canary path, whose
    # analysis has data because the canary step's smoke Job sends it requests.
    md = example("modeldeployment-digits.yaml", namespace)
    md["metadata"]["name"] = "digits-cnn"
    md["spec"]["model"] = {"trainingJobRef": {"name": "digits-cnn"}, "version": "1.0.0"}
    md["spec"]["autoscaling"] = {"enabled": False, "minReplicas": 1}
    request = (REPO / "examples" / "predict-digits.json").read_text()
    md["spec"]["rollout"] = {
        "steps": [50],
        "interval": "30s",
        "thresholds": {"maxErrorRate": 0.01, "maxLatencyP99Ms": 100, "window": "1m"},
        "failedChecksBeforeRollback": 2,
        "smokeTraffic": {"requestsPerSecond": 5, "request": request},
    }
    cluster.apply(md)
    wait_until(
        "ModelDeployment Available",
        lambda: md_status(cluster, namespace, "digits-cnn").get("phase") == "Available",
        300,
        interval=3,
    )
    predicted = plugin(
        cluster, namespace, "predict", "digits-cnn", "-f", str(REPO / "examples" / "predict-digits.json")
    )
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)["predictions"][0]["label"] == "0", predicted.stdout

    before = md_status(cluster, namespace, "digits-cnn")["stable"]["templateHash"]
    cluster.kubectl(
        "-n", namespace, "patch", "mdep", "digits-cnn", "--type=merge", "-p",
        json.dumps({"spec": {"serving": {"maxBatchDelayMs": 10}}}),
    )  # fmt: skip
    wait_until(
        "the template canary promoted",
        lambda: (
            (st := md_status(cluster, namespace, "digits-cnn")).get("phase") == "Available"
            and st["stable"].get("templateHash") not in (None, before)
        ),
        600,
        interval=3,
    )
    st = md_status(cluster, namespace, "digits-cnn")
    assert st["history"][-1]["outcome"] == "Promoted", st["history"]
    events = cluster.kubectl(
        "-n", namespace, "get", "events", "--field-selector", "involvedObject.name=digits-cnn"
    ).stdout
    assert "SmokeTraffic" in events, events
