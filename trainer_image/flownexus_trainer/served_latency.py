"""The served-latency step of the validator: the candidate archive in a real TorchServe, timed by its clients.

The validator pod runs ``python -m flownexus_trainer.validate --stage candidate`` first (trainer image, an init
container): it measures quality, writes ``<model>.mar``, the test rows as a client sends them (``requests.json``)
and its verdict so far (``verdict.json``) into the hand-over directory (``$FLOWNEXUS_CANDIDATE_DIR``: an emptyDir
of the pod; ``<runDir>/candidate`` outside one). Then this module runs in the server image, the image a
ModelDeployment serves with:

1. start TorchServe on loopback with the settings a ModelDeployment renders (``config_properties`` and
   ``model_settings`` mirror ``flownexus.modeldeployment.children``; a unit test holds them equal): batch size,
   max batch delay, workers, response timeout, one intra-op thread per worker (``OMP_NUM_THREADS=1``);
2. post ``requests`` one-row requests (``{"inputs": [f1, ...]}``, raw features, the test split in turn) from
   ``concurrency`` closed-loop clients, each on its own keep-alive connection, after 20 warm-up requests;
3. apply ``maxLatencyP95Ms`` to the client-side p95 (the in-process figure stays as ``modelLatencyMs``);
4. write the final ``validation.json``, update ``metadata.json`` and ``report.md``, and only on a pass move the
   archive into ``model-store/``; the verdict goes to the termination message, which the operator reads.

Standard library plus the package's torch-free modules only: the server image has neither scikit-learn nor
matplotlib. Exit status: 0 when the gate decided (passed or rejected), 2 when it could not decide.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, _get, load_config
from .errors import TERMINATION_LOG, failure_summary, write_termination_message
from .thresholds import ThresholdResult

log = logging.getLogger(__name__)

CANDIDATE_DIR = "candidate"
# Where the two steps hand over: in the pod an emptyDir only its two containers mount (nothing else can plant a
# verdict between them); outside a pod ``<runDir>/candidate``.
CANDIDATE_ENV = "FLOWNEXUS_CANDIDATE_DIR"
VERDICT_FILE = "verdict.json"
REQUESTS_FILE = "requests.json"
WARMUP_REQUESTS = 20
RESPONSE_TIMEOUT_S = 120  # the ModelDeployment's (flownexus.modeldeployment.children.RESPONSE_TIMEOUT_S)
READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ServedLatencyConfig:
    """``validation.servedLatency``; the defaults are the ModelDeployment's ``spec.serving`` defaults."""

    batch_size: int = 32
    max_batch_delay_ms: int = 5
    workers: int = 1
    concurrency: int = 1
    requests: int = 300

    @classmethod
    def from_dict(cls, raw: Any, path: str = "validation.servedLatency") -> ServedLatencyConfig:
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: must be an object, got {raw!r}")
        cfg = cls(
            batch_size=_get(raw, "batchSize", 32, int, path),
            max_batch_delay_ms=_get(raw, "maxBatchDelayMs", 5, int, path),
            workers=_get(raw, "workers", 1, int, path),
            concurrency=_get(raw, "concurrency", 1, int, path),
            requests=_get(raw, "requests", 300, int, path),
        )
        for key, value, low in (("batchSize", cfg.batch_size, 1), ("maxBatchDelayMs", cfg.max_batch_delay_ms, 0),
                                ("workers", cfg.workers, 1), ("concurrency", cfg.concurrency, 1),
                                ("requests", cfg.requests, 1)):  # fmt: skip
            if value < low:
                raise ConfigError(f"{path}.{key}: must be >= {low}, got {value}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return {
            "batchSize": self.batch_size,
            "maxBatchDelayMs": self.max_batch_delay_ms,
            "workers": self.workers,
            "concurrency": self.concurrency,
            "requests": self.requests,
        }


def candidate_dir(run_dir: Path) -> Path:
    """The hand-over directory of the two validator steps: ``$FLOWNEXUS_CANDIDATE_DIR``, else ``<runDir>/candidate``."""
    return Path(os.environ.get(CANDIDATE_ENV) or run_dir / CANDIDATE_DIR)


def read_served_config(config_path: str | None) -> ServedLatencyConfig:
    """``validation.servedLatency`` of the job config (``$FLOWNEXUS_CONFIG`` when no path is given)."""
    location = config_path or os.environ.get("FLOWNEXUS_CONFIG") or ""
    with open(location, encoding="utf-8") as fh:
        raw = json.load(fh)
    validation = raw.get("validation") if isinstance(raw, dict) else None
    return ServedLatencyConfig.from_dict((validation or {}).get("servedLatency"))


# ---- TorchServe config, as a ModelDeployment renders it -------------------------------------------------


@dataclass(frozen=True)
class Ports:
    inference: int
    management: int
    metrics: int


def config_properties(ports: Ports, model_store: Path, model_name: str, workers: int) -> str:
    """TorchServe's config.properties as ``flownexus.modeldeployment.children.config_properties`` renders it
    without token authorization, every listener on loopback (nothing outside the pod needs to reach it)."""
    lines = [
        "# Rendered by flownexus_trainer.served_latency like a ModelDeployment's; listeners on loopback.",
        f"inference_address=http://127.0.0.1:{ports.inference}",
        f"management_address=http://127.0.0.1:{ports.management}",
        f"metrics_address=http://127.0.0.1:{ports.metrics}",
        "grpc_inference_address=127.0.0.1",
        "grpc_management_address=127.0.0.1",
        "metrics_mode=prometheus",
        "enable_metrics_api=true",
        "model_metrics_auto_detect=true",
        "enable_model_api=false",
        f"model_store={model_store}",
        f"allowed_urls=file://{model_store}/.*\\\\.mar",
        f"load_models={model_name}={model_name}.mar",
        "install_py_dep_per_model=false",
        "enable_envvars_config=false",
        f"default_workers_per_model={workers}",
        f"default_response_timeout={RESPONSE_TIMEOUT_S}",
        "async_logging=true",
        "disable_token_authorization=true",
    ]
    return "\n".join(lines) + "\n"


def model_settings(model_name: str, cfg: ServedLatencyConfig) -> dict[str, Any]:
    """The per-model settings, as ``flownexus.modeldeployment.children.model_settings`` renders them."""
    return {
        "marName": f"{model_name}.mar",
        "minWorkers": cfg.workers,
        "maxWorkers": cfg.workers,
        "batchSize": cfg.batch_size,
        "maxBatchDelay": cfg.max_batch_delay_ms,
        "responseTimeout": RESPONSE_TIMEOUT_S,
        "defaultVersion": True,
    }


def archive_version(archive: Path) -> str:
    """The version in the archive's manifest: TorchServe applies per-model settings only under that key."""
    try:
        with zipfile.ZipFile(archive) as mar:
            return str(json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"])
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise ValueError(f"{archive} is not a TorchServe model archive: {exc}") from exc


def render_config(ports: Ports, model_store: Path, model_name: str, version: str, cfg: ServedLatencyConfig) -> str:
    """The whole config.properties, with the ``models=`` line the ModelDeployment's init container appends."""
    models = {model_name: {version: model_settings(model_name, cfg)}}
    return config_properties(ports, model_store, model_name, cfg.workers) + (
        "models=" + json.dumps(models, separators=(",", ":")) + "\n"
    )


# ---- numbers --------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile: q must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LatencyResult:
    """Client-side latency of the measured requests (warm-up excluded)."""

    p50: float
    p95: float
    p99: float
    mean: float
    max: float
    samples: int
    errors: int
    seconds: float
    first_error: str = ""

    @property
    def requests_per_second(self) -> float:
        return (self.samples + self.errors) / self.seconds if self.seconds > 0 else 0.0


def summarize(timings_ms: Sequence[float], errors: int, seconds: float, first_error: str = "") -> LatencyResult:
    if not timings_ms:
        raise RuntimeError(f"no request was answered ({errors} failed; first: {first_error or 'none'})")
    return LatencyResult(
        p50=percentile(timings_ms, 50),
        p95=percentile(timings_ms, 95),
        p99=percentile(timings_ms, 99),
        mean=sum(timings_ms) / len(timings_ms),
        max=max(timings_ms),
        samples=len(timings_ms),
        errors=errors,
        seconds=seconds,
        first_error=first_error,
    )


def request_bodies(rows: Sequence[Sequence[float]]) -> list[bytes]:
    """One request per row, the way a client sends a single prediction: ``{"inputs": [f1, f2, ...]}``."""
    if not rows:
        raise ValueError("no test rows to send")
    return [json.dumps({"inputs": [float(v) for v in row]}, separators=(",", ":")).encode() for row in rows]


# ---- the load ---------------------------------------------------------------------------------------------


@dataclass
class _Shared:
    next_index: int = 0
    timings: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)


def _client(host: str, port: int, path: str, bodies: Sequence[bytes], total: int, shared: _Shared) -> None:
    """One closed-loop client on a keep-alive connection: take the next request number, send, wait, repeat."""
    conn = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
    headers = {"Content-Type": "application/json"}
    try:
        while True:
            with shared.lock:
                index = shared.next_index
                if index >= total:
                    return
                shared.next_index += 1
            body = bodies[index % len(bodies)]
            started = time.perf_counter()
            error = ""
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                if response.status != 200:
                    error = f"HTTP {response.status}: {payload[:200].decode(errors='replace')}"
            except (OSError, http.client.HTTPException) as exc:
                error = f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            with shared.lock:
                if error:
                    shared.errors += 1
                    shared.first_error = shared.first_error or error
                else:
                    shared.timings.append(elapsed_ms)
    finally:
        conn.close()


def _clients(host: str, port: int, path: str, bodies: Sequence[bytes], concurrency: int, total: int) -> _Shared:
    shared = _Shared()
    threads = [
        threading.Thread(target=_client, args=(host, port, path, bodies, total, shared), daemon=True)
        for _ in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return shared


def drive(url: str, bodies: Sequence[bytes], concurrency: int, requests: int, warmup: int = WARMUP_REQUESTS
          ) -> LatencyResult:  # fmt: skip
    """``warmup`` untimed requests, then ``requests`` timed ones, each phase from ``concurrency`` clients."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.hostname is None or parsed.port is None:
        raise ValueError(f"url needs a host and a port: {url!r}")
    if warmup:
        _clients(parsed.hostname, parsed.port, parsed.path, bodies, concurrency, warmup)
    started = time.perf_counter()
    shared = _clients(parsed.hostname, parsed.port, parsed.path, bodies, concurrency, requests)
    return summarize(shared.timings, shared.errors, time.perf_counter() - started, shared.first_error)


# ---- TorchServe -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except Exception:  # psutil missing or the process gone: the process group is still signalled
        return []


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Stop what we started: TorchServe's launcher, its Java frontend and the Python workers, by pid and group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def _worker_ready(management: str, model_name: str) -> bool:
    try:
        with urllib.request.urlopen(f"{management}/models/{model_name}", timeout=5) as resp:
            described = json.load(resp)
    except (OSError, ValueError):
        return False
    return any(w.get("status") == "READY" for entry in described for w in entry.get("workers", []))


@contextlib.contextmanager
def torchserve(archive: Path, model_name: str, cfg: ServedLatencyConfig, work: Path,
               ready_timeout: float = READY_TIMEOUT_S) -> Iterator[str]:  # fmt: skip
    """A TorchServe on loopback serving ``archive`` as ``model_name``; yields the prediction URL."""
    store, run, tmp = work / "model-store", work / "run", work / "tmp"
    for directory in (store, run, tmp):
        directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(archive, store / f"{model_name}.mar")
    ports = Ports(free_port(), free_port(), free_port())
    config = work / "config.properties"
    config.write_text(render_config(ports, store, model_name, archive_version(archive), cfg), encoding="utf-8")
    log_path = run / "torchserve.log"
    # The ModelDeployment's container environment: HOME and the working dir writable, one thread per worker.
    env = {**os.environ, "HOME": str(run), "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = ["torchserve", "--foreground", "--ncs", "--ts-config", str(config), "--model-store", str(store)]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=run, env=env, start_new_session=True)
    management = f"http://127.0.0.1:{ports.management}"
    try:
        deadline = time.monotonic() + ready_timeout
        while not _worker_ready(management, model_name):
            if proc.poll() is not None or time.monotonic() > deadline:
                exited = proc.poll() is not None
                what = f"exited with {proc.returncode}" if exited else f"not ready in {ready_timeout:g} s"
                tail = log_path.read_text(encoding="utf-8", errors="replace")[-1500:]
                raise RuntimeError(f"TorchServe {what}; log tail: {tail}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{ports.inference}/predictions/{model_name}"
    finally:
        stop_process(proc)


# ---- the verdict -------------------------------------------------------------------------------------------


def latency_json(result: LatencyResult, cfg: ServedLatencyConfig) -> dict[str, Any]:
    """``metrics.latencyMs`` of validation.json: the served figures and the setting they were measured under."""
    return {
        "p50": round(result.p50, 4),
        "p95": round(result.p95, 4),
        "p99": round(result.p99, 4),
        "mean": round(result.mean, 4),
        "max": round(result.max, 4),
        "samples": result.samples,
        "errors": result.errors,
        "requestsPerSecond": round(result.requests_per_second, 1),
        "device": "cpu",
        "measuredAs": "served",
        **cfg.to_dict(),
    }


def latency_threshold(limit: float | None, p95: float) -> list[ThresholdResult]:
    """``maxLatencyP95Ms`` against the served p95, worded like the other thresholds; nothing when it is off."""
    if limit is None:
        return []
    if math.isnan(p95):
        return [ThresholdResult("maxLatencyP95Ms", None, limit, False, "maxLatencyP95Ms: served p95 latency (ms) "
                                "was not measured")]  # fmt: skip
    passed = p95 <= limit
    message = f"maxLatencyP95Ms: served p95 latency (ms) {p95:.4g} {'<=' if passed else '>'} {limit:g}"
    return [ThresholdResult("maxLatencyP95Ms", round(p95, 6), limit, passed, message)]


# Keys of candidate/verdict.json that are hand-over between the two steps, not part of validation.json.
HANDOVER_KEYS = ("summary", "task", "maxLatencyP95Ms")


def finalize(candidate: dict[str, Any], latency: dict[str, Any], results: list[ThresholdResult]) -> dict[str, Any]:
    """The final verdict: the candidate's (quality) results plus the served-latency one; passed only if all pass."""
    all_results = [*candidate["results"], *(r.to_json() for r in results)]
    failed = [r for r in all_results if not r["passed"]]
    return {
        **{k: v for k, v in candidate.items() if k not in HANDOVER_KEYS},
        "passed": not failed,
        "failedThresholds": [{"name": r["name"], "message": r["message"]} for r in failed],
        "results": all_results,
        "metrics": {**candidate["metrics"], "latencyMs": latency},
    }


def termination_summary(candidate_summary: dict[str, Any], verdict: dict[str, Any]) -> dict[str, Any]:
    """The candidate step's termination summary (``validate.termination_summary``), with the final verdict and
    the served latency: ``latencyP*Ms`` are served figures, ``modelLatencyP95Ms`` the in-process forward pass."""
    metrics, latency = verdict["metrics"], verdict["metrics"]["latencyMs"]
    model = metrics.get("modelLatencyMs")
    keys = ("batchSize", "maxBatchDelayMs", "workers", "concurrency", "samples")
    return {
        **candidate_summary,
        "passed": verdict["passed"],
        "failed": [f["message"] for f in verdict["failedThresholds"]],
        "latencyP50Ms": round(latency["p50"], 4),
        "latencyP95Ms": round(latency["p95"], 4),
        "latencyP99Ms": round(latency["p99"], 4),
        "modelLatencyP95Ms": round(model["p95"], 4) if model else None,
        "servedLatency": {k: latency[k] for k in keys},
        "modelArchive": verdict["artifacts"].get("modelArchive"),
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic: a reader sees the old file or the new one, never half of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


def _report_section(verdict: dict[str, Any], latency: dict[str, Any], results: list[ThresholdResult]) -> str:
    lines = [
        "",
        "## Served latency (the gate)",
        "",
        f"TorchServe with batchSize {latency['batchSize']}, maxBatchDelay {latency['maxBatchDelayMs']} ms, "
        f"{latency['workers']} worker(s); {latency['concurrency']} client(s) posting one row per request, "
        f"{latency['samples']} answered, {latency['errors']} failed, {latency['requestsPerSecond']} req/s: "
        f"p50 {latency['p50']:.2f} ms, p95 {latency['p95']:.2f} ms, p99 {latency['p99']:.2f} ms.",
        "",
        *(f"- {'PASS' if r.passed else 'FAIL'} {r.message}" for r in results),
        "",
        f"**Final verdict: {'passed' if verdict['passed'] else 'rejected'}**"
        + "".join(f"; {f['message']}" for f in verdict["failedThresholds"]),
        "",
    ]
    return "\n".join(lines)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


SETTINGS_KEYS = ("batchSize", "maxBatchDelayMs", "workers", "concurrency", "requests")


def withdraw_exports(artifacts: dict[str, Any], artifact_root: Path) -> None:
    """Remove a rejected model's exported files and schema, and their entries: only a validated model is shipped."""
    for export in artifacts.pop("exports", []):
        if export.get("path"):
            (artifact_root / export["path"]).unlink(missing_ok=True)
    schema = artifacts.pop("exportSchema", None)
    if schema:
        (artifact_root / schema).unlink(missing_ok=True)


def conclude(run_dir: Path, artifact_root: Path, staged: Path, model_name: str, candidate: dict[str, Any],
             latency: dict[str, Any], limit: float | None) -> dict[str, Any]:  # fmt: skip
    """Write the final verdict; the archive moves into model-store/ only when every threshold passed."""
    results = latency_threshold(limit, float(latency["p95"]))
    verdict = finalize(candidate, latency, results)
    store = run_dir / "model-store"
    target = store / f"{model_name}.mar"
    artifacts = dict(verdict["artifacts"])
    artifacts.pop("candidateArchive", None)
    if verdict["passed"]:
        store.mkdir(parents=True, exist_ok=True)
        part = store / f".{model_name}.mar.part"
        shutil.copyfile(staged, part)
        os.replace(part, target)
        artifacts["modelArchive"] = _relative(target, artifact_root)
    else:
        # Only a validated model may be served: no archive, and no exports of a rejected model.
        target.unlink(missing_ok=True)
        artifacts.pop("modelArchive", None)
        withdraw_exports(artifacts, artifact_root)
    staged.unlink(missing_ok=True)
    verdict["artifacts"] = artifacts
    metadata_path = run_dir / "metadata.json"
    if metadata_path.exists():
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
        metadata.setdefault("thresholds", {})["maxLatencyP95Ms"] = limit
        metadata["thresholds"]["servedLatency"] = {k: latency[k] for k in SETTINGS_KEYS}
        metadata["metrics"] = verdict["metrics"]
        metadata["results"] = verdict["results"]
        failed_names = [f["name"] for f in verdict["failedThresholds"]]
        metadata["verdict"] = {"passed": verdict["passed"], "failedThresholds": failed_names}
        metadata["artifacts"] = artifacts
        _write_json(metadata_path, metadata)
    report = run_dir / "report.md"
    if report.exists():
        text = report.read_text(encoding="utf-8") + _report_section(verdict, latency, results)
        report.write_text(text, encoding="utf-8")
    _write_json(run_dir / "validation.json", verdict)
    return verdict


def measure_served(handover: Path, model_name: str, cfg: ServedLatencyConfig, work: Path) -> LatencyResult:
    """Serve the candidate archive and time ``cfg.requests`` one-row requests at ``cfg.concurrency``."""
    rows = json.loads((handover / REQUESTS_FILE).read_text(encoding="utf-8"))["rows"]
    bodies = request_bodies(rows)
    with torchserve(handover / f"{model_name}.mar", model_name, cfg, work) as url:
        result = drive(url, bodies, cfg.concurrency, cfg.requests)
    if result.errors:
        raise RuntimeError(f"{result.errors} of {result.errors + result.samples} requests failed: {result.first_error}")
    return result


class CandidateFailed(RuntimeError):
    """The first step could not validate; its own failure summary (error, retryable) is relayed as it is."""

    def __init__(self, summary: dict[str, Any]) -> None:
        super().__init__(str(summary.get("error")))
        self.summary = {"passed": False, **summary}


def run(config_path: str | None, work: Path) -> dict[str, Any]:
    """The whole served step; returns the termination summary."""
    job = load_config(config_path)
    cfg = read_served_config(config_path)
    run_dir = job.run_dir
    handover = candidate_dir(run_dir)
    verdict_path = handover / VERDICT_FILE
    if not verdict_path.exists():
        raise RuntimeError(f"the validate step left no verdict at {verdict_path} (see its log)")
    candidate: dict[str, Any] = json.loads(verdict_path.read_text(encoding="utf-8"))
    if "error" in candidate:
        raise CandidateFailed(candidate)
    result = measure_served(handover, job.output.model_name, cfg, work)
    latency = latency_json(result, cfg)
    log.info("served latency: %s", json.dumps(latency))
    staged = handover / f"{job.output.model_name}.mar"
    verdict = conclude(run_dir, job.artifact_root, staged, job.output.model_name, candidate, latency,
                       job.validation.max_latency_p95_ms)  # fmt: skip
    return termination_summary(candidate.get("summary") or {}, verdict)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="config JSON (default: $FLOWNEXUS_CONFIG)")
    parser.add_argument("--termination-log", default=str(TERMINATION_LOG))
    parser.add_argument("--work-dir", help="writable dir for TorchServe (default: a new one under $TMPDIR)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.work_dir:
            summary = run(args.config, Path(args.work_dir))
        else:
            with tempfile.TemporaryDirectory(prefix="served-latency-") as work:
                summary = run(args.config, Path(work))
    except CandidateFailed as exc:
        log.error("the validate step could not run: %s", exc)
        write_termination_message(exc.summary, Path(args.termination_log))
        return 2
    except Exception as exc:
        log.exception("the served-latency step could not run")
        write_termination_message({"passed": False, **failure_summary(exc)}, Path(args.termination_log))
        return 2
    failures = "".join(f"; {m}" for m in summary["failed"])
    log.info("validation %s%s", "passed" if summary["passed"] else "FAILED", failures)
    write_termination_message(summary, Path(args.termination_log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
