"""The validator's two steps as the pod runs them: ``flownexus_trainer.candidate`` (quality, the candidate
archive), then ``flownexus_trainer.served_latency`` (that archive in a real TorchServe, timed by its clients)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.trainer.procs import DIGITS_CONFIG, DigitsRun, subprocess_env, write_job_config

pytestmark = pytest.mark.integration

RUN_FILES = ("model", "training_summary.json", "metrics.jsonl")


def _run(module: str, config: Path, termination_log: Path, timeout: float = 300) -> tuple[int, dict[str, Any]]:
    cmd = [sys.executable, "-m", module, "--config", str(config), "--termination-log", str(termination_log)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=timeout, check=False)
    assert termination_log.exists(), done.stderr[-4000:]
    summary: dict[str, Any] = json.loads(termination_log.read_text())
    return done.returncode, summary


@pytest.fixture(scope="module")
def staged(digits_run: DigitsRun) -> tuple[Path, dict[str, Any]]:
    """The candidate step on a copy of the shared digits run (that run's own model-store stays untouched)."""
    root = digits_run.root
    run_dir = root / "it" / "candidate"
    run_dir.mkdir(parents=True)
    for name in RUN_FILES:
        source = digits_run.run_dir / name
        if source.is_dir():
            shutil.copytree(source, run_dir / name)
        elif source.exists():
            shutil.copyfile(source, run_dir / name)
    config = write_job_config(root, "candidate")
    rc, summary = _run("flownexus_trainer.candidate", config, root / "candidate.termination-log")
    assert rc == 0, summary
    return run_dir, summary


def served_run(staged: tuple[Path, dict[str, Any]], name: str, validation: dict[str, Any]) -> tuple[Path, Path]:
    """A fresh copy of the staged run, and a config with these validation settings, for one served step."""
    run_dir = staged[0].parent / name
    shutil.copytree(staged[0], run_dir)
    config = write_job_config(run_dir.parent.parent, name, validation={**DIGITS_CONFIG["validation"], **validation})
    return run_dir, config


def test_candidate_step_stages_archive_and_rows_but_serves_nothing_yet(staged: tuple[Path, dict[str, Any]]) -> None:
    run_dir, _ = staged
    assert (run_dir / "candidate" / "digits.mar").stat().st_size > 0
    rows = json.loads((run_dir / "candidate" / "requests.json").read_text())["rows"]
    assert len(rows) >= 100 and all(len(row) == 64 for row in rows)
    # Raw digits pixels (0..16), not the standardized values the model sees inside.
    assert min(min(r) for r in rows) >= -1e-4 and max(max(r) for r in rows) <= 16 + 1e-4
    assert not (run_dir / "model-store" / "digits.mar").exists(), "only the served step may publish the archive"
    assert not (run_dir / "validation.json").exists()
    verdict = json.loads((run_dir / "candidate" / "verdict.json").read_text())
    assert "maxLatencyP95Ms" not in [r["name"] for r in verdict["results"]]
    assert verdict["metrics"]["modelLatencyMs"]["p95"] > 0


def test_served_step_gates_on_torchserve_latency_and_publishes_the_archive(
    staged: tuple[Path, dict[str, Any]],
) -> None:
    served = {"batchSize": 32, "maxBatchDelayMs": 5, "workers": 1, "concurrency": 1, "requests": 150}
    run_dir, config = served_run(staged, "served-pass", {"maxLatencyP95Ms": 100.0, "servedLatency": served})
    rc, summary = _run("flownexus_trainer.served_latency", config, run_dir / "termination-log")
    assert rc == 0, summary
    assert summary["passed"] is True, summary
    settings = {k: served[k] for k in ("batchSize", "maxBatchDelayMs", "workers", "concurrency")}
    assert summary["servedLatency"] == {**settings, "samples": 150}
    # One client never fills a batch of 32: every request waits the whole 5 ms delay, plus HTTP, the Java
    # frontend and the worker. The model's own forward pass is reported beside it.
    assert summary["latencyP50Ms"] >= 5.0
    assert summary["modelLatencyP95Ms"] > 0
    assert 0 < summary["latencyP50Ms"] <= summary["latencyP95Ms"] <= summary["latencyP99Ms"]
    assert summary["modelArchive"] == "it/served-pass/model-store/digits.mar"
    assert (run_dir / "model-store" / "digits.mar").exists()
    verdict = json.loads((run_dir / "validation.json").read_text())
    latency_result = next(r for r in verdict["results"] if r["name"] == "maxLatencyP95Ms")
    assert latency_result["passed"] and "served p95" in latency_result["message"]
    assert verdict["metrics"]["latencyMs"]["measuredAs"] == "served"
    assert len(json.dumps(summary)) < 4096


def test_a_batch_delay_no_single_client_can_fill_fails_the_gate_and_publishes_nothing(
    staged: tuple[Path, dict[str, Any]],
) -> None:
    # The old ModelDeployment default: batch 32 / 100 ms. One client never fills a batch, so each request
    # waits the whole 100 ms; the in-process latency (well under 1 ms) would have passed this gate.
    served = {"batchSize": 32, "maxBatchDelayMs": 100, "workers": 1, "concurrency": 1, "requests": 40}
    run_dir, config = served_run(staged, "served-fail", {"maxLatencyP95Ms": 100.0, "servedLatency": served})
    rc, summary = _run("flownexus_trainer.served_latency", config, run_dir / "termination-log")
    assert rc == 0, summary
    assert summary["passed"] is False
    assert summary["latencyP50Ms"] >= 100.0
    assert [m for m in summary["failed"] if m.startswith("maxLatencyP95Ms: served p95 latency (ms)")], summary
    assert summary["modelArchive"] is None
    assert not (run_dir / "model-store" / "digits.mar").exists()
    assert not (run_dir / "candidate" / "digits.mar").exists()
