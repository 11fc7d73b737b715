"""The operator's TrainingJob and API health metrics: phase and queue gauges read from the cache at scrape time,
answers of the API server by status code, and finished TrainingJobs counted once per transition."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from monitoring import render
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from flownexus.api.trainingjob import TrainingJobSpec, TrainingJobStatus
from flownexus.metrics import TRAININGJOB_PHASES, TrainingJobCollector, count_finished, register_cache_metrics
from flownexus.runtime.cache import Cache
from flownexus.runtime.client import ApiError, Client, Conflict, Manifest
from flownexus.runtime.controller import Controller, Outcome
from flownexus.trainingjob.decide import JobState, Observed, decide
from tests.e2e.monitoring_check import query as prometheus_query
from tests.factories import neural_cluster, training_job
from tests.prereq import missing
from tests.processes import stop

# ---- the phase and queue gauges --------------------------------------------------------------------------------


def tj(name: str, namespace: str = "default", cluster: str = "demo", **status: Any) -> Manifest:
    obj = training_job(name, **{"metadata.namespace": namespace, "spec.clusterRef.name": cluster})
    if status:
        obj["status"] = status
    return obj


def queued_by_decide(name: str, position: int) -> Manifest:
    """A TrainingJob whose status is what decide() writes for the ``position``-th job in its cluster's queue."""
    obj = tj(name)
    observed = Observed(
        cluster_ready=True, cluster_problem="", queue_position=position, max_workers=8, worker_job=JobState.MISSING,
        previous_attempt_present=False, worker_failure="", validator_job=JobState.MISSING, verdict=None,
        now=datetime.now(UTC),
    )  # fmt: skip
    plan = decide(TrainingJobSpec.model_validate(obj["spec"]), TrainingJobStatus(), observed, 1)
    assert plan.status.reason == "WaitingForCapacity", plan.status
    obj["status"] = plan.status.model_dump(by_alias=True, exclude_none=True, mode="json")
    return obj


def filled_cache() -> Cache:
    cache = Cache()
    for nc in (neural_cluster("demo"), neural_cluster("big"), neural_cluster("idle", **{"metadata.namespace": "b"})):
        cache.upsert(nc)
    for obj in (
        tj("running-1", phase="Running", attempt=1),
        tj("running-2", phase="Running", attempt=1),
        tj("validating", phase="Validating", attempt=1),
        tj("done", phase="Succeeded", reason="Validated", attempt=1),
        tj("broken", phase="Failed", reason="InvalidSpec"),  # never started: finished, not waiting
        queued_by_decide("queued-1", 1),
        queued_by_decide("queued-2", 2),
        tj("big-queued", cluster="big", phase="Pending", reason="WaitingForCapacity", queuePosition=1),
        tj("no-cluster", cluster="gone", phase="Pending", reason="ClusterNotReady"),  # waits, but not for a slot
        tj("too-wide", phase="Pending", reason="TooManyWorkers"),
        tj("new"),  # no status yet: Pending
        tj("paused", namespace="a", phase="Suspended", reason="Suspended"),
    ):
        cache.upsert(obj)
    suspended_in_queue = tj("suspended-queued", phase="Pending", reason="WaitingForCapacity", queuePosition=3)
    suspended_in_queue["spec"]["runPolicy"] = {"suspend": True}  # suspended since: no longer waits for a slot
    cache.upsert(suspended_in_queue)
    return cache


@pytest.fixture
def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    cache = filled_cache()
    register_cache_metrics(lambda: cache, reg)
    return reg


def value(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def test_phase_gauge_counts_cached_trainingjobs_per_namespace_and_phase(registry: CollectorRegistry) -> None:
    expected = {"Pending": 7, "Running": 2, "Validating": 1, "Succeeded": 1, "Failed": 1}
    for phase in TRAININGJOB_PHASES:
        assert value(registry, "flownexus_trainingjobs", namespace="default", phase=phase) == expected.get(phase, 0)
    assert value(registry, "flownexus_trainingjobs", namespace="a", phase="Suspended") == 1
    # A namespace with a NeuralCluster and no TrainingJob reports every phase at 0 (the dashboard has data).
    assert [value(registry, "flownexus_trainingjobs", namespace="b", phase=p) for p in TRAININGJOB_PHASES] == [0] * 8


def test_queue_depth_counts_only_jobs_waiting_for_a_slot_of_each_cluster(registry: CollectorRegistry) -> None:
    assert value(registry, "flownexus_trainingjob_queue_depth", namespace="default", cluster="demo") == 2
    assert value(registry, "flownexus_trainingjob_queue_depth", namespace="default", cluster="big") == 1
    assert value(registry, "flownexus_trainingjob_queue_depth", namespace="b", cluster="idle") == 0
    # A job waiting for a cluster that does not exist waits for the cluster, not for a slot.
    assert value(registry, "flownexus_trainingjob_queue_depth", namespace="default", cluster="gone") is None


def test_gauges_follow_the_cache_at_each_scrape_without_bookkeeping() -> None:
    cache, reg = Cache(), CollectorRegistry()
    register_cache_metrics(lambda: cache, reg)
    cache.upsert(neural_cluster("demo"))
    cache.upsert(queued_by_decide("q", 1))
    assert value(reg, "flownexus_trainingjob_queue_depth", namespace="default", cluster="demo") == 1
    admitted = tj("q", phase="Created", reason="Starting", attempt=1)
    admitted["metadata"]["resourceVersion"] = "2"
    cache.upsert(admitted)
    assert value(reg, "flownexus_trainingjob_queue_depth", namespace="default", cluster="demo") == 0
    assert value(reg, "flownexus_trainingjobs", namespace="default", phase="Created") == 1
    cache.remove("TrainingJob", "default", "q")
    assert value(reg, "flownexus_trainingjobs", namespace="default", phase="Created") == 0


def test_nothing_is_reported_before_the_cache_is_filled() -> None:
    reg = CollectorRegistry()
    register_cache_metrics(lambda: None, reg)
    families = {m.name: m.samples for m in reg.collect()}
    assert families == {"flownexus_trainingjobs": [], "flownexus_trainingjob_queue_depth": []}


def test_the_gauges_are_served_over_http_next_to_the_default_metrics(registry: CollectorRegistry) -> None:
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["flownexus_trainingjobs"].type == "gauge"
    depth = {
        (s.labels["namespace"], s.labels["cluster"]): s.value
        for s in families["flownexus_trainingjob_queue_depth"].samples
    }
    assert depth == {("default", "demo"): 2, ("default", "big"): 1, ("b", "idle"): 0}


def test_the_collector_describes_its_families_so_a_second_registration_clashes() -> None:
    reg = CollectorRegistry()
    reg.register(TrainingJobCollector(lambda: None))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        reg.register(TrainingJobCollector(lambda: None))


# ---- a tiny API server on loopback --------------------------------------------------------------------------------


class _Api(BaseHTTPRequestHandler):
    """Answers ``.../configmaps/<code>`` with that HTTP code, and PUT of a status with the body it was sent (its
    resourceVersion one higher), like the API server's status subresource."""

    def _answer(self, code: int, body: Manifest) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code == 503:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        sent = json.loads(self.rfile.read(length)) if length else {}
        last = self.path.split("?")[0].rstrip("/").split("/")[-1]
        if last.isdigit():
            self._answer(int(last), {"kind": "Status", "message": f"answered {last}", "reason": "Test"})
        elif self.command == "PUT" and last == "status":
            meta = sent["metadata"]
            meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)
            meta["uid"] = "uid-1"
            self._answer(200, sent)
        else:
            self._answer(404, {"kind": "Status", "message": "not found"})

    do_GET = do_PUT = do_PATCH = do_DELETE = do_POST = _handle

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def client_for(url: str) -> Client:
    return Client(k8s.ApiClient(k8s.Configuration(host=url)))


def responses(verb: str, kind: str, code: str) -> float:
    return REGISTRY.get_sample_value("flownexus_api_responses_total", {"verb": verb, "kind": kind, "code": code}) or 0


def requests_sent(verb: str, kind: str) -> float:
    return REGISTRY.get_sample_value("flownexus_api_requests_total", {"verb": verb, "kind": kind}) or 0


def test_each_answer_is_counted_by_its_status_code(api: str) -> None:
    c = client_for(api)
    before = {code: responses("GET", "ConfigMap", code) for code in ("200", "404", "409", "422")}
    assert c.get("ConfigMap", "default", "404") is None
    with pytest.raises(Conflict):
        c.request("GET", "/api/v1/namespaces/default/configmaps/409", kind="ConfigMap")
    with pytest.raises(ApiError) as refused:
        c.request("GET", "/api/v1/namespaces/default/configmaps/422", kind="ConfigMap")
    assert refused.value.status == 422
    assert c.request("GET", "/api/v1/namespaces/default/configmaps/200", kind="ConfigMap")["message"] == "answered 200"
    after = {code: responses("GET", "ConfigMap", code) for code in before}
    assert {code: after[code] - before[code] for code in before} == {"200": 1, "404": 1, "409": 1, "422": 1}


def test_every_try_of_a_retried_request_is_an_answer_but_one_request(api: str) -> None:
    c = client_for(api)
    sent, answered = requests_sent("PATCH", "Job"), responses("PATCH", "Job", "503")
    with pytest.raises(ApiError) as unavailable:
        c.request("PATCH", "/apis/batch/v1/namespaces/default/jobs/503", body={}, kind="Job")
    assert unavailable.value.status == 503
    assert requests_sent("PATCH", "Job") - sent == 1  # API_REQUESTS is unchanged: one per request
    assert responses("PATCH", "Job", "503") - answered == 4  # the first try and three retries


def test_no_answer_is_counted_as_error() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = responses("GET", "Pod", "error")
    with pytest.raises(Exception) as failed:
        client_for(f"http://127.0.0.1:{port}").list("Pod", "default")
    assert not isinstance(failed.value, ApiError)
    assert responses("GET", "Pod", "error") - before == 1


# ---- finished TrainingJobs ----------------------------------------------------------------------------------------


def finished(namespace: str, result: str, reason: str) -> float:
    labels = {"namespace": namespace, "result": result, "reason": reason}
    return REGISTRY.get_sample_value("flownexus_trainingjob_finished_total", labels) or 0


@pytest.mark.parametrize(
    ("old", "new", "counted"),
    [
        ({"phase": "Validating"}, {"phase": "Failed", "reason": "ValidationFailed"}, True),
        ({"phase": "Running"}, {"phase": "Succeeded", "reason": "Validated"}, True),
        ({}, {"phase": "Failed", "reason": "InvalidSpec"}, True),  # refused before any status
        (
            {"phase": "Failed", "reason": "InputError"},
            {"phase": "Failed", "reason": "InputError", "message": "x"},
            False,
        ),
        ({"phase": "Succeeded"}, {"phase": "Failed", "reason": "ValidatorError"}, False),  # final to final
        ({"phase": "Pending"}, {"phase": "Running"}, False),
    ],
)
def test_a_transition_into_a_final_phase_is_counted_not_the_state(old: Manifest, new: Manifest, counted: bool) -> None:
    before, after = tj("t", namespace="table"), tj("t", namespace="table")
    before["status"], after["status"] = old, new
    start = finished("table", str(new["phase"]), str(new.get("reason") or ""))
    assert count_finished(before, after) is counted
    assert finished("table", str(new["phase"]), str(new.get("reason") or "")) - start == (1 if counted else 0)


def test_other_kinds_are_never_counted() -> None:
    md = {"kind": "ModelDeployment", "metadata": {"name": "m", "namespace": "default"}}
    assert not count_finished({**md, "status": {"phase": "Progressing"}}, {**md, "status": {"phase": "Failed"}})


class _Finishing:
    """A TrainingJob reconciler that decides a failed validation (its message changes per pass)."""

    kind = "TrainingJob"
    pod_owned_status = frozenset({"progress"})

    def __init__(self) -> None:
        self.passes = 0

    def reconcile(self, obj: Manifest) -> Outcome:
        self.passes += 1
        message = "accuracy 0.5 < 0.9" if self.passes < 3 else "accuracy 0.5 < 0.9 (again)"
        return Outcome(status={"phase": "Failed", "reason": "ValidationFailed", "message": message, "attempt": 1})


def test_the_controller_counts_the_status_write_that_finishes_a_job_once(api: str) -> None:
    """First pass: Validating -> Failed is written and counted. Second pass: nothing to write. Third pass: the
    message changes, Failed is written again, not counted. A restarted operator (new cache and controller, the
    object read back as Failed) counts nothing."""
    namespace = "ctl-finish"
    obj = tj("val", namespace=namespace, phase="Validating", attempt=1)
    obj["metadata"].update(uid="uid-1", resourceVersion="10", generation=1)
    cache, rec = Cache(), _Finishing()
    cache.upsert(obj)
    controller = Controller(client_for(api), cache, [rec])
    start = finished(namespace, "Failed", "ValidationFailed")
    for _ in range(3):
        controller.run_pass("TrainingJob", namespace, "val")
    stored = cache.get("TrainingJob", namespace, "val")
    assert stored is not None and stored["metadata"]["resourceVersion"] == "12"  # two writes
    assert stored["status"]["phase"] == "Failed"
    assert finished(namespace, "Failed", "ValidationFailed") - start == 1

    restarted_cache = Cache()
    restarted_cache.upsert(stored)
    Controller(client_for(api), restarted_cache, [_Finishing()]).run_pass("TrainingJob", namespace, "val")
    assert restarted_cache.get("TrainingJob", namespace, "val")["metadata"]["resourceVersion"] == "13"  # type: ignore[index]
    assert finished(namespace, "Failed", "ValidationFailed") - start == 1


# ---- the new operator panels against a real Prometheus ------------------------------------------------------------

NEW_PANELS = ("API responses/s by code", "TrainingJobs by phase", "TrainingJob queue depth by NeuralCluster")


def test_new_operator_panels_have_data_from_a_real_prometheus_scraping_the_operator_metrics(
    api: str, tmp_path: Path
) -> None:
    """What e2e's serving namespace holds (one NeuralCluster, no TrainingJob) and one API answer are enough for the
    TrainingJob phase, queue depth and API response panels to return data (the e2e check does not skip them);
    the finished-jobs panel, empty until a job finishes, is skipped."""
    exe = shutil.which("prometheus")
    if exe is None:
        missing("prometheus is not installed (apt-get install prometheus)")
    cache = Cache()
    cache.upsert(neural_cluster("demo", **{"metadata.namespace": "e2e-md"}))
    reg = CollectorRegistry()
    reg.register(REGISTRY)  # the counters of flownexus.metrics and runtime.client, as the operator serves them
    register_cache_metrics(lambda: cache, reg)
    client_for(api).get("ConfigMap", "default", "200")
    target, thread = start_http_server(0, addr="127.0.0.1", registry=reg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = {"scrape_configs": [{"job_name": "flownexus-operator", "scrape_interval": "1s",
              "static_configs": [{"targets": [f"127.0.0.1:{target.server_address[1]}"]}]}]}  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [exe, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            checked = [
                q for q in render.all_queries({"operator": render.OPERATOR}) if q.where.split("'")[1] in NEW_PANELS
            ]
            assert len(checked) == 3 and all(q.empty_reason is None for q in checked)
            deadline, empty = time.monotonic() + 90, [q.expr for q in checked]
            while empty and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(1)
                try:
                    empty = [q.expr for q in checked if not prometheus_query(url, q.expr)]
                except OSError:
                    continue  # not ready yet
            assert empty == [], (tmp_path / "prometheus.log").read_text()[-2000:]
            phases = {s["metric"]["phase"]: s["value"][1] for s in prometheus_query(url, checked[1].expr)}
            assert phases == {p: "0" for p in TRAININGJOB_PHASES}
            (depth,) = prometheus_query(url, checked[2].expr)
            assert depth["metric"] == {"namespace": "e2e-md", "cluster": "demo"} and depth["value"][1] == "0"
            (finished_panel,) = [q for q in render.all_queries() if "TrainingJobs finished" in q.where]
            assert finished_panel.empty_reason  # no job may have finished: the e2e check skips it
        finally:
            stop(proc)
            target.shutdown()
            target.server_close()
            thread.join(5)
