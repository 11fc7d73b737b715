"""ModelDeployment end to end on the local cluster: real TorchServe pods, a real Prometheus scraping them, canaries
that the operator promotes or rolls back from Prometheus' answers, the HPA, and the Argo CD health check.

The pieces, all real: the operator runs on the host (the `operator` fixture of conftest.py); the server image is
built from trainer_image/Containerfile.server; the digits model is trained on the host with the trainer package
(torchrun DDP, then the validator writes the TorchServe archive) and copied into the artifact PVC's hostPath
directory; Prometheus (Debian's binary) runs on the host and scrapes every pod annotated
`prometheus.io/scrape=true` by pod IP; the load generator is a bounded thread pool on the host that posts
to the Service's ClusterIP (a new connection per request, so kube-proxy splits the traffic by replica ratio).

The tests build on each other in file order, on one ModelDeployment `digits` in one namespace:
version 1.0.0 becomes Available -> the HPA scales its stable Deployment 1 -> 2 under load -> a good canary 2.0.0 is
promoted (canary pods sized from the stable's current replicas) -> a broken canary 3.0.0 is rolled back -> the Argo CD
health check reads Healthy.
Run them with `-s` to see the `[figure]` lines (time to promote, time to roll back).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from flownexus.modeldeployment.children import canary_replicas
from tests.e2e.conftest import REPO, SERVER_TAG, Cluster, create_namespace, wait_until
from tests.e2e.monitoring_check import queries_without_data, skipped_queries
from tests.e2e.prom import http_status as _http_status
from tests.e2e.test_trainingjob import artifact_dir, example
from tests.integration.trainer.procs import run_torchrun, run_validator, write_job_config
from tests.prereq import missing
from tests.unit.test_modeldeployment_docs import LUA, health

pytestmark = pytest.mark.e2e

MD = "digits"
INTERVAL_S = 20  # rollout.interval
FAILED_CHECKS = 2  # rollout.failedChecksBeforeRollback
# Prometheus scrapes every SCRAPE_S = 2 s (tests/e2e/prom.py), so that the rollback bound holds in the worst case:
# errors are visible to rate() two scrapes after the first one; then at most one interval to the next analysis
# slot, one more for the second failed check, and the operator's 10 s timer: 2 x 2 + 20 + 20 + 10 = 54 s <= 20 s x 2
# + 20 s.
ROLLOUT_TIMEOUT_S = 420  # a TorchServe pod takes 20-60 s to load the model on two busy cores
ARCHIVES = {  # relative to the artifact store root
    "1.0.0": "e2e/digits/1.0.0/digits.mar",
    "2.0.0": "e2e/digits/2.0.0/digits.mar",
    "3.0.0": "e2e/digits/3.0.0-broken/digits.mar",
}


# ---- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def digits_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits model trained on the host (torchrun, 2 processes) and gated by the validator: its .mar."""
    root = tmp_path_factory.mktemp("digits-run")
    config = write_job_config(root, "digits", output={"modelName": "digits", "version": "1.0.0"})
    run_torchrun(config, root / "train.log")
    summary = run_validator(config, root / "termination-log")
    assert summary["passed"], summary
    return root / str(summary["modelArchive"])


def broken_archive(good: Path, target: Path) -> None:
    """The same archive with a normalization of the wrong size: it loads and gets ready, then every prediction
    fails inside the handler (TorchServe answers 503 "Prediction failed"), the 'bad model version' of a canary."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "normalization.json":
                norm = json.loads(data)
                norm["mean"], norm["std"] = norm["mean"][:3], norm["std"][:3]
                data = json.dumps(norm).encode()
            dst.writestr(item, data)


@dataclass(frozen=True)
class Serving:
    cluster: Cluster
    namespace: str
    prometheus: str
    manifest: dict[str, Any]

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = self.cluster.get("-n", self.namespace, "mdep", MD).get("status") or {}
        return st

    def service_url(self) -> str:
        ip = self.cluster.get("-n", self.namespace, "service", MD)["spec"]["clusterIP"]
        return f"http://{ip}:8080"

    def set_model(self, version: str) -> None:
        patch = {"spec": {"model": {"archivePath": ARCHIVES[version], "version": version}}}
        self.cluster.kubectl("-n", self.namespace, "patch", "mdep", MD, "--type=merge", "-p", json.dumps(patch))

    def wait(self, what: str, check: Any, timeout: float = ROLLOUT_TIMEOUT_S, interval: float = 1.0) -> None:
        try:
            wait_until(what, lambda: bool(check(self.status())), timeout, interval)
        except pytest.fail.Exception:
            pytest.fail(f"timed out waiting for {what}\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        k = self.cluster.kubectl
        ns = ["-n", self.namespace]
        return "\n".join(
            [
                "status: " + json.dumps(self.status(), indent=1),
                k(*ns, "get", "deploy,pods,hpa,svc", "-o", "wide", check=False).stdout,
                k(*ns, "get", "events", "--sort-by=.lastTimestamp", check=False).stdout[-4000:],
                k(*ns, "logs", "-l", f"flownexus.io/modeldeployment={MD}", "--all-containers", "--tail=20",
                  "--prefix", check=False).stdout[-6000:],
            ]
        )  # fmt: skip

    def events(self, reason: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.cluster.get(
            "-n", self.namespace, "events", "--field-selector", f"involvedObject.name={MD},reason={reason}"
        )["items"]
        return items

    def pods(self, track: str) -> list[dict[str, Any]]:
        selector = f"flownexus.io/modeldeployment={MD},flownexus.io/track={track}"
        items: list[dict[str, Any]] = self.cluster.get("-n", self.namespace, "pods", "-l", selector)["items"]
        return items


@pytest.fixture(scope="module")
def serving(
    cluster: Cluster, operator: int, server_image: str, prometheus: str, digits_archive: Path
) -> Iterator[Serving]:
    """A namespace with a NeuralCluster that points at our Prometheus, the archives in its artifact store, and
    the example ModelDeployment serving version 1.0.0 with short rollout settings."""
    assert server_image.startswith("localhost/flownexus/server:")
    namespace = f"e2e-md-{uuid.uuid4().hex[:6]}"
    try:
        create_namespace(cluster, namespace)
        nc = example("neuralcluster.yaml", namespace, prometheusUrl=prometheus)
        assert nc["spec"]["images"]["server"] == SERVER_TAG
        cluster.apply(nc)
        wait_until(
            "NeuralCluster Ready",
            lambda: (cluster.get("-n", namespace, "nc", "demo").get("status") or {}).get("phase") == "Ready",
            60,
        )
        wait_until(
            "artifact PVC bound",
            lambda: cluster.get("-n", namespace, "pvc", "demo-artifacts").get("status", {}).get("phase") == "Bound",
            60,
        )
        store = artifact_dir(cluster, namespace, "demo-artifacts")
        # The archives come from the host (written as root, world-readable): the serving pods (uid 1000) read them.
        for version, relative in ARCHIVES.items():
            target = store / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if version == "3.0.0":
                broken_archive(digits_archive, target)
            else:
                shutil.copyfile(digits_archive, target)
        md = example(
            "modeldeployment-digits.yaml",
            namespace,
            model={"archivePath": ARCHIVES["1.0.0"], "version": "1.0.0"},
            **{
                "serving.batchSize": 8,
                "autoscaling.minReplicas": 1,  # two cores: one stable pod, one canary pod
                "autoscaling.maxReplicas": 2,
                "autoscaling.scaleUpStabilization": "0s",  # the HPA test measures scale-up, not the 3 m default
                "rollout.steps": [25, 50],
                "rollout.interval": f"{INTERVAL_S}s",
                "rollout.failedChecksBeforeRollback": FAILED_CHECKS,
            },
        )
        cluster.apply(md)
        yield Serving(cluster, namespace, prometheus, md)
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


# ---- the load generator --------------------------------------------------------------------------------


DIGIT_ROW = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8,
             8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13,
             10, 0, 0, 0]  # fmt: skip  # sklearn digits[0], a zero


@dataclass
class Result:
    started: float  # time.monotonic()
    seconds: float
    status: int  # HTTP status; 0 = no HTTP answer (connection refused/reset, timeout)
    detail: str  # the label predicted, or the error


@dataclass
class Load:
    """A bounded load generator: `threads` workers post one digit each (a new connection per request) until
    `max_requests` or `max_seconds` is reached or stop() is called."""

    url: str
    threads: int = 4
    pause_s: float = 0.02
    max_requests: int = 50_000
    max_seconds: float = 600
    results: list[Result] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        deadline = time.monotonic() + self.max_seconds
        body = json.dumps({"inputs": [DIGIT_ROW]}).encode()

        def work() -> None:
            while not self._stop.is_set() and time.monotonic() < deadline and len(self.results) < self.max_requests:
                result = post(self.url, body)
                with self._lock:
                    self.results.append(result)
                time.sleep(self.pause_s)

        self._workers = [threading.Thread(target=work, daemon=True) for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=60)

    def failures(self, since: float = 0.0) -> list[Result]:
        with self._lock:
            return [r for r in self.results if r.status != 200 and r.started >= since]

    def summary(self) -> str:
        with self._lock:
            results = list(self.results)
        if not results:
            return "no requests"
        latencies = sorted(r.seconds for r in results if r.status == 200)
        span = max(r.started + r.seconds for r in results) - min(r.started for r in results)
        codes: dict[int, int] = {}
        for r in results:
            codes[r.status] = codes.get(r.status, 0) + 1
        p = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000) if latencies else None
        lat = f"p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms" if p else "no successes"
        return f"{len(results)} requests in {span:.0f} s ({len(results) / max(span, 1e-9):.1f} req/s), {codes}, {lat}"


def post(url: str, body: bytes) -> Result:
    started = time.monotonic()
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = json.loads(resp.read())
            return Result(started, time.monotonic() - started, resp.status, answer["predictions"][0]["label"])
    except urllib.error.HTTPError as err:
        return Result(started, time.monotonic() - started, err.code, err.read().decode(errors="replace")[:200])
    except (OSError, ValueError, KeyError) as exc:
        return Result(started, time.monotonic() - started, 0, repr(exc)[:200])


def management_answers(url: str) -> bool:
    """Whether TorchServe's management API answers at ``url`` (describe-model lists the model)."""
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status == 200 and "modelName" in resp.read().decode(errors="replace")
    except OSError:
        return False


def run_client_pod(serving: Serving, command: list[str], timeout: float = 120) -> str:
    """Run ``command`` in a one-off pod of the server image in the namespace (Pod Security restricted); its
    output. The pod is deleted afterwards."""
    name = f"client-{uuid.uuid4().hex[:6]}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "client",
                    "image": SERVER_TAG,
                    "imagePullPolicy": "IfNotPresent",
                    "command": command,
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                }
            ],
        },
    }
    cluster, ns = serving.cluster, ["-n", serving.namespace]
    cluster.apply(pod, namespace=serving.namespace)
    try:
        wait_until(
            f"pod {name} done",
            lambda: cluster.get(*ns, "pod", name)["status"].get("phase") in {"Succeeded", "Failed"},
            timeout,
        )
        phase = cluster.get(*ns, "pod", name)["status"]["phase"]
        out = cluster.kubectl(*ns, "logs", name).stdout
        assert phase == "Succeeded", f"{name} {phase}:\n{out}"
        return out
    finally:
        cluster.kubectl(*ns, "delete", "pod", name, "--wait=false", check=False)


def scrape(url: str) -> dict[str, float]:
    """The samples of a Prometheus text page, keyed by their full series name."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status.get("conditions") or []}


def available_at(version: str) -> Any:
    def check(st: dict[str, Any]) -> bool:
        stable = st.get("stable") or {}
        return (
            st.get("phase") == "Available"
            and stable.get("version") == version
            and conditions(st).get("Ready") == "True"
        )

    return check


# ---- the tests ----------------------------------------------------------------------------------------


def test_first_version_becomes_available_and_answers_in_the_cluster(serving: Serving) -> None:
    started = time.monotonic()
    serving.wait("version 1.0.0 Available", available_at("1.0.0"))
    took = time.monotonic() - started
    print(f"\n[figure] ModelDeployment apply -> Available (one TorchServe pod, model loaded): {took:.0f} s")
    st = serving.status()
    assert st["endpoint"] == f"http://{MD}.{serving.namespace}.svc:8080/predictions/{MD}"
    assert (
        st["observedGeneration"] == serving.cluster.get("-n", serving.namespace, "mdep", MD)["metadata"]["generation"]
    )
    assert conditions(st) == {"Ready": "True", "Progressing": "False", "Degraded": "False"}
    assert [h["outcome"] for h in st["history"]] == ["Deployed"]

    # A client pod of the namespace (which the NetworkPolicy admits by default) reaches the endpoint by its DNS
    # name. Not the serving pod itself: its policy allows it no egress at all, DNS included.
    script = (
        "import json, sys, urllib.request as u\n"
        "rows = [[float(x) for x in sys.argv[2:]]]\n"
        "req = u.Request(sys.argv[1], json.dumps({'inputs': rows}).encode(), {'Content-Type': 'application/json'})\n"
        "print(u.urlopen(req, timeout=30).read().decode())\n"
    )
    answer = run_client_pod(serving, ["python", "-c", script, st["endpoint"], *map(str, DIGIT_ROW)])
    prediction = json.loads(answer)["predictions"][0]
    assert prediction["label"] == "0" and prediction["probabilities"]["0"] > 0.5, prediction

    # From the host through the ClusterIP: inference answers; management (8081) is on no address but loopback.
    base = serving.service_url()
    assert post(f"{base}/predictions/{MD}", json.dumps({"inputs": DIGIT_ROW}).encode()).status == 200
    bad = post(f"{base}/predictions/{MD}", json.dumps({"inputs": [1, 2, 3]}).encode())
    assert bad.status == 400 and "expected 64 features" in bad.detail, bad
    # (An address nobody routes may still answer: this sandbox's egress proxy says 404 to anything. What matters
    # is that TorchServe's management API, which lists the model, answers on no address outside the pod.)
    ip = base.removeprefix("http://").removesuffix(":8080")
    (pod,) = serving.pods("stable")
    pod_ip = pod["status"]["podIP"]
    for address in (ip, pod_ip):
        assert not management_answers(f"http://{address}:8081/models/{MD}"), address
    assert _http_status(f"http://{pod_ip}:8081/models", timeout=3) == 0  # refused: it listens on loopback only
    inside = serving.cluster.kubectl(
        "-n", serving.namespace, "exec", pod["metadata"]["name"], "-c", "torchserve", "--", "python", "-c",
        f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:8081/models/{MD}').read().decode())",
    ).stdout  # fmt: skip
    assert json.loads(inside)[0]["modelName"] == MD  # the positive control: in the pod, on loopback, it answers
    assert _http_status(f"http://{pod_ip}:8082/metrics") == 200  # what Prometheus scrapes
    ports = serving.cluster.get("-n", serving.namespace, "service", MD)["spec"]["ports"]
    assert [p["port"] for p in ports] == [8080]


def test_hpa_scales_the_stable_deployment_under_load(serving: Serving) -> None:
    hpa_name = f"{MD}-stable"
    hpa = serving.cluster.get("-n", serving.namespace, "hpa", hpa_name)
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{MD}-stable"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 2)
    assert int(serving.cluster.get("-n", serving.namespace, "deploy", f"{MD}-stable")["spec"]["replicas"]) == 1
    url = f"{serving.service_url()}/predictions/{MD}"
    started = time.monotonic()

    def scaled() -> bool:
        dep = serving.cluster.get("-n", serving.namespace, "deploy", f"{MD}-stable")
        return int(dep["spec"].get("replicas", 0)) >= 2

    with Load(url, threads=8, pause_s=0.0, max_seconds=300) as load:
        try:
            wait_until("the HPA to scale the stable Deployment to 2", scaled, 280, interval=3)
        except pytest.fail.Exception:
            pytest.fail(
                "no scale-up\n"
                + serving.cluster.kubectl("-n", serving.namespace, "describe", "hpa", hpa_name, check=False).stdout
            )
        scaled_after = time.monotonic() - started
    hpa = serving.cluster.get("-n", serving.namespace, "hpa", hpa_name)
    print(f"\n[figure] HPA: load on -> stable scaled 1 -> 2: {scaled_after:.0f} s; load {load.summary()}; "
          f"CPU {hpa['status'].get('currentMetrics')}")  # fmt: skip
    # The operator did not fight the HPA: the ModelDeployment's spec is untouched and the replicas stay.
    st = serving.status()
    assert st["phase"] == "Available"
    assert serving.cluster.get("-n", serving.namespace, "mdep", MD)["spec"]["autoscaling"]["minReplicas"] == 1
    serving.wait("two ready stable pods", lambda st: (st.get("stable") or {}).get("readyReplicas") == 2, timeout=240)
    assert int(serving.cluster.get("-n", serving.namespace, "deploy", f"{MD}-stable")["spec"]["replicas"]) == 2


def test_good_canary_is_promoted_through_every_step_under_load(serving: Serving) -> None:
    url = f"{serving.service_url()}/predictions/{MD}"
    with Load(url, threads=3, pause_s=0.05, max_seconds=ROLLOUT_TIMEOUT_S + 120) as load:
        time.sleep(5)
        started = time.monotonic()
        serving.set_model("2.0.0")
        serving.wait("the canary to start", lambda st: st.get("phase") == "Canary")
        serving.wait(
            "the canary pod ready",
            lambda st: ((st.get("canary") or {}).get("readyReplicas") or 0) >= 1 or st.get("phase") != "Canary",
        )
        ready = time.monotonic()
        seen: list[dict[str, Any]] = []  # status during the steps

        def promoted(st: dict[str, Any]) -> bool:
            if st.get("phase") == "Canary" and st.get("canary"):
                seen.append(st)
            return bool(available_at("2.0.0")(st))

        serving.wait("promotion to Available at 2.0.0", promoted)
        done = time.monotonic()
    # Both steps ran, and the canary's replicas followed the weight of the stable's current (HPA-chosen) replicas.
    assert {st["canary"]["weight"] for st in seen} >= {50}, seen[-1:]
    for st in seen:
        want = canary_replicas(st["stable"]["replicas"], st["canary"]["weight"], 2)
        assert st["canary"]["replicas"] == want, (st["stable"], st["canary"])
    st = serving.status()
    outcomes = [(h["version"], h["outcome"]) for h in st["history"]]
    assert outcomes[-2:] == [("1.0.0", "Retired"), ("2.0.0", "Promoted")], outcomes
    assert "passed all 2 steps" in st["history"][-1]["reason"]
    assert st["lastAnalysis"]["outcome"] == "Passed"
    assert st.get("canary") is None
    assert len(serving.events("CanaryStepAdvanced")) >= 1 and serving.events("Promoted")
    # Deleted in the foreground: the Deployment goes once its pods are gone.
    wait_until(
        "the canary Deployment gone",
        lambda: (
            serving.cluster.kubectl("-n", serving.namespace, "get", "deploy", f"{MD}-canary", check=False).returncode
            != 0
        ),
        90,
    )
    stable = serving.cluster.get("-n", serving.namespace, "deploy", f"{MD}-stable")
    assert stable["spec"]["template"]["metadata"]["labels"]["flownexus.io/version"] == "2.0.0"
    print(f"\n[figure] good canary: version change -> promoted and Available: {done - started:.0f} s "
          f"(canary pod ready after {ready - started:.0f} s; then {done - ready:.0f} s for "
          f"2 analyses at {INTERVAL_S} s and the stable roll-out)")  # fmt: skip
    print(f"[figure] load during the good canary: {load.summary()}")
    failures = load.failures()
    assert not failures, f"{len(failures)} failed requests during a good canary: {failures[:5]}"


def selects_stable_only(serving: Serving) -> bool:
    selector = serving.cluster.get("-n", serving.namespace, "service", MD)["spec"]["selector"]
    return bool(selector.get("flownexus.io/track") == "stable")


def test_bad_canary_is_rolled_back_in_time_and_stable_never_fails(serving: Serving) -> None:
    url = f"{serving.service_url()}/predictions/{MD}"
    with Load(url, threads=3, pause_s=0.05, max_seconds=ROLLOUT_TIMEOUT_S + 120) as load:
        time.sleep(5)
        started = time.monotonic()
        serving.set_model("3.0.0")
        serving.wait("the canary to start", lambda st: st.get("phase") == "Canary")
        serving.wait("the rollback", lambda st: st.get("phase") == "RolledBack")
        rolled_back = time.monotonic()
        # The operator records the rollback first, then routes (so that a crash in between still finishes the
        # runbook): traffic leaves the canary from the moment the Service selects stable only.
        wait_until("the Service to select stable only", lambda: selects_stable_only(serving), 30, 0.2)
        routed = time.monotonic()
        time.sleep(10)  # keep the load on: after the rollback every request must succeed
    failures = load.failures()
    assert failures, "the broken canary never answered a request"
    first_failure = min(r.started for r in failures)
    detect = rolled_back - first_failure
    bound = INTERVAL_S * FAILED_CHECKS + INTERVAL_S
    print(f"\n[figure] bad canary: first failed request -> RolledBack: {detect:.0f} s (bound {bound} s = "
          f"interval {INTERVAL_S} s x {FAILED_CHECKS} checks + one interval); version change -> RolledBack: "
          f"{rolled_back - started:.0f} s")  # fmt: skip
    print(f"[figure] load during the bad canary: {load.summary()}")
    assert detect <= bound, f"rolled back {detect:.0f} s after the first failure, bound {bound} s"

    # Every failure is the canary's: TorchServe's 503 from the broken handler, nothing else (no connection
    # errors, no timeouts) ...
    assert {(r.status, "Prediction failed" in r.detail) for r in failures} == {(503, True)}, failures[:5]
    # ... none after the rollback (kube-proxy needs a moment to drop the canary's endpoints) ...
    late = load.failures(since=routed + 2)
    assert not late, f"{len(late)} failures after the rollback: {late[:5]}"
    # ... and the stable pods answered no 5xx at all (their own counters, scraped directly).
    for pod in serving.pods("stable"):
        samples = scrape(f"http://{pod['status']['podIP']}:8082/metrics")
        errors = sum(v for k, v in samples.items() if k.startswith("Requests5XX"))
        served = sum(v for k, v in samples.items() if k.startswith("ts_inference_requests_total"))
        assert errors == 0 and served > 0, (pod["metadata"]["name"], errors, served)

    st = serving.status()
    assert st["stable"]["version"] == "2.0.0" and st.get("canary") is None
    assert st["lastAnalysis"]["outcome"] == "Failed" and st["lastAnalysis"]["errorRate"] > 0.01, st["lastAnalysis"]
    assert (st["history"][-1]["version"], st["history"][-1]["outcome"]) == ("3.0.0", "RolledBack")
    assert conditions(st)["Degraded"] == "True" and conditions(st)["Ready"] == "False"
    (event,) = serving.events("RolledBack")[-1:]
    assert event["type"] == "Warning" and "error rate" in event["message"], event
    svc = serving.cluster.get("-n", serving.namespace, "service", MD)
    assert svc["spec"]["selector"] == {"flownexus.io/modeldeployment": MD, "flownexus.io/track": "stable"}
    wait_until(
        "the canary scaled to zero",
        lambda: (
            not serving.pods("canary")
            and serving.cluster.get("-n", serving.namespace, "deploy", f"{MD}-canary")["spec"]["replicas"] == 0
        ),
        120,
    )
    # The pods stop by their preStop hook (drain 5 s, `torchserve --stop`), not at the 30 s grace period's SIGKILL.
    print(f"[figure] RolledBack -> canary pods gone: {time.monotonic() - rolled_back:.0f} s")

    # Back to the stable version: Available again, with no new rollout.
    serving.set_model("2.0.0")
    serving.wait("Available at 2.0.0 again", available_at("2.0.0"), timeout=60)


def plugin(serving: Serving, *args: str) -> subprocess.CompletedProcess[str]:
    """`kubectl flownexus ...` (the package's console script, run as its module) against the e2e cluster."""
    return subprocess.run(
        [sys.executable, "-m", "flownexus.cli", "--kubeconfig", str(serving.cluster.kubeconfig),
         "-n", serving.namespace, *args],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip


def patch_md(serving: Serving, body: dict[str, Any]) -> None:
    serving.cluster.kubectl("-n", serving.namespace, "patch", "mdep", MD, "--type=merge", "-p", json.dumps(body))


def test_a_template_canary_rolls_back_on_a_custom_metric_and_the_plugin_retries_pauses_resumes_promotes(
    serving: Serving,
) -> None:
    serving.wait("Available at 2.0.0", available_at("2.0.0"), timeout=60)
    before = serving.status()["stable"]["templateHash"]
    # The pod template, not the generation: the HPA may change the replicas (and so the generation) meanwhile.
    stable_template = serving.cluster.get("-n", serving.namespace, "deploy", f"{MD}-stable")["spec"]["template"]
    url = f"{serving.service_url()}/predictions/{MD}"
    requests = 'sum(rate(ts_inference_requests_total{model_name="{{name}}",hostname=~"{{pods}}"}[{{window}}]))'
    with Load(url, threads=2, pause_s=0.1, max_seconds=3 * ROLLOUT_TIMEOUT_S):
        # Not a new model: new batching. A check that no canary with traffic can pass (requests/s <= 0).
        check = {"name": "requests", "query": requests, "max": 0}
        patch_md(serving, {"spec": {"serving": {"batchSize": 4}, "rollout": {"metrics": [check]}}})
        serving.wait("the template canary", lambda st: st.get("phase") == "Canary")
        st = serving.status()
        assert st["canary"]["version"] == "2.0.0" and st["canary"]["templateHash"] != before, st["canary"]
        serving.wait("the rollback by the custom metric", lambda st: st.get("phase") == "RolledBack")
        st = serving.status()
        assert any(m["name"] == "requests" and (m.get("value") or 0) > 0 for m in st["lastAnalysis"]["metrics"]), st
        # This canary's RolledBack Event (the bad canary's, of version 3.0.0, is listed too, in no set order).
        messages = [e["message"] for e in serving.events("RolledBack")]
        assert any("metric requests" in m for m in messages), messages
        # The stable pods never changed: same template hash, same pod template.
        assert serving.status()["stable"]["templateHash"] == before
        stable = serving.cluster.get("-n", serving.namespace, "deploy", f"{MD}-stable")
        assert stable["spec"]["template"] == stable_template

        # Through the plugin: drop the check, retry the same template, promote it without waiting for the steps.
        patch_md(serving, {"spec": {"rollout": {"metrics": None}}})
        retried = plugin(serving, "retry", MD)
        assert retried.returncode == 0, retried.stderr
        serving.wait("the retried canary", lambda st: st.get("phase") == "Canary")
        # Paused, the canary holds its step (not analysed, not stepped) for more than two intervals, with traffic.
        paused = plugin(serving, "pause", MD)
        assert paused.returncode == 0, paused.stderr
        serving.wait("the canary held", lambda st: st.get("reason") == "Paused", timeout=60)
        held = serving.status()["canary"]
        time.sleep(2 * INTERVAL_S + 10)
        st = serving.status()
        assert st["phase"] == "Canary" and st["reason"] == "Paused", st
        assert (st["canary"]["step"], st["canary"].get("stepStartedAt")) == (held["step"], held.get("stepStartedAt"))
        resumed = plugin(serving, "resume", MD)
        assert resumed.returncode == 0, resumed.stderr
        serving.wait("the canary resumed", lambda st: st.get("reason") != "Paused" or st.get("phase") != "Canary")
        promoted = plugin(serving, "promote", MD)
        assert promoted.returncode == 0, promoted.stderr
        serving.wait("promotion of the new template", lambda st: bool(available_at("2.0.0")(st)))
    st = serving.status()
    assert st["stable"]["templateHash"] != before
    assert [a["name"] for a in st["actions"]][-2:] == ["retry", "promote"], st["actions"]
    assert all(a["result"] == "Applied" for a in st["actions"][-2:]), st["actions"]
    history = plugin(serving, "history", MD)
    assert history.returncode == 0 and "RolledBack" in history.stdout, history.stdout

    # The first five minutes: a prediction through the Service, as `make demo` ends.
    predicted = plugin(serving, "predict", MD, "-f", str(REPO / "examples" / "predict-digits.json"))
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)["predictions"][0]["label"] == "0", predicted.stdout

    # Every dashboard query returns data after this traffic (those that may be empty are listed and skipped).
    for where, reason in skipped_queries():
        print(f"[skip] {where}: {reason}")
    assert queries_without_data(serving.prometheus, serving.namespace, MD) == []


def test_keda_scales_the_stable_deployment_on_request_rate_and_the_hpa_comes_back_without_it(
    serving: Serving,
) -> None:
    """spec.autoscaling.targetRequestsPerSecond: the operator swaps its HPA for a KEDA ScaledObject whose Prometheus
    trigger reads the requests per second the stable pods' edge proxies count; KEDA (built and run in the local
    cluster) scales the stable Deployment 1 -> 2 under a load that leaves the CPU target far away. Unsetting the
    field gives the operator's own HPA back and deletes the ScaledObject."""
    ns, cluster = serving.namespace, serving.cluster
    target_rps = 3
    patch_md(
        serving,
        {"spec": {"autoscaling": {"targetRequestsPerSecond": target_rps, "targetCpuUtilization": 100,
                                  "scaleDownStabilization": "0s", "scaleUpStabilization": "0s"}}},
    )  # fmt: skip

    def keda_in_charge() -> bool:
        st = serving.status()
        cond = {c["type"]: c for c in st.get("conditions") or []}.get("RequestRateAutoscaling") or {}
        if cond.get("status") != "True":
            return False
        done = cluster.kubectl("-n", ns, "get", "scaledobject", f"{MD}-stable", "-o", "json", check=False)
        if done.returncode != 0:
            return False
        so = json.loads(done.stdout)
        ready = {c["type"]: c.get("status") for c in (so.get("status") or {}).get("conditions") or []}
        own_hpa = cluster.kubectl("-n", ns, "get", "hpa", f"{MD}-stable", check=False).returncode == 0
        return ready.get("Ready") == "True" and not own_hpa

    try:
        wait_until("the ScaledObject Ready and the operator's HPA gone", keda_in_charge, 180, interval=3)
    except pytest.fail.Exception:
        pytest.fail(
            "KEDA did not take over\n"
            + cluster.kubectl("-n", ns, "get", "scaledobject,hpa", "-o", "yaml", check=False).stdout[-4000:]
            + serving.diagnostics()
        )
    so = cluster.get("-n", ns, "scaledobject", f"{MD}-stable")
    prom = next(t for t in so["spec"]["triggers"] if t["type"] == "prometheus")
    assert prom["metadata"]["serverAddress"] == serving.prometheus
    assert float(prom["metadata"]["threshold"]) == target_rps
    keda_hpa = cluster.get("-n", ns, "hpa", f"{MD}-stable-keda")
    assert [o["kind"] for o in keda_hpa["metadata"]["ownerReferences"]] == ["ScaledObject"]

    def replicas() -> int:
        return int(cluster.get("-n", ns, "deploy", f"{MD}-stable")["spec"].get("replicas", 0))

    # Idle: KEDA's HPA brings the stable track down to minReplicas (the earlier CPU test left it at 2).
    wait_until("an idle stable track at 1 replica", lambda: replicas() == 1, 240, interval=3)
    url = f"{serving.service_url()}/predictions/{MD}"
    started = time.monotonic()
    # About 4 x 1 / (latency + 0.25 s) ~ 10-15 requests per second: well above 3 per pod, far below the CPU target.
    with Load(url, threads=4, pause_s=0.25, max_seconds=300) as load:
        try:
            wait_until("KEDA to scale the stable Deployment to 2", lambda: replicas() >= 2, 240, interval=3)
        except pytest.fail.Exception:
            pytest.fail(
                "no scale-up on request rate\n"
                + cluster.kubectl("-n", ns, "describe", "hpa", f"{MD}-stable-keda", check=False).stdout
            )
        scaled_after = time.monotonic() - started
        keda_hpa = cluster.get("-n", ns, "hpa", f"{MD}-stable-keda")
    metrics = keda_hpa["status"].get("currentMetrics") or []
    external = [m for m in metrics if m["type"] == "External"]
    print(f"\n[figure] KEDA: load on -> stable scaled 1 -> 2 on request rate: {scaled_after:.0f} s; "
          f"load {load.summary()}; metrics {metrics}")  # fmt: skip
    assert external, metrics
    assert not load.failures(), load.failures()[:3]

    # Back to the operator's own HPA: the ScaledObject (and KEDA's HPA with it) goes.
    cluster.kubectl(
        "-n", ns, "patch", "mdep", MD, "--type=json",
        "-p", json.dumps([{"op": "remove", "path": "/spec/autoscaling/targetRequestsPerSecond"}]),
    )  # fmt: skip

    def hpa_back() -> bool:
        gone = cluster.kubectl("-n", ns, "get", "scaledobject", f"{MD}-stable", check=False).returncode != 0
        own = cluster.kubectl("-n", ns, "get", "hpa", f"{MD}-stable", check=False).returncode == 0
        return gone and own

    wait_until("the operator's HPA back and the ScaledObject gone", hpa_back, 120, interval=3)


def test_argo_cd_health_check_reads_healthy_at_the_end(serving: Serving) -> None:
    if LUA is None:
        missing("lua5.1 is not installed (apt-get install lua5.1)")
    serving.wait("Available at 2.0.0", available_at("2.0.0"), timeout=60)
    obj = serving.cluster.get("-n", serving.namespace, "mdep", MD)
    status, message = health(obj)
    assert status == "Healthy", (status, message, obj.get("status"))
    # kubectl's own view agrees.
    serving.cluster.kubectl("-n", serving.namespace, "wait", "--for=condition=Ready", f"mdep/{MD}", "--timeout=10s")
    printed = serving.cluster.kubectl("-n", serving.namespace, "get", "mdep", MD).stdout
    assert "Available" in printed and "2.0.0" in printed, printed
