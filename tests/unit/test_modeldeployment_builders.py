"""Table tests of the ModelDeployment builders: spec in, manifests out; and the init container's script."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from flownexus.api.modeldeployment import MAX_NAME_LENGTH, ModelDeploymentSpec
from flownexus.api.neuralcluster import NeuralClusterSpec
from flownexus.modeldeployment.children import (
    INFERENCE_PORT,
    METRICS_PORT,
    UPSTREAM_INFERENCE_PORT,
    UPSTREAM_METRICS_PORT,
    ServedModel,
    ServingContext,
    achieved_weight,
    build_config_map,
    build_deployment,
    build_hpa,
    build_network_policy,
    build_pdb,
    build_scaled_object,
    build_service,
    canary_replicas,
    config_hash,
    config_properties,
    endpoint,
)
from tests.factories import model_deployment, neural_cluster

MODEL = ServedModel(version="1.0.0", archive="default/digits/model-store/digits.mar", training_job="digits")


def ctx(cluster_overrides: dict[str, Any] | None = None, **overrides: Any) -> ServingContext:
    md = model_deployment(**overrides)
    md["metadata"]["uid"] = "uid-1"
    nc = neural_cluster(**(cluster_overrides or {}))
    return ServingContext(
        owner=md,
        spec=ModelDeploymentSpec.model_validate(md["spec"]),
        cluster=NeuralClusterSpec.model_validate(nc["spec"]),
        artifact_claim="demo-artifacts",
    )


def properties(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def pod(dep: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = dep["spec"]["template"]["spec"]
    return spec


def container(dep: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod(dep)["containers"] if c["name"] == name)


# ---- replica math ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stable", "weight", "cap", "canary"),
    [
        (0, 5, 10, 0),  # nothing serves: no canary either (it would take all the traffic)
        (1, 5, 10, 1),  # a small weight still gets one pod to analyse
        (2, 5, 10, 1),
        (2, 50, 10, 2),
        (2, 95, 10, 10),  # capped: achieved weight is reported as it is
        (3, 25, 10, 1),
        (4, 25, 10, 2),  # ceil(4 * 25 / 75) = ceil(1.33)
        (7, 15, 10, 2),  # an HPA-scaled stable: ceil(7 * 15 / 85) = ceil(1.24)
        (10, 5, 10, 1),
        (10, 45, 10, 9),  # ceil(10 * 45 / 55) = ceil(8.18)
        (10, 55, 10, 10),
        (5, 100, 8, 8),
        (5, 0, 8, 0),
    ],
)
def test_canary_replicas_follow_the_weight_of_the_current_stable(
    stable: int, weight: int, cap: int, canary: int
) -> None:
    assert canary_replicas(stable, weight, cap) == canary


@pytest.mark.parametrize(
    ("canary", "stable", "weight"), [(1, 2, 33.3), (1, 9, 10.0), (10, 2, 83.3), (0, 3, 0.0), (0, 0, None)]
)
def test_achieved_weight_is_the_replica_ratio(canary: int, stable: int, weight: float | None) -> None:
    assert achieved_weight(canary, stable) == weight


# ---- config.properties ------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [None, "digits-token"], ids=["no-token", "token"])
def test_config_properties_are_hardened_and_every_listener_is_on_loopback_behind_the_proxy(
    secret: str | None,
) -> None:
    props = properties(config_properties(ctx(**({"spec.serving.inferenceTokenSecret": secret} if secret else {}))))
    assert props["inference_address"] == f"http://127.0.0.1:{UPSTREAM_INFERENCE_PORT}"
    assert props["management_address"] == "http://127.0.0.1:8081"
    assert props["metrics_address"] == f"http://127.0.0.1:{UPSTREAM_METRICS_PORT}"
    assert len({UPSTREAM_INFERENCE_PORT, UPSTREAM_METRICS_PORT, INFERENCE_PORT, METRICS_PORT, 8081}) == 5
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["enable_model_api"] == "false"
    assert props["allowed_urls"] == "file:///srv/flownexus/model-store/.*\\\\.mar"
    assert props["model_store"] == "/srv/flownexus/model-store"
    assert props["load_models"] == "digits=digits.mar"
    assert props["model_metrics_auto_detect"] == "true"
    assert props["metrics_mode"] == "prometheus"
    assert props["enable_envvars_config"] == "false"
    assert props["install_py_dep_per_model"] == "false"
    assert props["default_response_timeout"] == "120"
    assert "models" not in props  # the init container adds it, keyed by the archive's own version


PROXY_ENV = {
    "FLOWNEXUS_PROXY_PORT": "8080",
    "FLOWNEXUS_METRICS_PORT": "8082",
    "FLOWNEXUS_UPSTREAM_PORT": str(UPSTREAM_INFERENCE_PORT),
    "FLOWNEXUS_UPSTREAM_METRICS_PORT": str(UPSTREAM_METRICS_PORT),
    "FLOWNEXUS_CONF_FILE": "/srv/flownexus/conf/config.properties",
    "FLOWNEXUS_MODEL_NAME": "digits",
    "FLOWNEXUS_PROXY_DRAIN_S": "5",
}
TOKEN_ENV = {
    "FLOWNEXUS_RUN_DIR": "/srv/flownexus/run",
    "FLOWNEXUS_TOKEN_FILE": "/var/run/secrets/flownexus/inference/key",
}
PROXY_MOUNTS = [
    {"name": "templates", "mountPath": "/etc/flownexus", "readOnly": True},
    {"name": "conf", "mountPath": "/srv/flownexus/conf", "readOnly": True},
]
TOKEN_MOUNTS = [
    {"name": "run", "mountPath": "/srv/flownexus/run", "readOnly": True},
    {"name": "inference-token", "mountPath": "/var/run/secrets/flownexus/inference", "readOnly": True},
]


@pytest.mark.parametrize(
    ("secret", "disabled", "env", "mounts"),
    [
        pytest.param(None, "true", PROXY_ENV, PROXY_MOUNTS, id="no-token"),
        pytest.param("digits-token", "false", {**PROXY_ENV, **TOKEN_ENV}, PROXY_MOUNTS + TOKEN_MOUNTS, id="token"),
    ],
)
def test_the_proxy_is_always_the_pods_edge_and_holds_the_token_only_with_the_secret(
    secret: str | None, disabled: str, env: dict[str, str], mounts: list[dict[str, Any]]
) -> None:
    c = ctx(**({"spec.serving.inferenceTokenSecret": secret} if secret else {}))
    props = properties(config_properties(c))
    assert props["disable_token_authorization"] == disabled
    assert ("token_expiration_min" in props) is bool(secret)
    dep = build_deployment(c, "stable", MODEL, 2, "abc")
    assert [x["name"] for x in pod(dep)["containers"]] == ["torchserve", "auth-proxy"]
    assert "auth_proxy.py" in build_config_map(c)["data"]
    proxy = container(dep, "auth-proxy")
    # The Service's targetPort "inference" and the scrape port are the proxy's; TorchServe exposes nothing.
    assert proxy["ports"] == [
        {"name": "inference", "containerPort": INFERENCE_PORT},
        {"name": "metrics", "containerPort": METRICS_PORT},
    ]
    assert "ports" not in container(dep, "torchserve")
    assert {e["name"]: e["value"] for e in proxy["env"]} == env
    assert proxy["volumeMounts"] == mounts
    volumes = {v["name"]: v for v in pod(dep)["volumes"]}
    if secret:
        assert volumes["inference-token"]["secret"]["secretName"] == secret
        assert int(props["token_expiration_min"]) > 60 * 24 * 365
    else:
        assert "inference-token" not in volumes
    # Every mount names a volume of the pod.
    assert {m["name"] for c in pod(dep)["containers"] for m in c["volumeMounts"]} <= set(volumes)


@pytest.mark.parametrize(
    ("archive_version", "expected"), [(None, None), ("3.1.4", "3.1.4")], ids=["unknown", "from-the-trainingjob"]
)
def test_the_proxy_labels_its_metrics_with_the_archive_version_the_operator_knows(
    archive_version: str | None, expected: str | None
) -> None:
    model = ServedModel(version="1.0.0", archive=MODEL.archive, training_job="digits", archive_version=archive_version)
    env = {
        e["name"]: e["value"]
        for e in container(build_deployment(ctx(), "canary", model, 1, "abc"), "auth-proxy")["env"]
    }
    assert env.get("FLOWNEXUS_MODEL_VERSION") == expected
    # Unknown: the proxy reads the archive's version from the config the init container renders.
    assert env["FLOWNEXUS_CONF_FILE"] == "/srv/flownexus/conf/config.properties"


@pytest.mark.parametrize("secret", [None, "digits-token"], ids=["no-token", "token"])
def test_every_container_of_the_serving_pod_is_restricted(secret: str | None) -> None:
    dep = build_deployment(
        ctx(**({"spec.serving.inferenceTokenSecret": secret} if secret else {})), "stable", MODEL, 1, "a"
    )
    spec = pod(dep)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec["containers"] + spec["initContainers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert "privileged" not in sc and "hostPort" not in str(c.get("ports")), c["name"]


def test_model_settings_come_from_the_spec() -> None:
    c = ctx(**{"spec.serving": {"batchSize": 8, "maxBatchDelayMs": 40, "workersPerModel": 3}})
    settings = json.loads(build_config_map(c)["data"]["model-settings.json"])
    assert settings["batchSize"] == 8 and settings["maxBatchDelay"] == 40
    assert settings["minWorkers"] == settings["maxWorkers"] == 3
    assert settings["marName"] == "digits.mar" and settings["defaultVersion"] is True
    assert properties(config_properties(c))["default_workers_per_model"] == "3"


def test_defaults_batch_32_delay_5_ms() -> None:
    # 5 ms, not TorchServe's 100: a request that does not fill the batch waits the whole delay (docs/BENCHMARKS.md).
    settings = json.loads(build_config_map(ctx())["data"]["model-settings.json"])
    assert (settings["batchSize"], settings["maxBatchDelay"]) == (32, 5)


# ---- the Deployment -------------------------------------------------------------------------------


@pytest.mark.parametrize("track", ["stable", "canary"])
def test_deployment_labels_probe_and_scrape_annotations(track: str) -> None:
    dep = build_deployment(ctx(), track, MODEL, 3, "abc")  # type: ignore[arg-type]
    assert dep["metadata"]["name"] == f"digits-{track}"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["flownexus.io/modeldeployment"] == "digits"
    assert labels["flownexus.io/track"] == track and labels["flownexus.io/version"] == "1.0.0"
    assert dep["spec"]["selector"]["matchLabels"] == {
        "flownexus.io/modeldeployment": "digits",
        "flownexus.io/track": track,
    }
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8082"
    assert annotations["flownexus.io/config-hash"] == "abc"
    server = container(dep, "torchserve")
    assert server["readinessProbe"]["exec"]["command"] == ["python", "/etc/flownexus/probe.py"]
    assert server["startupProbe"]["exec"]["command"] == ["python", "/etc/flownexus/probe.py"]
    # The scrape port is the proxy's (TorchServe's metrics and the edge histogram); management is never exposed.
    ports = [p for c in pod(dep)["containers"] for p in c.get("ports", [])]
    assert {"name": "metrics", "containerPort": 8082} in ports
    assert all(p["containerPort"] != 8081 for p in ports)
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod(dep)["automountServiceAccountToken"] is False
    # PID 1 ignores SIGTERM: the pod stops TorchServe itself after a short drain.
    assert server["lifecycle"]["preStop"]["exec"]["command"] == ["sh", "-c", "sleep 5; torchserve --stop"]


def test_init_container_copies_the_archive_and_only_it_mounts_the_artifact_store() -> None:
    dep = build_deployment(ctx(), "stable", MODEL, 2, "abc")
    (init,) = pod(dep)["initContainers"]
    env = {e["name"]: e["value"] for e in init["env"]}
    assert env["FLOWNEXUS_ARCHIVE"] == "/artifacts/default/digits/model-store/digits.mar"
    assert {"name": "artifacts", "mountPath": "/artifacts", "readOnly": True} in init["volumeMounts"]
    assert all(m["name"] != "artifacts" for m in container(dep, "torchserve")["volumeMounts"])
    pvc = next(v for v in pod(dep)["volumes"] if v["name"] == "artifacts")
    assert pvc["persistentVolumeClaim"] == {"claimName": "demo-artifacts", "readOnly": True}


@pytest.mark.parametrize(("replicas", "present"), [(None, False), (0, True), (4, True)])
def test_replicas_are_omitted_when_the_hpa_owns_them(replicas: int | None, present: bool) -> None:
    dep = build_deployment(ctx(), "stable", MODEL, replicas, "abc")
    assert ("replicas" in dep["spec"]) is present
    if present:
        assert dep["spec"]["replicas"] == replicas


def test_config_hash_changes_with_the_config() -> None:
    a = config_hash(build_config_map(ctx()))
    b = config_hash(build_config_map(ctx(**{"spec.serving.batchSize": 4})))
    assert a != b and a == config_hash(build_config_map(ctx()))


def test_serving_placement_from_the_cluster() -> None:
    c = ctx({"spec.serving": {"nodeSelector": {"pool": "cpu"}, "tolerations": [{"key": "x", "operator": "Exists"}]}})
    spec = pod(build_deployment(c, "stable", MODEL, 1, "abc"))
    assert spec["nodeSelector"] == {"pool": "cpu"} and spec["tolerations"] == [{"key": "x", "operator": "Exists"}]


# ---- Service, HPA, PDB, NetworkPolicy ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("route_canary", "selector"),
    [
        (True, {"flownexus.io/modeldeployment": "digits"}),
        (False, {"flownexus.io/modeldeployment": "digits", "flownexus.io/track": "stable"}),
    ],
)
def test_service_exposes_only_inference(route_canary: bool, selector: dict[str, str]) -> None:
    svc = build_service(ctx(), route_canary)
    assert svc["spec"]["selector"] == selector
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "inference", "protocol": "TCP"}]


def test_endpoint_is_the_in_cluster_prediction_url() -> None:
    assert endpoint(ctx()) == "http://digits.default.svc:8080/predictions/digits"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, {"min": 2, "max": 10, "cpu": 70, "metrics": 1}),
        (
            {"spec.autoscaling": {"minReplicas": 1, "maxReplicas": 4, "targetCpuUtilization": 50}},
            {"min": 1, "max": 4, "cpu": 50, "metrics": 1},
        ),
        # A request rate is KEDA's (build_scaled_object): the HPA that stands in without KEDA has no metric for it.
        ({"spec.autoscaling": {"targetRequestsPerSecond": 100}}, {"min": 2, "max": 10, "cpu": 70, "metrics": 1}),
        ({"spec.autoscaling": {"enabled": False}}, None),
    ],
)
def test_hpa_targets_the_stable_deployment(overrides: dict[str, Any], expected: dict[str, int] | None) -> None:
    hpa = build_hpa(ctx(**overrides))
    if expected is None:
        assert hpa is None
        return
    assert hpa is not None
    spec = hpa["spec"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "digits-stable"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (expected["min"], expected["max"])
    assert spec["metrics"][0]["resource"]["target"]["averageUtilization"] == expected["cpu"]
    assert len(spec["metrics"]) == expected["metrics"]
    assert [m["type"] for m in spec["metrics"]] == ["Resource"] * expected["metrics"]


@pytest.mark.parametrize(
    ("autoscaling", "up", "down", "memory"),
    [
        ({}, 180, 300, None),  # the requirements' 3 m up and 5 m down
        ({"scaleUpStabilization": "0s", "scaleDownStabilization": "1h", "targetMemoryUtilization": 80}, 0, 3600, 80),
    ],
)
def test_hpa_stabilization_windows_and_memory_target(
    autoscaling: dict[str, Any], up: int, down: int, memory: int | None
) -> None:
    hpa = build_hpa(ctx(**{"spec.autoscaling": autoscaling}))
    assert hpa is not None
    spec = hpa["spec"]
    assert spec["behavior"] == {
        "scaleUp": {"stabilizationWindowSeconds": up},
        "scaleDown": {"stabilizationWindowSeconds": down},
    }
    targets = {m["resource"]["name"]: m["resource"]["target"] for m in spec["metrics"] if m["type"] == "Resource"}
    assert targets["cpu"]["averageUtilization"] == 70
    assert (targets.get("memory") or {}).get("averageUtilization") == memory


PROM_URL = "http://prometheus.monitoring.svc:9090"
RATE_QUERY = 'sum(rate(flownexus_edge_requests_total{ModelName="digits",Hostname=~"digits-stable-.+"}[1m]))'


@pytest.mark.parametrize(
    ("autoscaling", "triggers"),
    [
        (
            {"targetRequestsPerSecond": 50},
            [
                {"type": "cpu", "metricType": "Utilization", "metadata": {"value": "70"}},
                {"type": "prometheus", "metricType": "AverageValue",
                 "metadata": {"serverAddress": PROM_URL, "query": RATE_QUERY, "threshold": "50"}},
            ],
        ),
        (
            {"targetRequestsPerSecond": 2.5, "targetCpuUtilization": 60, "targetMemoryUtilization": 80},
            [
                {"type": "cpu", "metricType": "Utilization", "metadata": {"value": "60"}},
                {"type": "memory", "metricType": "Utilization", "metadata": {"value": "80"}},
                {"type": "prometheus", "metricType": "AverageValue",
                 "metadata": {"serverAddress": PROM_URL, "query": RATE_QUERY, "threshold": "2.5"}},
            ],
        ),
        ({}, None),  # no request rate: our HPA
        ({"targetRequestsPerSecond": 50, "enabled": False}, None),  # no autoscaling at all
    ],
)  # fmt: skip
def test_scaled_object_scales_stable_on_cpu_memory_and_the_stable_request_rate(
    autoscaling: dict[str, Any], triggers: list[dict[str, Any]] | None
) -> None:
    so = build_scaled_object(ctx(**{"spec.autoscaling": autoscaling}), PROM_URL)
    if triggers is None:
        assert so is None
        return
    assert so is not None
    assert (so["apiVersion"], so["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    assert so["metadata"]["name"] == "digits-stable"
    (ref,) = so["metadata"]["ownerReferences"]
    assert ref["kind"] == "ModelDeployment" and ref["uid"] == "uid-1" and ref["controller"] is True
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "digits-stable"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 10)
    assert spec["triggers"] == triggers
    # KEDA's HPA: not our HPA's name (digits-stable), the same stabilization windows as our HPA.
    hpa_config = spec["advanced"]["horizontalPodAutoscalerConfig"]
    assert hpa_config["name"] == "digits-stable-keda"
    assert hpa_config["behavior"] == {
        "scaleUp": {"stabilizationWindowSeconds": 180},
        "scaleDown": {"stabilizationWindowSeconds": 300},
    }


def test_the_keda_hpa_name_fits_a_label_value_for_the_longest_name() -> None:
    longest = "m" * MAX_NAME_LENGTH
    so = build_scaled_object(ctx(name=longest, **{"spec.autoscaling": {"targetRequestsPerSecond": 1}}), PROM_URL)
    assert so is not None
    assert len(so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["name"]) <= 63


def test_pdb() -> None:
    pdb = build_pdb(ctx())
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": {"flownexus.io/modeldeployment": "digits"}}}


OWN_NAMESPACE = [{"podSelector": {}}]
MONITORING = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
WEB_FRONTENDS = {
    "namespaceSelector": {"matchLabels": {"team": "web"}},
    "podSelector": {"matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In", "values": ["api"]}]},
}
PROMETHEUS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}


@pytest.mark.parametrize(
    ("serving", "inference_from", "metrics_from"),
    [
        pytest.param({}, OWN_NAMESPACE, MONITORING, id="defaults"),
        pytest.param({"allowedFrom": [], "metricsFrom": []}, OWN_NAMESPACE, MONITORING, id="empty-lists-are-defaults"),
        pytest.param({"allowedFrom": [WEB_FRONTENDS]}, [WEB_FRONTENDS], MONITORING, id="custom-inference-peers"),
        pytest.param(
            {"allowedFrom": [{"podSelector": {}}, {"namespaceSelector": {}}]},
            [{"podSelector": {}}, {"namespaceSelector": {}}],
            MONITORING,
            id="own-namespace-and-every-namespace",
        ),
        pytest.param({"metricsFrom": [PROMETHEUS]}, OWN_NAMESPACE, [PROMETHEUS], id="custom-metrics-peers"),
        pytest.param(
            {"allowedFrom": [{"podSelector": {"matchLabels": {"role": "client"}}}], "metricsFrom": [PROMETHEUS]},
            [{"podSelector": {"matchLabels": {"role": "client"}}}],
            [PROMETHEUS],
            id="both-custom",
        ),
    ],
)
def test_network_policy_admits_the_peers_per_port_and_denies_egress(
    serving: dict[str, Any], inference_from: list[dict[str, Any]], metrics_from: list[dict[str, Any]]
) -> None:
    netpol = build_network_policy(ctx(**{f"spec.serving.{k}": v for k, v in serving.items()}))
    spec = netpol["spec"]
    assert spec["podSelector"] == {"matchLabels": {"flownexus.io/modeldeployment": "digits"}}
    # Inference and metrics only, never the management port, each from its own peers; no rule has an empty
    # `from` (which would admit every source).
    assert spec["ingress"] == [
        {"from": inference_from, "ports": [{"protocol": "TCP", "port": 8080}]},
        {"from": metrics_from, "ports": [{"protocol": "TCP", "port": 8082}]},
    ]
    # Egress is a policy type with no rule: the serving pods may open no connection at all.
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["egress"] == []


def test_every_child_is_owned_by_the_modeldeployment() -> None:
    c = ctx()
    hpa = build_hpa(c)
    assert hpa is not None
    children = [
        build_config_map(c),
        build_deployment(c, "stable", MODEL, 1, "x"),
        build_service(c, True),
        hpa,
        build_pdb(c),
        build_network_policy(c),
    ]
    for child in children:
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref["kind"] == "ModelDeployment" and ref["uid"] == "uid-1" and ref["controller"] is True


# ---- the init container's script, run for real -------------------------------------------------------


def _fake_mar(path: Path, version: str) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "trained", "modelVersion": version}}))
        z.writestr("model.pt", b"weights")


def _run_prepare(tmp_path: Path, archive: Path, c: ServingContext) -> subprocess.CompletedProcess[str]:
    templates = tmp_path / "templates"
    templates.mkdir(exist_ok=True)
    for key, value in build_config_map(c)["data"].items():
        (templates / key).write_text(value)
    (tmp_path / "store").mkdir(exist_ok=True)
    (tmp_path / "conf").mkdir(exist_ok=True)
    env = {
        **os.environ,
        "FLOWNEXUS_ARCHIVE": str(archive),
        "FLOWNEXUS_MODEL_NAME": c.model_name,
        "FLOWNEXUS_MODEL_STORE": str(tmp_path / "store"),
        "FLOWNEXUS_CONF_DIR": str(tmp_path / "conf"),
    }
    return subprocess.run(
        [sys.executable, str(templates / "prepare.py"), str(templates)], env=env, capture_output=True, text=True
    )


def test_prepare_script_keys_the_model_settings_by_the_archives_version(tmp_path: Path) -> None:
    archive = tmp_path / "trained.mar"
    _fake_mar(archive, "2.1.0")
    c = ctx(**{"spec.serving.batchSize": 16})
    done = _run_prepare(tmp_path, archive, c)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "store" / "digits.mar").read_bytes() == archive.read_bytes()
    props = properties((tmp_path / "conf" / "config.properties").read_text())
    models = json.loads(props["models"])
    assert list(models) == ["digits"] and list(models["digits"]) == ["2.1.0"]
    assert models["digits"]["2.1.0"]["batchSize"] == 16
    assert props["management_address"] == "http://127.0.0.1:8081"


@pytest.mark.parametrize(
    ("kind", "message"),
    [("missing", "does not exist"), ("not-a-zip", "not a TorchServe model archive"), ("unreadable", "cannot be read")],
)
def test_prepare_script_fails_with_a_clear_message(tmp_path: Path, kind: str, message: str) -> None:
    archive = tmp_path / "bad.mar"
    if kind == "not-a-zip":
        archive.write_text("nope")
    if kind == "unreadable":  # as root the tests cannot lose a permission; a directory fails open() as well
        archive.mkdir()
    done = _run_prepare(tmp_path, archive, ctx())
    assert done.returncode != 0
    assert message in done.stderr


# ---- the auth proxy, run for real against a stand-in for TorchServe ----------------------------------


class _Upstream(BaseHTTPRequestHandler):
    """Plays TorchServe with token authorization: wants the pod's inference key, echoes the body."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ok = self.headers.get("Authorization") == "Bearer pod-key"
        data = body if ok else b'{"code": 400, "message": "Token Authorization failed"}'
        self.send_response(200 if ok else 400)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST

    def log_message(self, *args: Any) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _call(port: int, path: str, token: str | None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b'{"inputs": [1, 2]}', method="POST")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_auth_proxy_admits_only_the_secret_token(tmp_path: Path) -> None:
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "pod-key"}, "management": {"key": "m"}}))
    (tmp_path / "token").write_text("s3cret\n")
    script = tmp_path / "auth_proxy.py"
    script.write_text(build_config_map(ctx(**{"spec.serving.inferenceTokenSecret": "tok"}))["data"]["auth_proxy.py"])
    port = _free_port()
    env = {
        **os.environ,
        "FLOWNEXUS_PROXY_PORT": str(port),
        "FLOWNEXUS_UPSTREAM_PORT": str(upstream.server_address[1]),
        "FLOWNEXUS_RUN_DIR": str(tmp_path),
        "FLOWNEXUS_TOKEN_FILE": str(tmp_path / "token"),
    }
    proxy = subprocess.Popen([sys.executable, str(script)], env=env)
    try:
        for _ in range(50):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        assert _call(port, "/predictions/digits", None)[0] == 401
        assert _call(port, "/predictions/digits", "wrong")[0] == 401
        assert _call(port, "/predictions/digits", "s3cret") == (200, b'{"inputs": [1, 2]}')
        assert _call(port, "/ping", None)[0] == 200  # the liveness path stays open
    finally:
        proxy.terminate()
        proxy.wait(timeout=5)
        upstream.shutdown()
        upstream.server_close()
