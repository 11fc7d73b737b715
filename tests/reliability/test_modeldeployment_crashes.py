"""A ModelDeployment canary survives an operator that is SIGKILLed in every phase.

One ModelDeployment on the KWOK fake nodes (KWOK marks serving pods Running and Ready, so Deployments roll out
in about a second; nothing loads a model), fed by archive paths (no TrainingJob: on KWOK none is ever
Validated), autoscaling off, `rollout: {steps: [25, 50], interval: 2s, failedChecksBeforeRollback: 2}`. The canary
analysis asks a stand-in Prometheus in this process (an HTTP server answering `/api/v1/query`): healthy values
for version 2.0.0, a 50 % error rate for 3.0.0.

The run: 1.0.0 is deployed -> 2.0.0 goes through both canary steps and is promoted -> 3.0.0 fails two checks and
is rolled back. The operator is SIGKILLed as soon as each of these is seen (plus a random 0-0.3 s, seeded) and
started again: Progressing (1.0.0), Available (1.0.0), Canary step 1 and step 2 (2.0.0), Promoting, Available
(2.0.0), Canary with one failed check (3.0.0), RolledBack. The version changes are made while it is dead.

Asserted: it ends RolledBack with stable 2.0.0 and the canary at zero, Service routing to stable only; the history
holds each of 1.0.0 Deployed, 1.0.0 Retired, 2.0.0 Promoted, 3.0.0 RolledBack exactly once; in every snapshot
polled, the stable Deployment's version and status.stable never went back (no 2.0.0 -> 1.0.0), and once the
Service routed to stable only after the rollback it never routed to the canary again; one stable Deployment (one
uid) all along, two canary Deployments (2.0.0, 3.0.0), one Deployment deletion (the 2.0.0 canary, after the
promotion) and no other child created twice in the audit log.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from flownexus.modeldeployment.reconciler import deployment_view
from tests.e2e.conftest import Cluster
from tests.reliability.harness import (
    AuditLog,
    OperatorProcess,
    PassByPass,
    Poller,
    Snapshot,
    api_client,
    apply_ready_cluster,
    creations,
    deletions,
    is_operator,
    layout_of,
    log,
    neural_cluster,
    seeded_rng,
    wait_for,
)

pytestmark = pytest.mark.reliability

MD = "m"
VERSIONS = ("1.0.0", "2.0.0", "3.0.0")
PHASE_TIMEOUT_S = 60


# ---- a stand-in Prometheus ---------------------------------------------------------------------------------


@dataclass
class FakePrometheus:
    """Answers the canary's two instant queries with the values of ``bad`` or healthy ones; counts them."""

    bad: bool = False
    queries: int = 0
    url: str = ""
    _server: ThreadingHTTPServer | None = None

    def answer(self, promql: str) -> str:
        self.queries += 1
        if "histogram_quantile" in promql:
            return "20"  # p99 in ms, under the default 100 ms
        return "0.5" if self.bad else "0"  # error rate

    def __enter__(self) -> FakePrometheus:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query).get("query", [""])[0]
                body = {"status": "success", "data": {"resultType": "vector",
                        "result": [{"metric": {}, "value": [time.time(), fake.answer(query)]}]}}  # fmt: skip
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    with FakePrometheus() as fake:
        yield fake


# ---- invariants --------------------------------------------------------------------------------------------


def _version_of(dep: dict[str, Any]) -> str | None:
    labels = (((dep.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}
    return labels.get("flownexus.io/version")


def _routes_canary(svc: dict[str, Any]) -> bool:
    return "flownexus.io/track" not in ((svc.get("spec") or {}).get("selector") or {})


@dataclass
class ServingInvariants:
    """Stable never goes back a version; after a rollback has reached the Service, traffic never goes to the
    canary again; no history entry twice; a canary Deployment with ready pods never changes version in place."""

    stable_versions: list[str] = field(default_factory=list)
    recorded_stable: list[str] = field(default_factory=list)
    canary_seen: dict[str, tuple[str | None, int]] = field(default_factory=dict)  # uid -> (version, ready pods)
    routing_after_rollback: list[bool] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def __call__(self, snap: Snapshot) -> None:
        md = next((o for o in snap.objects["ModelDeployment"] if o["metadata"]["name"] == MD), None)
        stable = next((o for o in snap.objects["Deployment"] if o["metadata"]["name"] == f"{MD}-stable"), None)
        svc = next((o for o in snap.objects["Service"] if o["metadata"]["name"] == MD), None)
        status = (md or {}).get("status") or {}
        for seen, value in (
            (self.stable_versions, _version_of(stable) if stable else None),
            (self.recorded_stable, (status.get("stable") or {}).get("version")),
        ):
            if value is None or (seen and seen[-1] == value):
                continue
            if seen and VERSIONS.index(value) < VERSIONS.index(seen[-1]):
                self.violations.append(f"stable went back {seen[-1]} -> {value}")
            seen.append(value)
        canary = next((o for o in snap.objects["Deployment"] if o["metadata"]["name"] == f"{MD}-canary"), None)
        if canary is not None:
            uid, version = canary["metadata"]["uid"], _version_of(canary)
            ready = int((canary.get("status") or {}).get("readyReplicas") or 0)
            before, had_ready = self.canary_seen.get(uid, (version, 0))
            if before != version and had_ready:
                self.violations.append(
                    f"canary Deployment {uid} with {had_ready} ready pods of {before} was switched to {version} in "
                    f"place: the new canary is analysed on the old version's pods (a crash between recording the "
                    f"promotion and deleting the canary, then a version change)"
                )
            self.canary_seen[uid] = (version, ready)
        history = [(h["version"], h["outcome"]) for h in status.get("history") or []]
        if len(history) != len(set(history)):
            self.violations.append(f"history entry twice: {history}")
        rolled_back = any(v == "3.0.0" and o == "RolledBack" for v, o in history)
        if rolled_back and svc is not None:
            routes = _routes_canary(svc)
            if routes and False in self.routing_after_rollback:
                self.violations.append("the Service routed to the rolled-back canary again")
            self.routing_after_rollback.append(routes)


# ---- the test ----------------------------------------------------------------------------------------------


def model_deployment(version: str) -> dict[str, Any]:
    return {
        "apiVersion": "flownexus.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": MD},
        "spec": {
            "clusterRef": {"name": "rel"},
            "model": {"archivePath": f"models/{version}/m.mar", "version": version},
            "serving": {"replicas": 2},
            "autoscaling": {"enabled": False},
            "rollout": {"steps": [25, 50], "interval": "2s", "failedChecksBeforeRollback": 2,
                        "thresholds": {"window": "1m"}},
        },
    }  # fmt: skip


Check = Callable[[dict[str, Any]], bool]


def _status(md: dict[str, Any]) -> dict[str, Any]:
    return md.get("status") or {}


def _phase(phase: str, stable: str | None = None, canary: str | None = None, **canary_fields: int) -> Check:
    def check(md: dict[str, Any]) -> bool:
        st = _status(md)
        if st.get("phase") != phase or (stable and (st.get("stable") or {}).get("version") != stable):
            return False
        c = st.get("canary") or {}
        if canary and c.get("version") != canary:
            return False
        return all(c.get(k) == v for k, v in canary_fields.items())

    return check


# (what, seen when, what the test changes while the operator is dead after this kill)
CHECKPOINTS: list[tuple[str, Check, str | None]] = [
    ("Progressing 1.0.0", _phase("Progressing", stable="1.0.0"), None),
    ("Available 1.0.0", _phase("Available", stable="1.0.0"), "2.0.0"),
    ("Canary 2.0.0 step 1", _phase("Canary", stable="1.0.0", canary="2.0.0", step=0), None),
    ("Canary 2.0.0 step 2", _phase("Canary", stable="1.0.0", canary="2.0.0", step=1), None),
    ("Promoting 2.0.0", _phase("Promoting", stable="2.0.0"), None),
    ("Available 2.0.0", _phase("Available", stable="2.0.0"), "3.0.0"),
    ("Canary 3.0.0 one failed check", _phase("Canary", stable="2.0.0", canary="3.0.0", failedChecks=1), None),
    ("RolledBack 3.0.0", _phase("RolledBack", stable="2.0.0"), None),
]


def test_canary_survives_operator_sigkills_in_every_phase(
    flownexus_crds: Cluster, rel_namespace: str, prometheus: FakePrometheus
) -> None:
    cluster, ns = flownexus_crds, rel_namespace
    seed, rng = seeded_rng(ns)
    audit = AuditLog(layout_of(cluster))
    mark = audit.mark()
    client = api_client(cluster)
    invariants = ServingInvariants()
    poller = Poller(client, ns, ("ModelDeployment", "Deployment", "Service"), interval=0.2, checks=[invariants])
    operator = OperatorProcess(cluster.kubeconfig, ns)
    started = time.monotonic()
    operator.start()
    try:
        operator.wait_healthy()
        apply_ready_cluster(cluster, ns, 4, prometheusUrl=prometheus.url)
        with poller:
            cluster.apply(model_deployment("1.0.0"), namespace=ns)
            hit: list[str] = []
            for i, (what, check, change) in enumerate(CHECKPOINTS):
                later = [c for _, c, _ in CHECKPOINTS[i + 1 :]]
                seen: dict[str, Any] = {}

                def reached(check: Check = check, later: list[Check] = later, seen: dict[str, Any] = seen) -> bool:
                    md = client.get("ModelDeployment", ns, MD) or {}
                    seen.update(md)
                    return check(md) or any(c(md) for c in later)

                try:
                    wait_for(what, reached, PHASE_TIMEOUT_S, interval=0.1)
                except pytest.fail.Exception:
                    pytest.fail(f"{what} not reached; status {json.dumps(_status(seen))}\n{operator.tail()}")
                if not check(seen):
                    pytest.fail(f"{what} passed unseen (polled every 0.1 s): status {json.dumps(_status(seen))}")
                delay = rng.uniform(0, 0.3)
                time.sleep(delay)
                operator.sigkill()
                hit.append(what)
                log(f"kill {len(hit)} in {what} (+{delay:.2f}s): {_status(seen).get('reason')}")
                if change is not None:
                    prometheus.bad = change == "3.0.0"
                    spec = model_deployment(change)["spec"]["model"]
                    cluster.kubectl("-n", ns, "patch", "mdep", MD, "--type=merge",
                                    "-p", json.dumps({"spec": {"model": spec}}))  # fmt: skip
                operator.start()

            def settled() -> bool:
                md = client.get("ModelDeployment", ns, MD) or {}
                canary = client.get("Deployment", ns, f"{MD}-canary") or {}
                svc = client.get("Service", ns, MD) or {}
                return (
                    _status(md).get("phase") == "RolledBack"
                    and (canary.get("spec") or {}).get("replicas") == 0
                    and bool(svc)
                    and not _routes_canary(svc)
                )

            wait_for("the rollback to reach the children", settled, 60)
            time.sleep(2)
            poller.poll_once()
        wall = time.monotonic() - started
        assert operator.alive()

        md = client.get("ModelDeployment", ns, MD)
        assert md is not None
        st = md["status"]
        assert st["phase"] == "RolledBack" and st["stable"]["version"] == "2.0.0" and not st.get("canary"), st
        history = [(h["version"], h["outcome"]) for h in st["history"]]
        assert sorted(history) == sorted(
            [("1.0.0", "Deployed"), ("1.0.0", "Retired"), ("2.0.0", "Promoted"), ("3.0.0", "RolledBack")]
        ), history
        stable = client.get("Deployment", ns, f"{MD}-stable")
        assert stable is not None and _version_of(stable) == "2.0.0"
        assert not invariants.violations, f"seed {seed}: " + "\n".join(invariants.violations[:20])
        assert invariants.stable_versions == ["1.0.0", "2.0.0"], invariants.stable_versions
        assert invariants.recorded_stable == ["1.0.0", "2.0.0"], invariants.recorded_stable

        events = audit.events(mark, ns)
        created = creations([e for e in events if is_operator(e)])
        # One stable Deployment all along; one canary Deployment per canary version (2.0.0, 3.0.0). Counted by
        # the uids seen, since a kill can cut off the answer to a create that was stored (504 in the audit log).
        uids = {name: len(poller.uids.get(("Deployment", name), ())) for name in (f"{MD}-stable", f"{MD}-canary")}
        assert uids == {f"{MD}-stable": 1, f"{MD}-canary": 2}, uids
        deployments = {name: n for (resource, name), n in created.items() if resource == "deployments"}
        assert deployments.get(f"{MD}-stable", 0) <= 1 and deployments.get(f"{MD}-canary", 0) <= 2, deployments
        others = {key: n for key, n in created.items() if key[0] != "deployments" and n > 1}
        assert not others, f"created more than once: {others}"
        deleted = [e["objectRef"]["name"] for e in deletions(events, "deployments")]
        assert deleted == [f"{MD}-canary"], deleted
        log(
            f"[figure] ModelDeployment 1.0.0 -> 2.0.0 promoted -> 3.0.0 rolled back with {len(hit)} SIGKILLs "
            f"(seed {seed}), one in each of: {', '.join(hit)}; {wall:.0f}s wall; {prometheus.queries} Prometheus "
            f"queries; {len(operator.log_lines('pass failed'))} failed passes in the operator log"
        )
    finally:
        operator.stop()


def test_a_crash_between_recording_a_promotion_and_deleting_the_canary_never_reuses_its_pods(
    flownexus_crds: Cluster, rel_namespace: str, prometheus: FakePrometheus
) -> None:
    """The window test_canary_survives_operator_sigkills_in_every_phase hits about one run in six, made
    deterministic: the operator's own passes run one at a time in this process (PassByPass) against the dev
    cluster; the pass that records the promotion (Available, reason Promoted) dies before acting, so the 2.0.0
    canary Deployment and its ready pods are still there; the user sets 3.0.0; the restarted operator's pass must
    not turn that Deployment into the 3.0.0 canary in place (its 2.0.0 pods would serve and be measured as 3.0.0
    until the rolling update replaces them, or for up to progressDeadlineSeconds if 3.0.0 never gets ready)."""
    cluster, ns = flownexus_crds, rel_namespace
    op = PassByPass(cluster.kubeconfig, ns)
    client = api_client(cluster)
    cluster.apply(neural_cluster("rel", 4, prometheusUrl=prometheus.url), namespace=ns)
    md = model_deployment("1.0.0")
    md["spec"]["rollout"]["steps"] = [50]
    cluster.apply(md, namespace=ns)

    def drive(kind: str, name: str, done: Callable[[], bool], what: str, timeout: float = PHASE_TIMEOUT_S) -> None:
        """Run passes (the Deployment controller and KWOK act in between) until ``done``."""

        def step() -> bool:
            op.run_pass(kind, name)
            return done()

        wait_for(what, step, timeout, interval=0.5)

    def md_status() -> dict[str, Any]:
        return _status(client.get("ModelDeployment", ns, MD) or {})

    def canary() -> dict[str, Any]:
        return client.get("Deployment", ns, f"{MD}-canary") or {}

    drive("NeuralCluster", "rel", lambda: (client.get("NeuralCluster", ns, "rel") or {}).get("status", {}).get(
        "phase") == "Ready", "NeuralCluster Ready")  # fmt: skip
    drive("ModelDeployment", MD, lambda: md_status().get("phase") == "Available", "1.0.0 Available")
    cluster.kubectl("-n", ns, "patch", "mdep", MD, "--type=merge",
                    "-p", json.dumps({"spec": {"model": model_deployment("2.0.0")["spec"]["model"]}}))  # fmt: skip
    drive(
        "ModelDeployment",
        MD,
        lambda: md_status().get("phase") == "Canary" and int(canary().get("status", {}).get("readyReplicas") or 0) > 0,
        "the 2.0.0 canary ready",
    )
    drive("ModelDeployment", MD, lambda: md_status().get("phase") == "Promoting", "2.0.0 Promoting (one analysis)")

    def stable_runs_2() -> bool:
        dep = client.get("Deployment", ns, f"{MD}-stable") or {}
        view = deployment_view(dep) if dep else None
        return view is not None and view.version == "2.0.0" and view.rolled_out and view.ready >= 1

    wait_for("the stable Deployment rolled out to 2.0.0", stable_runs_2, PHASE_TIMEOUT_S)
    op.crash_after_record("ModelDeployment", MD)  # records Available/Promoted, dies before deleting the canary
    status = md_status()
    assert (status.get("phase"), status.get("reason")) == ("Available", "Promoted"), status
    old = canary()
    assert _version_of(old) == "2.0.0" and int(old["status"].get("readyReplicas") or 0) > 0, old.get("status")
    log(f"crashed after recording the promotion: canary {old['metadata']['uid']} still has ready 2.0.0 pods")

    cluster.kubectl("-n", ns, "patch", "mdep", MD, "--type=merge",
                    "-p", json.dumps({"spec": {"model": model_deployment("3.0.0")["spec"]["model"]}}))  # fmt: skip
    for _ in range(3):  # the restarted operator
        op.run_pass("ModelDeployment", MD)
        now = canary()
        if now.get("metadata", {}).get("uid") == old["metadata"]["uid"] and not now["metadata"].get(
            "deletionTimestamp"
        ):
            pods = [
                f"{p['metadata']['name']} ({p['metadata']['labels'].get('flownexus.io/version')}, "
                f"{(p.get('status') or {}).get('phase')})"
                for p in client.list("Pod", ns)
                if p["metadata"]["name"].startswith(f"{MD}-canary-")
            ]
            assert _version_of(now) == "2.0.0", (
                f"the restarted operator turned the 2.0.0 canary Deployment {old['metadata']['uid']}, which still "
                f"had {old['status'].get('readyReplicas')} ready pods, into the {_version_of(now)} canary in place; "
                f"canary pods now (all behind the Service, all matched by the analysis' hostname regex): {pods}; "
                f"status.canary {json.dumps(md_status().get('canary'))}"
            )
        time.sleep(0.5)
