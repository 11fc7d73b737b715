"""Bring your own model, for real on this machine: examples/custom-cnn/train_cnn.py under torchrun (2 processes,
DDP over gloo) with the config the operator writes for examples/custom-cnn/trainingjob.yaml, then the validator's
two steps (quality and the candidate archive; the archive in a real TorchServe, timed), then the archive serving.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from sklearn.datasets import load_digits

from flownexus.api.neuralcluster import NeuralClusterSpec
from flownexus.api.trainingjob import TrainingJobSpec
from flownexus.trainingjob.children import TrainingContext, trainer_config
from flownexus_trainer.config import load_config
from flownexus_trainer.data import load_splits
from flownexus_trainer.validate import load_trained_model
from tests.factories import neural_cluster
from tests.integration.trainer.procs import kill_group, run_torchrun, start_torchrun, subprocess_env

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "examples" / "custom-cnn"
SCRIPT = EXAMPLE / "train_cnn.py"
EPOCH_LINE = re.compile(r"epoch (\d+)/\d+ loss")
RESUME_LINE = re.compile(r"resuming from \S+ \(epoch (\d+)\)")


@dataclass(frozen=True)
class CustomRun:
    root: Path
    config: Path
    run_dir: Path
    log: Path


def operator_config(root: Path, run_name: str) -> Path:
    """The operator's own trainer_config() for the example TrainingJob, with the paths moved into ``root``."""
    manifest = yaml.safe_load((EXAMPLE / "trainingjob.yaml").read_text())
    manifest["metadata"].update(namespace="it", uid="")
    ctx = TrainingContext(
        owner=manifest,
        spec=TrainingJobSpec.model_validate(manifest["spec"]),
        cluster=NeuralClusterSpec.model_validate(neural_cluster()["spec"]),
        artifact_claim="demo-artifacts",
    )
    raw = trainer_config(ctx)
    assert raw["model"]["architecture"] == "custom"
    raw["paths"] = {"artifactRoot": str(root), "runDir": str(root / "it" / run_name)}
    path = root / f"{run_name}.json"
    path.write_text(json.dumps(raw))
    return path


def start_training(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """What the worker pods run, on one node: torchrun with spec.trainer.command in place of the built-in trainer."""
    return start_torchrun(config, log, program=[str(SCRIPT)])


def train(config: Path, log: Path, timeout: float = 300) -> None:
    run_torchrun(config, log, timeout, program=[str(SCRIPT)])


def step(module: str, config: Path, termination_log: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    """One validator step as the validator pod runs it; its termination message."""
    cmd = [sys.executable, "-m", module, "--config", str(config), "--termination-log", str(termination_log), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=400, check=False)
    assert termination_log.exists(), done.stderr[-4000:]
    summary: dict[str, Any] = json.loads(termination_log.read_text())
    return done.returncode, summary


def epochs_in(metrics: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in metrics.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory: pytest.TempPathFactory) -> CustomRun:
    """One uninterrupted 2-process run of the example."""
    root = tmp_path_factory.mktemp("custom")
    config = operator_config(root, "cnn")
    log = root / "cnn.log"
    train(config, log)
    return CustomRun(root, config, root / "it" / "cnn", log)


@pytest.fixture(scope="module")
def candidate(custom_run: CustomRun) -> dict[str, Any]:
    rc, summary = step("flownexus_trainer.candidate", custom_run.config, custom_run.root / "candidate.log")
    assert rc == 0, summary
    return summary


def test_the_example_trains_with_ddp_and_writes_the_contract(custom_run: CustomRun) -> None:
    log = custom_run.log.read_text()
    assert "joined the gloo process group" in log and "rank 1/2" in log
    run_dir = custom_run.run_dir
    for name in ("model/model.pt", "model/model_config.json", "model/normalization.json", "training_summary.json"):
        assert (run_dir / name).is_file(), name
    spec = json.loads((run_dir / "model" / "model_config.json").read_text())
    assert (spec["format"], spec["rawInput"], spec["model"]["architecture"]) == ("torchscript", True, "custom")
    assert spec["numFeatures"] == 64 and spec["classLabels"] == [str(i) for i in range(10)]
    summary = json.loads((run_dir / "training_summary.json").read_text())
    assert summary["worldSize"] == 2 and summary["backend"] == "gloo" and summary["trainer"] == "custom"
    epochs = epochs_in(run_dir / "metrics.jsonl")
    assert epochs == list(range(1, len(epochs) + 1)) and summary["epochsRun"] == epochs[-1]
    line = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss", "valLoss", "accuracy", "valAccuracy", "learningRate"} <= set(line)


def test_the_exported_torchscript_takes_raw_pixels_and_reaches_095_on_the_test_rows(custom_run: CustomRun) -> None:
    splits = load_splits(load_config(custom_run.config).dataset)
    graph = torch.jit.load(str(custom_run.run_dir / "model" / "model.pt"))
    raw = torch.from_numpy(splits.normalization.invert(splits.x_test).astype(np.float32))
    with torch.no_grad():
        predicted = graph(raw).argmax(-1).numpy()
    assert float(np.mean(predicted == splits.y_test)) >= 0.95
    # The validator's view of it (standardized rows in) agrees with the raw graph.
    model, _ = load_trained_model(custom_run.run_dir / "model")
    with torch.no_grad():
        assert torch.equal(model(torch.from_numpy(splits.x_test)).argmax(-1), torch.from_numpy(predicted))


def test_the_candidate_step_passes_the_default_gate_and_stages_a_torchscript_archive(
    custom_run: CustomRun, candidate: dict[str, Any]
) -> None:
    assert candidate["passed"] is True, candidate
    assert candidate["testAccuracy"] >= 0.95 and candidate["converged"] is True and candidate["failed"] == []
    staged = custom_run.run_dir / "candidate" / "digits-cnn.mar"
    with zipfile.ZipFile(staged) as mar:
        names = set(mar.namelist())
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
    assert {"model.pt", "flownexus_handler.py", "model_config.json", "normalization.json"} <= names
    assert "modelFile" not in manifest["model"], "a custom model is TorchScript: no model file, no user code"
    metadata = json.loads((custom_run.run_dir / "metadata.json").read_text())
    assert metadata["model"]["architecture"] == "custom" and metadata["training"]["trainer"] == "custom"
    assert (custom_run.run_dir / "report.md").exists() and (custom_run.run_dir / "training_curves.png").exists()


def test_the_served_step_times_the_archive_in_torchserve_and_publishes_it(
    custom_run: CustomRun, candidate: dict[str, Any]
) -> None:
    work = custom_run.root / "serve"
    work.mkdir()
    rc, summary = step(
        "flownexus_trainer.served_latency", custom_run.config, custom_run.root / "served.log", "--work-dir", str(work)
    )
    assert rc == 0, summary
    assert summary["passed"] is True, summary
    assert summary["modelArchive"] == "it/cnn/model-store/digits-cnn.mar"
    assert 0 < summary["latencyP95Ms"] <= 100


def test_the_archive_serves_raw_and_object_rows_through_the_handler(
    custom_run: CustomRun, candidate: dict[str, Any], tmp_path: Path
) -> None:
    """The handler inside TorchServe's unpacked archive, with TorchServe's BaseHandler loading the TorchScript."""
    from flownexus_trainer.handler import FlowNexusHandler
    from tests.unit.trainer.test_handler import FakeContext

    unpacked = tmp_path / "unpacked"
    # The served step moves the candidate archive into model-store/ when the gate passes.
    archive = next(
        p
        for p in (
            custom_run.run_dir / "model-store" / "digits-cnn.mar",
            custom_run.run_dir / "candidate" / "digits-cnn.mar",
        )
        if p.exists()
    )
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(unpacked)
    context = FakeContext(unpacked)
    context.manifest = json.loads((unpacked / "MAR-INF" / "MANIFEST.json").read_text())
    handler = FlowNexusHandler()
    handler.initialize(context)
    digits = load_digits()
    rows = digits.data[-40:]
    answers = handler.handle([{"body": json.dumps({"inputs": rows.tolist()}).encode()}], context)
    labels = [p["label"] for p in answers[0]["predictions"]]
    assert sum(label == str(t) for label, t in zip(labels, digits.target[-40:], strict=True)) >= 36
    names = json.loads((unpacked / "model_config.json").read_text())["featureNames"]
    row = dict(zip(names, rows[0].tolist(), strict=True))
    [by_name] = handler.handle([{"body": json.dumps({"inputs": row}).encode()}], context)
    assert by_name["predictions"][0]["label"] == labels[0]
    assert sum(by_name["predictions"][0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)


def test_a_killed_run_resumes_from_its_checkpoint_and_the_epochs_continue(custom_run: CustomRun) -> None:
    root = custom_run.root
    config = operator_config(root, "killed")
    run_dir = root / "it" / "killed"
    first = root / "killed-1.log"
    proc = start_training(config, first)
    deadline = time.monotonic() + 240
    checkpoints = run_dir / "checkpoints"
    while proc.poll() is None and time.monotonic() < deadline and not list(checkpoints.glob("ckpt-epoch-0000[4-9].pt")):
        time.sleep(0.02)
    kill_group(proc)  # SIGKILL the whole gang, as a node loss would
    written = sorted(int(p.stem.rsplit("-", 1)[1]) for p in checkpoints.glob("ckpt-epoch-*.pt"))
    assert written and written[-1] >= 4, first.read_text()[-3000:]
    assert not (run_dir / "model" / "model.pt").exists(), "the run finished before it could be killed"

    second = root / "killed-2.log"
    train(config, second)
    found = RESUME_LINE.search(second.read_text())
    assert found, second.read_text()[-3000:]
    resumed_at = int(found.group(1))
    assert resumed_at >= 4
    logged = [int(m.group(1)) for m in EPOCH_LINE.finditer(second.read_text())]
    assert logged[0] == resumed_at + 1, f"epochs before the checkpoint were repeated: {logged}"
    # metrics.jsonl holds each epoch once: the killed run's lines after the checkpoint were dropped.
    epochs = epochs_in(run_dir / "metrics.jsonl")
    assert epochs == list(range(1, len(epochs) + 1)), epochs
    summary = json.loads((run_dir / "training_summary.json").read_text())
    assert summary["resumedFrom"].endswith(f"ckpt-epoch-{resumed_at:05d}.pt")
    rc, verdict = step("flownexus_trainer.candidate", config, root / "killed-candidate.log")
    assert rc == 0 and verdict["passed"] is True and verdict["testAccuracy"] >= 0.95, verdict
    shutil.rmtree(run_dir / "candidate", ignore_errors=True)
