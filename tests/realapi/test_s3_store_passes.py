"""An S3 artifact store against a real API server: what the operator writes when a NeuralCluster keeps its
artifacts in a bucket (no PVC, pods behind the store wrapper with the Secret's keys as references), and what the
API server and the operator refuse (a store that is both kinds, a dataset URI in another bucket)."""

from __future__ import annotations

from typing import Any

import pytest
from tests.factories import model_deployment, neural_cluster, training_job
from tests.realapi.conftest import Harness

from flownexus.runtime.client import ApiError

pytestmark = pytest.mark.realapi

S3 = {"s3": {"endpoint": "http://seaweedfs.storage.svc:8333", "bucket": "models", "prefix": "team-a",
             "secretRef": {"name": "s3-keys"}}}  # fmt: skip


def s3_cluster(h: Harness) -> dict[str, Any]:
    return h.ready_cluster(neural_cluster(**{"spec.artifactStore": S3}))


def command_of(job: dict[str, Any], which: str = "containers") -> list[str]:
    cmd: list[str] = job["spec"]["template"]["spec"][which][0]["command"]
    return cmd


def test_an_s3_cluster_is_ready_with_no_pvc_and_names_its_bucket(harness: Harness) -> None:
    h = harness
    nc = s3_cluster(h)
    assert nc["status"]["artifactStore"] == "s3://models/team-a"
    assert "artifactClaim" not in nc["status"]
    assert not h.exists("PersistentVolumeClaim", "demo-artifacts")
    ready = next(c for c in nc["status"]["conditions"] if c["type"] == "Ready")
    assert ready["message"] == "artifact store s3://models/team-a is available"


def test_a_store_that_is_both_a_bucket_and_a_pvc_is_refused_by_the_api_server(harness: Harness) -> None:
    with pytest.raises(ApiError) as refused:
        harness.create(neural_cluster(**{"spec.artifactStore": {**S3, "size": "1Gi"}}))
    assert refused.value.status == 422
    assert "set exactly one kind of store: s3, or a PVC" in str(refused.value)


def test_the_store_of_a_cluster_cannot_change_from_pvc_to_s3(harness: Harness) -> None:
    h = harness
    h.ready_cluster(neural_cluster())
    with pytest.raises(ApiError) as refused:
        h.user.request(
            "PUT",
            f"/apis/flownexus.io/v1alpha1/namespaces/{h.ns}/neuralclusters/demo",
            body={**h.get("NeuralCluster", "demo"), "spec": {"artifactStore": S3}},
            kind="NeuralCluster",
        )
    assert refused.value.status == 422
    assert "is immutable" in str(refused.value)


def test_workers_and_validator_of_an_s3_cluster_are_accepted_with_the_wrapper_and_key_references(
    harness: Harness,
) -> None:
    h = harness
    s3_cluster(h)
    h.create(training_job())
    h.reconcile("TrainingJob", "digits")
    job = h.get("Job", "digits-a1")
    cmd = command_of(job)
    assert cmd[:3] == ["python", "-m", "flownexus_trainer.store"] and "torchrun" in cmd
    pod = job["spec"]["template"]["spec"]
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-keys", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    h.job_running("digits-a1")
    h.reconcile("TrainingJob", "digits")
    h.job_finished("digits-a1", "Complete")
    h.reconcile("TrainingJob", "digits")
    validator = h.get("Job", "digits-validate")
    assert command_of(validator, "initContainers")[:3] == ["python", "-m", "flownexus_trainer.store"]
    assert "flownexus_trainer.served_latency" in command_of(validator)


def test_a_dataset_in_another_bucket_fails_the_job_before_any_pod_naming_the_uri(harness: Harness) -> None:
    h = harness
    s3_cluster(h)
    uri = "s3://someone-elses/data.parquet"
    h.create(training_job(**{"spec.dataset": {"source": "uri", "uri": uri}}))
    h.reconcile("TrainingJob", "digits")
    st = h.get("TrainingJob", "digits")["status"]
    assert st["phase"] == "Failed"
    failed = next(c for c in st["conditions"] if c["type"] == "Ready" or c.get("reason") == "InvalidDataset")
    assert uri in failed["message"] and "spec.dataset.uri" in failed["message"]
    assert not h.exists("Job", "digits-a1")


def test_serving_pods_of_an_s3_cluster_fetch_their_archive_in_the_init_step(harness: Harness) -> None:
    h = harness
    s3_cluster(h)
    h.create(training_job("trained"))
    archive = f"/artifacts/{h.ns}/trained-x/model-store/digits.mar"
    h.set_status(
        "TrainingJob",
        "trained",
        {
            "phase": "Succeeded",
            "conditions": [{"type": "Validated", "status": "True", "reason": "ThresholdsMet", "message": ""}],
            "validation": {"passed": True, "accuracy": 0.97},
            "artifacts": {"modelArchive": archive},
        },
    )
    h.create(model_deployment(**{"spec.model": {"trainingJobRef": {"name": "trained"}, "version": "1.0.0"}}))
    h.reconcile("ModelDeployment", "digits")
    dep = h.get("Deployment", "digits-stable")
    fetch = dep["spec"]["template"]["spec"]["initContainers"][0]
    rel = archive.removeprefix("/artifacts/")
    assert fetch["command"][:5] == ["python", "-m", "flownexus_trainer.store", "--pull-file", f"{rel}=/artifacts/{rel}"]
    assert not any("persistentVolumeClaim" in v for v in dep["spec"]["template"]["spec"]["volumes"])
