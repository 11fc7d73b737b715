"""Datasets: load (packaged scikit-learn sets, synthetic, or a CSV/NPZ file), split, standardize.

Nothing is downloaded. The standardization is fitted on the training split only, so no statistic of
validation or test rows leaks into training; the fitted numbers travel with the model for serving.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn import datasets as skdatasets
from sklearn.model_selection import train_test_split

from .config import DatasetConfig
from .errors import InputError

log = logging.getLogger(__name__)

FloatArray = NDArray[np.float32]

_BUILTIN_LOADERS = {
    "digits": skdatasets.load_digits,
    "iris": skdatasets.load_iris,
    "wine": skdatasets.load_wine,
    "breast_cancer": skdatasets.load_breast_cancer,
    "diabetes": skdatasets.load_diabetes,
}


@dataclass(frozen=True)
class Normalization:
    """Per-feature standardization fitted on the training split (and the target's, for regression)."""

    mean: list[float]
    std: list[float]
    target_mean: float = 0.0
    target_std: float = 1.0

    def apply(self, x: NDArray[Any]) -> FloatArray:
        return (
            (np.asarray(x, dtype=np.float32) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        ).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "targetMean": self.target_mean, "targetStd": self.target_std}

    @classmethod
    def fit(cls, x: NDArray[Any], y: NDArray[Any] | None = None) -> Normalization:
        std = x.std(axis=0)
        # Constant columns (digits has several) would divide by zero; leave them unscaled.
        std = np.where(std < 1e-8, 1.0, std)
        t_mean, t_std = 0.0, 1.0
        if y is not None:
            t_mean, t_std = float(y.mean()), float(y.std()) or 1.0
        return cls(
            mean=[float(v) for v in x.mean(axis=0)], std=[float(v) for v in std], target_mean=t_mean, target_std=t_std
        )


@dataclass(frozen=True)
class Splits:
    """Standardized train/validation/test arrays plus what serving needs to reproduce the inputs."""

    task: str
    x_train: FloatArray
    y_train: NDArray[Any]
    x_val: FloatArray
    y_val: NDArray[Any]
    x_test: FloatArray
    y_test: NDArray[Any]
    normalization: Normalization
    feature_names: list[str]
    class_labels: list[str]
    fingerprint: str

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_outputs(self) -> int:
        return len(self.class_labels) if self.task == "classification" else 1


def _load_builtin(name: str) -> tuple[NDArray[Any], NDArray[Any], list[str]]:
    bunch = _BUILTIN_LOADERS[name]()
    return np.asarray(bunch.data), np.asarray(bunch.target), [str(f) for f in getattr(bunch, "feature_names", [])]


def _load_synthetic(cfg: DatasetConfig) -> tuple[NDArray[Any], NDArray[Any], list[str]]:
    syn = cfg.synthetic
    if cfg.task == "regression":
        x, y = skdatasets.make_regression(
            n_samples=syn.samples, n_features=syn.features, noise=syn.noise * 100, random_state=cfg.seed
        )
    else:
        x, y = skdatasets.make_classification(
            n_samples=syn.samples,
            n_features=syn.features,
            n_informative=max(2, syn.features // 2),
            n_classes=syn.classes,
            flip_y=syn.noise,
            random_state=cfg.seed,
        )
    return x, y, [f"x{i}" for i in range(syn.features)]


def _load_file(cfg: DatasetConfig, artifact_root: Path) -> tuple[NDArray[Any], NDArray[Any], list[str]]:
    path = (artifact_root / cfg.path).resolve()
    # The path comes from a user's spec: keep it inside the artifact store.
    if artifact_root.resolve() not in path.parents:
        raise InputError(f"dataset.path: must stay inside the artifact store, got {cfg.path!r}")
    if path.suffix not in (".npz", ".csv"):
        raise InputError(f"dataset.path: expected a .csv or .npz file, got {cfg.path!r}")
    if not path.is_file():
        raise InputError(f"dataset.path: {cfg.path!r} does not exist in the artifact store (looked for {path})")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            x_key = "x" if "x" in npz else "X"
            y_key = cfg.target_column if cfg.target_column in npz else "y"
            if x_key not in npz or y_key not in npz:
                raise InputError(f"dataset.path: {cfg.path!r} needs arrays 'x' and 'y', has {sorted(npz.keys())}")
            x, y = npz[x_key], npz[y_key]
        return x, y, [f"x{i}" for i in range(x.shape[1])]
    with path.open(encoding="utf-8") as fh:
        header = fh.readline().strip().split(",")
    if cfg.target_column not in header:
        raise InputError(f"dataset.targetColumn: {cfg.target_column!r} is not a column of {cfg.path} ({header})")
    # A plain comma-separated table with a header row (no quoting). Targets may be class names,
    # so read everything as text, then convert.
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=str, ndmin=2)
    target_idx = header.index(cfg.target_column)
    features = [i for i in range(len(header)) if i != target_idx]
    y_raw = table[:, target_idx]
    try:
        y = y_raw if cfg.task == "classification" else y_raw.astype(np.float64)
        return table[:, features].astype(np.float64), y, [header[i] for i in features]
    except ValueError as exc:
        raise InputError(f"dataset.path: {cfg.path} has a value that is not a number: {exc}") from exc


def split_indices(
    n: int, cfg: DatasetConfig, stratify: NDArray[Any] | None
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    n_test = max(1, round(n * cfg.test_fraction))
    n_val = max(1, round(n * cfg.validation_fraction))
    idx = np.arange(n)
    if cfg.split == "temporal":
        # Rows are in time order: train on the past, validate on the next slice, test on the latest.
        n_train = n - n_val - n_test
        return idx[:n_train], idx[n_train : n_train + n_val], idx[n_train + n_val :]
    try:
        rest, test = train_test_split(idx, test_size=n_test, random_state=cfg.seed, stratify=stratify)
        train, val = train_test_split(
            rest, test_size=n_val, random_state=cfg.seed, stratify=None if stratify is None else stratify[rest]
        )
    except ValueError:
        # A class too small to stratify: fall back to a plain shuffled split.
        rest, test = train_test_split(idx, test_size=n_test, random_state=cfg.seed)
        train, val = train_test_split(rest, test_size=n_val, random_state=cfg.seed)
    return np.sort(train), np.sort(val), np.sort(test)


def _fingerprint(x: NDArray[Any], y: NDArray[Any]) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(x, dtype=np.float64).tobytes())
    digest.update(np.asarray(y).astype(str).tobytes())
    return "sha256:" + digest.hexdigest()[:16]


def load_splits(cfg: DatasetConfig, artifact_root: Path = Path("/artifacts")) -> Splits:
    """Load the dataset the config names and return standardized, deterministic splits."""
    if cfg.source == "builtin":
        x, y, names = _load_builtin(cfg.name)
    elif cfg.source == "synthetic":
        x, y, names = _load_synthetic(cfg)
    else:
        x, y, names = _load_file(cfg, artifact_root)
    x = np.asarray(x, dtype=np.float64)
    fingerprint = _fingerprint(x, y)

    if cfg.task == "classification":
        labels, y_enc = np.unique(np.asarray(y), return_inverse=True)
        class_labels = [str(v) for v in labels]
        y_arr: NDArray[Any] = y_enc.astype(np.int64)
        stratify: NDArray[Any] | None = y_arr
    else:
        class_labels = []
        y_arr = np.asarray(y, dtype=np.float64)
        stratify = None

    train, val, test = split_indices(len(x), cfg, stratify)
    norm = Normalization.fit(x[train], y_arr[train] if cfg.task == "regression" else None)

    def target(rows: NDArray[np.int64]) -> NDArray[Any]:
        if cfg.task == "classification":
            return y_arr[rows]
        return ((y_arr[rows] - norm.target_mean) / norm.target_std).astype(np.float32)

    log.info(
        "dataset %s/%s: %d rows, %d features, split %s -> train %d, val %d, test %d",
        cfg.source,
        cfg.name if cfg.source != "file" else cfg.path,
        len(x),
        x.shape[1],
        cfg.split,
        len(train),
        len(val),
        len(test),
    )
    return Splits(
        task=cfg.task,
        x_train=norm.apply(x[train]),
        y_train=target(train),
        x_val=norm.apply(x[val]),
        y_val=target(val),
        x_test=norm.apply(x[test]),
        y_test=target(test),
        normalization=norm,
        feature_names=names or [f"x{i}" for i in range(x.shape[1])],
        class_labels=class_labels,
        fingerprint=fingerprint,
    )
