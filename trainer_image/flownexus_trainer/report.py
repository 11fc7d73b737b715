"""The human-readable side of validation: training-curve plot and ``report.md``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # pods have no display; select the file backend before pyplot loads

import matplotlib.pyplot as plt

from .thresholds import ThresholdResult


def plot_curves(history: list[dict[str, Any]], path: Path) -> Path:
    """Loss and accuracy (or RMSE) per epoch, train next to validation."""
    epochs = [h["epoch"] for h in history]
    quality = "accuracy" if history and "accuracy" in history[0] else "rmse"
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["loss"] for h in history], label="train")
    left.plot(epochs, [h["valLoss"] for h in history], label="validation")
    left.set(title="loss", xlabel="epoch")
    val_key = "val" + quality.title()
    right.plot(epochs, [h.get(quality) for h in history], label="train")
    right.plot(epochs, [h.get(val_key) for h in history], label="validation")
    right.set(title=quality, xlabel="epoch")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_report(metadata: dict[str, Any], results: list[ThresholdResult], plot_name: str) -> str:
    """report.md: verdict first, then the gate, the numbers, lineage and the curves."""
    verdict = "PASSED" if metadata["verdict"]["passed"] else "FAILED"
    lines = [
        f"# Validation report: {metadata['namespace']}/{metadata['name']}",
        "",
        f"**Verdict: {verdict}**",
        "",
        "## Thresholds",
        "",
        "| threshold | measured | limit | result |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.name} | {_fmt(r.value)} | {_fmt(r.limit)} | {'pass' if r.passed else 'FAIL'} |" for r in results]
    failures = [r.message for r in results if not r.passed]
    if failures:
        lines += ["", "Failed:", *[f"- {m}" for m in failures]]
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metadata["metrics"].items() if not isinstance(v, dict)]
    latency = metadata["metrics"]["latencyMs"]
    dataset = metadata["dataset"]
    lines += [
        "",
        f"Single-sample latency on {latency['device']} ({latency['samples']} requests): "
        f"p50 {latency['p50']:.3f} ms, p95 {latency['p95']:.3f} ms, p99 {latency['p99']:.3f} ms.",
        "",
        "## Lineage",
        "",
        f"- architecture: `{metadata['model']['architecture']}`",
        f"- dataset: `{dataset['source']}/{dataset['name']}` ({dataset['fingerprint']}), "
        f"split `{dataset['split']}`, seed {dataset['seed']}",
        f"- image: `{metadata['image']}`",
        f"- epochs run: {metadata['training']['epochsRun']} (stopped early: {metadata['training']['stoppedEarly']})",
        "",
        "## Training curves",
        "",
        f"![training curves]({plot_name})",
        "",
    ]
    return "\n".join(lines)
