"""A bare control plane for tests, in the manner of controller-runtime's envtest: etcd + kube-apiserver
from the cached binaries, on free loopback ports, in a temporary directory, with an audit log.

No kubelet, no controller-manager: nothing runs pods, no Job controller sets statuses and no garbage
collector deletes dependents, so a test sets those itself and every write the operator makes stays
visible. The audit log records every request the API server served, which is how tests and benchmarks
count the operator's requests (by its user agent) without trusting the operator to count them.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .config import AUDIT_POLICY, Layout
from .pki import ensure_pki, write_kubeconfig
from .procs import stop_pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ControlPlane:
    """A running etcd + kube-apiserver; ``kubeconfig`` has cluster-admin rights."""

    root: Path
    port: int
    kubeconfig: Path
    audit_log: Path
    pids: list[int] = field(default_factory=list)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def audit_events(self) -> Iterator[dict[str, object]]:
        if not self.audit_log.exists():
            return
        with self.audit_log.open() as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def requests_by(self, user_agent_prefix: str, since_line: int = 0) -> list[dict[str, object]]:
        """ResponseComplete audit events of the clients whose user agent starts with the prefix."""
        out = []
        for i, event in enumerate(self.audit_events()):
            if i < since_line or event.get("stage") != "ResponseComplete":
                continue
            if str(event.get("userAgent", "")).startswith(user_agent_prefix):
                out.append(event)
        return out

    def audit_lines(self) -> int:
        return sum(1 for _ in self.audit_events())

    def stop(self) -> None:
        for pid in reversed(self.pids):
            stop_pid(pid)
        self.pids.clear()


def _ready(server: str, ca: Path, cert: Path, key: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    try:
        with urllib.request.urlopen(f"{server}/readyz", context=context, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def start(layout: Layout | None = None, root: Path | None = None, timeout: float = 90) -> ControlPlane:
    """Start a fresh control plane (seconds); ``stop()`` it, then remove ``root``."""
    layout = layout or Layout()
    for binary in (layout.binary("etcd"), layout.k8s("kube-apiserver")):
        if not binary.exists():
            raise FileNotFoundError(f"{binary} is not built: run `dev/cluster build`")
    root = root or Path(tempfile.mkdtemp(prefix="fnx-envtest-"))
    pki = root / "pki"
    ensure_pki(pki, "127.0.0.1")
    port, etcd_port, peer_port = free_port(), free_port(), free_port()
    (root / "audit-policy.yaml").write_text(AUDIT_POLICY)
    audit_log = root / "audit.log"
    kubeconfig = root / "kubeconfig"
    write_kubeconfig(kubeconfig, pki, "admin", server=f"https://127.0.0.1:{port}")
    plane = ControlPlane(root=root, port=port, kubeconfig=kubeconfig, audit_log=audit_log)
    logs = root / "logs"
    logs.mkdir()

    def spawn(name: str, argv: list[str]) -> None:
        with (logs / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
        plane.pids.append(proc.pid)

    try:
        spawn("etcd", [
            str(layout.binary("etcd")), "--name", "envtest", "--data-dir", str(root / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"envtest=http://127.0.0.1:{peer_port}",
            "--listen-metrics-urls", "", "--log-level", "warn", "--unsafe-no-fsync",
        ])  # fmt: skip
        spawn("kube-apiserver", [
            str(layout.k8s("kube-apiserver")),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--secure-port={port}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            "--service-cluster-ip-range=10.0.0.0/24",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--authorization-mode=RBAC",
            f"--audit-policy-file={root / 'audit-policy.yaml'}", f"--audit-log-path={audit_log}",
            "--audit-log-format=json", "--audit-log-mode=blocking",
            "--profiling=false", "--v=0",
        ])  # fmt: skip
        deadline = time.monotonic() + timeout
        while not _ready(plane.server, pki / "ca.crt", pki / "admin.crt", pki / "admin.key"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"kube-apiserver not ready after {timeout:.0f}s; logs in {logs}")
            time.sleep(0.5)
    except BaseException:
        plane.stop()
        raise
    return plane


def admin_request(plane: ControlPlane, method: str, path: str, body: object = None) -> dict[str, object]:
    """One request as cluster-admin (the client certificate of the plane's kubeconfig)."""
    pki = plane.root / "pki"
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    request = urllib.request.Request(plane.server + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        parsed: dict[str, object] = json.loads(response.read() or b"{}")
        return parsed


def install_crds(plane: ControlPlane, manifests: list[dict[str, object]], timeout: float = 30) -> None:
    """Create the CRDs and wait until the API server serves their resources."""
    for crd in manifests:
        admin_request(plane, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    deadline = time.monotonic() + timeout
    for crd in manifests:
        spec = crd["spec"]
        assert isinstance(spec, dict)
        group, plural = spec["group"], spec["names"]["plural"]
        version = next(v["name"] for v in spec["versions"] if v.get("served"))
        while True:
            try:
                admin_request(plane, "GET", f"/apis/{group}/{version}/{plural}")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{plural}.{group} is not served after {timeout:.0f}s") from None
                time.sleep(0.2)


def remove(plane: ControlPlane) -> None:
    plane.stop()
    shutil.rmtree(plane.root, ignore_errors=True)
