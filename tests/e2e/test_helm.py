"""The Helm chart installs a working operator in the cluster: its image, RBAC and namespace scoping.

The operator image is built from operator/Containerfile by the harness; the chart is installed with the
Helm binary built here, watching only the test's namespace so that it never meets other operators.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, Cluster, _dev_cluster, build_image, create_namespace, wait_until

pytestmark = pytest.mark.e2e
KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}


@pytest.fixture(scope="session")
def operator_image(cluster: Cluster) -> str:
    return build_image(REPO / "operator", "operator", tag="flownexus/operator:0.1.0")


def helm(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    binary = _dev_cluster("which", "helm", timeout=30).stdout.strip()
    assert Path(binary).exists(), "dev/cluster which helm found no Helm binary"
    result = subprocess.run([binary, "--kubeconfig", str(cluster.kubeconfig), *args], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


@pytest.fixture
def helm_namespace(cluster: Cluster) -> Iterator[str]:
    """Not `e2e-*`: the shared e2e operator must not reconcile what the chart's operator does."""
    name = f"helm-{uuid.uuid4().hex[:8]}"
    create_namespace(cluster, name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_chart_installs_an_operator_that_reconciles(cluster: Cluster, helm_namespace: str, operator_image: str) -> None:
    namespace = helm_namespace
    release_ns = f"{namespace}-system"
    create_namespace(cluster, release_ns)  # the operator's own pod passes Pod Security "restricted" too
    # The trainer-status policy is cluster-wide and the e2e session installed it already.
    helm(cluster, "install", "flownexus", str(REPO / "helm" / "flownexus"), "--namespace", release_ns,
         "--set", f"watchNamespaces={{{namespace}}}", "--set", "trainerStatusPolicy=false",
         "--wait", "--timeout", "180s")  # fmt: skip
    try:
        deployment = cluster.get("-n", release_ns, "deployment", "flownexus-operator")
        assert deployment["status"].get("availableReplicas") == 1
        # The in-cluster operator (its own ServiceAccount and ClusterRole) creates the artifact PVC and a gang.
        cluster.apply(
            {"apiVersion": "flownexus.io/v1alpha1", "kind": "NeuralCluster",
             "metadata": {"name": "demo", "namespace": namespace},
             "spec": {"artifactStore": {"size": "64Mi"},
                      "training": {"nodeSelector": {"type": "kwok"}, "tolerations": [KWOK_TOLERATION]}}},
            {"apiVersion": "flownexus.io/v1alpha1", "kind": "TrainingJob",
             "metadata": {"name": "tiny", "namespace": namespace},
             "spec": {"clusterRef": {"name": "demo"}, "model": {"architecture": "mlp"},
                      "dataset": {"source": "builtin", "name": "iris"}, "distributed": {"workers": 2}}},
        )  # fmt: skip

        def phase(kind: str, name: str) -> str:
            return str((cluster.get("-n", namespace, kind, name).get("status") or {}).get("phase", ""))

        wait_until("NeuralCluster Ready via the in-cluster operator", lambda: phase("nc", "demo") == "Ready", 120)
        wait_until("TrainingJob gang created", lambda: phase("tj", "tiny") in {"Created", "Running"}, 120)
        job = cluster.get("-n", namespace, "job", "tiny-a1")
        assert job["spec"]["completions"] == 2
        logs = cluster.kubectl("-n", release_ns, "logs", "deployment/flownexus-operator").stdout
        assert f"flownexus operator started ({namespace})" in logs
        # A right the chart lacks would show as a 403 in a failed pass.
        assert "forbidden" not in logs.lower() and "pass failed" not in logs, logs[-2000:]
    finally:
        helm(cluster, "uninstall", "flownexus", "--namespace", release_ns, "--wait")
        cluster.kubectl("delete", "namespace", release_ns, "--wait=false", check=False)
