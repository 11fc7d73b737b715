"""The validator Job (``python -m flownexus_trainer.validate``): measure the trained model, gate it.

Writes into the run directory: ``validation.json`` (verdict and numbers), ``metadata.json``
(lineage), ``report.md`` + ``training_curves.png``, and when the gate passes
``model-store/<model>.mar`` plus the requested exports. A short verdict also goes to
``/dev/termination-log`` so the operator can read it from the pod status without the pod holding
API rights.

Exit status: 0 when validation ran (passed *or* rejected: read the verdict), 2 when it could not run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_write_bytes
from .config import JobConfig, load_config
from .data import Splits, load_splits
from .errors import TERMINATION_LOG, failure_summary, write_termination_message
from .export import build_mar, run_exports
from .models import build_model
from .report import plot_curves, render_report
from .thresholds import Measured, ThresholdResult, assess_convergence, evaluate_thresholds, failed
from .train import evaluate

log = logging.getLogger(__name__)


def load_trained_model(model_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    spec = json.loads((model_dir / "model_config.json").read_text(encoding="utf-8"))
    model = build_model(spec["model"], spec["numFeatures"], spec["numOutputs"])
    model.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True))
    return model.eval(), spec


def measure_latency(
    model: nn.Module, rows: torch.Tensor, classification: bool, runs: int = 300, warmup: int = 30
) -> dict[str, Any]:
    """Single-sample request latency (forward, plus softmax for classes) as one serving worker sees it."""
    timings = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            row = rows[i % len(rows)].unsqueeze(0)
            started = time.perf_counter()
            out = model(row)
            if classification:
                torch.softmax(out, dim=-1)
            if i >= warmup:
                timings.append((time.perf_counter() - started) * 1000.0)
    p50, p95, p99 = np.percentile(timings, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "samples": runs, "device": "cpu"}


def read_history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def measure(
    model: nn.Module, splits: Splits, history: list[dict[str, Any]], stopped_early: bool
) -> tuple[dict[str, Any], Measured]:
    """Test quality, train/validation gap, latency and convergence of the final model."""
    t_std = splits.normalization.target_std
    tensors = {
        name: (torch.from_numpy(getattr(splits, f"x_{name}")), torch.from_numpy(getattr(splits, f"y_{name}")))
        for name in ("train", "val", "test")
    }
    scores = {name: evaluate(model, x, y, splits.task, t_std) for name, (x, y) in tensors.items()}
    quality = "accuracy" if splits.task == "classification" else "r2"
    gap = scores["train"][quality] - scores["val"][quality]
    latency = measure_latency(model, tensors["test"][0], splits.task == "classification")
    converged, reason = assess_convergence(history, stopped_early)
    metrics: dict[str, Any] = {f"{split}{k.title()}": round(v, 6) for split, s in scores.items() for k, v in s.items()}
    metrics.update(trainValGap=round(gap, 6), converged=converged, convergenceReason=reason, latencyMs=latency)
    measured = Measured(
        task=splits.task,
        test_accuracy=scores["test"].get("accuracy"),
        test_rmse=scores["test"].get("rmse"),
        test_r2=scores["test"].get("r2"),
        latency_p95_ms=latency["p95"],
        train_val_gap=gap,
        converged=converged,
        convergence_reason=reason,
    )
    return metrics, measured


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _exports(cfg: JobConfig, model: nn.Module, splits: Splits) -> dict[str, Any]:
    run_dir = cfg.run_dir
    mar = build_mar(run_dir / "model", run_dir / "model-store", cfg.output.model_name, cfg.output.version)
    example = torch.from_numpy(splits.x_test[:8])
    results = run_exports(
        model, example, run_dir / "exports", cfg.output.torchscript, cfg.output.quantize_int8, cfg.output.onnx
    )
    out: dict[str, Any] = {"modelArchive": _relative(mar, cfg.artifact_root)}
    out["exports"] = [
        {**r.to_json(), **({"path": _relative(Path(r.path), cfg.artifact_root)} if r.path else {})} for r in results
    ]
    return out


def _metadata(
    cfg: JobConfig, splits: Splits, summary: dict[str, Any], metrics: dict[str, Any], results: list[ThresholdResult]
) -> dict[str, Any]:
    ds = cfg.dataset
    return {
        "name": cfg.name,
        "namespace": cfg.namespace,
        "model": cfg.model.to_dict(),
        "output": {"modelName": cfg.output.model_name, "version": cfg.output.version},
        "dataset": {
            "source": ds.source,
            "name": ds.path if ds.source == "file" else ds.name,
            "task": ds.task,
            "split": ds.split,
            "seed": ds.seed,
            "validationFraction": ds.validation_fraction,
            "testFraction": ds.test_fraction,
            "fingerprint": splits.fingerprint,
            "rows": {"train": len(splits.x_train), "validation": len(splits.x_val), "test": len(splits.x_test)},
        },
        "image": os.environ.get("FLOWNEXUS_IMAGE", "unknown"),
        "training": summary,
        "metrics": metrics,
        "thresholds": cfg.validation.to_dict(),
        "results": [r.to_json() for r in results],
        "verdict": {"passed": not failed(results), "failedThresholds": [r.name for r in failed(results)]},
        "validatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def validate(cfg: JobConfig) -> dict[str, Any]:
    """Run the whole gate for one TrainingJob and return what went into validation.json."""
    run_dir = cfg.run_dir
    model, _ = load_trained_model(run_dir / "model")
    summary = json.loads((run_dir / "training_summary.json").read_text(encoding="utf-8"))
    splits = load_splits(cfg.dataset, cfg.artifact_root)
    if summary.get("datasetFingerprint") not in (None, splits.fingerprint):
        raise RuntimeError(
            f"dataset changed since training: {summary['datasetFingerprint']} then, {splits.fingerprint} now"
        )
    history = read_history(run_dir / "metrics.jsonl")
    metrics, measured = measure(model, splits, history, bool(summary.get("stoppedEarly")))
    results = evaluate_thresholds(cfg.validation, measured)
    passed = not failed(results)
    metadata = _metadata(cfg, splits, summary, metrics, results)
    artifacts: dict[str, Any] = {
        "report": _relative(run_dir / "report.md", cfg.artifact_root),
        "metadata": _relative(run_dir / "metadata.json", cfg.artifact_root),
    }
    if history:
        plot_curves(history, run_dir / "training_curves.png")
        artifacts["plot"] = _relative(run_dir / "training_curves.png", cfg.artifact_root)
    if passed:
        artifacts.update(_exports(cfg, model, splits))
    else:
        # Only a validated model may be served: drop an archive a previous, passing run left behind.
        (run_dir / "model-store" / f"{cfg.output.model_name}.mar").unlink(missing_ok=True)
    metadata["artifacts"] = artifacts
    atomic_write_bytes(run_dir / "metadata.json", json.dumps(metadata, indent=2).encode())
    atomic_write_bytes(run_dir / "report.md", render_report(metadata, results, "training_curves.png").encode())
    verdict = {
        "passed": passed,
        "failedThresholds": [{"name": r.name, "message": r.message} for r in failed(results)],
        "results": [r.to_json() for r in results],
        "metrics": metrics,
        "artifacts": artifacts,
        "artifactRoot": str(cfg.artifact_root),
        "runDir": _relative(run_dir, cfg.artifact_root),
    }
    atomic_write_bytes(run_dir / "validation.json", json.dumps(verdict, indent=2).encode())
    log.info(
        "%s/%s: validation %s%s", cfg.namespace, cfg.name, "passed" if passed else "FAILED",
        "".join(f"; {r.message}" for r in failed(results)),
    )  # fmt: skip
    return verdict


def termination_summary(verdict: dict[str, Any]) -> dict[str, Any]:
    """What the operator copies into ``status.validation``; paths are relative to the artifact root."""
    metrics, latency = verdict["metrics"], verdict["metrics"]["latencyMs"]
    return {
        "passed": verdict["passed"],
        "failed": [f["message"] for f in verdict["failedThresholds"]],
        "testAccuracy": metrics.get("testAccuracy"),
        "testRmse": metrics.get("testRmse"),
        "testR2": metrics.get("testR2"),
        "latencyP50Ms": round(latency["p50"], 4),
        "latencyP95Ms": round(latency["p95"], 4),
        "latencyP99Ms": round(latency["p99"], 4),
        "trainValGap": metrics.get("trainValGap"),
        "converged": metrics.get("converged"),
        "runDir": verdict["runDir"],
        "modelArchive": verdict["artifacts"].get("modelArchive"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="config JSON (default: $FLOWNEXUS_CONFIG)")
    parser.add_argument("--termination-log", default=str(TERMINATION_LOG))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = load_config(args.config)
        verdict = validate(cfg)
    except Exception as exc:
        log.exception("validation could not run")
        write_termination_message({"passed": False, **failure_summary(exc)}, Path(args.termination_log))
        return 2
    write_termination_message(termination_summary(verdict), Path(args.termination_log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
