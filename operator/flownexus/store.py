"""How the pods the operator creates reach the artifact store: the parts of a pod template that differ between a
PVC store and an S3 store, in one place for TrainingJobs and ModelDeployments.

A PVC is mounted at ``/artifacts``. An S3 store is an emptyDir at ``/artifacts`` that
``python -m flownexus_trainer.store`` fills from the bucket before the pod's command runs and writes back while it
runs and when it ends (the storage-initializer pattern; trainer_image/flownexus_trainer/store.py). The pods get the
bucket's keys from the Secret as environment variables; the operator never reads the Secret.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Sequence
from urllib.parse import urlsplit

from .api.neuralcluster import NeuralClusterSpec, S3Store
from .api.trainingjob import DatasetSpec
from .meta import Manifest

ARTIFACT_ROOT = "/artifacts"
STORE_ENV = "FLOWNEXUS_STORE"
CA_DIR = "/etc/flownexus/store-ca"
KEY_ID, SECRET_KEY = "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"
# Where an s3:// dataset is downloaded to, inside the pod's emptyDir (never pushed back: not under a run dir).
DATASET_DIR = f"{ARTIFACT_ROOT}/.datasets"
# The emptyDir that stands in for the store; a run's checkpoints, exports and archive must fit.
S3_SCRATCH_LIMIT = "8Gi"


def s3_of(cluster: NeuralClusterSpec) -> S3Store | None:
    return cluster.artifact_store.s3


def artifacts_volume(cluster: NeuralClusterSpec, claim: str | None, *, read_only: bool = False) -> Manifest:
    """The ``artifacts`` volume: the PVC, or the emptyDir the store wrapper fills."""
    if s3_of(cluster) is not None or claim is None:
        return {"name": "artifacts", "emptyDir": {"sizeLimit": S3_SCRATCH_LIMIT}}
    source: Manifest = {"claimName": claim, **({"readOnly": True} if read_only else {})}
    return {"name": "artifacts", "persistentVolumeClaim": source}


def artifacts_read_only(cluster: NeuralClusterSpec) -> bool:
    """A reader of a PVC store mounts it read-only; with S3 the wrapper writes the downloads into the emptyDir."""
    return s3_of(cluster) is None


def store_volumes(cluster: NeuralClusterSpec) -> list[Manifest]:
    """Extra volumes: the CA bundle of the endpoint, when the cluster names one."""
    s3 = s3_of(cluster)
    if s3 is None or s3.ca_config_map is None:
        return []
    items = [{"key": "ca.crt", "path": "ca.crt"}]
    return [{"name": "store-ca", "configMap": {"name": s3.ca_config_map, "items": items}}]


def store_mounts(cluster: NeuralClusterSpec) -> list[Manifest]:
    return [{"name": "store-ca", "mountPath": CA_DIR, "readOnly": True} for _ in store_volumes(cluster)]


def store_egress(cluster: NeuralClusterSpec) -> list[Manifest]:
    """NetworkPolicy egress a pod needs to reach an S3 store: the endpoint's port (any address: the endpoint is a
    host name) and DNS. None for a PVC."""
    s3 = s3_of(cluster)
    if s3 is None:
        return []
    url = urlsplit(s3.endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    dns = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    return [{"ports": [{"protocol": "TCP", "port": port}]}, {"ports": dns}]


def store_config(s3: S3Store) -> dict[str, object]:
    """What the wrapper reads from ``$FLOWNEXUS_STORE``: where the bucket is, never the keys."""
    config: dict[str, object] = {
        "type": "s3",
        "endpoint": s3.endpoint,
        "bucket": s3.bucket,
        "prefix": s3.prefix or "",
        "insecureSkipTLSVerify": s3.insecure_skip_tls_verify,
        "root": ARTIFACT_ROOT,
    }
    if s3.region:
        config["region"] = s3.region
    if s3.ca_config_map:
        config["caFile"] = f"{CA_DIR}/ca.crt"
    return config


def store_env(cluster: NeuralClusterSpec) -> list[Manifest]:
    """The store's location and the Secret's keys (as references: the values never pass through the operator)."""
    s3 = s3_of(cluster)
    if s3 is None:
        return []
    secret = s3.secret_ref.name
    return [
        {"name": STORE_ENV, "value": json.dumps(store_config(s3), sort_keys=True, separators=(",", ":"))},
        *({"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": k}}} for k in (KEY_ID, SECRET_KEY)),
    ]


def with_store(
    cluster: NeuralClusterSpec,
    command: Sequence[str],
    *,
    pull: Sequence[str] = (),
    pull_files: Sequence[str] = (),
    push: Sequence[str] = (),
    push_when_env: str | None = None,
) -> list[str]:
    """``command`` as it runs in the pod: unchanged on a PVC; with S3, behind the wrapper that pulls the named
    directories and files (``SRC=DEST``) first and pushes the named directories back (only in the pod whose
    environment has ``push_when_env``'s NAME=VALUE, when given: one writer per directory)."""
    if s3_of(cluster) is None:
        return list(command)
    flags: list[str] = []
    flags += [a for d in pull for a in ("--pull", d)]
    flags += [a for f in pull_files for a in ("--pull-file", f)]
    flags += [a for d in push for a in ("--push", d)]
    flags += ["--push-when-env", push_when_env] if push and push_when_env else []
    return ["python", "-m", "flownexus_trainer.store", *flags, "--", *command]


def dataset_download(dataset: DatasetSpec, cluster: NeuralClusterSpec) -> tuple[str | None, str | None]:
    """For a dataset the pods must download: (``--pull-file`` argument, local path for ``paths.datasetFile``).

    With S3, ``source: file`` names an object under the store's prefix and ``source: uri`` an ``s3://`` object of
    the store's bucket; on a PVC the file is already mounted. (None, None) when nothing is downloaded."""
    if s3_of(cluster) is None:
        return None, None
    if dataset.source == "file" and dataset.path:
        source = dataset.path
    elif dataset.source == "uri" and dataset.uri and dataset.uri.startswith("s3://"):
        source = dataset.uri
    else:
        return None, None
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    local = f"{DATASET_DIR}/{digest}/{posixpath.basename(source.rstrip('/')) or 'data'}"
    return f"{source}={local}", local


def dataset_problem(dataset: DatasetSpec, cluster: NeuralClusterSpec) -> str | None:
    """A dataset URI this cluster's store cannot provide, in words that name the field and the value."""
    uri = (dataset.uri or "") if dataset.source == "uri" else ""
    s3 = s3_of(cluster)
    if uri.startswith("s3://"):
        if s3 is None:
            return f"spec.dataset.uri: {uri} is in S3, but the NeuralCluster's artifact store is a PVC"
        bucket = uri[len("s3://") :].split("/", 1)[0]
        if bucket != s3.bucket:
            return (
                f"spec.dataset.uri: {uri} is outside the artifact store's bucket {s3.bucket}: the pods only "
                "get keys for that bucket"
            )
    if uri.startswith("pvc://") and s3 is not None:
        return f"spec.dataset.uri: {uri} is on a PVC, but the NeuralCluster's artifact store is {s3.uri()}"
    return None
