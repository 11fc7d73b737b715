"""torchrun DDP on this machine: digits to >= 0.94, kill-and-resume, the validator's outputs."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flownexus_trainer.config import load_config
from flownexus_trainer.data import load_splits
from flownexus_trainer.validate import load_trained_model
from tests.integration.trainer.procs import (
    DigitsRun,
    kill_group,
    run_torchrun,
    run_validator,
    start_torchrun,
    write_job_config,
)

pytestmark = pytest.mark.integration

EPOCH_LINE = re.compile(r"epoch (\d+)/\d+ loss")
RESUME_LINE = re.compile(r"resuming from \S+ \(epoch (\d+)\)")


def measure_test_accuracy(run_dir: Path, config: Path) -> float:
    model, _ = load_trained_model(run_dir / "model")
    splits = load_splits(load_config(config).dataset)
    with torch.no_grad():
        predicted = model(torch.from_numpy(splits.x_test)).argmax(-1).numpy()
    return float(np.mean(predicted == splits.y_test))


def checkpoint_at_least(run_dir: Path, epoch: int) -> bool:
    return any(int(p.stem.rsplit("-", 1)[1]) >= epoch for p in (run_dir / "checkpoints").glob("ckpt-epoch-*.pt"))


def logged_epochs(log: Path) -> list[int]:
    return [int(m.group(1)) for m in EPOCH_LINE.finditer(log.read_text())]


def test_ddp_with_two_processes_trains_digits(digits_run: DigitsRun) -> None:
    log = digits_run.log.read_text()
    assert "joined the gloo process group" in log and "rank 1/2" in log
    assert measure_test_accuracy(digits_run.run_dir, digits_run.config) >= 0.94
    summary = json.loads((digits_run.run_dir / "training_summary.json").read_text())
    assert summary["worldSize"] == 2 and summary["backend"] == "gloo"
    lines = (digits_run.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, len(lines) + 1))


def test_killed_run_resumes_from_its_checkpoint(digits_run: DigitsRun) -> None:
    config = write_job_config(digits_run.root, "killed")
    run_dir = digits_run.root / "it" / "killed"
    first_log = digits_run.root / "killed-1.log"
    proc = start_torchrun(config, first_log)
    deadline = time.monotonic() + 180
    while not checkpoint_at_least(run_dir, 8) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_group(proc)  # SIGKILL the whole gang, as a node loss would
    assert checkpoint_at_least(run_dir, 8), first_log.read_text()[-3000:]
    assert not (run_dir / "model" / "model.pt").exists(), "the run finished before it could be killed"

    second_log = digits_run.root / "killed-2.log"
    run_torchrun(config, second_log)
    resumed = logged_epochs(second_log)
    found = RESUME_LINE.search(second_log.read_text())
    assert found, second_log.read_text()[-3000:]
    checkpoint_epoch = int(found.group(1))
    assert checkpoint_epoch >= 8
    assert resumed[0] == checkpoint_epoch + 1, f"epochs before the checkpoint were repeated: {resumed}"

    straight = measure_test_accuracy(digits_run.run_dir, digits_run.config)
    again = measure_test_accuracy(run_dir, config)
    assert abs(straight - again) <= 0.005, (straight, again)
    # Per-rank RNG states and the (seed, epoch) shuffle make the resumed trajectory the same one.
    a = torch.load(digits_run.run_dir / "model" / "model.pt", weights_only=True)
    b = torch.load(run_dir / "model" / "model.pt", weights_only=True)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_validator_writes_report_metadata_and_archive(digits_run: DigitsRun, validated_run: dict[str, Any]) -> None:
    assert validated_run["passed"], validated_run
    assert validated_run["testAccuracy"] >= 0.94
    # The termination message is the operator's only view of the verdict: its keys are a contract.
    assert validated_run["runDir"] == "it/straight"
    assert validated_run["modelArchive"] == "it/straight/model-store/digits.mar"
    assert validated_run["converged"] is True and validated_run["failed"] == []
    assert 0 < validated_run["latencyP50Ms"] <= validated_run["latencyP95Ms"] <= validated_run["latencyP99Ms"]
    run_dir = digits_run.run_dir
    for name in ("report.md", "training_curves.png", "metadata.json", "validation.json", "model-store/digits.mar"):
        assert (run_dir / name).exists(), name
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["verdict"] == {"passed": True, "failedThresholds": []}
    assert metadata["dataset"]["seed"] == 42 and metadata["model"]["architecture"] == "mlp"
    exports = {e["format"]: e for e in metadata["artifacts"]["exports"]}
    assert exports["torchscript"]["status"] == "written" and exports["int8"]["status"] == "written"
    assert exports["onnx"]["status"] in {"written", "skipped"}
    assert (run_dir / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_validator_rejects_with_the_threshold_named(digits_run: DigitsRun) -> None:
    # A copy of the trained run, so the shared run's passed verdict and archive stay untouched.
    run_dir = digits_run.root / "it" / "strict"
    shutil.copytree(digits_run.run_dir, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    raw = json.loads(digits_run.config.read_text())
    raw["validation"] = {"minAccuracy": 0.999, "maxLatencyP95Ms": 0.000001}
    raw["paths"]["runDir"] = str(run_dir)
    strict = digits_run.root / "strict.json"
    strict.write_text(json.dumps(raw))
    summary = run_validator(strict, digits_run.root / "strict-termination-log")
    assert not summary["passed"]
    assert {m.split(":")[0] for m in summary["failed"]} == {"minAccuracy", "maxLatencyP95Ms"}
    assert summary["modelArchive"] is None
    assert not (run_dir / "model-store" / "digits.mar").exists(), "a rejected model must leave no archive"
    assert "**Verdict: FAILED**" in (run_dir / "report.md").read_text()
