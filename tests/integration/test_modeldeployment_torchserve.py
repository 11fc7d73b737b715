"""The serving pod's pieces for real, on loopback: the operator's ConfigMap (init script, config.properties,
readiness probe, the edge proxy) around a real TorchServe 0.12, and the canary's PromQL on a real Prometheus
scraping the proxy's metrics port. Only the paths and ports of config.properties are moved so that it runs next
to other tests."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from flownexus.api.modeldeployment import ModelDeploymentSpec
from flownexus.api.neuralcluster import NeuralClusterSpec
from flownexus.modeldeployment.children import (
    INFERENCE_PORT,
    MANAGEMENT_PORT,
    METRICS_PORT,
    SERVE_ROOT,
    UPSTREAM_INFERENCE_PORT,
    UPSTREAM_METRICS_PORT,
    ServingContext,
    build_config_map,
)
from flownexus.prometheus import CanarySelector, HttpPrometheus, NoData, error_rate_query, latency_p99_ms_query
from tests.factories import model_deployment, neural_cluster
from tests.integration.trainer.procs import free_port, kill_group, subprocess_env
from tests.prereq import missing

pytestmark = pytest.mark.integration
FEATURES = 4
ARCHIVE_VERSION = "3.1.4"
TOKEN = "s3cret-token"


@dataclass(frozen=True)
class Pod:
    """One serving 'pod' on loopback."""

    inference: int  # what the Service would target: the proxy
    management: int
    metrics: int  # what Prometheus scrapes: the proxy, TorchServe's metrics and its own
    upstream_inference: int  # TorchServe's own listeners, on loopback
    upstream_metrics: int
    run_dir: Path
    env: dict[str, str]
    templates: Path
    token_auth: bool


def _context(token_auth: bool) -> ServingContext:
    serving: dict[str, Any] = {"batchSize": 4, "maxBatchDelayMs": 20, "workersPerModel": 1}
    if token_auth:
        serving["inferenceTokenSecret"] = "digits-token"
    md = model_deployment(**{"spec.serving": serving})
    md["metadata"]["uid"] = "uid-1"
    return ServingContext(
        owner=md,
        spec=ModelDeploymentSpec.model_validate(md["spec"]),
        cluster=NeuralClusterSpec.model_validate(neural_cluster()["spec"]),
        artifact_claim="demo-artifacts",
    )


def _build_archive(root: Path) -> Path:
    from flownexus_trainer.export import build_mar
    from flownexus_trainer.models import build_model

    model_dir = root / "model"
    model_dir.mkdir()
    spec = {"architecture": "mlp", "hiddenSizes": [8]}
    torch.save(build_model(spec, FEATURES, 3).state_dict(), model_dir / "model.pt")
    config = {"model": spec, "numFeatures": FEATURES, "numOutputs": 3, "task": "classification",
              "classLabels": ["a", "b", "c"]}  # fmt: skip
    (model_dir / "model_config.json").write_text(json.dumps(config))
    (model_dir / "normalization.json").write_text(json.dumps({"mean": [0.0] * FEATURES, "std": [1.0] * FEATURES}))
    store = root / "artifacts" / "default" / "digits" / "model-store"
    store.mkdir(parents=True)
    # The archive's own name and version differ from the ModelDeployment's on purpose.
    return build_mar(model_dir, store, "trained", ARCHIVE_VERSION)


def _wait(what: str, check: Any, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module", params=[False, True], ids=["open-inference", "token-auth"])
def pod(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    token_auth: bool = request.param
    root = tmp_path_factory.mktemp("serving")
    archive = _build_archive(root)
    ctx = _context(token_auth)
    srv = root / "srv"
    ports = {
        port: free_port()
        for port in (INFERENCE_PORT, MANAGEMENT_PORT, METRICS_PORT, UPSTREAM_INFERENCE_PORT, UPSTREAM_METRICS_PORT)
    }
    templates = root / "templates"
    templates.mkdir()
    for key, value in build_config_map(ctx)["data"].items():
        if key == "config.properties":
            value = value.replace(SERVE_ROOT, str(srv))
            for port, moved in ports.items():
                value = value.replace(f":{port}\n", f":{moved}\n")
            value += f"grpc_inference_port={free_port()}\ngrpc_management_port={free_port()}\n"
        (templates / key).write_text(value)
    for sub in ("model-store", "conf", "run"):
        (srv / sub).mkdir(parents=True)
    env = {
        **subprocess_env(),
        "FLOWNEXUS_ARCHIVE": str(archive),
        "FLOWNEXUS_MODEL_NAME": ctx.model_name,
        "FLOWNEXUS_MODEL_STORE": str(srv / "model-store"),
        "FLOWNEXUS_CONF_DIR": str(srv / "conf"),
        "FLOWNEXUS_MANAGEMENT_PORT": str(ports[MANAGEMENT_PORT]),
        "FLOWNEXUS_RUN_DIR": str(srv / "run"),
        "FLOWNEXUS_PROXY_PORT": str(ports[INFERENCE_PORT]),
        "FLOWNEXUS_METRICS_PORT": str(ports[METRICS_PORT]),
        "FLOWNEXUS_UPSTREAM_PORT": str(ports[UPSTREAM_INFERENCE_PORT]),
        "FLOWNEXUS_UPSTREAM_METRICS_PORT": str(ports[UPSTREAM_METRICS_PORT]),
        # No FLOWNEXUS_MODEL_VERSION (a source with no known version): the proxy reads the rendered config's.
        "FLOWNEXUS_CONF_FILE": str(srv / "conf" / "config.properties"),
        "HOSTNAME": socket.gethostname(),  # the pod name in a cluster; TorchServe labels with the same
        "HOME": str(srv / "run"),
        "OMP_NUM_THREADS": "1",
    }
    if token_auth:
        env["FLOWNEXUS_TOKEN_FILE"] = str(root / "token")
    (root / "token").write_text(TOKEN + "\n")
    prepared = subprocess.run(
        [sys.executable, str(templates / "prepare.py"), str(templates)], env=env, capture_output=True, text=True
    )
    assert prepared.returncode == 0, prepared.stderr
    torchserve = shutil.which("torchserve")
    assert torchserve, "torchserve is not installed"
    cmd = [torchserve, "--foreground", "--ncs", "--ts-config", str(srv / "conf" / "config.properties"),
           "--model-store", str(srv / "model-store")]  # fmt: skip
    log = open(root / "torchserve.log", "wb")  # noqa: SIM115 (closed after the process)
    server = subprocess.Popen(
        cmd, cwd=srv / "run", env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    proxy = subprocess.Popen([sys.executable, str(templates / "auth_proxy.py")], env=env, start_new_session=True)
    procs = [server, proxy]
    try:
        probe = [sys.executable, str(templates / "probe.py")]
        _wait("the readiness probe", lambda: subprocess.run(probe, env=env, capture_output=True).returncode == 0)
        yield Pod(
            inference=ports[INFERENCE_PORT],
            management=ports[MANAGEMENT_PORT],
            metrics=ports[METRICS_PORT],
            upstream_inference=ports[UPSTREAM_INFERENCE_PORT],
            upstream_metrics=ports[UPSTREAM_METRICS_PORT],
            run_dir=srv / "run",
            env=env,
            templates=templates,
            token_auth=token_auth,
        )
    finally:
        for proc in procs:
            kill_group(proc)
        log.close()


def call(url: str, body: bytes | None = None, token: str | None = None, method: str | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"))
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw or b"null")
        except ValueError:
            return err.code, raw.decode(errors="replace")


def management_token(pod: Pod) -> str | None:
    key_file = pod.run_dir / "key_file.json"
    return json.loads(key_file.read_text())["management"]["key"] if pod.token_auth else None


def predict(pod: Pod, rows: Any) -> tuple[int, Any]:
    body = json.dumps({"inputs": rows}).encode()
    return call(f"http://127.0.0.1:{pod.inference}/predictions/digits", body, TOKEN if pod.token_auth else None)


def test_the_model_is_served_under_the_deployments_name_with_the_specs_batching(pod: Pod) -> None:
    status, models = call(f"http://127.0.0.1:{pod.management}/models/digits", token=management_token(pod))
    assert status == 200, models
    (model,) = models
    assert (model["modelName"], model["modelVersion"]) == ("digits", ARCHIVE_VERSION)
    assert (model["batchSize"], model["maxBatchDelay"]) == (4, 20)  # per-model settings keyed by the archive version
    assert [w["status"] for w in model["workers"]] == ["READY"]


def test_predictions_single_and_batched(pod: Pod) -> None:
    status, body = predict(pod, [1.0, 2.0, 3.0, 4.0])
    assert status == 200 and len(body["predictions"]) == 1, body
    status, body = predict(pod, [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    assert status == 200 and len(body["predictions"]) == 2, body
    status, body = predict(pod, [1.0])
    assert status == 400 and "expected 4 features" in body["message"]


def _listening(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}


def test_torchserve_listens_on_loopback_only_behind_the_proxy_and_registers_nothing(pod: Pod) -> None:
    for port in (pod.management, pod.upstream_inference, pod.upstream_metrics):
        assert _listening(port) and _listening(port) <= {"127.0.0.1", "::ffff:127.0.0.1"}, port
    assert _listening(pod.inference) & {"0.0.0.0", "::"}  # the proxy: the pod's edge
    assert _listening(pod.metrics) & {"0.0.0.0", "::"}
    status, _ = call(
        f"http://127.0.0.1:{pod.management}/models?url=http://example.com/evil.mar",
        b"",
        token=management_token(pod),
        method="POST",
    )
    assert status == 405  # enable_model_api=false


def test_token_authorization(pod: Pod) -> None:
    if not pod.token_auth:
        # open to the clients the NetworkPolicy admits; TorchServe's own token authorization is off
        assert call(f"http://127.0.0.1:{pod.management}/models")[0] == 200
        body = json.dumps({"inputs": [1.0, 2.0, 3.0, 4.0]}).encode()
        assert call(f"http://127.0.0.1:{pod.inference}/predictions/digits", body)[0] == 200  # no token needed
        return
    url = f"http://127.0.0.1:{pod.inference}/predictions/digits"
    body = json.dumps({"inputs": [1.0, 2.0, 3.0, 4.0]}).encode()
    assert call(url, body)[0] == 401
    assert call(url, body, token="wrong")[0] == 401
    assert call(url, body, token=TOKEN)[0] == 200
    assert call(f"http://127.0.0.1:{pod.inference}/ping")[0] == 200
    # TorchServe itself wants its own keys: management without one is refused
    assert call(f"http://127.0.0.1:{pod.management}/models")[0] in (400, 401)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*?),?\} (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(pod: Pod) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{pod.metrics}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


def histogram(text: str, name: str, **labels: str) -> dict[float, float]:
    """Cumulative bucket counts ``{le: count}`` of ``name``, summed over the series that carry ``labels``."""
    out: dict[float, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or match.group(1) != f"{name}_bucket":
            continue
        found = dict(_LABEL.findall(match.group(2)))
        if all(found.get(k) == v for k, v in labels.items()):
            le = float(found["le"])
            out[le] = out.get(le, 0.0) + float(match.group(3))
    return out


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    """``histogram_quantile(q, ...)`` of the requests between two scrapes, interpolated as Prometheus does."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    raise AssertionError("unreachable: the +Inf bucket holds every request")


def test_the_proxys_metrics_port_has_torchserves_metrics_and_the_edge_histogram_of_every_prediction(
    pod: Pod,
) -> None:
    n = 40
    host = socket.gethostname()
    edge_labels = {"ModelName": "digits", "ModelVersion": ARCHIVE_VERSION, "Hostname": host, "code": "2xx"}
    handler_labels = {"ModelName": "digits", "ModelVersion": ARCHIVE_VERSION, "Hostname": host}
    assert predict(pod, [1.0, 2.0, 3.0, 4.0])[0] == 200  # the handler's histogram exists from here on
    before = scrape(pod)
    edge_before = histogram(before, "flownexus_edge_request_duration_seconds", **edge_labels)
    handler_before = histogram(before, "flownexus_inference_latency_seconds", **handler_labels)
    for i in range(n):
        assert predict(pod, [float(i), 2.0, 3.0, 4.0])[0] == 200
    after = scrape(pod)
    # TorchServe's own metrics come through the proxy's port (the scrape config does not change) ...
    assert "# TYPE ts_inference_requests_total counter" in after
    assert "# TYPE flownexus_inference_latency_seconds histogram" in after
    assert "flownexus_edge_upstream_metrics_up 1" in after
    # ... followed by the edge histogram, labelled like the handler's, with every prediction in it.
    edge = histogram(after, "flownexus_edge_request_duration_seconds", **edge_labels)
    handler = histogram(after, "flownexus_inference_latency_seconds", **handler_labels)
    assert edge and handler, after
    assert edge[math.inf] - edge_before.get(math.inf, 0.0) == n
    assert handler[math.inf] - handler_before[math.inf] == n
    # What a client sees includes the handler's time, and the batching delay (20 ms) the handler never sees.
    edge_p99, handler_p99 = quantile(0.99, edge_before, edge), quantile(0.99, handler_before, handler)
    assert edge_p99 >= handler_p99, (edge_p99, handler_p99)
    assert quantile(0.5, edge_before, edge) >= 0.01  # most requests wait out maxBatchDelay alone


def test_canary_promql_on_a_real_prometheus(pod: Pod, tmp_path: Path) -> None:
    """Healthy: error rate 0 (not NoData) and a finite p99; all workers gone: every request 503 -> error rate 1."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        missing("prometheus is not installed (apt-get install prometheus)")
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: torchserve, static_configs: [{{targets: ['127.0.0.1:{pod.metrics}']}}]}}]\n"
    )
    cmd = [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # TorchServe labels its series with the machine's hostname, as it does with the pod name in a cluster.
    host = socket.gethostname()
    sel = CanarySelector(model_name="digits", pod_prefix=host[:-1], archive_version=ARCHIVE_VERSION)
    client = HttpPrometheus(f"http://127.0.0.1:{port}")
    mgmt = f"http://127.0.0.1:{pod.management}/models/digits"
    try:
        for _ in range(30):
            assert predict(pod, [1.0, 2.0, 3.0, 4.0])[0] == 200
            time.sleep(0.2)
        _wait("a healthy error rate", lambda: client.query(error_rate_query(sel, "20s")) == 0.0, timeout=60)
        p99 = client.query(latency_p99_ms_query(sel, "20s"))
        assert isinstance(p99, float) and 0 < p99 < 10_000
        other = client.query(error_rate_query(CanarySelector("digits", "no-such-pod-"), "20s"))
        assert isinstance(other, NoData)
        # every worker gone: TorchServe answers 503, which Requests5XX counts
        assert call(f"{mgmt}?min_worker=0&max_worker=0&synchronous=true", b"", management_token(pod), "PUT")[0] == 200
        for _ in range(30):
            assert predict(pod, [1.0, 2.0, 3.0, 4.0])[0] == 503
            time.sleep(0.2)

        def high() -> bool:
            value = client.query(error_rate_query(sel, "5s"))
            return isinstance(value, float) and value > 0.9

        _wait("the error rate to show the 503s", high, timeout=60)
    finally:
        call(f"{mgmt}?min_worker=1&max_worker=1&synchronous=true", b"", management_token(pod), "PUT")
        kill_group(proc)
