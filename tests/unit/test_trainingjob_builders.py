"""Table tests of the TrainingJob builders: spec in, manifests out."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from flownexus.api.modeldeployment import ServingSpec
from flownexus.api.neuralcluster import NeuralClusterSpec
from flownexus.api.trainingjob import TrainingJobSpec
from flownexus.trainingjob.children import (
    CONFIG_ANNOTATION,
    TrainingContext,
    build_service,
    build_trainer_rbac,
    build_validator_job,
    build_worker_job,
    resolve_served_latency,
)
from tests.factories import neural_cluster, training_job


def ctx(cluster_overrides: dict[str, Any] | None = None, **overrides: Any) -> TrainingContext:
    tj = training_job(**overrides)
    tj["metadata"]["uid"] = "uid-1"
    nc = neural_cluster(**(cluster_overrides or {}))
    return TrainingContext(
        owner=tj,
        spec=TrainingJobSpec.model_validate(tj["spec"]),
        cluster=NeuralClusterSpec.model_validate(nc["spec"]),
        artifact_claim="demo-artifacts",
    )


def container(job: dict[str, Any]) -> dict[str, Any]:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize(
    ("workers", "procs", "gpus", "attempt"),
    [(1, 1, 0, 1), (2, 1, 0, 1), (4, 2, 0, 3), (2, 2, 2, 2)],
)
def test_worker_job_is_an_indexed_gang(workers: int, procs: int, gpus: int, attempt: int) -> None:
    c = ctx(**{"spec.distributed": {"workers": workers, "procsPerWorker": procs, "gpusPerWorker": gpus}})
    job = build_worker_job(c, attempt)
    spec = job["spec"]
    assert job["metadata"]["name"] == f"digits-a{attempt}"
    assert (spec["completions"], spec["parallelism"], spec["completionMode"]) == (workers, workers, "Indexed")
    assert spec["backoffLimit"] == 0  # any worker failure ends the attempt; the operator restarts the gang
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "digits-workers" and pod["restartPolicy"] == "Never"
    cmd = container(job)["command"]
    assert cmd[0] == "torchrun"
    assert f"--nnodes={workers}" in cmd and f"--nproc-per-node={procs}" in cmd
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in cmd
    assert f"--master-addr=digits-a{attempt}-0.digits-workers" in cmd
    env = {e["name"]: e["value"] for e in container(job)["env"]}
    assert env["FLOWNEXUS_ATTEMPT"] == str(attempt)
    limits = container(job)["resources"]["limits"]
    if gpus:
        assert limits["nvidia.com/gpu"] == gpus
    else:
        assert "nvidia.com/gpu" not in limits
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_gpu_resource_name_and_placement_come_from_the_cluster() -> None:
    c = ctx(
        {
            "spec.training": {
                "gpuResourceName": "amd.com/gpu",
                "nodeSelector": {"pool": "gpu"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            }
        },
        **{"spec.distributed": {"gpusPerWorker": 1}},
    )
    pod = build_worker_job(c, 1)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"][0]["key"] == "gpu"
    assert container(build_worker_job(c, 1))["resources"]["limits"]["amd.com/gpu"] == 1


@pytest.mark.parametrize("suspend", [True, False])
def test_suspend_is_passed_to_the_job(suspend: bool) -> None:
    assert build_worker_job(ctx(**{"spec.runPolicy.suspend": suspend}), 1)["spec"]["suspend"] is suspend


def test_deadline_is_the_remaining_time() -> None:
    assert build_worker_job(ctx(), 2, active_deadline_seconds=120)["spec"]["activeDeadlineSeconds"] == 120
    assert "activeDeadlineSeconds" not in build_worker_job(ctx(), 1)["spec"]


def test_user_env_is_kept_and_operator_env_wins() -> None:
    c = ctx(**{"spec.distributed.env": [{"name": "MY_FLAG", "value": "1"}]})
    names = [e["name"] for e in container(build_worker_job(c, 1))["env"]]
    assert names[0] == "MY_FLAG" and "FLOWNEXUS_CONFIG" in names


def test_the_pods_config_annotation_carries_the_spec_and_paths_and_becomes_config_json() -> None:
    for job in (build_worker_job(ctx(), 1), build_validator_job(ctx())):
        template = job["spec"]["template"]
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == "config")
        (item,) = volume["downwardAPI"]["items"]
        assert item["path"] == "config.json"
        assert item["fieldRef"]["fieldPath"] == f"metadata.annotations['{CONFIG_ANNOTATION}']"
    cfg = json.loads(build_worker_job(ctx(), 1)["spec"]["template"]["metadata"]["annotations"][CONFIG_ANNOTATION])
    assert cfg["model"]["architecture"] == "mlp"
    assert cfg["dataset"]["seed"] == 42
    assert cfg["training"]["checkpointEvery"] == 5
    assert cfg["output"]["modelName"] == "digits"
    assert cfg["paths"]["runDir"] == "/artifacts/default/digits-uid-1"


def test_service_is_headless_and_publishes_unready_pods() -> None:
    svc = build_service(ctx())["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True


def test_trainer_may_only_patch_its_own_status() -> None:
    _, role, binding = build_trainer_rbac(ctx())
    (rule,) = role["rules"]
    assert rule == {
        "apiGroups": ["flownexus.io"],
        "resources": ["trainingjobs/status"],
        "resourceNames": ["digits"],
        "verbs": ["get", "patch"],
    }
    assert binding["subjects"][0]["name"] == "digits-trainer"


def test_validator_has_no_api_rights() -> None:
    job = build_validator_job(ctx())
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod


def test_validator_validates_in_the_trainer_image_then_measures_served_latency_in_the_server_image() -> None:
    c = ctx(cluster_overrides={"spec.images": {"trainer": "reg/trainer:1", "server": "reg/server:1"}})
    pod = build_validator_job(c)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == "reg/trainer:1"
    assert init["command"] == ["python", "-m", "flownexus_trainer.candidate"]
    main = container(build_validator_job(c))
    assert main["image"] == "reg/server:1"
    assert main["command"] == ["python", "-m", "flownexus_trainer.served_latency", "--work-dir", "/srv/flownexus"]
    # The verdict is the main container's termination message, which the operator reads from containerStatuses.
    assert main["terminationMessagePolicy"] == "File"
    env = {e["name"]: e["value"] for e in main["env"]}
    assert env["FLOWNEXUS_CONFIG"] == "/etc/flownexus/config.json"
    assert env["OMP_NUM_THREADS"] == "1"  # as in a ModelDeployment's TorchServe container


def test_the_steps_hand_over_through_an_emptydir_only_this_pod_mounts() -> None:
    pod = build_validator_job(ctx())["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (main,) = pod["containers"]
    for c in (init, main):
        assert {e["name"]: e["value"] for e in c["env"]}["FLOWNEXUS_CANDIDATE_DIR"] == "/srv/flownexus/candidate"
        assert {"name": "serve", "mountPath": "/srv/flownexus"} in c["volumeMounts"]
    assert next(v for v in pod["volumes"] if v["name"] == "serve")["emptyDir"]["sizeLimit"] == "4Gi"


def test_served_latency_settings_reach_the_pods_config() -> None:
    served = {"batchSize": 8, "maxBatchDelayMs": 20, "workers": 2, "concurrency": 8, "requests": 500}
    job = build_validator_job(ctx(**{"spec.validation": {"servedLatency": served}}))
    cfg = json.loads(job["spec"]["template"]["metadata"]["annotations"][CONFIG_ANNOTATION])
    assert cfg["validation"]["servedLatency"] == served


def test_served_latency_defaults_are_the_modeldeployment_serving_defaults() -> None:
    # The reconciler resolves unset settings (from the champion's ModelDeployment, else these defaults).
    base = ctx()
    validation = base.spec.validation.model_copy(
        update={"served_latency": resolve_served_latency(base.spec.validation.served_latency, None)}
    )
    resolved = replace(base, spec=base.spec.model_copy(update={"validation": validation}))
    cfg = json.loads(build_validator_job(resolved)["spec"]["template"]["metadata"]["annotations"][CONFIG_ANNOTATION])
    serving = ServingSpec()
    assert cfg["validation"]["servedLatency"] == {
        "batchSize": serving.batch_size,
        "maxBatchDelayMs": serving.max_batch_delay_ms,
        "workers": serving.workers_per_model,
        "concurrency": 1,
        "requests": 300,
    }


def test_validator_steps_get_training_then_serving_resources() -> None:
    c = ctx(
        cluster_overrides={"spec.defaultServingResources": {"requests": {"cpu": "300m", "memory": "1Gi"},
                                                            "limits": {"cpu": "1", "memory": "2Gi"}}},
        **{"spec.distributed.resources": {"requests": {"cpu": "2", "memory": "3Gi"}}},
    )  # fmt: skip
    pod = build_validator_job(c)["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["resources"] == {"requests": {"cpu": "2", "memory": "3Gi"}}
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "300m", "memory": "1Gi"},
        "limits": {"cpu": "1", "memory": "2Gi"},
    }
    own = {"requests": {"cpu": "1", "memory": "1500Mi"}, "limits": {"cpu": "1", "memory": "1500Mi"}}
    c = ctx(**{"spec.validation": {"servedLatency": {"resources": own}}})
    assert container(build_validator_job(c))["resources"] == own


def test_served_latency_container_has_a_read_only_root_and_emptydir_scratch() -> None:
    pod = build_validator_job(ctx())["spec"]["template"]["spec"]
    main = pod["containers"][0]
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert mounts == {"/artifacts": "artifacts", "/etc/flownexus": "config", "/srv/flownexus": "serve", "/tmp": "tmp"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["serve"] and "emptyDir" in volumes["tmp"]
    assert main["workingDir"] == "/srv/flownexus"


@pytest.mark.parametrize("build", [lambda c: build_worker_job(c, 1), build_validator_job])
def test_pods_meet_pod_security_restricted_with_no_root_container(build: Any) -> None:
    pod = build(ctx())["spec"]["template"]["spec"]
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001 and sc["fsGroup"] == 10001
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod.get("initContainers", []) + pod["containers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert "runAsUser" not in c["securityContext"] or c["securityContext"]["runAsUser"] != 0
    assert {next(iter(set(v) - {"name"})) for v in pod["volumes"]} <= {
        "persistentVolumeClaim",
        "downwardAPI",
        "emptyDir",
    }
