"""validation.crossValidation: k-fold cross-validation of the training+validation rows, for small datasets.

One test split of a small dataset is a noisy estimate. With ``crossValidation: {folds: k}`` the
validator also trains the same architecture with the same training settings k times, in process, with
the real ``Trainer``: each model on k-1 folds of the training+validation rows (the test rows are never
used) and scored with the primary metric (balanced accuracy / R²) on the fold it did not see. The
folds are stratified by class for classification (scikit-learn ``StratifiedKFold``, shuffled with the
dataset seed). Inside the k-1 training folds a stratified ``validationFraction`` share is held out for
early stopping, and the standardization is fitted on each fold's training rows only.

Each fold trains in ``<runDir>/crossval/fold-<i>``; its weights and checkpoints are removed afterwards,
its metrics.jsonl and training_summary.json stay.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

from . import quality
from .config import JobConfig
from .data import Normalization, Splits
from .distributed import DistContext
from .errors import InputError
from .progress import MetricsFileSink
from .thresholds import CrossValScores
from .train import Trainer

log = logging.getLogger(__name__)

CROSSVAL_DIR = "crossval"


def raw_rows(splits: Splits) -> tuple[NDArray[np.float64], NDArray[Any]]:
    """The training+validation rows (never the test rows) in the dataset's units, undoing the standardization
    that was fitted on the training split; regression targets too."""
    norm = splits.normalization
    x = norm.invert(np.concatenate([splits.x_train, splits.x_val]))
    y = np.concatenate([splits.y_train, splits.y_val])
    return x, norm.invert_target(y) if splits.task == "regression" else y


def fold_indices(
    y: NDArray[Any], task: str, folds: int, seed: int
) -> list[tuple[NDArray[np.int64], NDArray[np.int64]]]:
    """(training rows, held-out rows) of each fold: stratified by class for classification, shuffled with the seed."""
    n = len(y)
    if n < folds:
        raise InputError(f"validation.crossValidation.folds: {folds} folds need at least {folds} rows, got {n}")
    if task == "classification":
        smallest = int(np.bincount(np.asarray(y, dtype=np.int64)).min(initial=n))
        if smallest < folds:
            raise InputError(
                f"validation.crossValidation.folds: {folds} stratified folds need at least {folds} training+validation "
                f"rows of every class; the smallest class has {smallest}: lower folds or add rows"
            )
        splitter: StratifiedKFold | KFold = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        pairs = splitter.split(np.zeros(n), y)
    else:
        splitter = KFold(n_splits=folds, shuffle=True, random_state=seed)
        pairs = splitter.split(np.zeros(n))
    return [(np.sort(a).astype(np.int64), np.sort(b).astype(np.int64)) for a, b in pairs]


def fold_splits(
    splits: Splits, x: NDArray[Any], y: NDArray[Any], train: NDArray[np.int64], held_out: NDArray[np.int64],
    val_share: float, seed: int,
) -> Splits:  # fmt: skip
    """Splits for one fold: an early-stopping share of ``train`` becomes validation, ``held_out`` the test rows;
    standardized with statistics of the fold's training rows only."""
    classification = splits.task == "classification"
    n_val = max(1, round(len(train) * val_share))
    try:
        fit_rows, val_rows = train_test_split(
            train, test_size=n_val, random_state=seed, stratify=y[train] if classification else None
        )
    except ValueError as exc:
        raise InputError(
            f"validation.crossValidation: cannot hold out {n_val} early-stopping rows of a fold: {exc}"
        ) from exc
    norm = Normalization.fit(x[fit_rows], None if classification else y[fit_rows])

    def target(rows: NDArray[Any]) -> NDArray[Any]:
        if classification:
            return np.asarray(y[rows], dtype=np.int64)
        return np.asarray((y[rows] - norm.target_mean) / norm.target_std, dtype=np.float32)

    return replace(
        splits,
        x_train=norm.apply(x[fit_rows]), y_train=target(fit_rows),
        x_val=norm.apply(x[val_rows]), y_val=target(val_rows),
        x_test=norm.apply(x[held_out]), y_test=target(held_out),
        normalization=norm,
    )  # fmt: skip


def _score(model: torch.nn.Module, s: Splits) -> tuple[float, float]:
    """The fold model's primary metric on its held-out rows, and the trivial baseline's on the same rows."""
    key = quality.primary_metric(s.task)
    model.eval()
    with torch.inference_mode():
        out = model(torch.from_numpy(np.ascontiguousarray(s.x_test, dtype=np.float32))).float().numpy()
    t_std = s.normalization.target_std
    if s.task == "classification":
        metrics = quality.classification_metrics(s.y_test, out.argmax(axis=1), s.class_labels)
    else:
        metrics = quality.regression_metrics(np.asarray(s.y_test) * t_std, out[:, 0] * t_std)
    base = quality.baselines(s.task, s.x_train, s.y_train, s.x_test, s.y_test, s.class_labels, t_std)
    return float(metrics[key]), base["trivial"].score(s.task)


def cross_validate(cfg: JobConfig, splits: Splits, ctx: DistContext) -> CrossValScores:
    """Train and score one model per fold (see the module doc); needs ``cfg.validation.cross_validation``."""
    cv = cfg.validation.cross_validation
    if cv is None:
        raise ValueError("cross_validate: validation.crossValidation is not set")
    if cfg.dataset.split == "temporal":
        raise InputError("validation.crossValidation: needs dataset.split random, got temporal (folds are shuffled)")
    x, y = raw_rows(splits)
    ds = cfg.dataset
    val_share = ds.validation_fraction / max(1e-9, 1.0 - ds.test_fraction)
    root = cfg.run_dir / CROSSVAL_DIR
    scores: list[float] = []
    trivial: list[float] = []
    started = time.perf_counter()
    for i, (train, held_out) in enumerate(fold_indices(y, splits.task, cv.folds, ds.seed), start=1):
        fold_dir = root / f"fold-{i}"
        shutil.rmtree(fold_dir, ignore_errors=True)  # a stale checkpoint would be resumed
        fold_cfg = replace(cfg, run_dir=fold_dir)
        fold = fold_splits(splits, x, y, train, held_out, val_share, ds.seed)
        trainer = Trainer(fold_cfg, ctx, MetricsFileSink(fold_dir / "metrics.jsonl"), splits=fold)
        state = trainer.run()
        if state.best_state:
            trainer.model.load_state_dict(state.best_state)
        score, base = _score(trainer.model, fold)
        scores.append(score)
        trivial.append(base)
        shutil.rmtree(fold_dir / "model", ignore_errors=True)
        shutil.rmtree(fold_dir / "checkpoints", ignore_errors=True)
        log.info("%s/%s: crossValidation fold %d/%d: %.4f", cfg.namespace, cfg.name, i, cv.folds, score)
    arr = np.asarray(scores, dtype=np.float64)
    log.info(
        "%s/%s: crossValidation over %d folds: %.4f ± %.4f in %.1f s", cfg.namespace, cfg.name, cv.folds,
        arr.mean(), arr.std(), time.perf_counter() - started,
    )  # fmt: skip
    return CrossValScores(
        scores=tuple(float(v) for v in arr),
        mean=float(arr.mean()),
        std=float(arr.std()),
        min=float(arr.min()),
        baseline_trivial=float(np.mean(trivial)),
        max_std=cv.max_std,
    )
