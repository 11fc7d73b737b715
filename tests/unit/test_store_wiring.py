"""Table tests of how the pods reach an S3 artifact store (operator/flownexus/store.py and the builders that use it):
no PVC anywhere, the wrapper around every command that reads or writes the store, the Secret's keys as references,
and the dataset URIs a store can and cannot give."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from flownexus.api.modeldeployment import ModelDeploymentSpec
from flownexus.api.neuralcluster import ArtifactStore, NeuralClusterSpec
from flownexus.api.trainingjob import DatasetSpec, TrainingJobSpec
from flownexus.modeldeployment.children import ServedModel, ServingContext, build_deployment
from flownexus.neuralcluster.children import artifact_claim_name, build_artifact_pvc
from flownexus.store import STORE_ENV, dataset_download, dataset_problem, store_config
from flownexus.trainingjob.children import (
    TrainingContext,
    build_validator_job,
    build_worker_job,
    champion_paths,
    trainer_config,
)
from tests.factories import model_deployment, neural_cluster, training_job

S3 = {"s3": {"endpoint": "http://seaweedfs.storage.svc:8333", "bucket": "models", "prefix": "team-a",
             "secretRef": {"name": "s3-keys"}}}  # fmt: skip
PVC = {"size": "1Gi"}


def cluster(store: dict[str, Any]) -> NeuralClusterSpec:
    return NeuralClusterSpec.model_validate(neural_cluster(**{"spec.artifactStore": store})["spec"])


def tj_ctx(store: dict[str, Any], **overrides: Any) -> TrainingContext:
    tj = training_job(**overrides)
    tj["metadata"]["uid"] = "uid-1"
    spec = cluster(store)
    claim = artifact_claim_name("demo", spec)
    return TrainingContext(
        owner=tj, spec=TrainingJobSpec.model_validate(tj["spec"]), cluster=spec, artifact_claim=claim,
        store=spec.artifact_store.describe("demo"),
    )  # fmt: skip


def pod_of(job: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = job["spec"]["template"]["spec"]
    return spec


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def flags(command: list[str]) -> list[tuple[str, str]]:
    """The wrapper's (flag, value) pairs, up to ``--``."""
    head = command[: command.index("--")]
    assert head[:3] == ["python", "-m", "flownexus_trainer.store"]
    return list(zip(head[3::2], head[4::2], strict=True))


def test_an_s3_store_names_itself_and_creates_no_pvc() -> None:
    spec = cluster(S3)
    assert spec.artifact_store.describe("demo") == "s3://models/team-a"
    assert artifact_claim_name("demo", spec) is None
    assert build_artifact_pvc(neural_cluster(**{"spec.artifactStore": S3}), spec) is None
    assert cluster(PVC).artifact_store.describe("demo") == "pvc/demo-artifacts"


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ({**S3, "size": "1Gi"}, "set exactly one kind of store"),
        ({}, "set exactly one kind of store"),
        ({"s3": {**S3["s3"], "prefix": "a/../b"}}, "prefix"),
        ({"s3": {**S3["s3"], "endpoint": "ftp://x"}}, "endpoint"),
        ({"s3": {**S3["s3"], "bucket": "Bad_Bucket"}}, "bucket"),
    ],
)
def test_a_store_that_is_both_or_neither_or_escapes_its_prefix_is_refused(store: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ArtifactStore.model_validate(store)


def test_with_s3_the_workers_pull_the_run_dir_and_push_it_back_behind_the_wrapper() -> None:
    c = tj_ctx(S3)
    job = build_worker_job(c, 1)
    pod = pod_of(job)
    (container,) = pod["containers"]
    assert {"name": "artifacts", "emptyDir": {"sizeLimit": "8Gi"}} in pod["volumes"]
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
    run_dir = "/artifacts/default/digits-uid-1"
    assert flags(container["command"]) == [
        ("--pull", run_dir), ("--push", run_dir), ("--push-when-env", "JOB_COMPLETION_INDEX=0"),
    ]  # fmt: skip
    after = container["command"][container["command"].index("--") + 1 :]
    assert after[0] == "torchrun" and "--node-rank=$(JOB_COMPLETION_INDEX)" in after
    env = env_of(container)
    assert json.loads(env[STORE_ENV]) == {
        "type": "s3", "endpoint": "http://seaweedfs.storage.svc:8333", "bucket": "models", "prefix": "team-a",
        "insecureSkipTLSVerify": False, "root": "/artifacts",
    }  # fmt: skip
    # The keys are references to the Secret: their values never pass through the operator.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {"secretKeyRef": {"name": "s3-keys", "key": key}}


def test_on_a_pvc_the_commands_are_not_wrapped_and_no_store_env_is_set() -> None:
    c = tj_ctx(PVC)
    (container,) = pod_of(build_worker_job(c, 1))["containers"]
    assert container["command"][0] == "torchrun"
    assert STORE_ENV not in env_of(container) and "AWS_ACCESS_KEY_ID" not in env_of(container)
    validator = pod_of(build_validator_job(c))
    assert validator["initContainers"][0]["command"] == ["python", "-m", "flownexus_trainer.candidate"]


def test_with_s3_both_validator_steps_pull_and_push_and_the_champion_dir_is_pulled_too() -> None:
    c = tj_ctx(S3)
    c = TrainingContext(**{**c.__dict__, "champion": {"championRunDir": "default/old-uid-0", "championVersion": "1"}})
    pod = pod_of(build_validator_job(c))
    run_dir = "/artifacts/default/digits-uid-1"
    (validate,) = pod["initContainers"]
    assert flags(validate["command"]) == [
        ("--pull", run_dir), ("--pull", "/artifacts/default/old-uid-0"), ("--push", run_dir),
    ]  # fmt: skip
    (served,) = pod["containers"]
    assert flags(served["command"]) == [("--pull", run_dir), ("--push", run_dir)]
    assert served["command"][-3:] == ["flownexus_trainer.served_latency", "--work-dir", "/srv/flownexus"]
    assert "AWS_SECRET_ACCESS_KEY" in env_of(served) and "AWS_SECRET_ACCESS_KEY" in env_of(validate)


def test_an_s3_dataset_is_downloaded_into_the_pod_and_its_local_path_reaches_the_trainer() -> None:
    uri = "s3://models/datasets/churn.parquet"
    c = tj_ctx(S3, **{"spec.dataset": {"source": "uri", "uri": uri, "targetColumn": "churned"}})
    (container,) = pod_of(build_worker_job(c, 1))["containers"]
    pulled = dict(flags(container["command"]))["--pull-file"]
    source, local = pulled.split("=", 1)
    assert source == uri and local.startswith("/artifacts/.datasets/") and local.endswith("/churn.parquet")
    assert trainer_config(c)["paths"]["datasetFile"] == local
    # A file dataset in an S3 store is an object under the store's prefix, downloaded the same way.
    f = tj_ctx(S3, **{"spec.dataset": {"source": "file", "path": "data/train.csv"}})
    assert dataset_download(f.spec.dataset, f.cluster)[0] == (
        "data/train.csv=" + trainer_config(f)["paths"]["datasetFile"]
    )
    # On a PVC nothing is downloaded and the trainer reads the mounted file.
    p = tj_ctx(PVC, **{"spec.dataset": {"source": "file", "path": "data/train.csv"}})
    assert "datasetFile" not in trainer_config(p)["paths"]


@pytest.mark.parametrize(
    ("store", "uri", "problem"),
    [
        (S3, "s3://models/x.csv", None),
        (S3, "s3://other/x.csv", "spec.dataset.uri: s3://other/x.csv is outside the artifact store's bucket models: "
                                 "the pods only get keys for that bucket"),
        (S3, "pvc://data/x.csv", "spec.dataset.uri: pvc://data/x.csv is on a PVC, but the NeuralCluster's artifact "
                                 "store is s3://models/team-a"),
        (PVC, "pvc://data/x.csv", None),
        (PVC, "s3://models/x.csv", "spec.dataset.uri: s3://models/x.csv is in S3, but the NeuralCluster's artifact "
                                   "store is a PVC"),
    ],
)  # fmt: skip
def test_a_dataset_uri_the_store_cannot_give_is_named_with_the_field(
    store: dict[str, Any], uri: str, problem: str | None
) -> None:
    dataset = DatasetSpec.model_validate({"source": "uri", "uri": uri})
    assert dataset_problem(dataset, cluster(store)) == problem


def test_serving_pods_download_their_archive_in_the_init_step_and_mount_no_pvc() -> None:
    md = model_deployment()
    md["metadata"]["uid"] = "uid-1"
    ctx = ServingContext(
        owner=md, spec=ModelDeploymentSpec.model_validate(md["spec"]), cluster=cluster(S3), artifact_claim=None
    )
    model = ServedModel(version="1.0.0", archive="default/digits-uid/model-store/digits.mar", training_job="digits")
    pod = build_deployment(ctx, "stable", model, 2, "digest")["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    assert flags(fetch["command"]) == [
        (
            "--pull-file",
            "default/digits-uid/model-store/digits.mar=/artifacts/default/digits-uid/model-store/digits.mar",
        )
    ]
    assert env_of(fetch)["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-keys", "key": "AWS_ACCESS_KEY_ID"}}
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
    # The serving container itself never sees the keys.
    assert all("AWS_SECRET_ACCESS_KEY" not in env_of(c) for c in pod["containers"])


def test_a_ca_bundle_is_mounted_and_named_to_the_wrapper() -> None:
    store = {"s3": {**S3["s3"], "caConfigMap": "s3-ca", "endpoint": "https://s3.internal:9000"}}
    spec = cluster(store)
    assert store_config(spec.artifact_store.s3)["caFile"] == "/etc/flownexus/store-ca/ca.crt"  # type: ignore[arg-type]
    pod = pod_of(build_worker_job(tj_ctx(store), 1))
    assert {"name": "store-ca", "configMap": {"name": "s3-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}} in (
        pod["volumes"]
    )
    assert {"name": "store-ca", "mountPath": "/etc/flownexus/store-ca", "readOnly": True} in (
        pod["containers"][0]["volumeMounts"]
    )


def test_a_champion_in_another_store_is_an_error_naming_both_stores() -> None:
    md = {"status": {"stable": {"archive": "default/old-uid/model-store/digits.mar", "version": "1.0.0"}}}
    same = champion_paths("digits", md, "s3://models/team-a", "s3://models/team-a")
    assert same == {"championRunDir": "default/old-uid", "championVersion": "1.0.0"}
    other = champion_paths("digits", md, "pvc/demo-artifacts", "s3://models/team-a")
    assert other["championError"] == (
        "ModelDeployment digits keeps its models in another artifact store (pvc/demo-artifacts, this job uses "
        "s3://models/team-a)"
    )


def test_serving_pods_get_egress_to_the_store_port_and_dns_only_with_s3() -> None:
    from flownexus.modeldeployment.children import build_network_policy

    md = model_deployment()
    md["metadata"]["uid"] = "uid-1"
    spec = ModelDeploymentSpec.model_validate(md["spec"])
    s3 = build_network_policy(ServingContext(owner=md, spec=spec, cluster=cluster(S3), artifact_claim=None))
    assert s3["spec"]["egress"] == [
        {"ports": [{"protocol": "TCP", "port": 8333}]},
        {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
    ]
    pvc = build_network_policy(ServingContext(owner=md, spec=spec, cluster=cluster(PVC), artifact_claim="c"))
    assert pvc["spec"]["egress"] == []
