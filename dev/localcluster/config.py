"""Where everything lives: pinned versions, cache and state paths, addresses of the local cluster."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

DEV_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = DEV_DIR.parent

NODE_NAME = "fnx-node"
# Non-default ports, so that an API server or etcd started by the integration tests can run beside us.
ETCD_CLIENT_PORT = 23790
ETCD_PEER_PORT = 23800
APISERVER_PORT = 16443
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
DNS_SERVICE_IP = "10.96.0.10"
POD_CIDR = "10.244.0.0/16"
NODE_POD_CIDR = "10.244.0.0/24"
CLUSTER_DOMAIN = "cluster.local"
CNI_NETWORK = "flownexus"
CNI_BRIDGE = "fnx0"
PAUSE_IMAGE = "localhost/flownexus/pause:3.10"
# kube-network-policies: its user (client certificate), its nfqueue, its metrics address, and its nftables
# table (`inet` where the kernel has nftables' queue statement, else `ip`; `down` removes both).
NETWORK_POLICY_USER = "system:kube-network-policies"
NETWORK_POLICY_QUEUE = 100
NETWORK_POLICY_METRICS = "127.0.0.1:10365"
NETWORK_POLICY_TABLE = "kube-network-policies"
# Every machine-wide path we create starts with one of these, which is what makes `down` able to find
# (and only find) our mounts and files. The hostPath provisioner's directory is fixed by Kubernetes.
STATE_ROOTS = (Path("/var/lib/flownexus"), Path("/run/flownexus"))
HOSTPATH_PV_DIR = Path("/tmp/hostpath_pv")
# The API servers' audit policy: metadata of every request (who, what, the answer's code), nothing else.
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
"""


def read_versions(path: Path = DEV_DIR / "versions.env") -> dict[str, str]:
    """Parse the KEY=VALUE pins file (comments and blank lines skipped, no shell expansion)."""
    versions: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        versions[key.strip()] = value.strip()
    return versions


@dataclass(frozen=True)
class Layout:
    """Paths of one checkout's cluster: binaries in the shared cache, state under the repo's .local/."""

    repo: Path = REPO_DIR

    @cached_property
    def versions(self) -> dict[str, str]:
        return read_versions()

    @property
    def cache(self) -> Path:
        return Path(os.environ.get("FLOWNEXUS_CACHE", Path.home() / ".cache" / "flownexus"))

    def bin_dir(self, component: str) -> Path:
        """`<cache>/bin/<component>-<version>/`, the one place a built binary is looked for."""
        return self.cache / "bin" / f"{component}-{self.versions[component.upper().replace('-', '_') + '_VERSION']}"

    def binary(self, component: str, name: str | None = None) -> Path:
        return self.bin_dir(component) / (name or component)

    def k8s(self, name: str) -> Path:
        return self.binary("kubernetes", name)

    @property
    def local(self) -> Path:
        return self.repo / ".local"

    @property
    def kubeconfig(self) -> Path:
        return self.local / "kubeconfig"

    @property
    def logs(self) -> Path:
        return self.local / "logs"

    @property
    def run(self) -> Path:
        return self.local / "run"

    @property
    def pki(self) -> Path:
        return self.local / "pki"

    @property
    def conf(self) -> Path:
        return self.local / "conf"

    @property
    def var(self) -> Path:
        return STATE_ROOTS[0]

    @property
    def runtime(self) -> Path:
        return STATE_ROOTS[1]

    @property
    def containerd_socket(self) -> Path:
        return self.runtime / "containerd" / "containerd.sock"

    @property
    def cni_conf_dir(self) -> Path:
        return self.var / "cni" / "net.d"

    @property
    def images_cache(self) -> Path:
        return self.cache / "images"


def host_ip() -> str:
    """The address of the interface holding the default route: the node IP, reachable from pods."""
    out = subprocess.run(["ip", "-4", "route", "get", "1.1.1.1"], capture_output=True, text=True, check=True).stdout
    words = out.split()
    return words[words.index("src") + 1]
