"""How good a model is, and how good it has to be to count: metrics, intervals and baselines.

Pure functions over numpy arrays (scikit-learn does the arithmetic), so the gate's numbers can be
table-tested without a network. The baselines are trained and scored on the same standardized split
the network used, so "better than a baseline" compares like with like.

The gate's primary metric is balanced accuracy for classification (the mean per-class recall: a model
that predicts the majority class for every row scores 1 / number of classes, however skewed the
classes are) and R² for regression (0 for predicting the training mean).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    r2_score,
    roc_auc_score,
)

from .thresholds import LINEAR_NAME, PRIMARY, TRIVIAL_NAME

# Two-sided 95 %: the normal quantile 1.959964 (scipy.stats.norm.ppf(0.975)).
Z95 = 1.959963984540054
BASELINE_SEED = 0
LINEAR_MAX_ITER = 2000


def primary_metric(task: str) -> str:
    """The key (in the metric dicts below) the gate compares models on."""
    return PRIMARY[task]


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (95 % by default).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0 or n successes,
    which is where small test sets of good models live (23 of 23 right still leaves 0.86 plausible).
    """
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be > 0, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: successes must be in [0, {n}], got {successes}")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Clamp the rounding dust at the ends (p = 0 or 1 gives exactly 0 or 1 in exact arithmetic).
    return max(0.0, centre - half), min(1.0, centre + half)


def classification_metrics(
    y_true: NDArray[Any], y_pred: NDArray[Any], class_labels: list[str], scores: NDArray[Any] | None = None
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, ROC-AUC (two classes, from ``scores`` of class 1),
    the confusion matrix (rows = true class, columns = predicted, in ``class_labels`` order), the
    per-class precision/recall/F1/support, the 95 % Wilson interval of accuracy, and the classes
    that have no test row (their recall cannot be measured)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        raise ValueError("classification_metrics: no rows to score")
    indices = list(range(len(class_labels)))
    with warnings.catch_warnings():
        # A class absent from y_true or never predicted: sklearn warns and scores 0, which is what we report.
        warnings.simplefilter("ignore")
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=indices, zero_division=0
        )
        balanced = float(balanced_accuracy_score(y_true, y_pred))
        macro_f1 = float(f1_score(y_true, y_pred, labels=indices, average="macro", zero_division=0))
    correct = int((y_true == y_pred).sum())
    lo, hi = wilson_interval(correct, len(y_true))
    out: dict[str, Any] = {
        "accuracy": correct / len(y_true),
        "balancedAccuracy": balanced,
        "macroF1": macro_f1,
        "rocAuc": None,
        "accuracyInterval": [lo, hi],
        "rows": len(y_true),
        "confusionMatrix": confusion_matrix(y_true, y_pred, labels=indices).tolist(),
        "perClass": [
            {
                "label": label,
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(class_labels)
        ],
        "classesWithoutTestRows": [label for i, label in enumerate(class_labels) if support[i] == 0],
    }
    if scores is not None and len(class_labels) == 2 and len(np.unique(y_true)) == 2:
        out["rocAuc"] = float(roc_auc_score(y_true, np.asarray(scores)))
    return out


def regression_metrics(y_true: NDArray[Any], y_pred: NDArray[Any]) -> dict[str, Any]:
    """RMSE and MAE in the units of the arrays given (pass target units), and R²."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if len(y_true) == 0:
        raise ValueError("regression_metrics: no rows to score")
    r2 = float(r2_score(y_true, y_pred)) if len(y_true) > 1 else math.nan
    return {
        "rmse": math.sqrt(float(mean_squared_error(y_true, y_pred))),
        "r2": r2,
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "rows": len(y_true),
    }


@dataclass(frozen=True)
class Baseline:
    """One reference model scored on the test split: its name and its metrics."""

    kind: str  # trivial | linear
    name: str  # majority-class, logistic-regression, mean-prediction, ridge-regression
    metrics: dict[str, Any]

    def score(self, task: str) -> float:
        return float(self.metrics[PRIMARY[task]])

    def summary(self, task: str) -> dict[str, Any]:
        """The short form: name, primary metric and (classification) accuracy."""
        keys = ("balancedAccuracy", "accuracy", "macroF1") if task == "classification" else ("r2", "rmse", "mae")
        return {"name": self.name, **{k: round(float(self.metrics[k]), 6) for k in keys}}


def _fit_baseline(
    kind: str, task: str, x_train: NDArray[Any], y_train: NDArray[Any], x_test: NDArray[Any]
) -> tuple[NDArray[Any], NDArray[Any] | None]:
    """Predictions (and, for classification, class-1 scores when there are two classes) on x_test."""
    if task == "classification":
        clf: DummyClassifier | LogisticRegression = (
            DummyClassifier(strategy="most_frequent")
            if kind == "trivial"
            else LogisticRegression(max_iter=LINEAR_MAX_ITER, random_state=BASELINE_SEED)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(x_train, y_train)
        pred = clf.predict(x_test)
        scores = clf.predict_proba(x_test)[:, -1] if len(clf.classes_) == 2 else None
        return pred, scores
    reg: DummyRegressor | Ridge = (
        DummyRegressor(strategy="mean") if kind == "trivial" else Ridge(alpha=1.0, random_state=BASELINE_SEED)
    )
    reg.fit(x_train, y_train)
    return np.asarray(reg.predict(x_test)), None


def baselines(
    task: str,
    x_train: NDArray[Any],
    y_train: NDArray[Any],
    x_test: NDArray[Any],
    y_test: NDArray[Any],
    class_labels: list[str],
    target_std: float = 1.0,
) -> dict[str, Baseline]:
    """The trivial and the linear baseline, fitted on the training split and scored on the test split.

    Pass the same standardized arrays the network trained on (``Splits``). For regression the targets
    are standardized too; ``target_std`` turns RMSE and MAE back into target units (R² is unit-free).
    For classification, ``y_train`` must hold integer class indices into ``class_labels``.
    """
    out: dict[str, Baseline] = {}
    for kind in ("trivial", "linear"):
        pred, scores = _fit_baseline(kind, task, x_train, y_train, x_test)
        if task == "classification":
            metrics = classification_metrics(y_test, pred, class_labels, scores)
        else:
            metrics = regression_metrics(np.asarray(y_test) * target_std, pred * target_std)
        name = TRIVIAL_NAME[task] if kind == "trivial" else LINEAR_NAME[task]
        out[kind] = Baseline(kind, name, metrics)
    return out
