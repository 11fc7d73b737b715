"""Splits: deterministic, disjoint, temporal order kept, standardization fitted on train only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flownexus_trainer.config import DatasetConfig
from flownexus_trainer.data import load_splits, split_indices


def test_temporal_split_keeps_time_order() -> None:
    cfg = DatasetConfig(split="temporal", validation_fraction=0.2, test_fraction=0.1)
    train, val, test = split_indices(100, cfg, stratify=None)
    assert list(train) == list(range(70))
    assert list(val) == list(range(70, 90))
    assert list(test) == list(range(90, 100))


def test_random_split_is_disjoint_complete_and_reproducible() -> None:
    cfg = DatasetConfig(seed=7)
    labels = np.arange(200) % 4
    first = split_indices(200, cfg, labels)
    again = split_indices(200, cfg, labels)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    joined = np.concatenate(first)
    assert len(joined) == 200 and len(set(joined.tolist())) == 200


def test_standardization_uses_training_rows_only(tmp_path: Path) -> None:
    rows = np.arange(40, dtype=float).reshape(20, 2)
    np.savez(tmp_path / "series.npz", x=rows, y=np.arange(20) % 2)
    cfg = DatasetConfig(
        source="file", path="series.npz", split="temporal", validation_fraction=0.25, test_fraction=0.25
    )
    splits = load_splits(cfg, tmp_path)
    # 10 training rows: the first 10 in time. Their mean, not the whole table's, is the offset.
    assert splits.normalization.mean == pytest.approx(rows[:10].mean(axis=0).tolist())
    assert splits.x_train.mean(axis=0) == pytest.approx([0.0, 0.0], abs=1e-6)
    # Later rows are larger than anything seen in training: no leakage pulls them back to 0.
    assert (splits.x_test > splits.x_train.max()).all()


def test_csv_with_class_names_and_regression_target_scaling(tmp_path: Path) -> None:
    lines = ["a,b,target"] + [f"{i},{i % 3},{'cat' if i % 2 else 'dog'}" for i in range(30)]
    (tmp_path / "t.csv").write_text("\n".join(lines))
    splits = load_splits(DatasetConfig(source="file", path="t.csv"), tmp_path)
    assert splits.class_labels == ["cat", "dog"] and splits.num_features == 2
    reg = load_splits(DatasetConfig(source="synthetic", task="regression"), tmp_path)
    assert reg.num_outputs == 1 and abs(float(reg.y_train.mean())) < 1e-5


def test_file_outside_the_artifact_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="inside the artifact store"):
        load_splits(DatasetConfig(source="file", path="../../etc/passwd.csv"), tmp_path)


def test_builtin_sets_load_without_network() -> None:
    splits = load_splits(DatasetConfig(name="iris"))
    assert splits.num_features == 4 and splits.num_outputs == 3
    assert len(splits.x_train) + len(splits.x_val) + len(splits.x_test) == 150
