"""Certificates and kubeconfigs for the control plane, made with the openssl CLI (the stdlib has no X.509).

Layout follows kubeadm: one cluster CA for serving and client certs, a front-proxy CA for the aggregation
layer (metrics-server), and a service-account signing key pair.
"""

from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .config import APISERVER_PORT, CLUSTER_DOMAIN, KUBERNETES_SERVICE_IP, NETWORK_POLICY_USER, NODE_NAME

DAYS = "3650"


@dataclass(frozen=True)
class Identity:
    """A certificate to issue: file stem, subject CN/O, and SANs for serving certs."""

    stem: str
    cn: str
    org: str = ""
    sans: tuple[str, ...] = ()
    ca: str = "ca"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _new_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
    path.chmod(0o600)


def _new_ca(pki: Path, stem: str, cn: str) -> None:
    if (pki / f"{stem}.crt").exists():
        return
    _new_key(pki / f"{stem}.key")
    _openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        str(pki / f"{stem}.key"),
        "-out",
        str(pki / f"{stem}.crt"),
        "-days",
        DAYS,
        "-subj",
        f"/CN={cn}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )


def _issue(pki: Path, ident: Identity) -> None:
    crt = pki / f"{ident.stem}.crt"
    if crt.exists():
        return
    key, csr, ext = pki / f"{ident.stem}.key", pki / f"{ident.stem}.csr", pki / f"{ident.stem}.ext"
    _new_key(key)
    subject = (f"/O={ident.org}" if ident.org else "") + f"/CN={ident.cn}"
    _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", subject)
    lines = [
        "basicConstraints=CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        "extendedKeyUsage=serverAuth,clientAuth",
    ]
    if ident.sans:
        lines.append("subjectAltName=" + ",".join(ident.sans))
    ext.write_text("\n".join(lines) + "\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(pki / f"{ident.ca}.crt"),
        "-CAkey",
        str(pki / f"{ident.ca}.key"),
        "-CAcreateserial",
        "-out",
        str(crt),
        "-days",
        DAYS,
        "-extfile",
        str(ext),
    )
    csr.unlink()
    ext.unlink()


def ensure_pki(pki: Path, node_ip: str) -> None:
    """Create every key and certificate that is not there yet (so `up` is idempotent)."""
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)
    _new_ca(pki, "ca", "flownexus-ca")
    _new_ca(pki, "front-proxy-ca", "flownexus-front-proxy-ca")
    if not (pki / "sa.key").exists():
        _new_key(pki / "sa.key")
        _openssl("pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
    svc = [f"DNS:kubernetes.default.svc.{CLUSTER_DOMAIN}", "DNS:kubernetes.default.svc", "DNS:kubernetes.default"]
    for ident in (
        Identity(
            "apiserver",
            "kube-apiserver",
            sans=(
                "DNS:localhost",
                "DNS:kubernetes",
                *svc,
                "IP:127.0.0.1",
                f"IP:{node_ip}",
                f"IP:{KUBERNETES_SERVICE_IP}",
            ),
        ),
        Identity("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"),
        Identity("admin", "flownexus-admin", "system:masters"),
        Identity("controller-manager", "system:kube-controller-manager"),
        Identity("scheduler", "system:kube-scheduler"),
        Identity("kube-proxy", "system:kube-proxy", "system:node-proxier"),
        # Bound to its ClusterRole by manifests.kube_network_policies_rbac().
        Identity("kube-network-policies", NETWORK_POLICY_USER),
        Identity(
            "kubelet",
            f"system:node:{NODE_NAME}",
            "system:nodes",
            sans=(f"DNS:{NODE_NAME}", "DNS:localhost", "IP:127.0.0.1", f"IP:{node_ip}"),
        ),
        Identity("front-proxy-client", "front-proxy-client", ca="front-proxy-ca"),
    ):
        _issue(pki, ident)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, pki: Path, stem: str, server: str = f"https://127.0.0.1:{APISERVER_PORT}") -> None:
    """A kubeconfig with the certificates embedded, so it can be copied elsewhere and still work."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"""apiVersion: v1
kind: Config
clusters:
- name: flownexus
  cluster:
    server: {server}
    certificate-authority-data: {_b64(pki / "ca.crt")}
users:
- name: {stem}
  user:
    client-certificate-data: {_b64(pki / f"{stem}.crt")}
    client-key-data: {_b64(pki / f"{stem}.key")}
contexts:
- name: flownexus
  context:
    cluster: flownexus
    user: {stem}
current-context: flownexus
"""
    # Unchanged files are left alone, so processes watching them do not restart on a repeated `up`.
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
        path.chmod(0o600)
