"""Datasets: load (packaged scikit-learn sets, synthetic, or a CSV/NPZ file), check, split, encode, standardize.

Nothing is downloaded. The standardization (and the categories of one-hot encoded columns) are fitted
on the training split only, so no statistic of validation or test rows leaks into training; the fitted
numbers travel with the model for serving.

Bad data is an ``InputError`` naming the file, the line, the column and the value (the TrainingJob
fails at once with that message): a cell that is not a finite number, a missing value (unless
``dataset.missingValues: dropRows``), a class too small to appear in train, validation and test.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
from dataclasses import dataclass, field
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

    ``input_columns`` are the columns a client sends (a CSV's feature columns, in file order);
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
    line: int  # 1-based line of the file (the header is line 1)
    column: str
    value: str
    problem: str

    def describe(self) -> str:
        return f'line {self.line}, column "{self.column}": {_shown(self.value)} {self.problem}'


def bad_cells_error(display: str, cells: list[BadCell], total: int, hints: list[str]) -> InputError:
    """One error for all bad cells: the first few spelled out (file, line, column, value), and the total."""
    first = sorted(cells, key=lambda c: (c.row, c.line))[:MAX_REPORTED]
    if total == 1:
        text = f"dataset.path: {display} {first[0].describe()}"
    else:
        text = f"dataset.path: {display} has {total} bad cells, the first {len(first)}: " + "; ".join(
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
                        f"dataset.path: {display} line {reader.line_num}: {len(record)} fields, but the header has "
                        f"{len(header)} (delimiter {delimiter!r})"
                    )
                rows.append(record)  # cells are stripped column by column in parse_table
                lines.append(reader.line_num)
    except UnicodeDecodeError as exc:
        raise InputError(f"dataset.path: {display} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except csv.Error as exc:
        raise InputError(f"dataset.path: {display} is not a valid CSV: {exc}") from exc
    if header is None:
        raise InputError(f"dataset.path: {display} is empty (expected a header row, then data rows)")
    for i, name in enumerate(header):
        if not name:
            raise InputError(f"dataset.path: {display} line 1: column {i + 1} of the header has no name ({header})")
    dupes = sorted({n for n in header if header.count(n) > 1})
    if dupes:
        raise InputError(f"dataset.path: {display} line 1: column names appear twice: {dupes}")
    return Table(header, rows, lines, delimiter)


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


@dataclass(frozen=True)
class RawData:
    """Parsed, checked data before splitting: numeric columns as numbers, categorical ones as text."""

    columns: list[str]
    numeric: dict[str, NDArray[np.float64]]
    categorical: dict[str, NDArray[np.str_]]
    y: NDArray[Any]
    report: dict[str, Any]


def parse_table(table: Table, cfg: DatasetConfig, display: str) -> RawData:
    """Check every cell and convert; an InputError lists the first bad cells with line and column."""
    header = table.header
    if cfg.target_column not in header:
        raise InputError(
            f"dataset.targetColumn: {cfg.target_column!r} is not a column of {display} (columns: {header}, "
            f"delimiter {table.delimiter!r})"
        )
    categorical = list(dict.fromkeys(cfg.categorical_columns))
    for name in categorical:
        if name == cfg.target_column:
            raise InputError(f"dataset.categoricalColumns: {name!r} is the target column")
        if name not in header:
            raise InputError(f"dataset.categoricalColumns: {name!r} is not a column of {display} (columns: {header})")
    features = [n for n in header if n != cfg.target_column]
    if not features:
        raise InputError(f"dataset.path: {display} has no feature columns besides {cfg.target_column!r}")
    n = len(table.rows)
    by_column = list(zip(*table.rows, strict=True)) if n else [() for _ in header]
    cells = {name: list(by_column[i]) for i, name in enumerate(header)}
    lines = np.asarray(table.lines, dtype=np.int64)
    drop_missing = cfg.missing_values == "dropRows"

    bad: list[BadCell] = []
    total_bad = 0
    any_missing = np.zeros(n, dtype=bool)
    missing_by_column: dict[str, int] = {}
    text_columns: list[str] = []

    def note(name: str, mask: NDArray[np.bool_], problem: str) -> None:
        nonlocal total_bad
        hits = np.flatnonzero(mask)
        total_bad += len(hits)
        for i in hits[:MAX_REPORTED]:
            bad.append(BadCell(int(i), int(lines[i]), name, cells[name][i].strip(), problem))

    numeric: dict[str, NDArray[np.float64]] = {}
    text: dict[str, NDArray[np.str_]] = {}
    regression = cfg.task == "regression"
    for name in header:
        is_target = name == cfg.target_column
        is_numeric = (is_target and regression) or (not is_target and name not in categorical)
        if is_numeric:
            numbers, missing, not_number = _numeric_column(cells[name])
            infinite = ~np.isfinite(numbers) & ~missing & ~not_number
            note(name, not_number, "is not a number")
            note(name, infinite, "is not a finite number")
            if not_number.any() and name != cfg.target_column:
                text_columns.append(name)
            numeric[name] = numbers
        else:
            stripped = [c.strip() for c in cells[name]]
            missing = np.fromiter((v.lower() in MISSING_TOKENS for v in stripped), dtype=bool, count=n)
            text[name] = np.asarray(stripped, dtype=str)
        if missing.any():
            missing_by_column[name] = int(missing.sum())
            any_missing |= missing
            if not drop_missing:
                empty = missing & np.fromiter((not c.strip() for c in cells[name]), dtype=bool, count=n)
                note(name, empty, "is empty")
                other = "is not a number (a missing value)" if is_numeric else "is a missing value"
                note(name, missing & ~empty, other)
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
    y = numeric.pop(cfg.target_column)[keep] if cfg.target_column in numeric else text.pop(cfg.target_column)[keep]
    return RawData(
        columns=features,
        numeric={k: v[keep] for k, v in numeric.items()},
        categorical={k: v[keep] for k, v in text.items()},
        y=y,
        report=report,
    )


# --- NPZ -----------------------------------------------------------------------------------------


def _first_bad(mask: NDArray[np.bool_]) -> str:
    index = np.argwhere(mask)[0]
    return "[" + ", ".join(str(int(i)) for i in index) + "]"


def parse_npz(path: Path, cfg: DatasetConfig, display: str) -> RawData:
    if cfg.categorical_columns:
        raise InputError(
            f"dataset.categoricalColumns: only CSV files have named columns; {display} is an NPZ file "
            "(one-hot encode its arrays before saving them)"
        )
    with np.load(path, allow_pickle=False) as npz:
        x_key = "x" if "x" in npz else "X"
        y_key = cfg.target_column if cfg.target_column in npz else "y"
        if x_key not in npz or y_key not in npz:
            raise InputError(f"dataset.path: {display!r} needs arrays 'x' and 'y', has {sorted(npz.keys())}")
        x, y = npz[x_key], npz[y_key]
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise InputError(f"dataset.path: {display} array {x_key!r} must be 2-D numbers, got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise InputError(f"dataset.path: {display} array {y_key!r} must be 1-D with {len(x)} values, got {y.shape}")
    if cfg.task == "regression" and not np.issubdtype(y.dtype, np.number):
        raise InputError(f"dataset.path: {display} array {y_key!r} must hold numbers for regression, got {y.dtype}")
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
                f"dataset.path: {display} array {key!r} has {count} value{'s' if count > 1 else ''} that "
                f"{'are' if count > 1 else 'is'} not a finite number (NaN or inf), the first at "
                f"{_first_bad(worst)}"
                + ("" if inf.any() else "; dataset.missingValues: dropRows drops rows with NaN")
            )
        drop |= nan if nan.ndim == 1 else nan.any(axis=1)
    report: dict[str, Any] = {"rowsRead": len(x), "rowsDropped": int(drop.sum())}
    if drop.any():
        log.warning("dataset %s: dropped %d of %d rows with NaN", display, int(drop.sum()), len(x))
    keep = ~drop
    names = [f"x{i}" for i in range(x.shape[1])]
    return RawData(names, {n: x[keep, i] for i, n in enumerate(names)}, {}, y[keep], report)


def _load_file(cfg: DatasetConfig, artifact_root: Path) -> RawData:
    path = (artifact_root / cfg.path).resolve()
    # The path comes from a user's spec: keep it inside the artifact store.
    if artifact_root.resolve() not in path.parents:
        raise InputError(f"dataset.path: must stay inside the artifact store, got {cfg.path!r}")
    if path.suffix not in (".npz", ".csv"):
        raise InputError(f"dataset.path: expected a .csv or .npz file, got {cfg.path!r}")
    if not path.is_file():
        raise InputError(f"dataset.path: {cfg.path!r} does not exist in the artifact store (looked for {path})")
    if path.suffix == ".npz":
        return parse_npz(path, cfg, cfg.path)
    return parse_table(read_table(path, cfg.path), cfg, cfg.path)


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
    if cfg.source == "builtin":
        raw = _load_builtin(cfg.name)
    elif cfg.source == "synthetic":
        raw = _load_synthetic(cfg)
    else:
        raw = _load_file(cfg, artifact_root)
    n = len(raw.y)
    where = cfg.path if cfg.source == "file" else cfg.name
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
    )
