"""TrainingJob end to end on the local cluster: real DDP pods, whole-gang restart, the validation gate.

The operator runs as a process on the host against the cluster's kubeconfig (as `python -m flownexus`, the
`operator` fixture of conftest.py);
the trainer image is built from trainer_image/Containerfile.trainer by the harness and loaded into the node.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import REPO, TRAINER_TAG, Cluster, wait_until

pytestmark = pytest.mark.e2e
TRAIN_TIMEOUT_S = 900


def example(name: str, namespace: str, **spec_overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "examples" / name).read_text())
    doc["metadata"]["namespace"] = namespace
    for dotted, value in spec_overrides.items():
        node = doc["spec"]
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return doc


def tj_status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = cluster.get("-n", namespace, "trainingjob", name).get("status") or {}
    return status


def wait_phase(cluster: Cluster, namespace: str, name: str, phases: set[str], timeout: float) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def reached() -> bool:
        seen.update(tj_status(cluster, namespace, name))
        return seen.get("phase") in phases

    try:
        wait_until(f"TrainingJob {name} to reach {phases}", reached, timeout, interval=3)
    except pytest.fail.Exception:
        pods = cluster.kubectl("-n", namespace, "get", "pods", "-o", "wide", check=False).stdout
        logs = cluster.kubectl(
            "-n", namespace, "logs", "-l", f"flownexus.io/trainingjob={name}", "--tail=30", "--prefix", check=False
        ).stdout
        pytest.fail(f"status: {json.dumps(seen, indent=1)}\npods:\n{pods}\nlogs:\n{logs}")
    return seen


def artifact_dir(cluster: Cluster, namespace: str, claim: str) -> Path:
    """Where the hostPath-provisioned artifact PVC lives on this machine (the node is this machine)."""
    pvc = cluster.get("-n", namespace, "pvc", claim)
    pv = cluster.get("pv", pvc["spec"]["volumeName"])
    return Path(pv["spec"].get("hostPath", pv["spec"].get("local", {}))["path"])


def start_cluster(cluster: Cluster, namespace: str, image: str) -> None:
    # The example as written: its trainer image name is the tag the fixture gave the built image.
    nc = example("neuralcluster.yaml", namespace)
    assert nc["spec"]["images"]["trainer"] == TRAINER_TAG and image.startswith("localhost/flownexus/trainer:")
    cluster.apply(nc)
    wait_until(
        "NeuralCluster Ready",
        lambda: (cluster.get("-n", namespace, "nc", "demo").get("status") or {}).get("phase") == "Ready",
        60,
    )


def delete_a_worker_after_a_checkpoint(cluster: Cluster, namespace: str, name: str) -> int:
    """Wait for a checkpoint at epoch >= 5 of attempt 1, then delete the worker of index 1; the checkpoint's epoch."""

    def checkpointed() -> bool:
        st = tj_status(cluster, namespace, name)
        return (st.get("latestCheckpoint") or {}).get("epoch", 0) >= 5 and st.get("attempt") == 1

    wait_until("a checkpoint at epoch >= 5", checkpointed, TRAIN_TIMEOUT_S, interval=1)
    epoch: int = tj_status(cluster, namespace, name)["latestCheckpoint"]["epoch"]
    pods = cluster.get("-n", namespace, "pods", "-l", f"job-name={name}-a1")["items"]
    victim = next(
        p["metadata"]["name"]
        for p in pods
        if p["metadata"]["annotations"].get("batch.kubernetes.io/job-completion-index") == "1"
    )
    cluster.kubectl("-n", namespace, "delete", "pod", victim, "--wait=false")
    return epoch


def test_digits_trains_with_two_workers_and_passes_the_gate(
    cluster: Cluster, namespace: str, operator: int, trainer_image: str, server_image: str
) -> None:
    start_cluster(cluster, namespace, trainer_image)
    started = time.monotonic()
    cluster.apply(example("trainingjob-digits.yaml", namespace))
    status = wait_phase(cluster, namespace, "digits", {"Succeeded", "Failed"}, TRAIN_TIMEOUT_S)
    wall = time.monotonic() - started
    assert status["phase"] == "Succeeded", status
    validation = status["validation"]
    assert validation["passed"] is True
    assert validation["accuracy"] >= 0.94
    # The gate compared the model with its baselines on the same test rows.
    assert validation["balancedAccuracy"] > validation["baselineTrivial"] + 0.5, validation
    assert validation["balancedAccuracy"] >= validation["baselineLinear"] - 0.05, validation
    # The latency it gated is the model behind TorchServe (the validator pod's second step), not the bare model.
    assert validation["latencyP95Ms"] > validation["modelLatencyP95Ms"], validation
    assert validation["latencyP95Ms"] <= 100, validation
    pods = cluster.get("-n", namespace, "pods", "-l", "job-name=digits-validate")["items"]
    assert [c["name"] for c in pods[0]["spec"]["initContainers"]] == ["validate"]
    assert [c["name"] for c in pods[0]["spec"]["containers"]] == ["served-latency"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Validated"] == "True" and conditions["Succeeded"] == "True"
    # Both ranks really ran: the Job had two completions (one per torchrun node).
    job = cluster.get("-n", namespace, "job", "digits-a1")
    assert job["status"]["succeeded"] == 2
    root = artifact_dir(cluster, namespace, "demo-artifacts")
    run_dir = root / status["artifacts"]["report"].rsplit("/", 1)[0]
    for artifact in ("report.md", "metadata.json", "metrics.jsonl"):
        assert (run_dir / artifact).is_file(), f"{artifact} missing in {sorted(run_dir.iterdir())}"
    assert (root / status["artifacts"]["modelArchive"]).is_file(), status["artifacts"]
    assert "digits" in cluster.kubectl("-n", namespace, "get", "tj").stdout
    # The operator's own metrics count the reconciles it did.
    with urllib.request.urlopen(f"http://127.0.0.1:{operator}/metrics", timeout=5) as r:
        assert 'flownexus_reconcile_total{kind="TrainingJob",result="ok"}' in r.read().decode()
    print(f"\n[figure] digits TrainingJob apply -> Succeeded: {wall:.0f} s")


def test_deleted_worker_restarts_the_gang_from_the_checkpoint(
    cluster: Cluster, namespace: str, operator: int, trainer_image: str, server_image: str
) -> None:
    start_cluster(cluster, namespace, trainer_image)
    tj = example(
        "trainingjob-digits.yaml",
        namespace,
        **{
            "training.epochs": 40,
            "training.checkpointEvery": 5,
            "training.earlyStopping": {"enabled": False},
            "validation.minAccuracy": 0.9,
        },
    )
    cluster.apply(tj)
    checkpoint_epoch = delete_a_worker_after_a_checkpoint(cluster, namespace, "digits")
    status = wait_phase(cluster, namespace, "digits", {"Succeeded", "Failed"}, TRAIN_TIMEOUT_S)
    assert status["attempt"] == 2, status
    assert status["phase"] == "Succeeded", status
    assert {c["type"]: c["status"] for c in status["conditions"]}["Restarting"] == "False"
    events = cluster.kubectl("-n", namespace, "get", "events", "--field-selector", "involvedObject.name=digits").stdout
    assert "WorkerFailed" in events
    run_dir = artifact_dir(cluster, namespace, "demo-artifacts") / status["artifacts"]["metrics"].rsplit("/", 1)[0]
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    # Epochs up to the checkpoint ran once; attempt 2 picked up after it rather than from epoch 1.
    for epoch in range(1, checkpoint_epoch + 1):
        assert epochs.count(epoch) == 1, (epoch, epochs)
    assert max(epochs) == 40


def test_unreachable_threshold_fails_naming_it(
    cluster: Cluster, namespace: str, operator: int, trainer_image: str, server_image: str
) -> None:
    start_cluster(cluster, namespace, trainer_image)
    cluster.apply(
        example(
            "trainingjob-digits.yaml",
            namespace,
            **{
                "training.epochs": 3,
                "distributed.workers": 1,
                "validation.minAccuracy": 0.9999,
                # One client and a batch that waits 150 ms to fill: every request waits it out, past the 100 ms.
                "validation.servedLatency": {"maxBatchDelayMs": 150},
            },
        )
    )
    status = wait_phase(cluster, namespace, "digits", {"Succeeded", "Failed"}, TRAIN_TIMEOUT_S)
    assert status["phase"] == "Failed" and status["reason"] == "ValidationFailed"
    failed = status["validation"]["failedThresholds"]
    assert any("minAccuracy" in t for t in failed), status["validation"]
    assert any(t.startswith("maxLatencyP95Ms: served p95") for t in failed), failed
    assert status["validation"]["latencyP95Ms"] > 100
    assert not (status.get("artifacts") or {}).get("modelArchive"), status["artifacts"]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Validated"] == "False"


def test_a_dataset_that_does_not_exist_fails_the_job_at_once_naming_it(
    cluster: Cluster, namespace: str, operator: int, trainer_image: str, server_image: str
) -> None:
    """An input error is not retried: the worker's own message (its termination message) reaches status and
    the job fails on attempt 1 although restarts are left."""
    start_cluster(cluster, namespace, trainer_image)
    dataset = {"source": "file", "path": "data/missing.csv", "targetColumn": "label"}
    cluster.apply(
        example(
            "trainingjob-digits.yaml",
            namespace,
            **{"dataset": dataset, "distributed.workers": 1, "runPolicy.maxRestarts": 3},
        )
    )
    status = wait_phase(cluster, namespace, "digits", {"Succeeded", "Failed"}, 300)
    assert status["phase"] == "Failed" and status["reason"] == "InputError", status
    assert "data/missing.csv" in status["message"] and "does not exist" in status["message"], status["message"]
    assert status["attempt"] == 1
    assert cluster.kubectl("-n", namespace, "get", "job", "digits-a2", check=False).returncode != 0


def test_pods_the_job_controller_cannot_create_are_in_status_within_30s(
    cluster: Cluster, namespace: str, operator: int
) -> None:
    """A quota that admits no pods: the Job controller's FailedCreate becomes Stalled=True on the TrainingJob."""
    cluster.apply(
        {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-pods", "namespace": namespace},
         "spec": {"hard": {"pods": "0"}}},
        {"apiVersion": "flownexus.io/v1alpha1", "kind": "NeuralCluster",
         "metadata": {"name": "demo", "namespace": namespace}, "spec": {"artifactStore": {"size": "64Mi"}}},
    )  # fmt: skip
    wait_until(
        "NeuralCluster Ready",
        lambda: (cluster.get("-n", namespace, "nc", "demo").get("status") or {}).get("phase") == "Ready",
        60,
    )
    cluster.apply(example("trainingjob-digits.yaml", namespace, **{"distributed.workers": 1}))
    wait_until("attempt 1's Job", lambda: cluster.kubectl("-n", namespace, "get", "job", "digits-a1",
                                                          check=False).returncode == 0, 30)  # fmt: skip
    created = time.monotonic()

    def stalled() -> bool:
        conditions = {c["type"]: c for c in tj_status(cluster, namespace, "digits").get("conditions") or []}
        return conditions.get("Stalled", {}).get("reason") == "FailedCreate"

    wait_until("Stalled=True, reason FailedCreate", stalled, 45)
    elapsed = time.monotonic() - created
    status = tj_status(cluster, namespace, "digits")
    assert "exceeded quota" in status["message"], status["message"]
    assert elapsed <= 30, f"reported after {elapsed:.0f}s"
    cluster.kubectl("wait", "-n", namespace, "tj/digits", "--for=condition=Stalled", "--timeout=5s")
    print(f"\n[figure] FailedCreate in TrainingJob status {elapsed:.0f} s after the Job was created")
