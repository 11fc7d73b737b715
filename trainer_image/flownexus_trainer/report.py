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


def _num(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def quality_section(metrics: dict[str, Any]) -> list[str]:
    """Model vs baselines (and champion) on the primary metric, the accuracy interval, per-class table,
    confusion matrix: the lines of report.md's "Quality" section."""
    q = metrics.get("quality")
    if not q:
        return []
    key, test = q["primaryMetric"], q["test"]
    classification = key == "balancedAccuracy"
    cols = ("balancedAccuracy", "accuracy", "macroF1") if classification else ("r2", "rmse", "mae")
    names = {"balancedAccuracy": "balanced accuracy", "accuracy": "accuracy", "macroF1": "macro-F1",
             "r2": "R²", "rmse": "RMSE", "mae": "MAE"}  # fmt: skip
    lines = [
        "## Quality",
        "",
        f"Primary metric: **{names[key]}** on the test split ({test['rows']} rows); the baselines are fitted on "
        "the same training split and scored on the same test rows.",
        "",
        "| model | " + " | ".join(names[c] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
        "| this model | " + " | ".join(_num(test.get(c)) for c in cols) + " |",
    ]
    for kind, base in q["baselines"].items():
        lines.append(f"| {kind} baseline ({base['name']}) | " + " | ".join(_num(base.get(c)) for c in cols) + " |")
    champ = q.get("champion")
    if champ:
        score = champ.get(key)
        cells = [_num(score)] + ["" for _ in cols[1:]]
        lines.append(f"| champion (ModelDeployment {champ['modelDeployment']}) | " + " | ".join(cells) + " |")
        if champ.get("error"):
            lines += ["", f"The champion could not be scored: {champ['error']}"]
    lines.append("")
    lines.append(f"Train {names[key]}: {_num(q['train'].get(key))}; overfitting gap (train - test): "
                 f"{_num(metrics.get('overfittingGap'))}.")  # fmt: skip
    if not classification:
        return [*lines, ""]
    lo, hi = test["accuracyInterval"]
    lines.append(
        f"Test accuracy {test['accuracy']:.3f}, 95 % Wilson interval {lo:.3f}-{hi:.3f} on {test['rows']} rows."
    )
    if test.get("rocAuc") is not None:
        lines.append(f"ROC-AUC: {test['rocAuc']:.3f}.")
    if test.get("classesWithoutTestRows"):
        lines.append(f"Classes without a test row: {', '.join(test['classesWithoutTestRows'])}.")
    labels = [c["label"] for c in test["perClass"]]
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [
        f"| {c['label']} | {_num(c['precision'])} | {_num(c['recall'])} | {_num(c['f1'])} | {c['support']} |"
        for c in test["perClass"]
    ]
    lines += ["", "Confusion matrix (rows: true class, columns: predicted):", ""]
    lines += ["| true \\ predicted | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    lines += [f"| {label} | " + " | ".join(str(v) for v in row) + " |" for label, row in
              zip(labels, test["confusionMatrix"], strict=True)]  # fmt: skip
    return [*lines, ""]


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
    lines += ["", *quality_section(metadata["metrics"])]
    lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [
        f"| {k} | {_fmt(v)} |"
        for k, v in metadata["metrics"].items()
        if not isinstance(v, (dict, list)) and v is not None
    ]
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
        f"- dataset: `{dataset['source']}/{dataset['name']}` ({dataset['fingerprint']}"
        + (f", file sha256 {dataset['sha256'][:16]}" if dataset.get("sha256") else "")
        + f"), split `{dataset['split']}`, seed {dataset['seed']}",
        f"- image: `{metadata['image']}`",
        f"- epochs run: {metadata['training']['epochsRun']} (stopped early: {metadata['training']['stoppedEarly']})",
        "",
        "## Training curves",
        "",
        f"![training curves]({plot_name})",
        "",
    ]
    return "\n".join(lines)
