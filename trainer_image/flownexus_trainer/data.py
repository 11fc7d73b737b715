"""Datasets: load (packaged scikit-learn sets, synthetic, or a CSV/Parquet/NPZ file), check, split, encode,
standardize.

Nothing is downloaded here: an ``s3://`` dataset is a local file the operator's store wrapper fetched before the
trainer started (``paths.datasetFile``); a ``pvc://`` one and ``source: file`` are files in the artifact store.
The standardization (and the categories of one-hot encoded columns) are fitted on the training split only, so no
statistic of validation or test rows leaks into training; the fitted numbers travel with the model for serving.

Bad data is an ``InputError`` naming the file, the line (a Parquet file's data row), the column and the value (the
TrainingJob fails at once with that message): a cell that is not a finite number, a missing value (unless
``dataset.missingValues: dropRows``), a class too small to appear in train, validation and test.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
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

# Cells that mean "no value" (compared after stripping, case-insensitive).
MISSING_TOKENS = frozenset({"", "nan", "na", "n/a", "null", "none"})
DELIMITERS = (",", ";", "\t")
MAX_REPORTED = 5  # bad cells spelled out in an error; the total is always given
MIN_CLASS_ROWS = 3  # one row each for train, validation and test
MAX_CATEGORIES = 1024  # per categorical column, in the training split
URI_SCHEMES = ("s3://", "pvc://")
NULL_PROBLEM = "is null (a missing value)"
# A dataset's format by its extension (lowercased), when spec.dataset.format does not say (the API's list).
FORMATS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet", ".npz": "npz"}
_SHOWN_CHARS = 40


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

    def invert(self, x: NDArray[Any]) -> NDArray[np.float64]:
        """Standardized rows back in the dataset's units: what a client of the served model sends."""
        return np.asarray(x, np.float64) * np.asarray(self.std, np.float64) + np.asarray(self.mean, np.float64)

    def invert_target(self, y: NDArray[Any]) -> NDArray[np.float64]:
        """A regression target (or prediction) back in the target's units."""
        return np.asarray(y, np.float64) * self.target_std + self.target_mean

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "targetMean": self.target_mean, "targetStd": self.target_std}

    @classmethod
    def fit(cls, x: NDArray[Any], y: NDArray[Any] | None = None) -> Normalization:
        std = x.std(axis=0)
        # Constant columns (digits has several, one-hot columns can be) would divide by zero; leave them unscaled.
        std = np.where(std < 1e-8, 1.0, std)
        t_mean, t_std = 0.0, 1.0
        if y is not None:
            t_mean, t_std = float(y.mean()), float(y.std()) or 1.0
        return cls(
            mean=[float(v) for v in x.mean(axis=0)], std=[float(v) for v in std], target_mean=t_mean, target_std=t_std
        )


@dataclass(frozen=True)
class Splits:
    """Standardized train/validation/test arrays plus what serving needs to reproduce the inputs.

    ``input_columns`` are the columns a client sends (a table's feature columns, in file or featureColumns order);
    ``encoding`` maps each categorical one to its categories, each of which became one 0/1 feature
    named ``column=category`` in ``feature_names``. ``data_report`` says what loading dropped or met
    (rows read and dropped, unseen categories in validation/test).
    """

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
    encoding: dict[str, list[str]] = field(default_factory=dict)
    input_columns: list[str] = field(default_factory=list)
    data_report: dict[str, Any] = field(default_factory=dict)
    # sha256 (hex) of the dataset file's bytes and its format (csv, parquet, npz) for source file and uri;
    # None for builtin and synthetic data.
    source_sha256: str | None = None
    source_format: str | None = None

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_outputs(self) -> int:
        return len(self.class_labels) if self.task == "classification" else 1

    def input_schema(self) -> dict[str, Any]:
        """What serving needs to turn ``{"column": value}`` rows into the model's features (model_config.json)."""
        return {"columns": list(self.input_columns or self.feature_names), "categorical": dict(self.encoding)}


# --- cells and labels ----------------------------------------------------------------------------


def canonical_label(text: str) -> str:
    """One spelling per class: numbers are written canonically (``1``, ``1.0``, `` 1 `` -> ``1``; ``2.50`` -> ``2.5``).

    Non-numeric labels are only stripped. Categories of categorical columns are spelled the same way.
    """
    s = text.strip()
    if "_" in s:  # float() reads 1_000; a label like that is a name, not a number
        return s
    try:
        value = float(s)
    except ValueError:
        return s
    if not math.isfinite(value):
        return s
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _label_key(label: str) -> tuple[int, float, str]:
    """Numeric labels in numeric order (2 before 10), then the others alphabetically."""
    try:
        value = float(label)
    except ValueError:
        return (1, 0.0, label)
    if math.isfinite(value) and "_" not in label and canonical_label(label) == label:
        return (0, value, "")
    return (1, 0.0, label)


def sort_labels(labels: set[str] | list[str]) -> list[str]:
    return sorted({str(label) for label in labels}, key=_label_key)


def _shown(value: str) -> str:
    text = value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS] + "..."
    return '"' + text.replace('"', '\\"') + '"'


@dataclass(frozen=True)
class BadCell:
    row: int  # index of the data row (for ordering)
    line: int  # 1-based line of the file (the header is line 1), or 1-based data row (unit "row", Parquet)
    column: str
    value: str
    problem: str
    unit: str = "line"

    def describe(self) -> str:
        shown = "null" if self.problem == NULL_PROBLEM else _shown(self.value)  # a Parquet null has no text
        return f'{self.unit} {self.line}, column "{self.column}": {shown} {self.problem}'


def _field(display: str) -> str:
    """The spec field an error about the dataset ``display`` names: dataset.uri for a URI, else dataset.path."""
    return "dataset.uri" if display.startswith(URI_SCHEMES) else "dataset.path"


def bad_cells_error(display: str, cells: list[BadCell], total: int, hints: list[str]) -> InputError:
    """One error for all bad cells: the first few spelled out (file, line, column, value), and the total."""
    first = sorted(cells, key=lambda c: (c.row, c.line))[:MAX_REPORTED]
    if total == 1:
        text = f"{_field(display)}: {display} {first[0].describe()}"
    else:
        text = f"{_field(display)}: {display} has {total} bad cells, the first {len(first)}: " + "; ".join(
            c.describe() for c in first
        )
    return InputError(" ".join([text + ".", *hints]) if hints else text)


# --- CSV -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """A CSV file as text: stripped header names, the cells as read, and the file line each row ended on."""

    header: list[str]
    rows: list[list[str]]
    lines: list[int]
    delimiter: str


def detect_delimiter(header_line: str) -> str:
    """The one of ``,`` ``;`` tab that splits the header line into the most fields (comma on a tie)."""
    counts = {d: len(next(csv.reader([header_line], delimiter=d), [])) for d in DELIMITERS}
    return max(DELIMITERS, key=lambda d: (counts[d], -DELIMITERS.index(d)))


def read_table(path: Path, display: str) -> Table:
    """Read a CSV with a header row: UTF-8 (a BOM is dropped), ``,`` ``;`` or tab, quoted fields allowed."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            first = fh.readline()
            delimiter = detect_delimiter(first.rstrip("\r\n"))
            fh.seek(0)
            reader = csv.reader(fh, delimiter=delimiter, strict=True)
            header: list[str] | None = None
            rows: list[list[str]] = []
            lines: list[int] = []
            for record in reader:
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue  # blank line
                if header is None:
                    header = [c.strip() for c in record]
                    continue
                if len(record) != len(header):
                    raise InputError(
                        f"{_field(display)}: {display} line {reader.line_num}: {len(record)} fields, but the header "
                        f"has {len(header)} (delimiter {delimiter!r})"
                    )
                rows.append(record)  # cells are stripped column by column in parse_table
                lines.append(reader.line_num)
    except UnicodeDecodeError as exc:
        raise InputError(f"{_field(display)}: {display} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except csv.Error as exc:
        raise InputError(f"{_field(display)}: {display} is not a valid CSV: {exc}") from exc
    if header is None:
        raise InputError(f"{_field(display)}: {display} is empty (expected a header row, then data rows)")
    for i, name in enumerate(header):
        if not name:
            raise InputError(
                f"{_field(display)}: {display} line 1: column {i + 1} of the header has no name ({header})"
            )
    dupes = sorted({n for n in header if header.count(n) > 1})
    if dupes:
        raise InputError(f"{_field(display)}: {display} line 1: column names appear twice: {dupes}")
    return Table(header, rows, lines, delimiter)


@dataclass(frozen=True)
class RawData:
    """Parsed, checked data before splitting: numeric columns as numbers, categorical ones as text."""

    columns: list[str]
    numeric: dict[str, NDArray[np.float64]]
    categorical: dict[str, NDArray[np.str_]]
    y: NDArray[Any]
    report: dict[str, Any]


def _numeric_column(values: list[str]) -> tuple[NDArray[np.float64], NDArray[np.bool_], NDArray[np.bool_]]:
    """(numbers, missing, not-a-number) for one column of cells; numbers are NaN where not usable.

    ``float`` ignores surrounding whitespace; NaN in any spelling is a missing value.
    """
    n = len(values)
    not_number = np.zeros(n, dtype=bool)
    try:
        numbers = np.fromiter(map(float, values), dtype=np.float64, count=n)
    except ValueError:
        numbers = np.empty(n, dtype=np.float64)
        for i, cell in enumerate(values):
            try:
                numbers[i] = float(cell)
            except ValueError:
                numbers[i] = np.nan
                not_number[i] = cell.strip().lower() not in MISSING_TOKENS
    missing = np.isnan(numbers) & ~not_number
    return numbers, missing, not_number


def _timestamp_column(values: list[str]) -> tuple[NDArray[np.float64], NDArray[np.bool_], NDArray[np.bool_]]:
    """(seconds, missing, not-a-time) for cells holding numbers or ISO-8601 dates/times (naive ones read as UTC)."""
    numbers, missing, not_number = _numeric_column(values)
    for i in np.flatnonzero(not_number):
        text = values[i].strip()
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            continue
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        numbers[i] = moment.timestamp()
        not_number[i] = False
    return numbers, missing, not_number


@dataclass(frozen=True)
class Column:
    """One column as a table holds it: text cells (a CSV's, a Parquet string column's) or numbers (a Parquet
    numeric or date/time column, NaN where null); ``null`` marks cells that hold no value at all (Parquet)."""

    text: list[str] | None
    numbers: NDArray[np.float64] | None
    null: NDArray[np.bool_]


@dataclass(frozen=True)
class Columns:
    """A table, column by column: what :func:`parse_columns` checks and converts, whatever the file format.

    ``positions`` are what an error names for each row: the file line (CSV, ``unit`` "line") or the 1-based data
    row (Parquet, ``unit`` "row"). ``read(name, as_text)`` gives a column; ``as_text`` asks for text cells (a
    categorical column or a class label) where the file holds numbers.
    """

    names: list[str]
    positions: NDArray[np.int64]
    unit: str
    detail: str  # added to "columns: [...]" in errors (the CSV's delimiter)
    read: Callable[[str, bool], Column]


def table_columns(table: Table) -> Columns:
    """A CSV table as columns of text cells."""
    n = len(table.rows)
    by_column = list(zip(*table.rows, strict=True)) if n else [() for _ in table.header]
    cells = {name: list(by_column[i]) for i, name in enumerate(table.header)}
    no_nulls = np.zeros(n, dtype=bool)
    return Columns(
        names=table.header,
        positions=np.asarray(table.lines, dtype=np.int64),
        unit="line",
        detail=f", delimiter {table.delimiter!r}",
        read=lambda name, _as_text: Column(cells[name], None, no_nulls),
    )


def _feature_columns(names: list[str], cfg: DatasetConfig, display: str) -> list[str]:
    """``featureColumns`` in their order, checked against the table; unset: every column but target and timestamp."""
    if not cfg.feature_columns:
        return [n for n in names if n not in (cfg.target_column, cfg.timestamp_column)]
    for name in cfg.feature_columns:
        if name not in names:
            raise InputError(f"dataset.featureColumns: {name!r} is not a column of {display} (columns: {names})")
        if name == cfg.target_column:
            raise InputError(f"dataset.featureColumns: {name!r} is the target column")
        if name == cfg.timestamp_column:
            raise InputError(f"dataset.featureColumns: {name!r} is the timestamp column, which only orders the rows")
    return list(cfg.feature_columns)


def parse_table(table: Table, cfg: DatasetConfig, display: str) -> RawData:
    """Check every cell of a CSV and convert; an InputError lists the first bad cells with line and column."""
    return parse_columns(table_columns(table), cfg, display)


def parse_columns(table: Columns, cfg: DatasetConfig, display: str) -> RawData:
    """Check every cell of the columns in use and convert; an InputError lists the first bad cells with their line
    (or row) and column. With ``timestampColumn`` the rows come out stably sorted by it, ascending."""
    field_name = _field(display)
    header = table.names
    if cfg.target_column not in header:
        raise InputError(
            f"dataset.targetColumn: {cfg.target_column!r} is not a column of {display} (columns: {header}"
            f"{table.detail})"
        )
    if cfg.timestamp_column and cfg.timestamp_column not in header:
        raise InputError(
            f"dataset.timestampColumn: {cfg.timestamp_column!r} is not a column of {display} (columns: {header})"
        )
    if cfg.timestamp_column == cfg.target_column:
        raise InputError(f"dataset.timestampColumn: {cfg.timestamp_column!r} is the target column")
    features = _feature_columns(header, cfg, display)
    categorical = list(dict.fromkeys(cfg.categorical_columns))
    for name in categorical:
        if name == cfg.target_column:
            raise InputError(f"dataset.categoricalColumns: {name!r} is the target column")
        if name not in header:
            raise InputError(f"dataset.categoricalColumns: {name!r} is not a column of {display} (columns: {header})")
        if name not in features:
            raise InputError(
                f"dataset.categoricalColumns: {name!r} is not one of the feature columns ({features}): "
                "add it to dataset.featureColumns or remove it here"
            )
    if not features:
        raise InputError(f"{field_name}: {display} has no feature columns besides {cfg.target_column!r}")
    used = [cfg.target_column, *features, *([cfg.timestamp_column] if cfg.timestamp_column else [])]
    n = len(table.positions)
    drop_missing = cfg.missing_values == "dropRows"

    bad: list[BadCell] = []
    total_bad = 0
    any_missing = np.zeros(n, dtype=bool)
    missing_by_column: dict[str, int] = {}
    text_columns: list[str] = []
    columns: dict[str, Column] = {}

    def value_of(name: str, i: int) -> str:
        column = columns[name]
        if column.null[i]:
            return "null"
        if column.text is not None:
            return column.text[i].strip()
        assert column.numbers is not None
        return repr(float(column.numbers[i]))

    def note(name: str, mask: NDArray[np.bool_], problem: str) -> None:
        nonlocal total_bad
        hits = np.flatnonzero(mask)
        total_bad += len(hits)
        for i in hits[:MAX_REPORTED]:
            bad.append(BadCell(int(i), int(table.positions[i]), name, value_of(name, int(i)), problem, table.unit))

    numeric: dict[str, NDArray[np.float64]] = {}
    text: dict[str, NDArray[np.str_]] = {}
    regression = cfg.task == "regression"
    wanted = set(used)
    for name in (n for n in header if n in wanted):  # file order: bad cells of one row are listed in column order
        is_target = name == cfg.target_column
        is_time = name == cfg.timestamp_column
        is_numeric = (is_target and regression) or (not is_target and not is_time and name not in categorical)
        column = columns[name] = table.read(name, not (is_numeric or is_time))
        null = column.null
        if is_numeric or is_time:
            if column.numbers is not None:
                numbers = column.numbers
                missing = np.isnan(numbers)
                not_number = np.zeros(n, dtype=bool)
            else:
                assert column.text is not None
                numbers, missing, not_number = (_timestamp_column if is_time else _numeric_column)(column.text)
            missing |= null
            infinite = ~np.isfinite(numbers) & ~missing & ~not_number
            note(name, not_number, "is not a number or an ISO-8601 date/time" if is_time else "is not a number")
            note(name, infinite, "is not a finite number")
            if not_number.any() and not is_target and not is_time:
                text_columns.append(name)
            numeric[name] = numbers
        else:
            assert column.text is not None
            stripped = [c.strip() for c in column.text]
            missing = null | np.fromiter((v.lower() in MISSING_TOKENS for v in stripped), dtype=bool, count=n)
            text[name] = np.asarray(stripped, dtype=str)
        if missing.any():
            missing_by_column[name] = int(missing.sum())
            any_missing |= missing
            if not drop_missing:
                note(name, null, NULL_PROBLEM)
                blank = np.zeros(n, dtype=bool)
                if column.text is not None:
                    blank = np.fromiter((not c.strip() for c in column.text), dtype=bool, count=n)
                empty = missing & ~null & blank
                note(name, empty, "is empty")
                other = "is not a number (a missing value)" if is_numeric or is_time else "is a missing value"
                note(name, missing & ~null & ~empty, other)
    if total_bad:
        hints = []
        if text_columns:
            hints.append(
                f"Columns {text_columns} hold text: list them in dataset.categoricalColumns if they are categories."
            )
        if missing_by_column and not drop_missing:
            hints.append(
                "Missing values (empty, NaN, NA, n/a, null, none) can be dropped with dataset.missingValues: dropRows."
            )
        raise bad_cells_error(display, bad, total_bad, hints)

    keep = ~any_missing
    report: dict[str, Any] = {"rowsRead": n, "rowsDropped": int(any_missing.sum())}
    if missing_by_column:
        report["missingByColumn"] = missing_by_column
    if drop_missing and any_missing.any():
        log.warning(
            "dataset %s: dropped %d of %d rows with missing values (%s)",
            display,
            int(any_missing.sum()),
            n,
            ", ".join(f"{k}: {v}" for k, v in missing_by_column.items()),
        )
    rows = np.flatnonzero(keep)
    if cfg.timestamp_column:
        # Stable: rows with the same time keep their file order.
        rows = rows[np.argsort(numeric.pop(cfg.timestamp_column)[rows], kind="stable")]
        report["sortedBy"] = cfg.timestamp_column
    y = numeric.pop(cfg.target_column)[rows] if cfg.target_column in numeric else text.pop(cfg.target_column)[rows]
    return RawData(
        columns=features,
        numeric={k: v[rows] for k, v in numeric.items()},
        categorical={k: v[rows] for k, v in text.items()},
        y=y,
        report=report,
    )


# --- Parquet -------------------------------------------------------------------------------------

# Seconds per unit of Arrow's timestamps; dates are days (date32) or milliseconds (date64).
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def read_parquet(path: Path, display: str) -> Columns:
    """A Parquet file as columns: numbers (ints, floats, decimals, booleans) as float64, dates and times as
    seconds since the epoch, strings as text cells; nulls are marked. Errors name the data row (1-based)."""
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    try:
        arrow = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{_field(display)}: {display} is not a readable Parquet file: {exc}") from exc
    names = [str(n).strip() for n in arrow.column_names]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"{_field(display)}: {display} has columns whose names appear twice: {dupes}")
    n = int(arrow.num_rows)

    def read(name: str, as_text: bool) -> Column:
        data = arrow.column(names.index(name))
        kind = data.type
        if pa.types.is_dictionary(kind):
            data = data.cast(kind.value_type)
            kind = data.type
        null = np.asarray(data.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        if pa.types.is_string(kind) or pa.types.is_large_string(kind) or (as_text and _arrow_number(pa, kind)):
            cells = data.cast(pa.string()).to_pylist()
            return Column(["" if c is None else str(c) for c in cells], None, null)
        if _arrow_number(pa, kind):
            numbers = data.cast(pa.float64())
        elif pa.types.is_timestamp(kind) or pa.types.is_date(kind):
            if pa.types.is_date32(kind):
                raw, scale = data.cast(pa.int32()), 86400.0
            else:
                raw, scale = data.cast(pa.int64()), (1e-3 if pa.types.is_date64(kind) else _TIME_UNITS[kind.unit])
            numbers = raw.cast(pa.float64())
            values = np.asarray(numbers.fill_null(np.nan).to_numpy(zero_copy_only=False), dtype=np.float64)
            return Column(None, values * scale, null)
        else:
            raise InputError(
                f"{_field(display)}: {display} column {name!r} has type {kind}: expected numbers, text, or dates/times"
            )
        values = np.asarray(numbers.fill_null(np.nan).to_numpy(zero_copy_only=False), dtype=np.float64)
        return Column(None, values, null)

    return Columns(names, np.arange(1, n + 1, dtype=np.int64), "row", "", read)


def _arrow_number(pa: Any, kind: Any) -> bool:
    return bool(
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_decimal(kind)
        or pa.types.is_boolean(kind)
    )


# --- NPZ -----------------------------------------------------------------------------------------


def _first_bad(mask: NDArray[np.bool_]) -> str:
    index = np.argwhere(mask)[0]
    return "[" + ", ".join(str(int(i)) for i in index) + "]"


def parse_npz(path: Path, cfg: DatasetConfig, display: str) -> RawData:
    if cfg.categorical_columns:
        raise InputError(
            f"dataset.categoricalColumns: only CSV and Parquet files have named columns; {display} is an NPZ file "
            "(one-hot encode its arrays before saving them)"
        )
    for key, value in (("featureColumns", cfg.feature_columns), ("timestampColumn", cfg.timestamp_column)):
        if value:
            raise InputError(
                f"dataset.{key}: only CSV and Parquet files have named columns; {display} is an NPZ file "
                "(select and order its arrays before saving them)"
            )
    with np.load(path, allow_pickle=False) as npz:
        x_key = "x" if "x" in npz else "X"
        y_key = cfg.target_column if cfg.target_column in npz else "y"
        if x_key not in npz or y_key not in npz:
            raise InputError(f"{_field(display)}: {display!r} needs arrays 'x' and 'y', has {sorted(npz.keys())}")
        x, y = npz[x_key], npz[y_key]
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise InputError(f"{_field(display)}: {display} array {x_key!r} must be 2-D numbers, got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise InputError(
            f"{_field(display)}: {display} array {y_key!r} must be 1-D with {len(x)} values, got {y.shape}"
        )
    if cfg.task == "regression" and not np.issubdtype(y.dtype, np.number):
        raise InputError(
            f"{_field(display)}: {display} array {y_key!r} must hold numbers for regression, got {y.dtype}"
        )
    x = x.astype(np.float64)
    drop = np.zeros(len(x), dtype=bool)
    arrays: list[tuple[str, NDArray[Any]]] = [(x_key, x)]
    if np.issubdtype(y.dtype, np.number):
        arrays.append((y_key, y.astype(np.float64)))
    for key, arr in arrays:
        nan, inf = np.isnan(arr), np.isinf(arr)
        if inf.any() or (nan.any() and cfg.missing_values != "dropRows"):
            worst = inf if inf.any() else nan
            count = int((nan | inf).sum())
            raise InputError(
                f"{_field(display)}: {display} array {key!r} has {count} value{'s' if count > 1 else ''} that "
                f"{'are' if count > 1 else 'is'} not a finite number (NaN or inf), the first at "
                f"{_first_bad(worst)}" + ("" if inf.any() else "; dataset.missingValues: dropRows drops rows with NaN")
            )
        drop |= nan if nan.ndim == 1 else nan.any(axis=1)
    report: dict[str, Any] = {"rowsRead": len(x), "rowsDropped": int(drop.sum())}
    if drop.any():
        log.warning("dataset %s: dropped %d of %d rows with NaN", display, int(drop.sum()), len(x))
    keep = ~drop
    names = [f"x{i}" for i in range(x.shape[1])]
    return RawData(names, {n: x[keep, i] for i, n in enumerate(names)}, {}, y[keep], report)


def _confined(artifact_root: Path, relative: str, field_name: str) -> Path:
    """``relative`` under the artifact store root; a path from a user's spec may not leave it."""
    path = (artifact_root / relative).resolve()
    if artifact_root.resolve() not in path.parents:
        raise InputError(f"{field_name}: must stay inside the artifact store, got {relative!r}")
    return path


def dataset_file(cfg: DatasetConfig, artifact_root: Path) -> tuple[Path, str, str]:
    """(local file, how errors name it, format) of a file or uri dataset.

    ``source: file``: ``path`` in the artifact store (.csv or .npz); with an S3 store, the file the store wrapper
    downloaded it to (``paths.datasetFile``). ``source: uri``: ``pvc://<path>`` is that path in the artifact store;
    ``s3://<bucket>/<key>`` is the file the store wrapper downloaded (``paths.datasetFile``). The format is
    ``format``, else the extension of the uri (.csv/.tsv/.txt, .parquet/.pq, .npz).
    """
    if cfg.source == "file":
        path = _confined(artifact_root, cfg.path, "dataset.path")
        if path.suffix not in (".npz", ".csv"):
            raise InputError(f"dataset.path: expected a .csv or .npz file, got {cfg.path!r}")
        if cfg.downloaded_file:
            local = Path(cfg.downloaded_file)
            if not local.is_file():
                raise InputError(f"dataset.path: {cfg.path!r} was not downloaded from the S3 store: {local} is missing")
            return local, cfg.path, FORMATS[path.suffix]
        if not path.is_file():
            raise InputError(f"dataset.path: {cfg.path!r} does not exist in the artifact store (looked for {path})")
        return path, cfg.path, FORMATS[path.suffix]
    uri = cfg.uri
    fmt = cfg.format or next((f for ext, f in FORMATS.items() if uri.lower().endswith(ext)), "")
    if not fmt:
        raise InputError(
            f"dataset.uri: {uri!r} has no known extension ({', '.join(FORMATS)}): set dataset.format to csv, "
            "parquet or npz"
        )
    if uri.startswith("pvc://"):
        relative = uri.removeprefix("pvc://")
        path = _confined(artifact_root, relative, "dataset.uri")
        if not path.is_file():
            raise InputError(f"dataset.uri: {uri!r} does not exist in the artifact store (looked for {path})")
        return path, uri, fmt
    if uri.startswith("s3://"):
        if not cfg.downloaded_file:
            raise InputError(
                f"dataset.uri: the s3 dataset {uri!r} was not downloaded (no paths.datasetFile in the job config): "
                "the NeuralCluster's artifact store must be S3, with the same bucket"
            )
        path = Path(cfg.downloaded_file)
        if not path.is_file():
            raise InputError(f"dataset.uri: the s3 dataset {uri!r} was not downloaded: {path} does not exist")
        return path, uri, fmt
    raise InputError(f"dataset.uri: {uri!r} is not s3://<bucket>/<key> or pvc://<path relative to the store root>")


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_file(cfg: DatasetConfig, artifact_root: Path) -> tuple[RawData, str, str]:
    """The dataset of a file or uri source, parsed and checked; the sha256 of the file it was read from; its format."""
    path, display, fmt = dataset_file(cfg, artifact_root)
    sha256 = file_sha256(path)
    if fmt == "npz":
        return parse_npz(path, cfg, display), sha256, fmt
    if fmt == "parquet":
        return parse_columns(read_parquet(path, display), cfg, display), sha256, fmt
    return parse_table(read_table(path, display), cfg, display), sha256, fmt


def _from_arrays(x: NDArray[Any], y: NDArray[Any], names: list[str]) -> RawData:
    x = np.asarray(x, dtype=np.float64)
    names = names or [f"x{i}" for i in range(x.shape[1])]
    return RawData(names, {n: x[:, i] for i, n in enumerate(names)}, {}, np.asarray(y), {"rowsRead": len(x)})


def _load_builtin(name: str) -> RawData:
    bunch = _BUILTIN_LOADERS[name]()
    return _from_arrays(bunch.data, bunch.target, [str(f) for f in getattr(bunch, "feature_names", [])])


def _load_synthetic(cfg: DatasetConfig) -> RawData:
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
    return _from_arrays(x, y, [f"x{i}" for i in range(syn.features)])


# --- labels, split, encoding ---------------------------------------------------------------------


def encode_labels(y: NDArray[Any]) -> tuple[list[str], NDArray[np.int64]]:
    """Class labels in their canonical spelling (``1`` and ``1.0`` are one class) and each row's class index."""
    uniq, inverse = np.unique(np.asarray(y), return_inverse=True)
    canon = [canonical_label(str(u)) for u in uniq]
    labels = sort_labels(canon)
    position = {label: i for i, label in enumerate(labels)}
    mapping = np.asarray([position[c] for c in canon], dtype=np.int64)
    return labels, mapping[inverse.reshape(-1)]


def check_class_sizes(labels: list[str], y: NDArray[np.int64], n_val: int, n_test: int) -> None:
    """A random split is stratified: every class must be able to appear in train, validation and test."""
    counts = np.bincount(y, minlength=len(labels))
    small = [(labels[i], int(c)) for i, c in enumerate(counts) if c < MIN_CLASS_ROWS]
    if small:
        named = ", ".join(f'"{label}" ({c} row{"s" if c != 1 else ""})' for label, c in small[:MAX_REPORTED])
        more = f" and {len(small) - MAX_REPORTED} more" if len(small) > MAX_REPORTED else ""
        raise InputError(
            f"dataset: {len(small)} class{'es' if len(small) > 1 else ''} with fewer than {MIN_CLASS_ROWS} rows: "
            f"{named}{more}. A random split is stratified and needs at least {MIN_CLASS_ROWS} rows of every class "
            "(one each for train, validation and test): add rows, merge or remove the class, or use split: temporal"
        )
    for what, size in (("testFraction", n_test), ("validationFraction", n_val)):
        if size < len(labels):
            raise InputError(
                f"dataset.{what}: gives {size} rows, fewer than the {len(labels)} classes; a stratified split "
                f"needs at least one row per class: raise it or add rows"
            )


def split_indices(
    n: int, cfg: DatasetConfig, stratify: NDArray[Any] | None
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    n_test = max(1, round(n * cfg.test_fraction))
    n_val = max(1, round(n * cfg.validation_fraction))
    if n - n_val - n_test < 1:
        raise InputError(f"dataset: {n} rows leave none for training after {n_val} validation and {n_test} test rows")
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
    except ValueError as exc:
        # No silent fallback to an unstratified split: a class would be missing from a split unnoticed.
        raise InputError(f"dataset: cannot split {n} rows stratified by class: {exc}") from exc
    return np.sort(train), np.sort(val), np.sort(test)


def one_hot(
    raw: RawData, train: NDArray[np.int64]
) -> tuple[NDArray[np.float64], list[str], dict[str, list[str]], NDArray[np.bool_]]:
    """Features in column order, categorical columns one-hot with the training split's categories.

    Returns (x, feature names, categories per column, per column-row: value unseen in training).
    """
    blocks: list[NDArray[np.float64]] = []
    names: list[str] = []
    encoding: dict[str, list[str]] = {}
    n = len(raw.y)
    unseen = np.zeros((len(raw.categorical), n), dtype=bool)
    k = 0
    for column in raw.columns:
        if column in raw.numeric:
            blocks.append(raw.numeric[column].reshape(-1, 1))
            names.append(column)
            continue
        uniq, inverse = np.unique(raw.categorical[column], return_inverse=True)
        canon = [canonical_label(str(u)) for u in uniq]  # few distinct values: canonicalize those
        seen = np.unique(inverse.reshape(-1)[train])
        categories = sort_labels([canon[i] for i in seen])
        if len(categories) > MAX_CATEGORIES:
            raise InputError(
                f"dataset.categoricalColumns: {column!r} has {len(categories)} distinct values in the training "
                f"split, more than {MAX_CATEGORIES}: it is not a category column (an id?)"
            )
        encoding[column] = categories
        index = {c: i for i, c in enumerate(categories)}
        position = np.asarray([index.get(c, -1) for c in canon], dtype=np.int64)[inverse.reshape(-1)]
        unseen[k] = position < 0
        block = np.zeros((n, len(categories)), dtype=np.float64)
        rows = np.flatnonzero(~unseen[k])
        block[rows, position[rows]] = 1.0
        blocks.append(block)
        names.extend(f"{column}={c}" for c in categories)
        k += 1
    x = np.concatenate(blocks, axis=1) if blocks else np.zeros((n, 0))
    return x, names, encoding, unseen


def _fingerprint(x: NDArray[Any], y: NDArray[Any]) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(x, dtype=np.float64).tobytes())
    digest.update(np.asarray(y).astype(str).tobytes())
    return "sha256:" + digest.hexdigest()[:16]


def load_splits(cfg: DatasetConfig, artifact_root: Path = Path("/artifacts")) -> Splits:
    """Load the dataset the config names and return checked, encoded, standardized, deterministic splits."""
    sha256: str | None = None
    fmt: str | None = None
    if cfg.source == "builtin":
        raw = _load_builtin(cfg.name)
    elif cfg.source == "synthetic":
        raw = _load_synthetic(cfg)
    else:
        raw, sha256, fmt = _load_file(cfg, artifact_root)
    n = len(raw.y)
    where = {"file": cfg.path, "uri": cfg.uri}.get(cfg.source, cfg.name)
    if n < 3:
        raise InputError(f"dataset: {where} has {n} usable rows; at least 3 are needed (train, validation, test)")

    if cfg.task == "classification":
        class_labels, y_arr = encode_labels(raw.y)
        y_all: NDArray[Any] = y_arr
        stratify: NDArray[Any] | None = y_arr
        if cfg.split == "random":
            check_class_sizes(
                class_labels, y_arr, max(1, round(n * cfg.validation_fraction)), max(1, round(n * cfg.test_fraction))
            )
    else:
        class_labels = []
        y_all = np.asarray(raw.y, dtype=np.float64)
        stratify = None

    train, val, test = split_indices(n, cfg, stratify)
    x, names, encoding, unseen = one_hot(raw, train)
    report = dict(raw.report)
    if encoding:
        held_out = np.zeros(n, dtype=bool)
        held_out[val] = held_out[test] = True
        counts = {column: int((unseen[k] & held_out).sum()) for k, column in enumerate(encoding)}
        report["unseenCategories"] = counts
        if any(counts.values()):
            log.warning("dataset %s: validation/test categories unseen in training (all zeros): %s", where, counts)
    fingerprint = _fingerprint(x, np.asarray(class_labels)[y_all] if cfg.task == "classification" else y_all)
    norm = Normalization.fit(x[train], y_all[train] if cfg.task == "regression" else None)

    def target(rows: NDArray[np.int64]) -> NDArray[Any]:
        if cfg.task == "classification":
            return y_all[rows]
        return ((y_all[rows] - norm.target_mean) / norm.target_std).astype(np.float32)

    log.info(
        "dataset %s/%s: %d rows, %d features, split %s -> train %d, val %d, test %d",
        cfg.source,
        where,
        n,
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
        feature_names=names,
        class_labels=class_labels,
        fingerprint=fingerprint,
        encoding=encoding,
        input_columns=list(raw.columns),
        data_report=report,
        source_sha256=sha256,
        source_format=fmt,
    )
