"""Datasets by URI (pvc://, s3://), Parquet files, featureColumns and timestampColumn, and the file's sha256.

Real files through the real ``load_splits`` (and, once, the real Trainer and validator): Parquet columns are typed
(numbers, text, dates), go through the same checks as a CSV's cells, and errors name the data row and column.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest
import torch
from pydantic import ValidationError

from flownexus.api.trainingjob import DATASET_EXTENSIONS, DatasetSpec, dataset_format
from flownexus_trainer.config import ConfigError, DatasetConfig, JobConfig
from flownexus_trainer.data import FORMATS, Splits, load_splits
from flownexus_trainer.distributed import DistContext
from flownexus_trainer.errors import InputError
from flownexus_trainer.progress import MetricsFileSink
from flownexus_trainer.train import Trainer
from flownexus_trainer.validate import validate

from .conftest import raw_config

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
COLORS = ("red", "green", "blue")
START = datetime(2024, 1, 1, tzinfo=UTC)
EAST, WEST = timezone(timedelta(hours=9)), timezone(timedelta(hours=-11))


def _table(n: int = 60, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """``n`` rows in a shuffled order: ``size`` (float), ``count`` (int), ``color`` (text), ``when`` (ISO text,
    one hour per step of the true order), ``target`` (0/1 following size). Returns the table and the order."""
    order = np.random.default_rng(seed).permutation(n)
    table = pa.table(
        {
            "size": pa.array([float(i) for i in order]),
            "count": pa.array([int(i) * 2 for i in order], pa.int32()),
            "color": pa.array([COLORS[i % 3] for i in order]),
            "when": pa.array([(START + timedelta(hours=int(i))).isoformat() for i in order]),
            "target": pa.array([int(i >= n // 2) for i in order], pa.int64()),
        }
    )
    return table, order


def _write(root: Path, name: str, table: pa.Table) -> str:
    pq.write_table(table, root / name)
    return name


def _uri(name: str, **fields: Any) -> DatasetConfig:
    return DatasetConfig(source="uri", uri=f"pvc://{name}", **fields)


def _raw_sizes(splits: Splits, x: np.ndarray) -> list[float]:
    """The ``size`` feature of standardized rows, back in the file's units."""
    column = splits.feature_names.index("size")
    return [round(float(v), 3) for v in splits.normalization.invert(x)[:, column]]


# --- Parquet through load_splits -----------------------------------------------------------------


def test_parquet_numeric_categorical_and_timestamp_columns_load_into_features(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    name = _write(tmp_path, "d/x.parquet", _table()[0])
    cfg = _uri(name, categorical_columns=("color",), timestamp_column="when", split="temporal")
    splits = load_splits(cfg, tmp_path)
    # The timestamp column is not a feature; the categorical one is one-hot in its place; file order otherwise.
    assert splits.input_columns == ["size", "count", "color"]
    assert splits.feature_names == ["size", "count", "color=blue", "color=green", "color=red"]
    assert splits.encoding == {"color": ["blue", "green", "red"]}
    assert splits.class_labels == ["0", "1"]
    assert len(splits.x_train) + len(splits.x_val) + len(splits.x_test) == 60
    assert splits.data_report["sortedBy"] == "when" and splits.data_report["rowsDropped"] == 0
    assert splits.source_format == "parquet"


@pytest.mark.parametrize(
    "kind",
    ["iso text", "arrow timestamp", "arrow date", "numbers", "iso with offsets"],
)
def test_temporal_split_follows_the_timestamp_column_not_the_file_order(tmp_path: Path, kind: str) -> None:
    table, order = _table(n=40)
    moments = [START + timedelta(days=int(i)) for i in order]
    values = {
        "iso text": pa.array([m.isoformat() for m in moments]),
        "arrow timestamp": pa.array(moments, pa.timestamp("ms", tz="UTC")),
        "arrow date": pa.array([m.date() for m in moments], pa.date32()),
        "numbers": pa.array([m.timestamp() for m in moments]),
        # The same instants written in other zones: ordered by the instant, not the text.
        "iso with offsets": pa.array(
            [m.astimezone(EAST if i % 2 else WEST).isoformat() for i, m in enumerate(moments)]
        ),
    }[kind]
    table = table.set_column(table.column_names.index("when"), "when", values)
    name = _write(tmp_path, "t.parquet", table)
    cfg = _uri(
        name,
        categorical_columns=("color",),
        timestamp_column="when",
        split="temporal",
        validation_fraction=0.25,
        test_fraction=0.25,
    )
    splits = load_splits(cfg, tmp_path)
    # size equals the row's place in time: train holds the first 20 instants, validation the next 10, test the last.
    assert _raw_sizes(splits, splits.x_train) == list(range(20))
    assert _raw_sizes(splits, splits.x_val) == list(range(20, 30))
    assert _raw_sizes(splits, splits.x_test) == list(range(30, 40))


def test_rows_with_the_same_timestamp_keep_their_file_order(tmp_path: Path) -> None:
    n = 30
    table = pa.table(
        {
            "size": pa.array([float(i) for i in range(n)]),
            "when": pa.array(["2024-01-02" if i < n // 2 else "2024-01-01" for i in range(n)]),
            "target": pa.array([i % 2 for i in range(n)]),
        }
    )
    cfg = _uri(_write(tmp_path, "s.pq", table), timestamp_column="when", split="temporal")
    splits = load_splits(cfg, tmp_path)
    everything = np.concatenate([splits.x_train, splits.x_val, splits.x_test])
    # The second half is a day earlier and comes first; within each day, file order.
    assert _raw_sizes(splits, everything) == [*range(15, 30), *range(15)]


def test_a_timestamp_that_is_not_a_time_names_row_and_column(tmp_path: Path) -> None:
    table, _ = _table(n=30)
    when = table.column("when").to_pylist()
    when[6] = "next tuesday"
    table = table.set_column(table.column_names.index("when"), "when", pa.array(when))
    name = _write(tmp_path, "t.parquet", table)
    cfg = _uri(name, categorical_columns=("color",), timestamp_column="when", split="temporal")
    with pytest.raises(InputError) as caught:
        load_splits(cfg, tmp_path)
    assert str(caught.value) == (
        'dataset.uri: pvc://t.parquet row 7, column "when": "next tuesday" is not a number or an ISO-8601 date/time'
    )


def test_a_timestamp_column_in_a_csv_file_source_orders_the_rows_too(tmp_path: Path) -> None:
    order = np.random.default_rng(3).permutation(30)
    lines = ["when,size,target"] + [f"2024-01-01T{int(i) // 2:02d}:{int(i) % 2 * 30:02d}:00,{i},{i % 2}" for i in order]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    cfg = DatasetConfig(source="file", path="t.csv", timestamp_column="when", split="temporal")
    splits = load_splits(cfg, tmp_path)
    assert splits.input_columns == ["size"]
    everything = np.concatenate([splits.x_train, splits.x_val, splits.x_test])
    assert _raw_sizes(splits, everything) == list(range(30))


# --- featureColumns ------------------------------------------------------------------------------


def test_feature_columns_select_and_order_the_features(tmp_path: Path) -> None:
    name = _write(tmp_path, "x.parquet", _table()[0])
    splits = load_splits(_uri(name, feature_columns=("color", "size"), categorical_columns=("color",)), tmp_path)
    assert splits.input_columns == ["color", "size"]
    assert splits.feature_names == ["color=blue", "color=green", "color=red", "size"]
    # count and when are neither features nor checked: when is text that is not a number.
    assert splits.input_schema()["columns"] == ["color", "size"]


def test_a_feature_column_that_does_not_exist_is_named_with_the_available_ones(tmp_path: Path) -> None:
    name = _write(tmp_path, "x.parquet", _table()[0])
    with pytest.raises(InputError) as caught:
        load_splits(_uri(name, feature_columns=("size", "weight")), tmp_path)
    assert str(caught.value) == (
        "dataset.featureColumns: 'weight' is not a column of pvc://x.parquet "
        "(columns: ['size', 'count', 'color', 'when', 'target'])"
    )


def test_a_categorical_column_left_out_of_feature_columns_is_an_error(tmp_path: Path) -> None:
    name = _write(tmp_path, "x.parquet", _table()[0])
    with pytest.raises(InputError, match=r"dataset.categoricalColumns: 'color' is not one of the feature columns"):
        load_splits(_uri(name, feature_columns=("size",), categorical_columns=("color",)), tmp_path)


def test_a_text_column_used_as_a_number_is_named_with_the_categorical_hint(tmp_path: Path) -> None:
    name = _write(tmp_path, "x.parquet", _table(n=30)[0])
    with pytest.raises(InputError) as caught:
        load_splits(_uri(name, feature_columns=("size", "color")), tmp_path)
    text = str(caught.value)
    assert text.startswith('dataset.uri: pvc://x.parquet has 30 bad cells, the first 5: row 1, column "color": ')
    assert "is not a number" in text and "list them in dataset.categoricalColumns" in text


# --- missing values ------------------------------------------------------------------------------


def _with_gaps(n: int = 40) -> pa.Table:
    table, _ = _table(n=n)
    sizes = [None if i in (4, 9) else v for i, v in enumerate(table.column("size").to_pylist())]
    sizes[12] = float("nan")
    colors = [None if i == 20 else v for i, v in enumerate(table.column("color").to_pylist())]
    table = table.set_column(0, "size", pa.array(sizes, pa.float64()))
    return table.set_column(table.column_names.index("color"), "color", pa.array(colors))


def test_parquet_nulls_and_nan_are_errors_naming_row_and_column(tmp_path: Path) -> None:
    name = _write(tmp_path, "g.parquet", _with_gaps())
    with pytest.raises(InputError) as caught:
        load_splits(_uri(name, categorical_columns=("color",), feature_columns=("size", "color")), tmp_path)
    assert str(caught.value) == (
        "dataset.uri: pvc://g.parquet has 4 bad cells, the first 4: "
        'row 5, column "size": null is null (a missing value); '
        'row 10, column "size": null is null (a missing value); '
        'row 13, column "size": "nan" is not a number (a missing value); '
        'row 21, column "color": null is null (a missing value). '
        "Missing values (empty, NaN, NA, n/a, null, none) can be dropped with dataset.missingValues: dropRows."
    )


def test_drop_rows_drops_parquet_nulls_and_counts_them(tmp_path: Path) -> None:
    name = _write(tmp_path, "g.parquet", _with_gaps())
    cfg = _uri(name, categorical_columns=("color",), feature_columns=("size", "color"), missing_values="dropRows")
    splits = load_splits(cfg, tmp_path)
    assert splits.data_report["rowsRead"] == 40 and splits.data_report["rowsDropped"] == 4
    assert splits.data_report["missingByColumn"] == {"size": 3, "color": 1}
    assert len(splits.x_train) + len(splits.x_val) + len(splits.x_test) == 36


# --- where the file is ---------------------------------------------------------------------------


def test_a_pvc_uri_cannot_leave_the_artifact_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    _write(tmp_path, "x.parquet", _table()[0])  # exists, but outside the store
    with pytest.raises(InputError, match=r"dataset.uri: must stay inside the artifact store, got '../x.parquet'"):
        load_splits(_uri("../x.parquet"), store)


def test_a_pvc_uri_that_does_not_exist_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"dataset.uri: 'pvc://no/such.parquet' does not exist in the artifact"):
        load_splits(_uri("no/such.parquet"), tmp_path)


def test_an_s3_uri_without_a_downloaded_file_is_a_clear_error(tmp_path: Path) -> None:
    cfg = DatasetConfig(source="uri", uri="s3://flownexus/data/x.parquet")
    with pytest.raises(InputError) as caught:
        load_splits(cfg, tmp_path)
    assert str(caught.value) == (
        "dataset.uri: the s3 dataset 's3://flownexus/data/x.parquet' was not downloaded (no paths.datasetFile in the "
        "job config): the NeuralCluster's artifact store must be S3, with the same bucket"
    )


def test_an_s3_uri_reads_the_file_named_by_paths_dataset_file(tmp_path: Path) -> None:
    # No extension on the downloaded file: the format comes from the uri.
    downloaded = tmp_path / "download-1234"
    pq.write_table(_table()[0], downloaded)
    raw = raw_config(tmp_path, dataset={"source": "uri", "uri": "s3://flownexus/data/x.PQ", "categoricalColumns":
                                        ["color"], "featureColumns": ["size", "color"]})  # fmt: skip
    raw["paths"]["datasetFile"] = str(downloaded)
    cfg = JobConfig.from_dict(raw)
    assert cfg.dataset.downloaded_file == str(downloaded)
    splits = load_splits(cfg.dataset, cfg.artifact_root)
    assert splits.source_format == "parquet" and splits.input_columns == ["size", "color"]
    assert splits.source_sha256 == hashlib.sha256(downloaded.read_bytes()).hexdigest()


def test_a_file_source_on_an_s3_store_reads_the_downloaded_file(tmp_path: Path) -> None:
    """With an S3 artifact store the operator names the downloaded copy of ``path`` in ``paths.datasetFile``."""
    downloaded = tmp_path / "download" / "train.csv"
    downloaded.parent.mkdir()
    downloaded.write_text("a,b,target\n" + "\n".join(f"{i},{i % 3},{i % 2}" for i in range(30)) + "\n")
    cfg = DatasetConfig(source="file", path="data/train.csv", downloaded_file=str(downloaded))
    splits = load_splits(cfg, tmp_path / "store")  # nothing at <store>/data/train.csv
    assert splits.source_sha256 == hashlib.sha256(downloaded.read_bytes()).hexdigest()
    with pytest.raises(InputError, match=r"dataset.path: 'data/train.csv' was not downloaded from the S3 store"):
        load_splits(DatasetConfig(source="file", path="data/train.csv", downloaded_file=str(tmp_path / "no")), tmp_path)


# --- checksum and format -------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["file csv", "file npz", "uri parquet", "uri csv"])
def test_the_checksum_is_the_sha256_of_the_file_bytes(tmp_path: Path, source: str) -> None:
    rows = [f"{i},{i % 3},{i % 2}" for i in range(30)]
    if source == "file npz":
        np.savez(tmp_path / "d.npz", x=np.arange(60, dtype=float).reshape(30, 2), y=np.arange(30) % 2)
        file, cfg = tmp_path / "d.npz", DatasetConfig(source="file", path="d.npz")
    elif source == "uri parquet":
        file, cfg = tmp_path / _write(tmp_path, "d.parquet", _table()[0]), _uri("d.parquet", feature_columns=("size",))
    else:
        (tmp_path / "d.csv").write_text("a,b,target\n" + "\n".join(rows) + "\n")
        file = tmp_path / "d.csv"
        cfg = DatasetConfig(source="file", path="d.csv") if source == "file csv" else _uri("d.csv")
    splits = load_splits(cfg, tmp_path)
    assert splits.source_sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    if source.endswith("csv"):
        # One more blank line: the same rows (the same fingerprint), other bytes (another checksum).
        with file.open("ab") as fh:
            fh.write(b"\n")
        again = load_splits(cfg, tmp_path)
        assert again.fingerprint == splits.fingerprint and again.source_sha256 != splits.source_sha256


def test_builtin_and_synthetic_data_have_no_checksum() -> None:
    assert load_splits(DatasetConfig(name="iris")).source_sha256 is None
    assert load_splits(DatasetConfig(source="synthetic")).source_sha256 is None


@pytest.mark.parametrize(
    ("name", "fmt", "expected"),
    [
        ("d.csv", "", "csv"),
        ("d.TSV", "", "csv"),
        ("d.txt", "", "csv"),
        ("d.parquet", "", "parquet"),
        ("d.pq", "", "parquet"),
        ("d.npz", "", "npz"),
        ("d.data", "parquet", "parquet"),  # format wins where the extension says nothing
        ("d.data", "csv", "csv"),
    ],
)
def test_the_format_comes_from_the_extension_unless_set(tmp_path: Path, name: str, fmt: str, expected: str) -> None:
    path = tmp_path / name
    if expected == "parquet":
        pq.write_table(_table()[0], path)
    elif expected == "npz":
        with path.open("wb") as fh:
            np.savez(fh, x=np.arange(60, dtype=float).reshape(30, 2), y=np.arange(30) % 2)
    else:
        sep = "\t" if name.lower().endswith(".tsv") else ","
        path.write_text("\n".join([sep.join(["a", "b", "target"])] + [sep.join(map(str, (i, i % 3, i % 2))) for i in
                                                                        range(30)]) + "\n")  # fmt: skip
    splits = load_splits(_uri(name, format=fmt, feature_columns=() if expected != "parquet" else ("size",)), tmp_path)
    assert splits.source_format == expected
    if not fmt:  # the API infers the same format at admission
        assert dataset_format(f"pvc://{name}") == expected


def test_an_unknown_extension_without_a_format_is_an_error_at_run_time(tmp_path: Path) -> None:
    (tmp_path / "d.data").write_text("a,target\n1,0\n")
    with pytest.raises(InputError, match=r"dataset.uri: 'pvc://d.data' has no known extension .*set dataset.format"):
        load_splits(_uri("d.data"), tmp_path)


def test_the_trainer_and_the_api_know_the_same_extensions() -> None:
    assert FORMATS == DATASET_EXTENSIONS


def test_npz_has_no_named_columns_to_select_or_sort_by(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((30, 2)), y=np.arange(30) % 2)
    with pytest.raises(InputError, match=r"dataset.featureColumns: only CSV and Parquet files have named columns"):
        load_splits(_uri("d.npz", feature_columns=("a",)), tmp_path)
    with pytest.raises(InputError, match=r"dataset.timestampColumn: only CSV and Parquet files have named columns"):
        load_splits(_uri("d.npz", timestamp_column="t", split="temporal"), tmp_path)


def test_a_file_that_is_not_parquet_is_named(tmp_path: Path) -> None:
    (tmp_path / "d.parquet").write_text("a,target\n1,0\n")
    with pytest.raises(InputError, match=r"dataset.uri: pvc://d.parquet is not a readable Parquet file"):
        load_splits(_uri("d.parquet"), tmp_path)


# --- the config and the API ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ({"source": "uri"}, "dataset.uri: required when source is 'uri'"),
        ({"source": "file", "path": "a.csv", "format": "csv"}, "dataset.format: only meaningful with source 'uri'"),
        ({"source": "synthetic", "featureColumns": ["a"]}, "dataset.featureColumns: only meaningful with source"),
        ({"source": "uri", "uri": "pvc://a.csv", "timestampColumn": "t"}, "dataset.timestampColumn: needs split"),
        ({"source": "uri", "uri": "pvc://a.csv", "featureColumns": ["a", "a"]}, "featureColumns: names appear twice"),
        ({"source": "uri", "uri": "pvc://a.csv", "featureColumns": ["target"]}, "is the target column"),
        ({"source": "uri", "uri": "pvc://a.csv", "format": "xlsx"}, "dataset.format: must be one of"),
    ],
)
def test_the_trainer_config_refuses_inconsistent_dataset_fields(dataset: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DatasetConfig.from_dict(dataset)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"source": "uri"}, "uri is required when source is uri"),
        ({"source": "uri", "uri": "pvc://../x.csv"}, "pvc://../x.csv may not contain a '..' segment"),
        ({"source": "uri", "uri": "s3://b/x.csv"}, "s3://b/x.csv is not s3://<bucket>/<key> or pvc://"),
        ({"source": "uri", "uri": "pvc:///etc/x.csv"}, "is not s3://<bucket>/<key> or pvc://"),
        ({"source": "uri", "uri": "http://example.com/x.csv"}, "is not s3://<bucket>/<key> or pvc://"),
        ({"source": "uri", "uri": "pvc://x.xlsx"}, "uri has no known extension"),
        ({"source": "file", "path": "x.csv", "uri": "pvc://x.csv"}, "uri needs source: uri"),
        ({"source": "file", "path": "x.csv", "format": "csv"}, "format needs source: uri"),
        ({"source": "synthetic", "featureColumns": ["a"]}, "featureColumns needs source: file or uri"),
        ({"source": "builtin", "name": "iris", "timestampColumn": "t", "split": "temporal"}, "timestampColumn needs "
         "source: file or uri"),
        ({"source": "uri", "uri": "pvc://x.csv", "timestampColumn": "t"}, "timestampColumn needs split: temporal"),
        ({"source": "uri", "uri": "pvc://x.csv", "featureColumns": ["target"]}, "targetColumn cannot be one of "
         "featureColumns"),
        ({"source": "uri", "uri": "pvc://x.csv", "split": "temporal", "timestampColumn": "target"}, "timestampColumn "
         "cannot be the targetColumn"),
        ({"source": "uri", "uri": "pvc://x.csv", "split": "temporal", "timestampColumn": "t", "featureColumns": ["t"]},
         "timestampColumn cannot be one of featureColumns"),
        ({"source": "synthetic", "categoricalColumns": ["a"]}, "categoricalColumns needs source: file or uri"),
    ],
)  # fmt: skip
def test_the_api_refuses_inconsistent_dataset_fields(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        DatasetSpec.model_validate(spec)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "spec",
    [
        {"source": "uri", "uri": "s3://my-bucket/data/2024/x.parquet"},
        {"source": "uri", "uri": "pvc://data/x.csv", "categoricalColumns": ["c"], "featureColumns": ["a", "c"]},
        {"source": "uri", "uri": "pvc://data/export", "format": "parquet"},
        {"source": "uri", "uri": "s3://b.with.dots/x.NPZ"},
        {"source": "file", "path": "x.csv", "split": "temporal", "timestampColumn": "t"},
    ],
)
def test_the_api_accepts_datasets_by_uri(spec: dict[str, Any]) -> None:
    DatasetSpec.model_validate(spec)


# --- a real training run -------------------------------------------------------------------------


def test_a_tiny_training_run_on_a_parquet_dataset_trains_validates_and_records_the_checksum(tmp_path: Path) -> None:
    table, _ = _table(n=240, seed=5)
    (tmp_path / "data").mkdir()
    file = tmp_path / _write(tmp_path, "data/train.parquet", table)
    dataset = {
        "source": "uri",
        "uri": "pvc://data/train.parquet",
        "categoricalColumns": ["color"],
        "timestampColumn": "when",
        "split": "temporal",
    }
    cfg = JobConfig.from_dict(raw_config(tmp_path, dataset=dataset, training={"epochs": 3}))
    Trainer(cfg, SINGLE, MetricsFileSink(cfg.run_dir / "metrics.jsonl")).run()
    sha256 = hashlib.sha256(file.read_bytes()).hexdigest()
    summary = json.loads((cfg.run_dir / "training_summary.json").read_text())
    assert summary["datasetSha256"] == sha256
    model_config = json.loads((cfg.run_dir / "model" / "model_config.json").read_text())
    assert model_config["inputSchema"] == {"columns": ["size", "count", "color"], "categorical": {
        "color": ["blue", "green", "red"]}}  # fmt: skip
    validate(cfg)
    metadata = json.loads((cfg.run_dir / "metadata.json").read_text())
    ds = metadata["dataset"]
    assert (ds["name"], ds["uri"], ds["sha256"], ds["format"]) == ("pvc://data/train.parquet",) * 2 + (
        sha256,
        "parquet",
    )
    assert ds["featureColumns"] == ["size", "count", "color"] and ds["timestampColumn"] == "when"
    report = (cfg.run_dir / "report.md").read_text()
    assert "- dataset: `uri/pvc://data/train.parquet` (sha256:" in report
    assert f"file sha256 {sha256[:16]}), split `temporal`" in report
