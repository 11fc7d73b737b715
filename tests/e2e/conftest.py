"""The `cluster` fixture: the real local Kubernetes from dev/cluster, started once per session; and the
Flow Nexus CRDs and the operator (a host process against the cluster) that the e2e test modules share.

A cluster that is already running (`dev/cluster status` succeeds) is reused and left running; one the
fixture started is taken down again at the end of the session.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import prereq
from tests.chart import OPERATOR_SA, chart_rbac
from tests.e2e.s3 import s3_store  # noqa: F401  (a session fixture: SeaweedFS in the cluster)
from tests.processes import stop

REPO = Path(__file__).resolve().parents[2]
DEV_CLUSTER = REPO / "dev" / "cluster"
UP_TIMEOUT_S = 1800  # covers a cold build of the binaries; a warm `up` takes about a minute
DOWN_TEST = "test_down_leaves_nothing_behind"


def _versions() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (REPO / "dev" / "versions.env").read_text().splitlines())
    return {k: v for k, v in (p for p in pairs if len(p) == 2 and not p[0].startswith("#"))}


def kubectl_binary() -> Path:
    cache = Path(os.environ.get("FLOWNEXUS_CACHE", Path.home() / ".cache" / "flownexus"))
    return cache / "bin" / f"kubernetes-{_versions()['KUBERNETES_VERSION']}" / "kubectl"


@dataclass
class Cluster:
    """Handle on the running cluster for tests."""

    kubeconfig: Path
    started_here: bool
    stopped: bool = field(default=False)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against the cluster; with check=True a failure fails the test with kubectl's stderr."""
        result = subprocess.run(
            [str(kubectl_binary()), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def apply(self, *objects: dict[str, Any], namespace: str | None = None) -> None:
        ns = ["-n", namespace] if namespace else []
        self.kubectl(*ns, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)


def wait_until(what: str, check: Callable[[], bool], timeout: float, interval: float = 1.0) -> None:
    """Poll `check` until it is true; fail the test (naming `what`) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _missing_prerequisites() -> list[str]:
    missing = [] if os.geteuid() == 0 else ["root"]
    missing += [tool for tool in ("containerd", "runc", "buildah", "iptables", "openssl") if not shutil.which(tool)]
    if not Path("/usr/lib/cni/bridge").exists():
        missing.append("containernetworking-plugins")
    if not shutil.which("go") and not kubectl_binary().exists():
        missing.append("go (or prebuilt binaries in the cache)")
    return missing


def _dev_cluster(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DEV_CLUSTER), *args], capture_output=True, text=True, timeout=timeout)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Taking the cluster down must come after every other test that uses it.
    items.sort(key=lambda item: item.name == DOWN_TEST)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    missing = _missing_prerequisites()
    if missing:
        prereq.missing(f"the local cluster needs: {', '.join(missing)} (see docs/CLUSTER.md)")
    status = _dev_cluster("status", timeout=60)
    running = status.returncode == 0
    if running:
        # Possibly another checkout's cluster (one per machine): status names its kubeconfig.
        kubeconfig = Path(status.stdout.strip().splitlines()[-1].removeprefix("kubeconfig: "))
    else:
        kubeconfig = REPO / ".local" / "kubeconfig"
        up = _dev_cluster("up", timeout=UP_TIMEOUT_S)
        if up.returncode != 0:
            _dev_cluster("down", timeout=300)
            pytest.fail(f"dev/cluster up failed ({up.returncode}):\n{up.stdout[-4000:]}\n{up.stderr[-4000:]}")
    handle = Cluster(kubeconfig=kubeconfig, started_here=not running)
    yield handle
    if handle.started_here and not handle.stopped:
        _dev_cluster("down", timeout=300)


RESTRICTED = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")}


def create_namespace(cluster: Cluster, name: str) -> None:
    """A namespace that enforces Pod Security ``restricted``, as a careful platform team sets them up: every
    pod the operator creates must pass it, or the test sees the refusal."""
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": RESTRICTED}})
    # Pods may only start once the namespace's default ServiceAccount exists.
    wait_until(
        "default ServiceAccount",
        lambda: cluster.kubectl("-n", name, "get", "serviceaccount", "default", check=False).returncode == 0,
        30,
    )


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting: the next test does not need it gone)."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    create_namespace(cluster, name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def build_image(
    context: Path,
    name: str,
    *,
    containerfile: str | None = None,
    tag: str | None = None,
    build_args: dict[str, str] | None = None,
    timeout: float = 900,
) -> str:
    """Build a Containerfile with the harness (buildah), load it into the node; the image reference to use."""
    args = ["build-image", str(context), "--name", name]
    args += ["-f", str(context / containerfile)] if containerfile else []
    args += ["--tag", tag] if tag else []
    args += [a for k, v in (build_args or {}).items() for a in ("--build-arg", f"{k}={v}")]
    result = _dev_cluster(*args, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"dev/cluster build-image {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


SERVER_TAG = "flownexus/server:0.1.0"  # the name examples/neuralcluster.yaml uses


@pytest.fixture(scope="session")
def server_image(cluster: Cluster) -> str:
    """The TorchServe image built from trainer_image/Containerfile.server, also named as in the examples: the
    ModelDeployments' pods and the validator's served-latency step run it."""
    return build_image(
        REPO / "trainer_image", "server", containerfile="Containerfile.server", tag=SERVER_TAG, timeout=2400
    )


TRAINER_TAG = "flownexus/trainer:0.1.0"  # the name examples/neuralcluster.yaml uses


@pytest.fixture(scope="session")
def trainer_image(cluster: Cluster) -> str:
    """The trainer image built from trainer_image/Containerfile.trainer, also named as in the examples: the
    worker pods and the validator's first step run it."""
    return build_image(
        REPO / "trainer_image", "trainer", containerfile="Containerfile.trainer", tag=TRAINER_TAG, timeout=2400
    )


@pytest.fixture(scope="session")
def web_image(cluster: Cluster) -> str:
    """The test HTTP server image, built by the harness (buildah) and loaded into the node."""
    return build_image(Path(__file__).parent / "images" / "web", "e2e-web")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def flownexus_crds(cluster: Cluster) -> Cluster:
    """The CRDs and the trainer-status admission policy, as the chart installs them."""
    files = sorted((REPO / "crds").glob("*.yaml"))
    policies = sorted((REPO / "policies").glob("*.yaml"))
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", *(a for p in files + policies for a in ("-f", str(p)))
    )
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"-f={p}" for p in files))
    wait_until(
        "flownexus.io served",
        lambda: "trainingjobs" in cluster.kubectl("api-resources", "--api-group=flownexus.io", check=False).stdout,
        60,
    )
    return cluster


OPERATOR_NAMESPACE = "flownexus-e2e"


def operator_kubeconfig(cluster: Cluster, watch: str, target: Path) -> Path:
    """The chart's rights for ``watch`` (a namespace glob), installed into OPERATOR_NAMESPACE, and a
    kubeconfig that authenticates with its ServiceAccount's token: the operator process has exactly the
    rights the chart gives it, so a missing grant fails the test that needs it."""
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}})
    rbac = chart_rbac(OPERATOR_NAMESPACE, f"watchNamespaces={{{watch}}}")
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": rbac}))  # fmt: skip
    token = cluster.kubectl("-n", OPERATOR_NAMESPACE, "create", "token", OPERATOR_SA, "--duration=12h").stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": OPERATOR_SA, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": admin["clusters"][0]["name"], "user": OPERATOR_SA}}],
        "current-context": "operator",
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(config))
    target.chmod(0o600)
    return target


@pytest.fixture(scope="session")
def operator(flownexus_crds: Cluster) -> Iterator[int]:
    """The operator as a host process with the chart's ServiceAccount; yields its metrics port. Stopped by
    pid at the end."""
    metrics_port, health_port = _free_port(), _free_port()
    log_path = REPO / ".local" / "logs" / "operator-e2e.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    kubeconfig = operator_kubeconfig(flownexus_crds, "e2e-*", REPO / ".local" / "operator-e2e.kubeconfig")
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), os.environ.get("PYTHONPATH", "")]),
    }
    # Only the e2e namespaces: tests/reliability runs its own operators in theirs.
    command = [sys.executable, "-m", "flownexus", "--metrics-port", str(metrics_port),
               "--health-port", str(health_port), "--namespace", "e2e-*"]  # fmt: skip
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_until("operator /healthz", healthy, 60)
        yield metrics_port
    finally:
        stop(proc)


def run_down() -> subprocess.CompletedProcess[str]:
    return _dev_cluster("down", timeout=300)


# At the end: tests/e2e/prom.py imports this module's names.
from tests.e2e.prom import prometheus  # noqa: E402,F401  (a session fixture: a real Prometheus)
