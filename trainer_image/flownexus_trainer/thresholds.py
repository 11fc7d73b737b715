"""The validation gate: measured numbers against the TrainingJob's thresholds, each failure named.

The names (``minAccuracy``, ``maxLatencyP95Ms`` ...) are the spec's field names, so a failed gate
reads in status exactly like the field a user would change.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .config import ValidationConfig

# Relative change of the validation loss over this many final epochs that still counts as a plateau.
PLATEAU_EPOCHS = 3
PLATEAU_TOLERANCE = 0.10


@dataclass(frozen=True)
class Measured:
    """What the validator measured on the final model."""

    task: str
    test_accuracy: float | None
    test_rmse: float | None
    test_r2: float | None
    latency_p95_ms: float
    train_val_gap: float
    converged: bool
    convergence_reason: str


@dataclass(frozen=True)
class ThresholdResult:
    name: str
    value: float | bool | None
    limit: float | bool
    passed: bool
    message: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _bound(name: str, label: str, value: float | None, limit: float, at_least: bool) -> ThresholdResult:
    if value is None or math.isnan(value):
        return ThresholdResult(name, None, limit, False, f"{name}: {label} was not measured")
    passed = value >= limit if at_least else value <= limit
    op = (">=" if passed else "<") if at_least else ("<=" if passed else ">")
    return ThresholdResult(name, round(value, 6), limit, passed, f"{name}: {label} {value:.4g} {op} {limit:g}")


def evaluate_thresholds(cfg: ValidationConfig, measured: Measured) -> list[ThresholdResult]:
    """Every configured threshold that applies to the task, passed or not (null ones are off)."""
    results: list[ThresholdResult] = []
    if measured.task == "classification" and cfg.min_accuracy is not None:
        results.append(_bound("minAccuracy", "test accuracy", measured.test_accuracy, cfg.min_accuracy, at_least=True))
    if measured.task == "regression":
        if cfg.max_rmse is not None:
            results.append(_bound("maxRmse", "test RMSE", measured.test_rmse, cfg.max_rmse, at_least=False))
        if cfg.min_r2 is not None:
            results.append(_bound("minR2", "test R²", measured.test_r2, cfg.min_r2, at_least=True))
    if cfg.max_latency_p95_ms is not None:
        results.append(
            _bound(
                "maxLatencyP95Ms", "p95 latency (ms)", measured.latency_p95_ms, cfg.max_latency_p95_ms, at_least=False
            )
        )
    if cfg.max_train_val_gap is not None:
        results.append(
            _bound(
                "maxTrainValGap", "train/validation gap", measured.train_val_gap, cfg.max_train_val_gap, at_least=False
            )
        )
    if cfg.require_convergence:
        verdict = "converged" if measured.converged else "did not converge"
        results.append(
            ThresholdResult(
                "requireConvergence",
                measured.converged,
                True,
                measured.converged,
                f"requireConvergence: training {verdict} ({measured.convergence_reason})",
            )
        )
    return results


def failed(results: list[ThresholdResult]) -> list[ThresholdResult]:
    return [r for r in results if not r.passed]


def assess_convergence(history: list[dict[str, Any]], stopped_early: bool) -> tuple[bool, str]:
    """Converged = finite losses, validation loss improved on epoch 1, and it has levelled off.

    Levelled off means early stopping fired, or the validation loss moved less than 10 % over the
    last three epochs. One epoch of history cannot show either.
    """
    if len(history) < 2:
        return False, f"only {len(history)} epoch(s) of history"
    losses = [float(h["loss"]) for h in history] + [float(h["valLoss"]) for h in history]
    if not all(math.isfinite(v) for v in losses):
        return False, "a loss became NaN or infinite"
    val = [float(h["valLoss"]) for h in history]
    if min(val) >= val[0]:
        return False, f"validation loss never improved on epoch 1 ({val[0]:.4g})"
    if stopped_early:
        return True, "early stopping found a plateau"
    window = val[-PLATEAU_EPOCHS:]
    change = (max(window) - min(window)) / max(abs(min(window)), 1e-12)
    if change <= PLATEAU_TOLERANCE:
        return True, f"validation loss changed {change:.1%} over the last {len(window)} epochs"
    return False, f"validation loss still moving ({change:.1%} over the last {len(window)} epochs)"
