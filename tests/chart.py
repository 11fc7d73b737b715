"""The Helm chart as `helm template` renders it (the Helm binary that `dev/cluster build` builds), for the
tests that install its rights: tests/realapi (impersonating its ServiceAccount) and tests/e2e (the operator
process runs with its ServiceAccount's token)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml
from dev.localcluster.config import Layout

from tests.prereq import missing

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "flownexus"
OPERATOR_SA = "flownexus-operator"  # the chart's ServiceAccount
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
Manifest = dict[str, Any]


def render_chart(namespace: str, *values: str) -> list[Manifest]:
    """The chart as `helm template` renders it into ``namespace`` (``--set`` values)."""
    helm = Layout().binary("helm")
    if not helm.exists():
        missing(f"{helm} (run `dev/cluster build`)")
    args = [str(helm), "template", "flownexus", str(CHART), "--namespace", namespace]
    for value in values:
        args += ["--set", value]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def chart_rbac(namespace: str, *values: str) -> list[Manifest]:
    """The chart's ServiceAccount, roles and bindings, installed into ``namespace``. Cluster-scoped names
    get the namespace as a suffix, so that the tests of one session do not share them."""
    docs = [d for d in render_chart(namespace, *values) if d["kind"] in RBAC_KINDS]
    for doc in docs:
        if doc["kind"].startswith("Cluster"):
            doc["metadata"]["name"] = f"{doc['metadata']['name']}-{namespace}"
        if doc["kind"].endswith("Binding") and doc["roleRef"]["kind"] == "ClusterRole":
            doc["roleRef"]["name"] = f"{doc['roleRef']['name']}-{namespace}"
    return docs
