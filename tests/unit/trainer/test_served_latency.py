"""The served-latency step's pure parts: config, TorchServe settings (same as a ModelDeployment's), percentiles,
the verdict, and the load generator against a real local HTTP server. TorchServe itself:
tests/integration/trainer/test_served_latency.py."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flownexus.api.modeldeployment import ModelDeploymentSpec, ServingSpec
from flownexus.api.neuralcluster import NeuralClusterSpec
from flownexus.api.trainingjob import ServedLatencySpec
from flownexus.modeldeployment import children as md
from flownexus.trainingjob.children import resolve_served_latency
from flownexus_trainer.config import ConfigError
from flownexus_trainer.served_latency import (
    CANDIDATE_DIR,
    Ports,
    ServedLatencyConfig,
    candidate_dir,
    conclude,
    config_properties,
    drive,
    finalize,
    latency_threshold,
    main,
    model_settings,
    percentile,
    render_config,
    request_bodies,
    run,
    termination_summary,
)
from tests.factories import model_deployment, neural_cluster


def properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def md_context(serving: dict[str, Any]) -> md.ServingContext:
    overrides: dict[str, Any] = {"spec.serving": serving}
    manifest = model_deployment(**overrides)
    manifest["metadata"]["uid"] = "uid-1"
    return md.ServingContext(
        owner=manifest,
        spec=ModelDeploymentSpec.model_validate(manifest["spec"]),
        cluster=NeuralClusterSpec.model_validate(neural_cluster()["spec"]),
        artifact_claim="demo-artifacts",
    )


# ---- same TorchServe settings as a ModelDeployment ------------------------------------------------------------

# What may differ: where TorchServe listens and keeps its archive (loopback, ports and paths of the validator pod).
PLACE_KEYS = {"inference_address", "management_address", "metrics_address", "model_store", "allowed_urls"}


@pytest.mark.parametrize(
    ("batch", "delay", "workers"), [(32, 5, 1), (1, 0, 1), (8, 100, 3), (64, 20, 2)]
)  # fmt: skip
def test_config_properties_match_the_modeldeployments_but_for_addresses_and_paths(
    batch: int, delay: int, workers: int
) -> None:
    ctx = md_context({"batchSize": batch, "maxBatchDelayMs": delay, "workersPerModel": workers})
    operator = properties(md.config_properties(ctx))
    ours = properties(config_properties(Ports(18080, 18081, 18082), Path("/srv/flownexus/model-store"), "digits",
                                        workers))  # fmt: skip
    assert set(ours) == set(operator)
    assert {k: v for k, v in ours.items() if k not in PLACE_KEYS} == {
        k: v for k, v in operator.items() if k not in PLACE_KEYS
    }
    assert ours["inference_address"] == "http://127.0.0.1:18080"
    assert ours["metrics_address"] == "http://127.0.0.1:18082"


@pytest.mark.parametrize(("batch", "delay", "workers"), [(32, 5, 1), (1, 0, 1), (8, 100, 3)])
def test_model_settings_match_the_modeldeployments(batch: int, delay: int, workers: int) -> None:
    ctx = md_context({"batchSize": batch, "maxBatchDelayMs": delay, "workersPerModel": workers})
    cfg = ServedLatencyConfig(batch_size=batch, max_batch_delay_ms=delay, workers=workers)
    assert model_settings("digits", cfg) == md.model_settings(ctx)


def test_the_models_line_keys_the_settings_by_archive_version_like_the_init_container() -> None:
    cfg = ServedLatencyConfig(batch_size=4, max_batch_delay_ms=7)
    text = render_config(Ports(1, 2, 3), Path("/s"), "digits", "2.1.0", cfg)
    models = json.loads(properties(text)["models"])
    assert models["digits"]["2.1.0"]["batchSize"] == 4 and models["digits"]["2.1.0"]["maxBatchDelay"] == 7


def test_defaults_equal_the_api_defaults_and_the_modeldeployment_serving_defaults() -> None:
    api, serving, ours = ServedLatencySpec(), ServingSpec(), ServedLatencyConfig()
    assert (ours.batch_size, ours.max_batch_delay_ms, ours.workers) == (
        serving.batch_size, serving.max_batch_delay_ms, serving.workers_per_model
    )  # fmt: skip
    resolved = resolve_served_latency(api, None)  # what the operator writes when nothing is named
    assert ours.to_dict() == {k: v for k, v in resolved.to_wire().items() if k != "resources"}
    assert ServedLatencyConfig.from_dict(None) == ours


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"batchSize": "32"}, "validation.servedLatency.batchSize"),
        ({"concurrency": 0}, "validation.servedLatency.concurrency: must be >= 1, got 0"),
        ({"maxBatchDelayMs": -1}, "validation.servedLatency.maxBatchDelayMs: must be >= 0, got -1"),
        ({"requests": True}, "validation.servedLatency.requests"),
        ([1, 2], "validation.servedLatency: must be an object"),
    ],
)
def test_bad_served_latency_config_names_the_field(raw: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        ServedLatencyConfig.from_dict(raw)


# ---- numbers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values", [[5.0], [1.0, 2.0], [3.0, 1.0, 2.0, 10.0], list(np.random.default_rng(1).gamma(2, 3, 257))]
)
@pytest.mark.parametrize("q", [0, 50, 95, 99, 100])
def test_percentile_equals_numpys_linear_percentile(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_each_request_carries_one_raw_row_as_the_handler_reads_it() -> None:
    bodies = request_bodies([[0, 1.5, 16], [2, 3, 4]])
    assert [json.loads(b) for b in bodies] == [{"inputs": [0.0, 1.5, 16.0]}, {"inputs": [2.0, 3.0, 4.0]}]


@pytest.mark.parametrize(
    ("limit", "p95", "passed", "message"),
    [
        (100.0, 12.5, True, "maxLatencyP95Ms: served p95 latency (ms) 12.5 <= 100"),
        (100.0, 127.0, False, "maxLatencyP95Ms: served p95 latency (ms) 127 > 100"),
        (10.0, 10.0, True, "maxLatencyP95Ms: served p95 latency (ms) 10 <= 10"),
    ],
)
def test_latency_threshold_applies_to_the_served_p95(limit: float, p95: float, passed: bool, message: str) -> None:
    (result,) = latency_threshold(limit, p95)
    assert (result.name, result.passed, result.message) == ("maxLatencyP95Ms", passed, message)


def test_no_latency_threshold_when_it_is_off() -> None:
    assert latency_threshold(None, 500.0) == []


# ---- the verdict -------------------------------------------------------------------------------------------


def candidate(passed_quality: bool = True) -> dict[str, Any]:
    result = {"name": "minAccuracy", "value": 0.97 if passed_quality else 0.5, "limit": 0.85,
              "passed": passed_quality, "message": "minAccuracy: test accuracy ..."}  # fmt: skip
    return {
        "passed": passed_quality,
        "failedThresholds": [] if passed_quality else [{"name": "minAccuracy", "message": result["message"]}],
        "results": [result],
        "metrics": {
            "testAccuracy": 0.97,
            "latencyMs": {"p50": 0.04, "p95": 0.06, "p99": 0.08},
            "modelLatencyMs": {"p50": 0.04, "p95": 0.06, "p99": 0.08},
        },
        "artifacts": {
            "candidateArchive": "ns/run/candidate/digits.mar",
            "exports": [{"format": "torchscript", "status": "written", "path": "ns/run/exports/m.pt"}],
        },
        "artifactRoot": "/artifacts",
        "runDir": "ns/run",
        "task": "classification",
        "maxLatencyP95Ms": 100.0,
        "summary": {
            "passed": passed_quality,
            "failed": [],
            "testAccuracy": 0.97,
            "latencyP95Ms": 0.06,
            "runDir": "ns/run",
            "modelArchive": None,
            "balancedAccuracy": 0.96,
        },
    }


SERVED = {"p50": 8.0, "p95": 11.0, "p99": 15.0, "batchSize": 32, "maxBatchDelayMs": 5, "workers": 1,
          "concurrency": 1, "requests": 300, "samples": 300, "errors": 0, "requestsPerSecond": 110.0,
          "measuredAs": "served"}  # fmt: skip


@pytest.mark.parametrize(
    ("quality", "p95", "passed", "failed"),
    [(True, 11.0, True, []), (True, 127.0, False, ["maxLatencyP95Ms"]), (False, 11.0, False, ["minAccuracy"]),
     (False, 127.0, False, ["minAccuracy", "maxLatencyP95Ms"])],
)  # fmt: skip
def test_final_verdict_passes_only_when_quality_and_served_latency_pass(
    quality: bool, p95: float, passed: bool, failed: list[str]
) -> None:
    verdict = finalize(candidate(quality), {**SERVED, "p95": p95}, latency_threshold(100.0, p95))
    assert verdict["passed"] is passed
    assert [f["name"] for f in verdict["failedThresholds"]] == failed
    assert verdict["metrics"]["latencyMs"]["p95"] == p95
    assert verdict["metrics"]["modelLatencyMs"]["p95"] == 0.06
    assert not {"summary", "task", "maxLatencyP95Ms"} & set(verdict)


def test_termination_summary_keeps_the_candidates_keys_and_reports_served_latency() -> None:
    verdict = finalize(candidate(), SERVED, latency_threshold(100.0, 11.0))
    verdict["artifacts"]["modelArchive"] = "ns/run/model-store/digits.mar"
    summary = termination_summary(candidate()["summary"], verdict)
    assert summary["balancedAccuracy"] == 0.96  # the candidate step's own keys stay
    assert (summary["latencyP50Ms"], summary["latencyP95Ms"], summary["latencyP99Ms"]) == (8.0, 11.0, 15.0)
    assert summary["modelLatencyP95Ms"] == 0.06
    assert summary["servedLatency"] == {"batchSize": 32, "maxBatchDelayMs": 5, "workers": 1, "concurrency": 1,
                                        "samples": 300}  # fmt: skip
    assert summary["passed"] is True and summary["modelArchive"] == "ns/run/model-store/digits.mar"
    assert len(json.dumps(summary)) < 4096


def staged_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "ns" / "run"
    (run_dir / CANDIDATE_DIR).mkdir(parents=True)
    (run_dir / CANDIDATE_DIR / "digits.mar").write_bytes(b"archive")
    (run_dir / "exports").mkdir()
    (run_dir / "exports" / "m.pt").write_bytes(b"scripted")
    (run_dir / "metadata.json").write_text(json.dumps({"thresholds": {"maxLatencyP95Ms": None}, "verdict": {}}))
    (run_dir / "report.md").write_text("# report\n")
    return run_dir


def test_a_pass_promotes_the_archive_into_model_store(tmp_path: Path) -> None:
    run_dir = staged_run(tmp_path)
    verdict = conclude(run_dir, tmp_path, run_dir / CANDIDATE_DIR / "digits.mar", "digits", candidate(), SERVED, 100.0)
    assert verdict["passed"] and verdict["artifacts"]["modelArchive"] == "ns/run/model-store/digits.mar"
    assert (run_dir / "model-store" / "digits.mar").read_bytes() == b"archive"
    assert not (run_dir / CANDIDATE_DIR / "digits.mar").exists()
    assert json.loads((run_dir / "validation.json").read_text())["passed"] is True
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["thresholds"]["maxLatencyP95Ms"] == 100.0 and metadata["verdict"]["passed"] is True
    assert metadata["thresholds"]["servedLatency"]["maxBatchDelayMs"] == 5
    assert "## Served latency (the gate)" in (run_dir / "report.md").read_text()


def test_a_served_latency_failure_leaves_no_archive_and_no_exports(tmp_path: Path) -> None:
    run_dir = staged_run(tmp_path)
    (run_dir / "model-store").mkdir()
    (run_dir / "model-store" / "digits.mar").write_bytes(b"an earlier run's")
    staged = run_dir / CANDIDATE_DIR / "digits.mar"
    verdict = conclude(run_dir, tmp_path, staged, "digits", candidate(), {**SERVED, "p95": 127.0}, 100.0)
    assert verdict["passed"] is False
    assert [f["name"] for f in verdict["failedThresholds"]] == ["maxLatencyP95Ms"]
    assert "modelArchive" not in verdict["artifacts"] and "exports" not in verdict["artifacts"]
    assert not (run_dir / "model-store" / "digits.mar").exists()
    assert not (run_dir / "exports" / "m.pt").exists()
    assert "FAIL maxLatencyP95Ms: served p95 latency (ms) 127 > 100" in (run_dir / "report.md").read_text()


def test_a_candidate_error_is_relayed(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    run_dir = tmp_path / "ns" / "run"
    (run_dir / CANDIDATE_DIR).mkdir(parents=True)
    (run_dir / CANDIDATE_DIR / "verdict.json").write_text(json.dumps({"passed": False, "error": "InputError: x"}))
    config.write_text(json.dumps({"paths": {"artifactRoot": str(tmp_path), "runDir": str(run_dir)}}))
    with pytest.raises(RuntimeError, match="InputError: x"):
        run(str(config), tmp_path / "work")
    # Through main: the pod's termination message is the first step's own failure, retryable flag included.
    (run_dir / CANDIDATE_DIR / "verdict.json").write_text(
        json.dumps({"passed": False, "error": "InputError: x", "retryable": False})
    )
    log = tmp_path / "termination-log"
    assert main(["--config", str(config), "--termination-log", str(log), "--work-dir", str(tmp_path / "w")]) == 2
    assert json.loads(log.read_text()) == {"passed": False, "error": "InputError: x", "retryable": False}


def test_the_hand_over_dir_is_the_pods_emptydir_when_set_else_under_the_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLOWNEXUS_CANDIDATE_DIR", raising=False)
    assert candidate_dir(tmp_path / "run") == tmp_path / "run" / "candidate"
    monkeypatch.setenv("FLOWNEXUS_CANDIDATE_DIR", "/srv/flownexus/candidate")
    assert candidate_dir(tmp_path / "run") == Path("/srv/flownexus/candidate")


def test_no_candidate_verdict_is_an_error_naming_the_file(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"paths": {"artifactRoot": str(tmp_path), "runDir": str(tmp_path / "r")}}))
    with pytest.raises(RuntimeError, match=r"left no verdict at .*candidate/verdict\.json"):
        run(str(config), tmp_path / "work")


# ---- the load generator against a real HTTP server ---------------------------------------------------------------


class _Slow(BaseHTTPRequestHandler):
    delay_s = 0.02
    fail_every = 0
    seen: list[bytes] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            self.seen.append(body)
            count = len(self.seen)
        time.sleep(self.delay_s)
        status = 500 if self.fail_every and count % self.fail_every == 0 else 200
        payload = b'{"predictions": []}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def slow_server() -> Iterator[tuple[str, type[_Slow]]]:
    handler = type("Handler", (_Slow,), {"seen": [], "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/predictions/digits", handler
    finally:
        server.shutdown()
        server.server_close()


def test_drive_times_each_request_from_the_client_and_skips_the_warmup(slow_server: tuple[str, type[_Slow]]) -> None:
    url, handler = slow_server
    result = drive(url, request_bodies([[1.0], [2.0]]), concurrency=2, requests=30, warmup=4)
    assert result.samples == 30 and result.errors == 0
    assert len(handler.seen) == 34
    assert 20.0 <= result.p50 <= result.p95 <= result.p99 <= result.max
    # Two clients, ~20 ms each: about 100 requests a second, not 50 (one client) and not unbounded.
    assert 60 <= result.requests_per_second <= 110


def test_drive_counts_failed_requests_and_keeps_the_first_error(slow_server: tuple[str, type[_Slow]]) -> None:
    url, handler = slow_server
    handler.fail_every = 5
    handler.delay_s = 0.0
    result = drive(url, request_bodies([[1.0]]), concurrency=1, requests=20, warmup=0)
    assert (result.samples, result.errors) == (16, 4)
    assert result.first_error.startswith("HTTP 500")


def test_the_served_step_imports_nothing_the_server_image_lacks() -> None:
    # The server image has torch, TorchServe and numpy, but neither scikit-learn nor matplotlib; the served step
    # needs none of them, not even torch.
    code = (
        "import sys, flownexus_trainer.served_latency; "
        "print(sorted(m for m in ('sklearn', 'matplotlib', 'torch', 'pandas') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
