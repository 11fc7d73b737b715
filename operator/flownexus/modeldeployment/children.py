"""Children of a ModelDeployment: TorchServe Deployments (stable, canary), their ConfigMap, Service, HPA (or KEDA
ScaledObject), PDB, NetworkPolicy.

TorchServe runs hardened: the management API listens on 127.0.0.1 only and is never on the Service, model
registration through the API is off, the model store holds exactly one archive, and gRPC binds to loopback.
Every pod's edge is the proxy sidecar (``pod/auth_proxy.py``): it owns the inference port (checking the bearer
token when ``spec.serving.inferenceTokenSecret`` is set, admitting every request otherwise) and the metrics port
(TorchServe's metrics plus its own request histogram, the latency a client sees); TorchServe's inference and
metrics listeners are on loopback behind it.
An init container copies the archive from the artifact PVC into an emptyDir model store and renders
``config.properties``: it reads the archive's own version from ``MAR-INF/MANIFEST.json``, because
TorchServe applies per-model settings (batch size, delay, workers) only under that exact version key.
The serving container therefore never mounts the artifact store.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from typing import Literal

from ..api.common import duration_seconds
from ..api.modeldeployment import MONITORING_NAMESPACE, ModelDeploymentSpec, ServingTemplate, namespace_peer
from ..api.neuralcluster import NeuralClusterSpec
from ..meta import Manifest, OwnedContext, child_metadata, pod_placement
from ..prometheus import stable_requests_per_second_query
from ..store import (
    ARTIFACT_ROOT,
    artifacts_read_only,
    artifacts_volume,
    store_egress,
    store_env,
    store_mounts,
    store_volumes,
    with_store,
)
from . import pod

Track = Literal["stable", "canary"]

INFERENCE_PORT = 8080
MANAGEMENT_PORT = 8081  # 127.0.0.1 only
METRICS_PORT = 8082  # the proxy: TorchServe's metrics followed by the edge's own
# TorchServe's own inference and metrics listeners, on loopback behind the proxy.
UPSTREAM_INFERENCE_PORT = 8079
UPSTREAM_METRICS_PORT = 8083
TEMPLATE_DIR = "/etc/flownexus"
SERVE_ROOT = "/srv/flownexus"
MODEL_STORE = f"{SERVE_ROOT}/model-store"
CONF_DIR = f"{SERVE_ROOT}/conf"
RUN_DIR = f"{SERVE_ROOT}/run"  # TorchServe's working dir: logs/ and key_file.json
TOKEN_DIR = "/var/run/secrets/flownexus/inference"
RESPONSE_TIMEOUT_S = 120
PRE_STOP_DRAIN_S = 5  # seconds a stopping pod keeps answering while its endpoint is removed
RUN_AS = 1000
MD_LABEL = "flownexus.io/modeldeployment"
TRACK_LABEL = "flownexus.io/track"
VERSION_LABEL = "flownexus.io/version"
CONFIG_HASH_ANNOTATION = "flownexus.io/config-hash"
# On the Deployment itself (not its pod template, so that adding it rolls no pod): the serving template's digest.
TEMPLATE_HASH_ANNOTATION = "flownexus.io/template-hash"
# Smoke traffic (spec.rollout.smokeTraffic): one Job per canary step, sending to the canary's own Service.
SMOKE_LABEL = "flownexus.io/smoke-traffic"  # on the smoke pods (never MD_LABEL: no Service, PDB or policy selects them)
SMOKE_COMPONENT = "smoke-traffic"
SMOKE_REVISION_ANNOTATION = "flownexus.io/revision"  # the canary revision a smoke Job was made for
SMOKE_RUN_AS = 10001
SMOKE_SLACK_S = 60  # activeDeadlineSeconds beyond the client's own duration (a hung client still ends)
SMOKE_TTL_S = 300  # a finished smoke Job (and its log) stays this long unless its step ends first


@dataclass(frozen=True)
class ServingContext(OwnedContext):
    """Everything the builders need about one ModelDeployment, resolved once by the reconciler."""

    spec: ModelDeploymentSpec
    cluster: NeuralClusterSpec
    artifact_claim: str | None  # None for an S3 store

    @property
    def model_name(self) -> str:
        """The name TorchServe serves the model under: the ModelDeployment's, the same for every version."""
        return self.name

    @property
    def token_auth(self) -> bool:
        return self.spec.serving.inference_token_secret is not None


@dataclass(frozen=True)
class ServedModel:
    """One version to run: what the stable or canary Deployment serves."""

    version: str
    archive: str  # relative to the artifact store root
    training_job: str | None = None
    # The version in the archive's manifest when the operator knows it (decide.Source.archive_version, the one
    # CanarySelector.archive_version filters on): the proxy's ModelVersion label. Unknown: the proxy reads it
    # from the models= line the init container renders from the manifest.
    archive_version: str | None = None


def deployment_name(name: str, track: Track) -> str:
    return f"{name}-{track}"


def config_map_name(name: str, track: Track = "stable") -> str:
    """Each track renders its own template: stable's ConfigMap keeps the historical name."""
    return f"{name}-serving" if track == "stable" else f"{name}-serving-{track}"


# ---- the serving template -------------------------------------------------------------------------


def serving_template(spec: ModelDeploymentSpec, cluster: NeuralClusterSpec) -> ServingTemplate:
    """What the pods of a track are made of besides the model: the server image and the TorchServe settings
    that reach the pod (through its containers or its ConfigMap). Not in it: replicas and autoscaling (the
    Deployment's size, not its pods), allowedFrom/metricsFrom (the NetworkPolicy), the cluster's placement and
    artifact claim (infrastructure, applied to both tracks at once)."""
    serving = spec.serving
    return ServingTemplate(
        server_image=cluster.images.server,
        pull_policy=cluster.images.pull_policy,
        batch_size=serving.batch_size,
        max_batch_delay_ms=serving.max_batch_delay_ms,
        workers_per_model=serving.workers_per_model,
        resources=(serving.resources or cluster.default_serving_resources).model_copy(deep=True),
        inference_token_secret=serving.inference_token_secret,
    )


def template_hash(template: ServingTemplate) -> str:
    """10 hex digits of the template's digest (recorded in status; a change starts a canary)."""
    wire = template.model_dump(by_alias=True, exclude_none=True, mode="json")
    return hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()[:10]


def revision(version: str, digest: str | None) -> str:
    """What `kubectl get` shows for a track: the version, and the template's digest when known."""
    return f"{version}@{digest[:7]}" if digest else version


def with_template(ctx: ServingContext, template: ServingTemplate) -> ServingContext:
    """The context whose builders render ``template`` (a track's recorded one) instead of the spec's."""
    serving = ctx.spec.serving.model_copy(
        update={
            "batch_size": template.batch_size,
            "max_batch_delay_ms": template.max_batch_delay_ms,
            "workers_per_model": template.workers_per_model,
            "resources": template.resources,
            "inference_token_secret": template.inference_token_secret,
        }
    )
    images = ctx.cluster.images.model_copy(
        update={"server": template.server_image, "pull_policy": template.pull_policy}
    )
    return replace(
        ctx,
        spec=ctx.spec.model_copy(update={"serving": serving}),
        cluster=ctx.cluster.model_copy(update={"images": images}),
    )


def service_name(name: str) -> str:
    return name


def endpoint(ctx: ServingContext) -> str:
    return f"http://{service_name(ctx.name)}.{ctx.namespace}.svc:{INFERENCE_PORT}/predictions/{ctx.model_name}"


def pod_prefix(name: str, track: Track) -> str:
    """Pod names (and TorchServe's Hostname label) of a track start with this."""
    return f"{deployment_name(name, track)}-"


# ---- replica math -----------------------------------------------------------------------------------


def canary_replicas(stable_current: int, weight: int, cap: int) -> int:
    """Canary pods that give ``weight`` % of the traffic next to ``stable_current`` stable pods.

    canary / (canary + stable) = w / 100  =>  canary = stable * w / (100 - w), rounded up so that a small weight
    still gets one pod to analyse; capped (the achieved weight is then reported as it is). No stable pods:
    no canary either, as it would take all the traffic.
    """
    if stable_current <= 0 or weight <= 0:
        return 0
    if weight >= 100:
        return max(1, cap)
    return max(1, min(cap, math.ceil(stable_current * weight / (100 - weight))))


def achieved_weight(canary: int, stable: int) -> float | None:
    """The traffic share (%) the replica ratio gives the canary, or None when nothing runs."""
    total = canary + stable
    return round(100.0 * canary / total, 1) if total > 0 else None


def max_replicas(spec: ModelDeploymentSpec) -> int:
    """Upper bound of one track: the HPA's maxReplicas (also the canary's cap without an HPA)."""
    return max(spec.autoscaling.max_replicas, spec.serving.replicas)


# ---- config ---------------------------------------------------------------------------------------


def config_properties(ctx: ServingContext) -> str:
    """The static part of TorchServe's config.properties; the init container appends ``models=``. Every
    listener is on loopback: the proxy is the pod's edge for inference and metrics."""
    lines = [
        "# Rendered by the Flow Nexus operator; the init container appends the per-model settings.",
        f"inference_address=http://127.0.0.1:{UPSTREAM_INFERENCE_PORT}",
        f"management_address=http://127.0.0.1:{MANAGEMENT_PORT}",
        f"metrics_address=http://127.0.0.1:{UPSTREAM_METRICS_PORT}",
        "grpc_inference_address=127.0.0.1",
        "grpc_management_address=127.0.0.1",
        "metrics_mode=prometheus",
        "enable_metrics_api=true",
        # The handler's latency histogram is exposed only when auto-detected (or declared in a metrics file).
        "model_metrics_auto_detect=true",
        # No model registration or scaling through the API: the operator owns what is served.
        "enable_model_api=false",
        f"model_store={MODEL_STORE}",
        f"allowed_urls=file://{MODEL_STORE}/.*\\\\.mar",
        f"load_models={ctx.model_name}={ctx.model_name}.mar",
        "install_py_dep_per_model=false",
        # Environment variables must not reconfigure a hardened server.
        "enable_envvars_config=false",
        f"default_workers_per_model={ctx.spec.serving.workers_per_model}",
        f"default_response_timeout={RESPONSE_TIMEOUT_S}",
        "async_logging=true",
    ]
    if ctx.token_auth:
        # TorchServe's keys guard management and inference; the auth proxy holds the pod's inference key.
        # Keys would expire after 60 minutes by default; the proxy reads the key file, which TorchServe
        # rewrites, but a pod should not depend on the token API to stay up.
        lines += ["disable_token_authorization=false", "token_expiration_min=5256000"]
    else:
        # TorchServe 0.12's token authorization cannot guard management alone: it also demands a per-pod,
        # random, expiring key on inference, which clients behind a Service cannot know. Management is
        # instead unreachable from outside the pod (loopback only, not on the Service, not in the
        # NetworkPolicy). spec.serving.inferenceTokenSecret turns token authorization on in the proxy.
        lines.append("disable_token_authorization=true")
    return "\n".join(lines) + "\n"


def model_settings(ctx: ServingContext) -> Manifest:
    """The per-model settings TorchServe reads from ``models={name: {version: ...}}``."""
    serving = ctx.spec.serving
    return {
        "marName": f"{ctx.model_name}.mar",
        "minWorkers": serving.workers_per_model,
        "maxWorkers": serving.workers_per_model,
        "batchSize": serving.batch_size,
        "maxBatchDelay": serving.max_batch_delay_ms,
        "responseTimeout": RESPONSE_TIMEOUT_S,
        "defaultVersion": True,
    }


def build_config_map(ctx: ServingContext, track: Track = "stable") -> Manifest:
    data = {
        "config.properties": config_properties(ctx),
        "model-settings.json": json.dumps(model_settings(ctx), indent=2, sort_keys=True),
        "prepare.py": pod.source("prepare"),
        "probe.py": pod.source("probe"),
        "auth_proxy.py": pod.source("auth_proxy"),
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(ctx.owner, config_map_name(ctx.name, track), "server-config"),
        "data": data,
    }


def config_hash(config_map: Manifest) -> str:
    """A digest of the ConfigMap: in the pod template, so that a config change rolls the pods."""
    return hashlib.sha256(json.dumps(config_map["data"], sort_keys=True).encode()).hexdigest()[:16]


# ---- pods -----------------------------------------------------------------------------------------


def selector_labels(name: str, track: Track | None = None) -> dict[str, str]:
    selector = {MD_LABEL: name}
    if track is not None:
        selector[TRACK_LABEL] = track
    return selector


def _exec_probe(period: int, failures: int, timeout: int = 5) -> Manifest:
    return {
        "exec": {"command": ["python", f"{TEMPLATE_DIR}/probe.py"]},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


_RESTRICTED: Manifest = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def _server_container(ctx: ServingContext) -> Manifest:
    resources = (ctx.spec.serving.resources or ctx.cluster.default_serving_resources).to_wire()
    return {
        "name": "torchserve",
        "image": ctx.cluster.images.server,
        "imagePullPolicy": ctx.cluster.images.pull_policy,
        "command": [
            "torchserve",
            "--foreground",
            "--ncs",  # no config snapshots: the operator's config is the only one
            "--ts-config",
            f"{CONF_DIR}/config.properties",
            "--model-store",
            MODEL_STORE,
        ],
        "workingDir": RUN_DIR,
        "env": [
            {"name": "HOME", "value": RUN_DIR},
            {"name": "FLOWNEXUS_MODEL_NAME", "value": ctx.model_name},
            {"name": "FLOWNEXUS_MANAGEMENT_PORT", "value": str(MANAGEMENT_PORT)},
            {"name": "FLOWNEXUS_RUN_DIR", "value": RUN_DIR},
            {"name": "OMP_NUM_THREADS", "value": "1"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        # No ports: TorchServe listens on loopback only, behind the proxy.
        "resources": resources,
        # Ready = the model is registered and a worker is READY (describe-model on the loopback management API).
        "startupProbe": _exec_probe(period=5, failures=60),
        "readinessProbe": _exec_probe(period=10, failures=3),
        "livenessProbe": _exec_probe(period=20, failures=3, timeout=10),
        # The torchserve launcher is PID 1 and installs no SIGTERM handler, so the kernel drops SIGTERM and a pod
        # would hold its CPU for the whole grace period (30 s). Instead: let kube-proxy drop the pod's endpoint
        # while it still answers, then stop the frontend (the launcher exits with it).
        "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", f"sleep {PRE_STOP_DRAIN_S}; torchserve --stop"]}}},
        "volumeMounts": [
            {"name": "templates", "mountPath": TEMPLATE_DIR, "readOnly": True},
            {"name": "model-store", "mountPath": MODEL_STORE, "readOnly": True},
            {"name": "conf", "mountPath": CONF_DIR, "readOnly": True},
            {"name": "run", "mountPath": RUN_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": dict(_RESTRICTED),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _proxy_container(ctx: ServingContext, model: ServedModel) -> Manifest:
    """The pod's edge: the inference and metrics ports. The token file, and TorchServe's key file (the run dir)
    only with spec.serving.inferenceTokenSecret; its Hostname label is the pod name (HOSTNAME)."""
    env: list[Manifest] = [
        {"name": "FLOWNEXUS_PROXY_PORT", "value": str(INFERENCE_PORT)},
        {"name": "FLOWNEXUS_METRICS_PORT", "value": str(METRICS_PORT)},
        {"name": "FLOWNEXUS_UPSTREAM_PORT", "value": str(UPSTREAM_INFERENCE_PORT)},
        {"name": "FLOWNEXUS_UPSTREAM_METRICS_PORT", "value": str(UPSTREAM_METRICS_PORT)},
        {"name": "FLOWNEXUS_CONF_FILE", "value": f"{CONF_DIR}/config.properties"},
        {"name": "FLOWNEXUS_MODEL_NAME", "value": ctx.model_name},
        # Answer while the endpoint is removed, as TorchServe does (its preStop), then finish what is in flight.
        {"name": "FLOWNEXUS_PROXY_DRAIN_S", "value": str(PRE_STOP_DRAIN_S)},
    ]
    if model.archive_version:
        env.append({"name": "FLOWNEXUS_MODEL_VERSION", "value": model.archive_version})
    mounts: list[Manifest] = [
        {"name": "templates", "mountPath": TEMPLATE_DIR, "readOnly": True},
        {"name": "conf", "mountPath": CONF_DIR, "readOnly": True},
    ]
    if ctx.token_auth:
        env += [
            {"name": "FLOWNEXUS_RUN_DIR", "value": RUN_DIR},
            {"name": "FLOWNEXUS_TOKEN_FILE", "value": f"{TOKEN_DIR}/key"},
        ]
        mounts += [
            {"name": "run", "mountPath": RUN_DIR, "readOnly": True},
            {"name": "inference-token", "mountPath": TOKEN_DIR, "readOnly": True},
        ]
    return {
        "name": "auth-proxy",
        "image": ctx.cluster.images.server,
        "imagePullPolicy": ctx.cluster.images.pull_policy,
        "command": ["python", f"{TEMPLATE_DIR}/auth_proxy.py"],
        "env": env,
        "ports": [
            {"name": "inference", "containerPort": INFERENCE_PORT},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
        "readinessProbe": {"tcpSocket": {"port": INFERENCE_PORT}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}},
        "volumeMounts": mounts,
        "securityContext": dict(_RESTRICTED),
    }


def _prepare_container(ctx: ServingContext, model: ServedModel) -> Manifest:
    return {
        "name": "fetch-model",
        "image": ctx.cluster.images.server,
        "imagePullPolicy": ctx.cluster.images.pull_policy,
        # With an S3 store the archive is first downloaded into the pod's emptyDir (a storage initializer).
        "command": with_store(
            ctx.cluster,
            ["python", f"{TEMPLATE_DIR}/prepare.py", TEMPLATE_DIR],
            pull_files=[f"{model.archive}={ARTIFACT_ROOT}/{model.archive}"],
        ),
        "env": [
            *store_env(ctx.cluster),
            {"name": "FLOWNEXUS_ARCHIVE", "value": f"{ARTIFACT_ROOT}/{model.archive}"},
            {"name": "FLOWNEXUS_MODEL_NAME", "value": ctx.model_name},
            {"name": "FLOWNEXUS_MODEL_STORE", "value": MODEL_STORE},
            {"name": "FLOWNEXUS_CONF_DIR", "value": CONF_DIR},
        ],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}},
        "volumeMounts": [
            {"name": "artifacts", "mountPath": ARTIFACT_ROOT, "readOnly": artifacts_read_only(ctx.cluster)},
            *store_mounts(ctx.cluster),
            {"name": "templates", "mountPath": TEMPLATE_DIR, "readOnly": True},
            {"name": "model-store", "mountPath": MODEL_STORE},
            {"name": "conf", "mountPath": CONF_DIR},
        ],
        "securityContext": dict(_RESTRICTED),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def build_deployment(
    ctx: ServingContext,
    track: Track,
    model: ServedModel,
    replicas: int | None,
    config_digest: str,
    template_digest: str | None = None,
) -> Manifest:
    """The Deployment of one track. ``replicas=None`` leaves the count to the HPA (omitted from the patch).
    ``template_digest`` goes on the Deployment (not its pods): the decision reads it to know which template
    the Deployment has been given."""
    pod_labels = {**selector_labels(ctx.name, track), VERSION_LABEL: model.version}
    meta = child_metadata(ctx.owner, deployment_name(ctx.name, track), "server", **pod_labels)
    if template_digest is not None:
        meta["annotations"] = {**(meta.get("annotations") or {}), TEMPLATE_HASH_ANNOTATION: template_digest}
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(METRICS_PORT),
        "prometheus.io/path": "/metrics",
        CONFIG_HASH_ANNOTATION: config_digest,
        "flownexus.io/archive": model.archive,
    }
    if model.training_job:
        annotations["flownexus.io/trainingjob"] = model.training_job
    volumes: list[Manifest] = [
        artifacts_volume(ctx.cluster, ctx.artifact_claim, read_only=True),
        *store_volumes(ctx.cluster),
        {"name": "templates", "configMap": {"name": config_map_name(ctx.name, track)}},
        {"name": "model-store", "emptyDir": {}},
        {"name": "conf", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {"name": "run", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}},
    ]
    containers = [_server_container(ctx), _proxy_container(ctx, model)]
    secret = ctx.spec.serving.inference_token_secret
    if secret is not None:
        volumes.append(
            {"name": "inference-token", "secret": {"secretName": secret, "items": [{"key": "key", "path": "key"}]}}
        )
    spec: Manifest = {
        "selector": {"matchLabels": selector_labels(ctx.name, track)},
        "revisionHistoryLimit": 3,
        "progressDeadlineSeconds": 600,
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "template": {
            "metadata": {"labels": dict(meta["labels"]), "annotations": annotations},
            "spec": {
                # TorchServe needs no API rights.
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": RUN_AS,
                    "runAsGroup": RUN_AS,
                    "fsGroup": RUN_AS,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "terminationGracePeriodSeconds": 30,
                **pod_placement(ctx.cluster.serving),
                "initContainers": [_prepare_container(ctx, model)],
                "containers": containers,
                "volumes": volumes,
            },
        },
    }
    if replicas is not None:
        spec["replicas"] = replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}


# ---- traffic, scaling, disruption, network ----------------------------------------------------------


def build_service(ctx: ServingContext, route_canary: bool) -> Manifest:
    """The inference port only. Selecting both tracks splits traffic by replica ratio; stable-only sends all
    traffic to stable (the first step of the rollback runbook)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(ctx.owner, service_name(ctx.name), "server"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(ctx.name, None if route_canary else "stable"),
            "ports": [{"name": "http", "port": INFERENCE_PORT, "targetPort": "inference", "protocol": "TCP"}],
        },
    }


def _hpa_behavior(ctx: ServingContext) -> Manifest:
    auto = ctx.spec.autoscaling
    return {
        "scaleUp": {"stabilizationWindowSeconds": int(duration_seconds(auto.scale_up_stabilization))},
        "scaleDown": {"stabilizationWindowSeconds": int(duration_seconds(auto.scale_down_stabilization))},
    }


def build_hpa(ctx: ServingContext) -> Manifest | None:
    """The stable Deployment's HPA (CPU, optionally memory, stabilization windows for both directions); None
    when disabled. Requests per second are KEDA's part (:func:`build_scaled_object`): no metric here that
    nothing serves."""
    auto = ctx.spec.autoscaling
    if not auto.enabled:
        return None
    metrics: list[Manifest] = [
        {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": auto.target_cpu_utilization},
            },
        }
    ]
    if auto.target_memory_utilization is not None:
        metrics.append(
            {
                "type": "Resource",
                "resource": {
                    "name": "memory",
                    "target": {"type": "Utilization", "averageUtilization": auto.target_memory_utilization},
                },
            }
        )
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": child_metadata(ctx.owner, deployment_name(ctx.name, "stable"), "server"),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": deployment_name(ctx.name, "stable"),
            },
            "minReplicas": auto.min_replicas,
            "maxReplicas": auto.max_replicas,
            "metrics": metrics,
            "behavior": _hpa_behavior(ctx),
        },
    }


KEDA_API_VERSION = "keda.sh/v1alpha1"
REQUESTS_PER_SECOND_WINDOW = "1m"


def scaled_object_name(name: str) -> str:
    """The ScaledObject of the stable Deployment: named like our HPA, which it replaces."""
    return deployment_name(name, "stable")


def keda_hpa_name(name: str) -> str:
    """The HPA that KEDA makes from the ScaledObject. Not our HPA's name: KEDA's HPA is owned by the ScaledObject
    and carries its labels, so under our HPA's name it would read as a foreign object taking our child's name
    (and KEDA's webhook refuses a ScaledObject while another HPA targets the Deployment). At most 62 characters:
    KEDA also puts it in a label value."""
    return f"{deployment_name(name, 'stable')}-keda"


def _decimal(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def build_scaled_object(ctx: ServingContext, prometheus_url: str) -> Manifest | None:
    """spec.autoscaling.targetRequestsPerSecond through KEDA: a ScaledObject of the stable Deployment with the
    HPA's CPU (and memory) targets and a prometheus trigger on the requests per second the stable pods' edge
    proxies count, as an average per pod; the HPA KEDA makes from it has our stabilization windows. None when
    autoscaling is off or no request rate is set (then :func:`build_hpa`)."""
    auto = ctx.spec.autoscaling
    if not auto.enabled or auto.target_requests_per_second is None:
        return None
    triggers: list[Manifest] = [
        {"type": "cpu", "metricType": "Utilization", "metadata": {"value": str(auto.target_cpu_utilization)}}
    ]
    if auto.target_memory_utilization is not None:
        triggers.append(
            {"type": "memory", "metricType": "Utilization", "metadata": {"value": str(auto.target_memory_utilization)}}
        )
    query = stable_requests_per_second_query(ctx.model_name, pod_prefix(ctx.name, "stable"), REQUESTS_PER_SECOND_WINDOW)
    triggers.append(
        {
            "type": "prometheus",
            "metricType": "AverageValue",
            "metadata": {
                "serverAddress": prometheus_url,
                "query": query,
                "threshold": _decimal(auto.target_requests_per_second),
            },
        }
    )
    return {
        "apiVersion": KEDA_API_VERSION,
        "kind": "ScaledObject",
        "metadata": child_metadata(ctx.owner, scaled_object_name(ctx.name), "server"),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": deployment_name(ctx.name, "stable"),
            },
            "minReplicaCount": auto.min_replicas,
            "maxReplicaCount": auto.max_replicas,
            "advanced": {
                "horizontalPodAutoscalerConfig": {"name": keda_hpa_name(ctx.name), "behavior": _hpa_behavior(ctx)}
            },
            "triggers": triggers,
        },
    }


def build_pdb(ctx: ServingContext) -> Manifest:
    """At most one serving pod of the deployment down at a time by voluntary disruption (drains)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": child_metadata(ctx.owner, ctx.name, "server"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(ctx.name)}},
    }


def network_policy_peers(ctx: ServingContext) -> tuple[list[Manifest], list[Manifest]]:
    """The peers admitted to the inference port and to the metrics port.

    Inference: spec.serving.allowedFrom, or every pod of the ModelDeployment's namespace when unset or empty;
    with spec.rollout.smokeTraffic and an allowedFrom list, also this deployment's smoke pods (the default
    admits them as pods of the namespace). Metrics: spec.serving.metricsFrom, or every pod of the namespace
    named ``monitoring`` when unset or empty. An empty ``from`` would admit every source, so neither list is
    ever empty.
    """
    serving = ctx.spec.serving
    inference = [p.to_wire() for p in serving.allowed_from or []] or [{"podSelector": {}}]
    if serving.allowed_from and ctx.spec.rollout.smoke_traffic is not None:
        inference.append({"podSelector": {"matchLabels": {SMOKE_LABEL: ctx.name}}})
    metrics = [p.to_wire() for p in serving.metrics_from or []] or [namespace_peer(MONITORING_NAMESPACE).to_wire()]
    return inference, metrics


def build_network_policy(ctx: ServingContext) -> Manifest:
    """Ingress to the inference port from the admitted peers (default: the own namespace) and to the metrics
    port from the monitoring peers (default: namespace ``monitoring``); nothing else (the management API is on
    loopback anyway). No egress with a PVC store: a serving pod starts from its init container's copy of the
    archive and calls nothing (kubelet's exec probes and loopback do not leave the pod). With an S3 store the init
    container downloads the archive: egress to the endpoint's port and DNS only."""
    inference, metrics = network_policy_peers(ctx)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": child_metadata(ctx.owner, ctx.name, "server"),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(ctx.name)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": inference, "ports": [{"protocol": "TCP", "port": INFERENCE_PORT}]},
                {"from": metrics, "ports": [{"protocol": "TCP", "port": METRICS_PORT}]},
            ],
            "egress": store_egress(ctx.cluster),
        },
    }


# ---- smoke traffic ----------------------------------------------------------------------------------


def canary_service_name(name: str) -> str:
    return f"{name}-canary"


def smoke_job_name(name: str, step: int) -> str:
    """``<md>-smoke-s<step>``: at most 50 + 8 + 2 characters (a Job's name is also its pods' label value)."""
    return f"{name}-smoke-s{step}"


def smoke_url(ctx: ServingContext) -> str:
    host = f"{canary_service_name(ctx.name)}.{ctx.namespace}.svc"
    return f"http://{host}:{INFERENCE_PORT}/predictions/{ctx.model_name}"


def smoke_duration_s(spec: ModelDeploymentSpec) -> int:
    """How long one step's smoke Job sends: the longest a step can last unpaused (its analysis slots until
    noDataTimeout, then failedChecksBeforeRollback more, and the one that passes). A step that passes earlier
    deletes its Job; a paused step has none."""
    rollout = spec.rollout
    interval = duration_seconds(rollout.interval)
    return int(duration_seconds(rollout.no_data_timeout) + interval * (rollout.failed_checks_before_rollback + 1))


def build_canary_service(ctx: ServingContext) -> Manifest:
    """A ClusterIP Service of the canary track only (``<md>-canary``): the smoke Job's target, so that all of
    its requests reach the pods under analysis instead of the step's share of them. It selects no pod while no
    canary runs; the NetworkPolicy and the token guard the same inference port as through ``<md>``."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(ctx.owner, canary_service_name(ctx.name), "server"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(ctx.name, "canary"),
            "ports": [{"name": "http", "port": INFERENCE_PORT, "targetPort": "inference", "protocol": "TCP"}],
        },
    }


def build_smoke_job(ctx: ServingContext, canary_revision: str, step: int, duration_s: int) -> Manifest:
    """The smoke Job of one canary step: ``pod/smoke.py`` POSTs spec.rollout.smokeTraffic.request to the canary
    Service at requestsPerSecond for ``duration_s``, and logs the answers it counted. ``ctx`` is the canary's
    (its template's server image and inference token). Pod Security ``restricted``, no API token, no
    MD_LABEL on its pods (no Service, PDB or NetworkPolicy of the deployment selects them)."""
    smoke = ctx.spec.rollout.smoke_traffic
    assert smoke is not None, "build_smoke_job needs spec.rollout.smokeTraffic"
    name = smoke_job_name(ctx.name, step)
    meta = child_metadata(ctx.owner, name, SMOKE_COMPONENT, **{SMOKE_LABEL: ctx.name})
    meta["annotations"] = {SMOKE_REVISION_ANNOTATION: canary_revision, "flownexus.io/step": str(step)}
    pod_labels = {
        "app.kubernetes.io/part-of": meta["labels"]["app.kubernetes.io/part-of"],
        "app.kubernetes.io/component": SMOKE_COMPONENT,
        SMOKE_LABEL: ctx.name,
    }
    env: list[Manifest] = [
        {"name": "FLOWNEXUS_SMOKE_URL", "value": smoke_url(ctx)},
        {"name": "FLOWNEXUS_SMOKE_RPS", "value": str(smoke.requests_per_second)},
        {"name": "FLOWNEXUS_SMOKE_DURATION_S", "value": str(duration_s)},
        {"name": "FLOWNEXUS_SMOKE_EXPECT_STATUS", "value": str(smoke.expect_status)},
        {"name": "FLOWNEXUS_SMOKE_BODY", "value": smoke.request},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    container: Manifest = {
        "name": "smoke",
        "image": ctx.cluster.images.server,
        "imagePullPolicy": ctx.cluster.images.pull_policy,
        "command": ["python", "-c", pod.source("smoke")],
        "env": env,
        "resources": {"requests": {"cpu": "20m", "memory": "32Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}},
        "securityContext": dict(_RESTRICTED),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    volumes: list[Manifest] = []
    secret = ctx.spec.serving.inference_token_secret
    if secret is not None:
        env.append({"name": "FLOWNEXUS_TOKEN_FILE", "value": f"{TOKEN_DIR}/key"})
        container["volumeMounts"] = [{"name": "inference-token", "mountPath": TOKEN_DIR, "readOnly": True}]
        volumes.append(
            {"name": "inference-token", "secret": {"secretName": secret, "items": [{"key": "key", "path": "key"}]}}
        )
    pod_spec: Manifest = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SMOKE_RUN_AS,
            "runAsGroup": SMOKE_RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": 5,
        **pod_placement(ctx.cluster.serving),
        "containers": [container],
    }
    if volumes:
        pod_spec["volumes"] = volumes
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": 0,  # the client exits 0 whatever the answers; a crash is not retried within the step
            "activeDeadlineSeconds": duration_s + SMOKE_SLACK_S,
            "ttlSecondsAfterFinished": SMOKE_TTL_S,
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }
