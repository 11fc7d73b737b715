"""Splits: deterministic, disjoint, temporal order kept, standardization fitted on train only; bad data is an
error naming the file, line, column and value; labels have one spelling; categorical columns are one-hot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from flownexus.api.trainingjob import DatasetSpec
from flownexus_trainer.config import ConfigError, DatasetConfig
from flownexus_trainer.data import canonical_label, detect_delimiter, encode_labels, load_splits, split_indices
from flownexus_trainer.errors import InputError


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


# --- bad data: errors name the file, the line, the column and the value --------------------------


def _rows(n: int = 30, classes: int = 2) -> list[str]:
    return [f"{i},{i % 3},{i % classes}" for i in range(n)]


def _write(root: Path, name: str, lines: list[str], encoding: str = "utf-8") -> str:
    (root / name).write_text("\n".join(lines) + "\n", encoding=encoding)
    return name


def _error(root: Path, name: str, **cfg: Any) -> str:
    with pytest.raises(InputError) as raised:
        load_splits(DatasetConfig(source="file", path=name, **cfg), root)
    return str(raised.value)


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        ("5,n/a,1", 'data.csv line 7, column "b": "n/a" is not a number'),
        ("5,,1", 'data.csv line 7, column "b": "" is empty'),
        ("5,NaN,1", 'data.csv line 7, column "b": "NaN" is not a number (a missing value)'),
        ("5,inf,1", 'data.csv line 7, column "b": "inf" is not a finite number'),
        ("5,-Infinity,1", 'data.csv line 7, column "b": "-Infinity" is not a finite number'),
        ("abc,1,1", 'data.csv line 7, column "a": "abc" is not a number'),
        ('"1,5",1,1', 'data.csv line 7, column "a": "1,5" is not a number'),
        ("5,1,", 'data.csv line 7, column "target": "" is empty'),
    ],
)
def test_a_bad_cell_is_an_error_naming_file_line_column_and_value(tmp_path: Path, bad_row: str, expected: str) -> None:
    rows = _rows()
    name = _write(tmp_path, "data.csv", ["a,b,target", *rows[:5], bad_row, *rows[6:]])
    assert f"dataset.path: {expected}" in _error(tmp_path, name)


def test_many_bad_cells_report_the_first_five_in_file_order_and_the_total(tmp_path: Path) -> None:
    rows = _rows()
    bad = ["x1,1,0", "2,x2,1", "x3,x4,0", "4,5,1", "6,,0", "7,8,1", "x5,9,0", "10,n/a,1"]
    name = _write(tmp_path, "data.csv", ["a,b,target", *bad, *rows])
    message = _error(tmp_path, name)
    assert "data.csv has 7 bad cells, the first 5:" in message
    listed = ['line 2, column "a": "x1"', 'line 3, column "b": "x2"', 'line 4, column "a": "x3"',
              'line 4, column "b": "x4"', 'line 6, column "b": ""']  # fmt: skip
    positions = [message.index(part) for part in listed]
    assert positions == sorted(positions)
    assert '"x5"' not in message and '"n/a"' not in message
    # The hints: text in a feature column may be a category; missing values may be dropped.
    assert "dataset.categoricalColumns" in message and "dataset.missingValues: dropRows" in message


def test_a_nan_cell_no_longer_trains_on_nan(tmp_path: Path) -> None:
    # Before: one NaN turned the column's standardization into NaN and training wrote NaN weights.
    rows = _rows()
    name = _write(tmp_path, "data.csv", ["a,b,target", *rows[:3], "3,nan,1", *rows[4:]])
    assert 'line 5, column "b": "nan"' in _error(tmp_path, name)


def test_regression_target_that_is_not_a_number_names_line_and_column(tmp_path: Path) -> None:
    rows = _rows()
    name = _write(tmp_path, "data.csv", ["a,b,target", *rows[:9], "9,0,high", *rows[10:]])
    message = _error(tmp_path, name, task="regression")
    assert message == 'dataset.path: data.csv line 11, column "target": "high" is not a number'


@pytest.mark.parametrize(
    ("header", "delimiter", "encoding"),
    [
        ("\ufeffa,b,target", ",", "utf-8"),  # a UTF-8 BOM (Excel's "CSV UTF-8")
        (" a , b ,  target ", ",", "utf-8"),  # spaces around the names
        ("a;b;target", ";", "utf-8"),  # semicolons (a European Excel)
        ("a\tb\ttarget", "\t", "utf-8"),  # tab-separated
        ('"a";"b";"target"', ";", "utf-8"),  # quoted names
        ("a,b,target", ",", "utf-8-sig"),  # the BOM written by the codec
    ],
)
def test_headers_with_bom_spaces_or_other_delimiters_load(
    tmp_path: Path, header: str, delimiter: str, encoding: str
) -> None:
    body = [f" {i} {delimiter}{i % 3}{delimiter} {i % 2} " for i in range(30)]
    name = _write(tmp_path, "data.csv", [header, *body], encoding=encoding)
    splits = load_splits(DatasetConfig(source="file", path=name), tmp_path)
    assert splits.feature_names == ["a", "b"] and splits.class_labels == ["0", "1"]
    assert len(splits.x_train) + len(splits.x_val) + len(splits.x_test) == 30


@pytest.mark.parametrize(
    ("line", "delimiter"),
    [("a,b,target", ","), ("a;b;target", ";"), ("a\tb\ttarget", "\t"), ('"x;y",b,target', ","), ("a;b,c;d", ";")],
)
def test_the_delimiter_is_the_one_that_splits_the_header_most(line: str, delimiter: str) -> None:
    assert detect_delimiter(line) == delimiter


def test_a_missing_target_column_lists_the_header_and_delimiter(tmp_path: Path) -> None:
    name = _write(tmp_path, "data.csv", ["a;b;label", *[r.replace(",", ";") for r in _rows()]])
    message = _error(tmp_path, name)
    assert "'target' is not a column of data.csv (columns: ['a', 'b', 'label'], delimiter ';')" in message


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["a,b,target", "1,2,0", "1,2"], "data.csv line 3: 2 fields, but the header has 3"),
        (["a,,target", "1,2,0"], "line 1: column 2 of the header has no name"),
        (["a,a,target", "1,2,0"], "line 1: column names appear twice: ['a']"),
        ([""], "data.csv is empty"),
        (["a,b,target", '1,"2,0'], "not a valid CSV"),
    ],
)
def test_malformed_csv_files_name_what_is_wrong(tmp_path: Path, lines: list[str], expected: str) -> None:
    assert expected in _error(tmp_path, _write(tmp_path, "data.csv", lines))


def test_a_file_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_bytes("a,b,target\n1,\xe9,0\n".encode("latin-1"))
    assert "data.csv is not UTF-8 text" in _error(tmp_path, "data.csv")


# --- missing values: dropRows --------------------------------------------------------------------


def test_drop_rows_drops_rows_with_missing_cells_and_reports_them(tmp_path: Path) -> None:
    rows = _rows(40)
    name = _write(tmp_path, "data.csv", ["a,b,target", "1,,0", "2,NaN,1", ",3,0", "4,5,NA", *rows])
    splits = load_splits(DatasetConfig(source="file", path=name, missing_values="dropRows"), tmp_path)
    assert len(splits.x_train) + len(splits.x_val) + len(splits.x_test) == 40
    assert splits.data_report["rowsRead"] == 44 and splits.data_report["rowsDropped"] == 4
    assert splits.data_report["missingByColumn"] == {"a": 1, "b": 2, "target": 1}
    assert np.isfinite(splits.x_train).all()


def test_drop_rows_still_refuses_values_that_are_not_missing(tmp_path: Path) -> None:
    name = _write(tmp_path, "data.csv", ["a,b,target", "1,,0", "2,abc,1", "3,inf,0", *_rows()])
    message = _error(tmp_path, name, missing_values="dropRows")
    assert 'line 3, column "b": "abc" is not a number' in message and '"inf" is not a finite number' in message
    assert "line 2" not in message  # the empty cell would have been dropped


@pytest.mark.parametrize(
    ("x_bad", "y_bad", "expected"),
    [
        ((7, 2, np.nan), None, "array 'x' has 1 value that is not a finite number (NaN or inf), the first at [7, 2]"),
        ((3, 0, np.inf), None, "array 'x' has 1 value that is not a finite number (NaN or inf), the first at [3, 0]"),
        (None, (11, np.nan), "array 'y' has 1 value that is not a finite number (NaN or inf), the first at [11]"),
    ],
)
def test_npz_nan_or_inf_names_the_array_and_the_first_index(
    tmp_path: Path, x_bad: tuple[int, int, float] | None, y_bad: tuple[int, float] | None, expected: str
) -> None:
    x, y = np.arange(90, dtype=float).reshape(30, 3), (np.arange(30) % 2).astype(float)
    if x_bad:
        x[x_bad[0], x_bad[1]] = x_bad[2]
    if y_bad:
        y[y_bad[0]] = y_bad[1]
    np.savez(tmp_path / "d.npz", x=x, y=y)
    assert f"dataset.path: d.npz {expected}" in _error(tmp_path, "d.npz", task="regression")


def test_npz_drop_rows_drops_nan_rows_but_refuses_inf(tmp_path: Path) -> None:
    x = np.arange(90, dtype=float).reshape(30, 3)
    x[4, 1] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(30) % 2)
    splits = load_splits(DatasetConfig(source="file", path="d.npz", missing_values="dropRows"), tmp_path)
    assert splits.data_report == {"rowsRead": 30, "rowsDropped": 1}
    x[5, 0] = np.inf
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(30) % 2)
    assert "first at [5, 0]" in _error(tmp_path, "d.npz", missing_values="dropRows")


# --- labels -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [("1", "1"), ("1.0", "1"), (" 1 ", "1"), ("01", "1"), ("-0", "0"), ("2.50", "2.5"), ("1e3", "1000"),
     ("cat", "cat"), (" Cat ", "Cat"), ("1_000", "1_000"), ("inf", "inf"), ("0.1", "0.1")],
)  # fmt: skip
def test_numeric_looking_labels_have_one_spelling(text: str, canonical: str) -> None:
    assert canonical_label(text) == canonical


def test_labels_1_and_1_0_are_one_class_in_numeric_order(tmp_path: Path) -> None:
    spellings = ["1", "1.0", " 1 ", "2", "2.0", "10"]
    lines = [f"{i},{i % 3},{spellings[i % 6]}" for i in range(36)]
    splits = load_splits(DatasetConfig(source="file", path=_write(tmp_path, "d.csv", ["a,b,target", *lines])), tmp_path)
    assert splits.class_labels == ["1", "2", "10"]  # 2 before 10: numbers sort as numbers
    assert sorted(np.bincount(np.concatenate([splits.y_train, splits.y_val, splits.y_test])).tolist()) == [6, 12, 18]


def test_npz_float_labels_are_spelled_as_integers() -> None:
    labels, y = encode_labels(np.array([0.0, 1.0, 1.0, 2.0]))
    assert labels == ["0", "1", "2"] and y.tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize(("extra_rows", "count"), [(["1,2,rare"], "1 row"), (["1,2,rare", "3,4,rare"], "2 rows")])
def test_a_class_too_small_for_a_stratified_split_is_an_error_naming_it(
    tmp_path: Path, extra_rows: list[str], count: str
) -> None:
    name = _write(tmp_path, "d.csv", ["a,b,target", *_rows(), *extra_rows])
    message = _error(tmp_path, name)
    assert f'"rare" ({count})' in message and "at least 3 rows of every class" in message


def test_a_small_class_is_accepted_by_a_temporal_split(tmp_path: Path) -> None:
    name = _write(tmp_path, "d.csv", ["a,b,target", *_rows(), "1,2,rare"])
    splits = load_splits(DatasetConfig(source="file", path=name, split="temporal"), tmp_path)
    assert splits.class_labels == ["0", "1", "rare"]


def test_a_class_of_three_rows_is_enough_for_a_stratified_split() -> None:
    labels = np.array([0] * 40 + [1] * 40 + [2] * 3)
    train, val, test = split_indices(len(labels), DatasetConfig(), labels)
    assert 2 in labels[train] and len(train) + len(val) + len(test) == 83
    assert np.bincount(labels[test])[0] == np.bincount(labels[test])[1]  # stratified, not a plain shuffle


def test_more_classes_than_test_rows_is_an_error_naming_the_fraction(tmp_path: Path) -> None:
    lines = [f"{i},{i % 3},{i % 10}" for i in range(30)]  # 10 classes, 5 test rows
    message = _error(tmp_path, _write(tmp_path, "d.csv", ["a,b,target", *lines]))
    assert "dataset.testFraction: gives 4 rows, fewer than the 10 classes" in message


# --- categorical columns ------------------------------------------------------------------------


def _categorical_csv(root: Path, colors: list[str]) -> str:
    lines = [f'{i},"{colors[i % len(colors)]}",{i % 2}' for i in range(60)]
    return _write(root, "cat.csv", ["size,color,target", *lines])


def test_categorical_columns_are_one_hot_with_training_categories(tmp_path: Path) -> None:
    name = _categorical_csv(tmp_path, ["red", "green, dark", "blue", "1", "1.0"])
    splits = load_splits(DatasetConfig(source="file", path=name, categorical_columns=("color",)), tmp_path)
    assert splits.encoding == {"color": ["1", "blue", "green, dark", "red"]}  # 1 and 1.0 are one category
    assert splits.feature_names == ["size", "color=1", "color=blue", "color=green, dark", "color=red"]
    assert splits.input_schema() == {"columns": ["size", "color"], "categorical": splits.encoding}
    raw = splits.x_train * np.asarray(splits.normalization.std) + np.asarray(splits.normalization.mean)
    assert np.allclose(raw[:, 1:].sum(axis=1), 1.0, atol=1e-5)  # exactly one category per row
    assert splits.data_report["unseenCategories"] == {"color": 0}


def test_a_category_seen_only_outside_training_is_all_zeros_and_counted(tmp_path: Path) -> None:
    lines = [f"{i},{'red' if i % 2 else 'blue'},{i % 2}" for i in range(40)] + ["40,purple,0"]
    name = _write(tmp_path, "d.csv", ["size,color,target", *lines])
    cfg = DatasetConfig(source="file", path=name, categorical_columns=("color",), split="temporal")
    splits = load_splits(cfg, tmp_path)
    assert splits.encoding == {"color": ["blue", "red"]}  # purple is the last (test) row
    assert splits.data_report["unseenCategories"] == {"color": 1}
    last = splits.x_test[-1] * np.asarray(splits.normalization.std) + np.asarray(splits.normalization.mean)
    assert last[1:] == pytest.approx([0.0, 0.0], abs=1e-5)


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (("colour",), "dataset.categoricalColumns: 'colour' is not a column of cat.csv (columns: ['size', 'color', "
                      "'target'])"),
        (("target",), "dataset.categoricalColumns: 'target' is the target column"),
    ],
)  # fmt: skip
def test_a_categorical_column_that_is_not_usable_is_named(
    tmp_path: Path, columns: tuple[str, ...], expected: str
) -> None:
    name = _categorical_csv(tmp_path, ["red", "blue"])
    assert expected in _error(tmp_path, name, categorical_columns=columns)


def test_an_empty_category_is_a_missing_value(tmp_path: Path) -> None:
    lines = [f"{i},{'red' if i else ''},{i % 2}" for i in range(30)]
    name = _write(tmp_path, "d.csv", ["size,color,target", *lines])
    assert 'line 2, column "color": "" is empty' in _error(tmp_path, name, categorical_columns=("color",))


def test_categorical_columns_in_the_config_need_a_file_source() -> None:
    with pytest.raises(ConfigError, match="categoricalColumns: only meaningful with source 'file'"):
        DatasetConfig.from_dict({"source": "synthetic", "categoricalColumns": ["a"]})
    with pytest.raises(ConfigError, match="missingValues: must be one of"):
        DatasetConfig.from_dict({"source": "file", "path": "a.csv", "missingValues": "ignore"})
    cfg = DatasetConfig.from_dict(
        {"source": "file", "path": "a.csv", "categoricalColumns": ["color"], "missingValues": "dropRows"}
    )
    assert cfg.categorical_columns == ("color",) and cfg.missing_values == "dropRows"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"source": "synthetic", "categoricalColumns": ["a"]}, "categoricalColumns needs source: file"),
        ({"source": "file", "path": "a.csv", "categoricalColumns": ["target"]}, "targetColumn cannot be one of"),
        ({"source": "file", "path": "a.csv", "missingValues": "skip"}, "missingValues"),
        ({"source": "file", "path": "a.csv", "categoricalColumns": [""]}, "categoricalColumns"),
    ],
)
def test_the_api_refuses_what_the_trainer_would(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DatasetSpec.model_validate(spec)
