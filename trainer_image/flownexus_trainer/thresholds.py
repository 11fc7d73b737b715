"""The validation gate: measured numbers against the TrainingJob's thresholds, each failure named.

The names (``minAccuracy``, ``maxLatencyP95Ms`` ...) are the spec's field names, so a failed gate
reads in status exactly like the field a user would change.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .config import ValidationConfig

# Convergence (assess_convergence): the best validation loss must lie at least MIN_IMPROVEMENT
# (relative) below the untrained level, and the last PLATEAU_EPOCHS epochs (at least
# PLATEAU_FRACTION of the run) must not have improved on the best before them by more than
# PLATEAU_TOLERANCE (relative).
MIN_IMPROVEMENT = 0.25
PLATEAU_EPOCHS = 3
PLATEAU_FRACTION = 0.2
PLATEAU_TOLERANCE = 0.02
# ... and by more than this much in absolute terms (losses near zero make relative changes meaningless).
PLATEAU_ABS_TOLERANCE = 0.005
# With the learning rates in the history: a late improvement above LR_PLATEAU_TOLERANCE (relative) and
# LR_PLATEAU_ABS_TOLERANCE (absolute) is
# "still improving" when, per unit of learning rate, it is at least LATE_RATE_FRACTION of the run's
# average. A decayed learning rate makes an under-trained run flat without it having converged.
LR_PLATEAU_TOLERANCE = 0.005
LR_PLATEAU_ABS_TOLERANCE = 0.001
LATE_RATE_FRACTION = 0.25


# The primary metric per task and the baselines' names. Kept here, free of numpy and scikit-learn:
# the served-latency step imports this module in the server image, which has neither.
PRIMARY = {"classification": "balancedAccuracy", "regression": "r2"}
PRIMARY_LABEL = {"classification": "balanced accuracy", "regression": "R²"}
TRIVIAL_NAME = {"classification": "majority-class", "regression": "mean-prediction"}
LINEAR_NAME = {"classification": "logistic-regression", "regression": "ridge-regression"}


@dataclass(frozen=True)
class ChampionScore:
    """The model a ModelDeployment serves, scored on the same test rows as the candidate."""

    model_deployment: str
    score: float | None  # its primary metric; None when it could not be scored
    error: str = ""  # why it could not be scored
    run_dir: str = ""
    absent: str = ""  # why there is nothing to beat (the ModelDeployment serves no model yet)


@dataclass(frozen=True)
class CrossValScores:
    """validation.crossValidation: the primary metric of k models, each scored on its held-out fold
    (crossval.py), and the trivial baseline's mean over the same folds."""

    scores: tuple[float, ...]
    mean: float
    std: float
    min: float
    baseline_trivial: float
    max_std: float

    def to_json(self) -> dict[str, Any]:
        return {
            "folds": len(self.scores),
            "scores": [round(v, 6) for v in self.scores],
            "mean": round(self.mean, 6),
            "std": round(self.std, 6),
            "min": round(self.min, 6),
            "baselineTrivial": round(self.baseline_trivial, 6),
        }


@dataclass(frozen=True)
class Measured:
    """What the validator measured on the final model.

    The primary metric (``primary``) is test balanced accuracy for classification and test R² for
    regression; the baselines and the champion are scored with the same metric on the same rows.
    """

    task: str
    test_accuracy: float | None
    test_rmse: float | None
    test_r2: float | None
    latency_p95_ms: float
    converged: bool
    convergence_reason: str
    overfitting_gap: float | None = None  # train - test of the primary metric
    train_primary: float | None = None
    test_balanced_accuracy: float | None = None
    test_rows: int = 0
    accuracy_interval: tuple[float, float] | None = None
    baseline_trivial: float | None = None
    baseline_linear: float | None = None
    classes_without_test_rows: tuple[str, ...] = ()
    champion: ChampionScore | None = None
    cross_validation: CrossValScores | None = None

    @property
    def primary(self) -> float | None:
        return self.test_balanced_accuracy if self.task == "classification" else self.test_r2


@dataclass(frozen=True)
class ThresholdResult:
    name: str
    value: float | bool | None
    limit: float | bool
    passed: bool
    message: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _missing(value: float | None) -> bool:
    return value is None or math.isnan(value)


def _bound(
    name: str, label: str, value: float | None, limit: float, at_least: bool, fmt: str = ".4g"
) -> ThresholdResult:
    if value is None or math.isnan(value):
        return ThresholdResult(name, None, limit, False, f"{name}: {label} was not measured")
    passed = value >= limit if at_least else value <= limit
    op = (">=" if passed else "<") if at_least else ("<=" if passed else ">")
    return ThresholdResult(name, round(value, 6), limit, passed, f"{name}: {label} {value:{fmt}} {op} {limit:g}")


def _min_accuracy(cfg: ValidationConfig, m: Measured, limit: float) -> ThresholdResult:
    """minAccuracy on the estimate, or on the Wilson lower bound with decideOn: lowerBound.

    A test set too small to tell (the 95 % interval straddles the limit) is said so in the message.
    """
    value, interval = m.test_accuracy, m.accuracy_interval
    if value is None or math.isnan(value):
        return ThresholdResult("minAccuracy", None, limit, False, "minAccuracy: test accuracy was not measured")
    if interval is None:
        return _bound("minAccuracy", "test accuracy", value, limit, at_least=True, fmt=".3f")
    lo, hi = interval
    where = f"95 % interval {lo:.2f}-{hi:.2f} on {m.test_rows} rows"
    if cfg.decide_on == "lowerBound":
        passed = lo >= limit
        return ThresholdResult(
            "minAccuracy", round(lo, 6), limit, passed,
            f"minAccuracy: lower bound {lo:.3f} of the test accuracy's {where} (estimate {value:.3f}) "
            f"{'>=' if passed else '<'} {limit:g}",
        )  # fmt: skip
    result = _bound("minAccuracy", "test accuracy", value, limit, at_least=True, fmt=".3f")
    if lo < limit <= hi:
        return ThresholdResult(
            result.name, result.value, limit, result.passed, f"{result.message} ({where}: too few rows to be sure)"
        )
    return result


def _margin(
    name: str, label: str, value: float | None, baseline: float | None, baseline_name: str, margin: float
) -> ThresholdResult:
    """value must be at least ``margin`` above the baseline (a negative margin allows that much below)."""
    if _missing(value) or _missing(baseline):
        what = label if _missing(value) else f"the {baseline_name} baseline's {label}"
        return ThresholdResult(name, None, margin, False, f"{name}: {what} was not measured")
    assert value is not None and baseline is not None
    achieved = value - baseline
    # Round off float dust so a margin of exactly the limit counts (0.55 - 0.5 is 0.04999...).
    passed = round(achieved, 9) >= margin
    base = f"the {baseline_name} baseline {baseline:.3f}"
    if margin >= 0:
        verdict = f"is above {base} by {achieved:.3f} (>= {margin:g})"
        if not passed:
            verdict = f"is not above {base} by {margin:g}"
    elif passed:
        verdict = f"is within {-margin:g} of {base} ({achieved:+.3f})"
    else:
        verdict = f"is more than {-margin:g} below {base} ({achieved:+.3f})"
    return ThresholdResult(name, round(achieved, 6), margin, passed, f"{name}: {label} {value:.3f} {verdict}")


def _champion(cfg: ValidationConfig, m: Measured, label: str) -> ThresholdResult:
    champ = m.champion
    name = cfg.champion_model_deployment
    if champ is not None and champ.absent:
        return ThresholdResult("champion", None, False, True, f"champion: nothing to beat: {champ.absent}")
    if champ is None or champ.score is None:
        why = champ.error if champ is not None and champ.error else "it was not scored"
        message = f"champion: the model ModelDeployment {name} serves could not be scored: {why}"
        return ThresholdResult("champion", None, False, False, message)
    value = m.primary
    if _missing(value):
        return ThresholdResult("champion", None, champ.score, False, f"champion: this model's {label} was not measured")
    assert value is not None
    need = champ.score - cfg.champion_tolerance
    passed = round(value - need, 9) >= 0
    tolerance = f" - tolerance {cfg.champion_tolerance:g}" if cfg.champion_tolerance else ""
    return ThresholdResult(
        "champion", round(value, 6), round(need, 6), passed,
        f"champion: {label} {value:.3f} of this model {'>=' if passed else '<'} {champ.score:.3f}{tolerance} of "
        f"the model ModelDeployment {name} serves, on the same {m.test_rows} test rows",
    )  # fmt: skip


def _cross_validation(cfg: ValidationConfig, m: Measured, label: str) -> ThresholdResult:
    """The fold scores must not vary more than maxStd, and their mean must be minMarginOverTrivial (0 when
    that is off) above the trivial baseline's mean over the same folds."""
    cv, limit = m.cross_validation, cfg.cross_validation
    assert limit is not None
    if cv is None or _missing(cv.mean):
        return ThresholdResult("crossValidation", None, limit.max_std, False, "crossValidation: was not measured")
    margin = cfg.min_margin_over_trivial if cfg.min_margin_over_trivial is not None else 0.0
    summary = f"crossValidation: {label} {cv.mean:.3f} ± {cv.std:.3f} over {len(cv.scores)} folds (min {cv.min:.3f})"
    problems = []
    if round(cv.std - limit.max_std, 9) > 0:
        problems.append(f"the folds vary more than maxStd {limit.max_std:g}")
    if round(cv.mean - cv.baseline_trivial, 9) < margin:
        problems.append(
            f"the mean is not {margin:g} above the {TRIVIAL_NAME[m.task]} baseline's {cv.baseline_trivial:.3f}"
        )
    verdict = "; ".join(problems) if problems else f"std <= {limit.max_std:g}, mean above the trivial baseline"
    return ThresholdResult("crossValidation", round(cv.mean, 6), limit.max_std, not problems, f"{summary}: {verdict}")


def evaluate_thresholds(cfg: ValidationConfig, measured: Measured) -> list[ThresholdResult]:
    """Every configured threshold that applies to the task, passed or not (null ones are off)."""
    m = measured
    label = PRIMARY_LABEL[m.task]
    results: list[ThresholdResult] = []
    if m.task == "classification":
        if cfg.min_accuracy is not None:
            results.append(_min_accuracy(cfg, m, cfg.min_accuracy))
        if cfg.min_balanced_accuracy is not None:
            balanced = _bound(
                "minBalancedAccuracy", "test balanced accuracy", m.test_balanced_accuracy,
                cfg.min_balanced_accuracy, at_least=True, fmt=".3f",
            )  # fmt: skip
            results.append(balanced)
    if m.task == "regression":
        if cfg.max_rmse is not None:
            results.append(_bound("maxRmse", "test RMSE", m.test_rmse, cfg.max_rmse, at_least=False))
        if cfg.min_r2 is not None:
            results.append(_bound("minR2", "test R²", m.test_r2, cfg.min_r2, at_least=True, fmt=".3f"))
    if cfg.min_margin_over_trivial is not None:
        result = _margin(
            "minMarginOverTrivial", label, m.primary, m.baseline_trivial, TRIVIAL_NAME[m.task],
            cfg.min_margin_over_trivial,
        )  # fmt: skip
        if m.classes_without_test_rows:
            missing = ", ".join(repr(c) for c in m.classes_without_test_rows)
            result = ThresholdResult(
                result.name, result.value, result.limit, result.passed,
                f"{result.message} (no test row of class {missing}: its recall is not in the balanced accuracy)",
            )  # fmt: skip
        results.append(result)
    if cfg.min_margin_over_linear is not None:
        linear = _margin(
            "minMarginOverLinear", label, m.primary, m.baseline_linear, LINEAR_NAME[m.task],
            cfg.min_margin_over_linear,
        )  # fmt: skip
        results.append(linear)
    if cfg.max_latency_p95_ms is not None:
        results.append(
            _bound("maxLatencyP95Ms", "p95 latency (ms)", m.latency_p95_ms, cfg.max_latency_p95_ms, at_least=False)
        )
    if cfg.max_overfitting_gap is not None:
        gap = _bound(
            "maxOverfittingGap", f"train - test {label}", m.overfitting_gap, cfg.max_overfitting_gap,
            at_least=False, fmt=".3f",
        )  # fmt: skip
        if gap.value is not None and m.train_primary is not None and m.primary is not None:
            gap = ThresholdResult(
                gap.name, gap.value, gap.limit, gap.passed,
                f"{gap.message} (train {m.train_primary:.3f}, test {m.primary:.3f})",
            )  # fmt: skip
        results.append(gap)
    if cfg.require_convergence:
        verdict = "converged" if m.converged else "did not converge"
        results.append(
            ThresholdResult(
                "requireConvergence",
                m.converged,
                True,
                m.converged,
                f"requireConvergence: training {verdict} ({m.convergence_reason})",
            )
        )
    if cfg.champion_model_deployment is not None:
        results.append(_champion(cfg, m, label))
    if cfg.cross_validation is not None:
        results.append(_cross_validation(cfg, m, label))
    return results


def failed(results: list[ThresholdResult]) -> list[ThresholdResult]:
    return [r for r in results if not r.passed]


def assess_convergence(history: list[dict[str, Any]], stopped_early: bool) -> tuple[bool, str]:
    """Converged = the model learned something real and the validation loss stopped improving.

    Only losses are read, never the learning rate, so a schedule that decays to zero cannot make a
    run look converged. Learned: the best validation loss is at least ``MIN_IMPROVEMENT`` below the
    untrained level, taken as the larger of epoch 1's training loss (averaged over its steps, so it
    starts at the untrained model's loss) and epoch 1's validation loss; a run stuck near chance
    fails here however flat its curve is. Stopped improving: early stopping fired, or the best
    validation loss of the last K epochs (K = max(``PLATEAU_EPOCHS``, ``PLATEAU_FRACTION`` of the
    run)) is within ``PLATEAU_TOLERANCE`` (relative) or ``PLATEAU_ABS_TOLERANCE`` (absolute) of the
    best before them. When the history carries each epoch's learning rate, a late improvement that,
    per unit of learning rate, still runs at ``LATE_RATE_FRACTION`` of the run's average is "still
    improving" however small the decayed rate made it: the schedule stopped that run, not a plateau.
    """
    if len(history) < 2:
        return False, f"only {len(history)} epoch(s) of history"
    train = [float(h["loss"]) for h in history]
    val = [float(h["valLoss"]) for h in history]
    if not all(math.isfinite(v) for v in train + val):
        return False, "a loss became NaN or infinite"
    start = max(train[0], val[0])
    best = min(val)
    best_epoch = val.index(best) + 1
    gain = (start - best) / max(abs(start), 1e-12)
    if gain < MIN_IMPROVEMENT:
        return False, (
            f"did not learn: best validation loss {best:.4g} (epoch {best_epoch}) is only {gain:.1%} below "
            f"the untrained level {start:.4g}, needs {MIN_IMPROVEMENT:.0%}; raise learningRate or epochs"
        )
    if stopped_early:
        return True, f"early stopping found a plateau (best validation loss {best:.4g}, {gain:.0%} below epoch 1)"
    k = max(PLATEAU_EPOCHS, math.ceil(PLATEAU_FRACTION * len(val)))
    if k >= len(val):
        return False, f"{len(val)} epochs are too few to see a plateau (needs more than {k})"
    before, recent = min(val[:-k]), min(val[-k:])
    late_gain = (before - recent) / max(abs(before), 1e-12)
    rates = _late_rate_ratio(history, val, k)
    if rates is not None and late_gain > LR_PLATEAU_TOLERANCE and before - recent > LR_PLATEAU_ABS_TOLERANCE:
        ratio, lr_share = rates
        if ratio >= LATE_RATE_FRACTION:
            return False, (
                f"validation loss still improving: {late_gain:.1%} over the last {k} epochs, with only "
                f"{lr_share:.0%} of the run's learning rate: per unit of learning rate that is {ratio:.0%} of "
                f"the run's average; the schedule ended the run, not a plateau; raise epochs"
            )
    if late_gain <= PLATEAU_TOLERANCE or before - recent <= PLATEAU_ABS_TOLERANCE:
        return True, (
            f"validation loss levelled off: the last {k} epochs improved {max(before - recent, 0.0):.2g} "
            f"({max(late_gain, 0.0):.1%}) on the best before them (best {best:.4g}, {gain:.0%} below epoch 1)"
        )
    return False, (
        f"validation loss still improving: {late_gain:.1%} over the last {k} epochs "
        f"(tolerance {PLATEAU_TOLERANCE:.0%}); raise epochs"
    )


def _late_rate_ratio(history: list[dict[str, Any]], val: list[float], k: int) -> tuple[float, float] | None:
    """(late improvement per unit LR / the run's per unit LR, the late epochs' share of the LR); None without LRs."""
    try:
        lrs = [float(h["learningRate"]) for h in history]
    except (KeyError, TypeError, ValueError):
        return None
    total_lr, late_lr = sum(lrs), sum(lrs[-k:])
    run_drop = val[0] - min(val)
    if not (math.isfinite(total_lr) and total_lr > 0 and late_lr > 0 and run_drop > 0):
        return None
    late_drop = min(val[:-k]) - min(val[-k:])
    return (late_drop / late_lr) / (run_drop / total_lr), late_lr / total_lr
