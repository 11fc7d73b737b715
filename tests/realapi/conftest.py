"""A real kube-apiserver + etcd (dev/localcluster/envtest) for every test that writes to the API.

One control plane per session (about 5 s to start), one fresh namespace per test. There is no
controller-manager: a test plays the Job controller and the garbage collector itself, which makes
every intermediate state (a Job that is still terminating, a Deployment that is not ready) easy to hold.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dev.localcluster import envtest
from dev.localcluster.config import Layout
from tests.chart import OPERATOR_SA, chart_rbac
from tests.prereq import missing

from flownexus.handlers import CHILDREN, PRIMARY
from flownexus.modeldeployment.reconciler import ModelDeploymentReconciler, ProviderFactory
from flownexus.neuralcluster.reconciler import NeuralClusterReconciler
from flownexus.prometheus import MetricsProvider
from flownexus.runtime.cache import Cache
from flownexus.runtime.client import USER_AGENT, Client, Manifest, path
from flownexus.runtime.controller import Controller
from flownexus.trainingjob.reconciler import Admission, TrainingJobReconciler

REPO = Path(__file__).resolve().parents[2]
KINDS = (*PRIMARY, *CHILDREN)  # what the operator caches (and may list)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[envtest.ControlPlane]:
    layout = Layout()
    if not shutil.which("openssl"):
        missing("openssl (apt-get install openssl)")
    for binary in (layout.binary("etcd"), layout.k8s("kube-apiserver")):
        if not binary.exists():
            missing(f"{binary} (run `dev/cluster build`)")
    plane = envtest.start(layout)
    try:
        crds = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "crds").glob("*.yaml"))]
        envtest.install_crds(plane, crds)
        yield plane
    finally:
        envtest.remove(plane)


class Harness:
    """The operator's real loop (client, cache, reconcilers) against the real API, one pass at a time.

    ``reconcile`` first re-lists every kind into the cache: what a synced informer would hold.
    """

    def __init__(
        self, plane: envtest.ControlPlane, namespace: str, provider: ProviderFactory | None, impersonate: str | None
    ) -> None:
        self.plane = plane
        self.ns = namespace
        # The operator's own client; the test's writes as a user go through ``self.user``.
        self.client = Client.from_kubeconfig(str(plane.kubeconfig), impersonate=impersonate)
        self.user = Client.from_kubeconfig(str(plane.kubeconfig), user_agent="flownexus-tests")
        self.cache = Cache()
        self.admission = Admission(self.cache)
        self.md = ModelDeploymentReconciler(self.cache, provider or (lambda url: _NoPrometheus()))
        self.controller = Controller(
            self.client,
            self.cache,
            [
                NeuralClusterReconciler(self.cache),
                TrainingJobReconciler(self.client, self.cache, self.admission),
                self.md,
            ],
        )

    # ---- the operator side --------------------------------------------------------------------------

    def sync(self) -> None:
        for kind in KINDS:
            self.cache.replace_kind(kind, *self.client.list_at(kind, self.ns))

    def reconcile(self, kind: str, name: str) -> float | None:
        self.sync()
        return self.controller.run_pass(kind, self.ns, name)

    def ready_cluster(self, obj: Manifest) -> Manifest:
        """Create a NeuralCluster and run its pass: Ready once its PVC exists."""
        self.create(obj)
        self.reconcile("NeuralCluster", obj["metadata"]["name"])
        nc = self.get("NeuralCluster", obj["metadata"]["name"])
        assert nc["status"]["phase"] == "Ready", nc.get("status")
        return nc

    # ---- the user, the Job controller, the garbage collector ------------------------------------------

    def create(self, obj: Manifest) -> Manifest:
        obj = {**obj, "metadata": {**obj["metadata"], "namespace": self.ns}}
        from flownexus.runtime.client import path

        created = self.user.request("POST", path(obj["kind"], self.ns), body=obj, kind=obj["kind"])
        return created

    def get(self, kind: str, name: str) -> Manifest:
        obj = self.user.get(kind, self.ns, name)
        assert obj is not None, f"{kind} {name} does not exist"
        return obj

    def exists(self, kind: str, name: str) -> bool:
        return self.user.get(kind, self.ns, name) is not None

    def patch(self, kind: str, name: str, body: Manifest, subresource: str | None = None) -> Manifest:
        return self.user.merge_patch(kind, self.ns, name, body, subresource)

    def set_status(self, kind: str, name: str, status: Manifest) -> Manifest:
        return self.patch(kind, name, {"status": status}, "status")

    def job_running(self, name: str) -> None:
        job = self.get("Job", name)
        self.set_status(
            "Job", name, {"ready": job["spec"].get("parallelism", 1), "active": job["spec"].get("parallelism", 1)}
        )

    def job_finished(self, name: str, condition: str, reason: str = "", message: str = "") -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        conds = [{"type": condition, "status": "True", "reason": reason or condition, "message": message,
                  "lastTransitionTime": stamp, "lastProbeTime": stamp}]  # fmt: skip
        if condition == "Complete":
            conds.insert(0, {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                             "lastTransitionTime": stamp, "lastProbeTime": stamp})  # fmt: skip
        else:
            conds.insert(0, {"type": "FailureTarget", "status": "True", "reason": reason or "BackoffLimitExceeded",
                             "message": message, "lastTransitionTime": stamp, "lastProbeTime": stamp})  # fmt: skip
        job = self.get("Job", name)
        n = job["spec"].get("completions", 1)
        status: Manifest = {"conditions": conds, "startTime": stamp, "ready": 0, "active": 0, "terminating": 0,
                            "uncountedTerminatedPods": {}}  # fmt: skip
        if condition == "Complete":
            status.update(succeeded=n, completionTime=stamp)
            if job["spec"].get("completionMode") == "Indexed":
                status["completedIndexes"] = "0" if n == 1 else f"0-{n - 1}"
        else:
            status.update(failed=1)
        self.set_status("Job", name, status)

    def collect_garbage(self, kind: str, name: str) -> None:
        """What the garbage collector does for a foreground deletion once the dependents are gone."""
        self.patch(kind, name, {"metadata": {"finalizers": None}})

    def events(self, reason: str | None = None) -> list[Manifest]:
        return [e for e in self.user.list("Event", self.ns) if reason is None or e.get("reason") == reason]

    def operator_requests(self, since: int) -> list[dict[str, Any]]:
        return self.plane.requests_by(USER_AGENT, since)


class _NoPrometheus:
    def query(self, promql: str) -> Any:
        raise AssertionError("this test did not expect a Prometheus query")


def install(admin: Client, docs: list[Manifest]) -> None:
    for obj in docs:
        namespaced = not obj["kind"].startswith("Cluster")
        ns = obj["metadata"].get("namespace") if namespaced else None
        admin.request("POST", path(obj["kind"], ns), body=obj)


def token_kubeconfig(plane: envtest.ControlPlane, namespace: str, account: str, target: Path) -> Path:
    """A kubeconfig that authenticates as ``namespace/account`` with a real ServiceAccount token."""
    admin = Client.from_kubeconfig(str(plane.kubeconfig))
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 7200}}
    token = admin.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token", body=request)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "envtest", "cluster": {"server": plane.server,
                      "certificate-authority": str(plane.root / "pki" / "ca.crt")}}],
        "users": [{"name": account, "user": {"token": token["status"]["token"]}}],
        "contexts": [{"name": "sa", "context": {"cluster": "envtest", "user": account, "namespace": namespace}}],
        "current-context": "sa",
    }  # fmt: skip
    target.write_text(yaml.safe_dump(config))
    return target


@pytest.fixture
def harness_factory(control_plane: envtest.ControlPlane) -> Callable[..., Harness]:
    def make(provider: Callable[[str], MetricsProvider] | None = None, operator_rbac: bool | str = False) -> Harness:
        """A fresh namespace; with ``operator_rbac`` the operator acts as the chart's ServiceAccount."""
        admin = Client.from_kubeconfig(str(control_plane.kubeconfig))
        ns = f"t-{uuid.uuid4().hex[:8]}"
        admin.request(
            "POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
        )
        # What the controller-manager would add: pods are admitted only when their ServiceAccount exists.
        sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}
        admin.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", body=sa)
        impersonate = None
        if operator_rbac:
            # The chart installed into the test's namespace: all namespaces; "namespaced": that namespace by
            # name (Roles); "glob": a pattern that matches it (a ClusterRole, and Kopf's namespace scanning).
            watch = {"namespaced": [f"watchNamespaces={{{ns}}}"], "glob": [f"watchNamespaces={{{ns}*}}"]}
            install(admin, chart_rbac(ns, *watch.get(str(operator_rbac), [])))
            impersonate = f"system:serviceaccount:{ns}:{OPERATOR_SA}"
        return Harness(control_plane, ns, provider, impersonate)

    return make


@pytest.fixture
def harness(harness_factory: Callable[..., Harness]) -> Harness:
    return harness_factory()
