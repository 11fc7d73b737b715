"""Children of a TrainingJob: trainer RBAC, config, headless Service, one Indexed Job per attempt, validator Job.

Pods find rank 0 at ``<job>-0.<tj>-workers``: the Indexed Job gives each pod the hostname
``<job>-<index>`` and the Service (``subdomain``) publishes it before the pod is ready.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .. import API_VERSION
from ..api.modeldeployment import ServingSpec
from ..api.neuralcluster import NeuralClusterSpec
from ..api.trainingjob import ServedLatencySpec, TrainingJobSpec
from ..meta import Manifest, OwnedContext, child_metadata, pod_placement
from ..store import (
    ARTIFACT_ROOT,
    artifacts_volume,
    dataset_download,
    store_env,
    store_mounts,
    store_volumes,
    with_store,
)

MASTER_PORT = 29500
CONFIG_DIR = "/etc/flownexus"
CONFIG_ANNOTATION = "flownexus.io/trainer-config"
# The trainer image's unprivileged user (trainer_image/Containerfile.trainer).
TRAINER_UID = 10001
# The validator's TorchServe scratch dir (an emptyDir), as SERVE_ROOT in a ModelDeployment's pods; the candidate
# archive, its request rows and the first step's verdict pass from one validator step to the other in it.
SERVE_ROOT = "/srv/flownexus"
CANDIDATE_DIR = f"{SERVE_ROOT}/candidate"


@dataclass(frozen=True)
class TrainingContext(OwnedContext):
    """Everything the builders need about one TrainingJob, resolved once by the reconciler."""

    spec: TrainingJobSpec
    cluster: NeuralClusterSpec
    artifact_claim: str | None  # None for an S3 store
    # What the validator learns about spec.validation.champion (see champion_paths); workers never get it.
    champion: dict[str, str] | None = None
    # Which store (ArtifactStore.describe): a champion is only reachable in the same one.
    store: str | None = None

    @property
    def run_dir(self) -> str:
        """One directory per TrainingJob *object*: a re-created job of the same name starts afresh
        instead of resuming from the checkpoints of its deleted predecessor."""
        uid = str(self.owner["metadata"].get("uid", ""))[:8]
        return (
            f"{ARTIFACT_ROOT}/{self.namespace}/{self.name}-{uid}"
            if uid
            else f"{ARTIFACT_ROOT}/{self.namespace}/{self.name}"
        )


def training_image(ctx: TrainingContext) -> str:
    """The workers' image: ``spec.trainer.image`` for a custom trainer, else the cluster's trainer image."""
    return ctx.spec.trainer.image if ctx.spec.trainer is not None else ctx.cluster.images.trainer


def service_name(name: str) -> str:
    # Not the bare TrainingJob name: a ModelDeployment of the same name owns that Service name.
    return f"{name}-workers"


def service_account_name(name: str) -> str:
    return f"{name}-trainer"


def worker_job_name(name: str, attempt: int) -> str:
    return f"{name}-a{attempt}"


def validator_job_name(name: str) -> str:
    return f"{name}-validate"


def master_addr(name: str, attempt: int) -> str:
    return f"{worker_job_name(name, attempt)}-0.{service_name(name)}"


def trainer_config(ctx: TrainingContext) -> dict[str, Any]:
    """The JSON the trainer and validator read (``$FLOWNEXUS_CONFIG``): the spec plus paths."""
    spec = ctx.spec.to_wire()
    output = dict(spec["output"])
    output.setdefault("modelName", ctx.name)
    return {
        "name": ctx.name,
        "namespace": ctx.namespace,
        "model": spec["model"],
        "dataset": spec["dataset"],
        "training": spec["training"],
        "distributed": {"backend": ctx.spec.distributed.backend},
        "validation": spec["validation"],
        "output": output,
        "paths": {"artifactRoot": ARTIFACT_ROOT, "runDir": ctx.run_dir, **_dataset_file(ctx), **(ctx.champion or {})},
    }


def _dataset_file(ctx: TrainingContext) -> dict[str, str]:
    """``paths.datasetFile``: where the store wrapper downloads the dataset to (S3 stores only)."""
    local = dataset_download(ctx.spec.dataset, ctx.cluster)[1]
    return {"datasetFile": local} if local else {}


def _pulled_dataset(ctx: TrainingContext) -> list[str]:
    pull = dataset_download(ctx.spec.dataset, ctx.cluster)[0]
    return [pull] if pull else []


def _champion_dir(ctx: TrainingContext) -> list[str]:
    """The champion's run dir, which the validator scores (downloaded too with an S3 store)."""
    run_dir = (ctx.champion or {}).get("championRunDir")
    return [f"{ARTIFACT_ROOT}/{run_dir}"] if run_dir else []


def resolve_served_latency(current: ServedLatencySpec, serving: Manifest | None) -> ServedLatencySpec:
    """``current`` with every unset setting taken from a ModelDeployment's ``spec.serving`` (the champion's), or
    from the ModelDeployment defaults when there is none: the latency gate serves the model as it will be served."""
    try:
        spec = ServingSpec.model_validate(serving or {})
    except ValidationError:  # the API server validated it already; a stale schema must not block the gate
        spec = ServingSpec()
    return current.model_copy(
        update={
            "batch_size": current.batch_size if current.batch_size is not None else spec.batch_size,
            "max_batch_delay_ms": (
                current.max_batch_delay_ms if current.max_batch_delay_ms is not None else spec.max_batch_delay_ms
            ),
            "workers": current.workers if current.workers is not None else spec.workers_per_model,
            "resources": current.resources or spec.resources,
        }
    )


def champion_paths(
    name: str, deployment: Manifest | None, deployment_store: str | None, own_store: str | None
) -> dict[str, str]:
    """Where the validator finds the model that ModelDeployment ``name`` serves now (``paths.champion*``).

    ``championRunDir``: the run directory of its stable archive, relative to the artifact root.
    ``championAbsent``: there is nothing to beat yet (no such ModelDeployment, or it serves nothing).
    ``championError``: it serves a model the validator cannot reach or score; the gate fails with it.
    """
    if deployment is None:
        return {"championAbsent": f"ModelDeployment {name} does not exist (yet)"}
    stable = (deployment.get("status") or {}).get("stable") or {}
    archive = stable.get("archive")
    if not archive:
        return {"championAbsent": f"ModelDeployment {name} serves no model yet"}
    if deployment_store != own_store:
        return {
            "championError": f"ModelDeployment {name} keeps its models in another artifact store "
            f"({deployment_store}, this job uses {own_store})"
        }
    parts = str(archive).strip("/").split("/")
    if len(parts) < 3 or parts[-2] != "model-store" or ".." in parts:
        return {
            "championError": f"ModelDeployment {name} serves {archive}, which is not a TrainingJob's archive "
            "(<run dir>/model-store/<model>.mar): there is no trained model to score"
        }
    return {"championRunDir": "/".join(parts[:-2]), "championVersion": str(stable.get("version", ""))}


def pod_template_metadata(ctx: TrainingContext, labels: dict[str, str]) -> Manifest:
    """The pods carry the trainer's config in an annotation that a downward-API volume turns into
    ``config.json``: one object fewer per job than a ConfigMap, and the config is fixed per attempt."""
    return {"labels": dict(labels), "annotations": {CONFIG_ANNOTATION: json.dumps(trainer_config(ctx), sort_keys=True)}}


def build_service(ctx: TrainingContext) -> Manifest:
    """Headless Service that gives every worker pod a stable DNS name, ready or not."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(ctx.owner, service_name(ctx.name), "trainer"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"flownexus.io/trainingjob": ctx.name, "flownexus.io/role": "worker"},
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
        },
    }


def build_trainer_rbac(ctx: TrainingContext) -> list[Manifest]:
    """A ServiceAccount whose only right is to patch this one TrainingJob's status (live progress)."""
    sa = service_account_name(ctx.name)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": child_metadata(ctx.owner, sa, "trainer")},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": child_metadata(ctx.owner, sa, "trainer"),
            "rules": [
                {
                    "apiGroups": [API_VERSION.split("/")[0]],
                    "resources": ["trainingjobs/status"],
                    "resourceNames": [ctx.name],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": child_metadata(ctx.owner, sa, "trainer"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ctx.namespace}],
        },
    ]


def _resources(ctx: TrainingContext) -> Manifest:
    chosen = ctx.spec.distributed.resources or ctx.cluster.default_training_resources
    wire = chosen.to_wire()
    gpus = ctx.spec.distributed.gpus_per_worker
    if gpus:
        gpu = ctx.cluster.training.gpu_resource_name
        wire.setdefault("limits", {})[gpu] = gpus
        wire.setdefault("requests", {})[gpu] = gpus
    return wire


def _volumes(ctx: TrainingContext) -> tuple[list[Manifest], list[Manifest]]:
    volumes: list[Manifest] = [
        artifacts_volume(ctx.cluster, ctx.artifact_claim),
        *store_volumes(ctx.cluster),
        {
            "name": "config",
            "downwardAPI": {
                "items": [
                    {"path": "config.json", "fieldRef": {"fieldPath": f"metadata.annotations['{CONFIG_ANNOTATION}']"}}
                ]
            },
        },
        # torch's gloo/shared-memory paths need more than the container default of 64 MiB.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
    ]
    mounts: list[Manifest] = [
        {"name": "artifacts", "mountPath": ARTIFACT_ROOT},
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        *store_mounts(ctx.cluster),
    ]
    return volumes, mounts


def _pod_security() -> Manifest:
    """Pod Security ``restricted``: no root anywhere. The store must let the trainer's user write: volumes
    that support ``fsGroup`` get group ``TRAINER_UID`` from the kubelet; others must be prepared by whoever
    provides them (docs/SECURITY.md). The trainer creates its run directory itself."""
    return {"runAsNonRoot": True, "runAsUser": TRAINER_UID, "runAsGroup": TRAINER_UID, "fsGroup": TRAINER_UID,
            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip


def _container_security() -> Manifest:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


def _base_env(ctx: TrainingContext) -> list[Manifest]:
    user = [e.to_wire() for e in ctx.spec.distributed.env or []]
    return [
        *user,
        {"name": "FLOWNEXUS_CONFIG", "value": f"{CONFIG_DIR}/config.json"},
        # The image that trained the model (metadata.json's lineage): the user's own for a custom trainer.
        {"name": "FLOWNEXUS_IMAGE", "value": training_image(ctx)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *store_env(ctx.cluster),
    ]


def build_worker_job(ctx: TrainingContext, attempt: int, active_deadline_seconds: int | None = None) -> Manifest:
    """The Indexed Job of one attempt: ``workers`` pods, each a torchrun node whose rank is its index.

    ``backoffLimit: 0`` makes any worker failure end the attempt: the operator restarts the whole gang
    as a new attempt, which resumes from the latest complete checkpoint.
    """
    dist = ctx.spec.distributed
    job_name = worker_job_name(ctx.name, attempt)
    volumes, mounts = _volumes(ctx)
    torchrun = [
        "torchrun",
        f"--nnodes={dist.workers}",
        f"--nproc-per-node={dist.procs_per_worker}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={master_addr(ctx.name, attempt)}",
        f"--master-port={MASTER_PORT}",
        "--max-restarts=0",
        # spec.trainer (model.architecture custom): the user's script or module, in the user's image.
        *(
            [*ctx.spec.trainer.command, *(ctx.spec.trainer.args or [])]
            if ctx.spec.trainer is not None
            else ["-m", "flownexus_trainer.train"]
        ),
    ]
    env = [
        *_base_env(ctx),
        {"name": "FLOWNEXUS_ATTEMPT", "value": str(attempt)},
        {"name": "FLOWNEXUS_REPORT_STATUS", "value": "1"},
        # No OMP_NUM_THREADS: each process takes the pod's CPU limit (cgroup cpu.max) divided by the processes
        # per pod (flownexus_trainer.distributed), so the same job gets the same threads on any node type.
    ]
    pod_labels = {"flownexus.io/role": "worker", "flownexus.io/attempt": str(attempt)}
    meta = child_metadata(ctx.owner, job_name, "trainer", **pod_labels)
    job_spec: Manifest = {
        "completionMode": "Indexed",
        "completions": dist.workers,
        "parallelism": dist.workers,
        "backoffLimit": 0,
        "suspend": ctx.spec.run_policy.suspend,
        "template": {
            "metadata": pod_template_metadata(ctx, meta["labels"]),
            "spec": {
                "subdomain": service_name(ctx.name),
                "restartPolicy": "Never",
                "serviceAccountName": service_account_name(ctx.name),
                "securityContext": _pod_security(),
                **pod_placement(ctx.cluster.training),
                "containers": [
                    {
                        "name": "trainer",
                        "image": training_image(ctx),
                        "imagePullPolicy": ctx.cluster.images.pull_policy,
                        # With an S3 store: pull the run dir (checkpoints to resume from) and the dataset; the
                        # pod of index 0 (rank 0 writes) pushes the run dir while training and at the end.
                        "command": with_store(
                            ctx.cluster,
                            torchrun,
                            pull=[ctx.run_dir],
                            pull_files=_pulled_dataset(ctx),
                            push=[ctx.run_dir],
                            push_when_env="JOB_COMPLETION_INDEX=0",
                        ),
                        "env": env,
                        "ports": [{"name": "rendezvous", "containerPort": MASTER_PORT}],
                        "resources": _resources(ctx),
                        "volumeMounts": mounts,
                        "securityContext": _container_security(),
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                    }
                ],
                "volumes": volumes,
            },
        },
    }
    if active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = max(1, active_deadline_seconds)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def _serving_env() -> list[Manifest]:
    """The TorchServe container's environment as a ModelDeployment's: HOME writable, one thread per worker."""
    return [
        {"name": "FLOWNEXUS_CONFIG", "value": f"{CONFIG_DIR}/config.json"},
        {"name": "FLOWNEXUS_CANDIDATE_DIR", "value": CANDIDATE_DIR},
        {"name": "HOME", "value": SERVE_ROOT},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "OMP_NUM_THREADS", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def build_validator_job(ctx: TrainingContext) -> Manifest:
    """The validator, two steps in one pod; its verdict is the termination message of the second.

    1. ``validate`` (init container, trainer image, the training resources): quality, convergence, the
       candidate archive (``python -m flownexus_trainer.candidate``).
    2. ``served-latency`` (server image, the serving resources): the candidate archive in TorchServe, configured
       as a ModelDeployment with ``spec.validation.servedLatency`` runs it, timed by in-pod clients; applies
       ``maxLatencyP95Ms`` to that, writes the final verdict and only then the archive into model-store/.
    """
    volumes, mounts = _volumes(ctx)
    meta = child_metadata(ctx.owner, validator_job_name(ctx.name), "validator", **{"flownexus.io/role": "validator"})
    resources = (ctx.spec.distributed.resources or ctx.cluster.default_training_resources).to_wire()
    served = ctx.spec.validation.served_latency
    serving_resources = (served.resources or ctx.cluster.default_serving_resources).to_wire()
    # TorchServe's scratch space (config, model store, logs) and the steps' hand-over: private to this pod, so that
    # nothing else can plant a verdict between the steps; the root filesystem stays read-only.
    volumes += [
        {"name": "serve", "emptyDir": {"sizeLimit": "4Gi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}},
    ]
    server_mounts = [
        *(m for m in mounts if m["name"] in ("artifacts", "config", "store-ca")),
        {"name": "serve", "mountPath": SERVE_ROOT},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": 1,
            "template": {
                "metadata": pod_template_metadata(ctx, meta["labels"]),
                "spec": {
                    "restartPolicy": "Never",
                    # The validator needs no API rights: its verdict travels in the termination message.
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": _pod_security(),
                    **pod_placement(ctx.cluster.training),
                    "initContainers": [
                        {
                            "name": "validate",
                            "image": ctx.cluster.images.trainer,
                            "imagePullPolicy": ctx.cluster.images.pull_policy,
                            "command": with_store(
                                ctx.cluster,
                                ["python", "-m", "flownexus_trainer.candidate"],
                                pull=[ctx.run_dir, *_champion_dir(ctx)],
                                pull_files=_pulled_dataset(ctx),
                                push=[ctx.run_dir],
                            ),
                            "env": [
                                *_base_env(ctx),
                                {"name": "OMP_NUM_THREADS", "value": "1"},
                                {"name": "FLOWNEXUS_CANDIDATE_DIR", "value": CANDIDATE_DIR},
                            ],
                            "resources": resources,
                            "volumeMounts": [*mounts, {"name": "serve", "mountPath": SERVE_ROOT}],
                            "securityContext": _container_security(),
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                        }
                    ],
                    "containers": [
                        {
                            "name": "served-latency",
                            "image": ctx.cluster.images.server,
                            "imagePullPolicy": ctx.cluster.images.pull_policy,
                            "command": with_store(
                                ctx.cluster,
                                ["python", "-m", "flownexus_trainer.served_latency", "--work-dir", SERVE_ROOT],
                                pull=[ctx.run_dir],
                                push=[ctx.run_dir],
                            ),
                            "workingDir": SERVE_ROOT,
                            "env": [*_serving_env(), *store_env(ctx.cluster)],
                            "resources": serving_resources,
                            "volumeMounts": server_mounts,
                            "securityContext": {**_container_security(), "readOnlyRootFilesystem": True},
                            "terminationMessagePolicy": "File",
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }
