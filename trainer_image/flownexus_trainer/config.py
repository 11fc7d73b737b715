"""The job config the operator writes for the pods (camelCase JSON mirroring the TrainingJob spec).

Parsing is lenient: a missing key takes the TrainingJob default, so an older operator or a
hand-written config still runs. A key present with the wrong type is an error naming its path.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

CONFIG_ENV = "FLOWNEXUS_CONFIG"

ARCHITECTURES = ("mlp", "residual_mlp", "transformer", "lstm", "custom")
BUILTIN_DATASETS = ("digits", "iris", "wine", "breast_cancer", "diabetes")


class ConfigError(InputError):
    """The config file holds a value the trainer cannot use; the message names the field path."""


def _section(raw: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}.{key}: must be an object, got {value!r}")
    return value


def _get(raw: dict[str, Any], key: str, default: Any, kind: type | tuple[type, ...], path: str) -> Any:
    value = raw.get(key, default)
    if value is None:
        return default
    # bool is an int subclass: refuse True where a number is meant, accept ints where floats are.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{path}.{key}: expected {kind}, got {value!r}")
    return value


def _choice(raw: dict[str, Any], key: str, default: str, choices: tuple[str, ...], path: str) -> str:
    value = _get(raw, key, default, str, path)
    if value not in choices:
        raise ConfigError(f"{path}.{key}: must be one of {list(choices)}, got {value!r}")
    return str(value)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and its sizes; fields that an architecture does not use are ignored."""

    architecture: str = "mlp"
    hidden_sizes: tuple[int, ...] = (128, 64)
    hidden_size: int = 128
    num_blocks: int = 2
    d_model: int = 32
    num_heads: int = 4
    num_layers: int = 2
    dropout: float = 0.1
    # lstm: time steps the features are read as; 0 = automatic (see models.sequence_shape).
    sequence_length: int = 0

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: str = "model") -> ModelConfig:
        sizes = _get(raw, "hiddenSizes", [128, 64], list, path)
        if not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ConfigError(f"{path}.hiddenSizes: must be a non-empty list of positive ints, got {sizes!r}")
        cfg = cls(
            architecture=_choice(raw, "architecture", "mlp", ARCHITECTURES, path),
            hidden_sizes=tuple(sizes),
            hidden_size=_get(raw, "hiddenSize", 128, int, path),
            num_blocks=_get(raw, "numBlocks", 2, int, path),
            d_model=_get(raw, "dModel", 32, int, path),
            num_heads=_get(raw, "numHeads", 4, int, path),
            num_layers=_get(raw, "numLayers", 2, int, path),
            dropout=_get(raw, "dropout", 0.1, float, path),
            sequence_length=_get(raw, "sequenceLength", 0, int, path),
        )
        if cfg.sequence_length < 0:
            raise ConfigError(f"{path}.sequenceLength: must be >= 0 (0 = automatic), got {cfg.sequence_length}")
        if cfg.architecture == "transformer" and cfg.d_model % cfg.num_heads:
            raise ConfigError(f"{path}.dModel: must be divisible by numHeads ({cfg.num_heads}), got {cfg.d_model}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """camelCase form, shipped inside the model archive so serving can rebuild the network."""
        return {
            "architecture": self.architecture,
            "hiddenSizes": list(self.hidden_sizes),
            "hiddenSize": self.hidden_size,
            "numBlocks": self.num_blocks,
            "dModel": self.d_model,
            "numHeads": self.num_heads,
            "numLayers": self.num_layers,
            "dropout": self.dropout,
            "sequenceLength": self.sequence_length,
        }


@dataclass(frozen=True)
class SyntheticConfig:
    samples: int = 2000
    features: int = 20
    classes: int = 3
    noise: float = 0.1


def _column_names(raw: dict[str, Any], key: str, path: str) -> tuple[str, ...]:
    names = _get(raw, key, [], list, path)
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{path}.{key}[{i}]: must be a non-empty column name, got {name!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}.{key}: names appear twice: {dupes}")
    return tuple(n.strip() for n in names)


@dataclass(frozen=True)
class DatasetConfig:
    source: str = "builtin"
    name: str = "digits"
    path: str = ""
    target_column: str = "target"
    task: str = "classification"
    split: str = "random"
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 42
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # CSV columns one-hot encoded (categories from the training split); only with source "file".
    categorical_columns: tuple[str, ...] = ()
    # "error": a missing cell fails the job naming it; "dropRows": such rows are dropped and counted.
    missing_values: str = "error"
    # source "uri": s3://<bucket>/<key> or pvc://<path relative to the artifact store root>.
    uri: str = ""
    # "csv", "parquet", "npz", or "" (from the extension of the uri or path).
    format: str = ""
    # Feature columns in this order; () = every column but the target and the timestamp column.
    feature_columns: tuple[str, ...] = ()
    # A temporal split stably sorts the rows by this column first; it is not a feature.
    timestamp_column: str = ""
    # paths.datasetFile: the local file the operator's store wrapper downloaded an s3:// dataset to.
    downloaded_file: str = ""

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: str = "dataset", downloaded_file: str = "") -> DatasetConfig:
        syn = _section(raw, "synthetic", path)
        sp = f"{path}.synthetic"
        source = _choice(raw, "source", "builtin", ("builtin", "synthetic", "file", "uri"), path)
        name = _get(raw, "name", "digits", str, path)
        if source == "builtin" and name not in BUILTIN_DATASETS:
            raise ConfigError(f"{path}.name: must be one of {list(BUILTIN_DATASETS)}, got {name!r}")
        # diabetes is the one packaged regression set; its task follows from the data.
        default_task = "regression" if source == "builtin" and name == "diabetes" else "classification"
        cfg = cls(
            source=source,
            name=name,
            path=_get(raw, "path", "", str, path),
            target_column=_get(raw, "targetColumn", "target", str, path),
            task=_choice(raw, "task", default_task, ("classification", "regression"), path),
            split=_choice(raw, "split", "random", ("random", "temporal"), path),
            validation_fraction=_get(raw, "validationFraction", 0.15, float, path),
            test_fraction=_get(raw, "testFraction", 0.15, float, path),
            seed=_get(raw, "seed", 42, int, path),
            synthetic=SyntheticConfig(
                samples=_get(syn, "samples", 2000, int, sp),
                features=_get(syn, "features", 20, int, sp),
                classes=_get(syn, "classes", 3, int, sp),
                noise=_get(syn, "noise", 0.1, float, sp),
            ),
            categorical_columns=_column_names(raw, "categoricalColumns", path),
            missing_values=_choice(raw, "missingValues", "error", ("error", "dropRows"), path),
            uri=_get(raw, "uri", "", str, path),
            format=_choice(raw, "format", "", ("", "csv", "parquet", "npz"), path),
            feature_columns=_column_names(raw, "featureColumns", path),
            timestamp_column=_get(raw, "timestampColumn", "", str, path).strip(),
            downloaded_file=downloaded_file,
        )
        tables = ("file", "uri")
        for key, value in (
            ("categoricalColumns", cfg.categorical_columns),
            ("featureColumns", cfg.feature_columns),
            ("timestampColumn", cfg.timestamp_column),
        ):
            if value and source not in tables:
                raise ConfigError(f"{path}.{key}: only meaningful with source 'file' or 'uri', got source {source!r}")
        if cfg.target_column in cfg.categorical_columns:
            raise ConfigError(f"{path}.categoricalColumns: {cfg.target_column!r} is the target column")
        if cfg.target_column in cfg.feature_columns:
            raise ConfigError(f"{path}.featureColumns: {cfg.target_column!r} is the target column")
        if cfg.timestamp_column and cfg.split != "temporal":
            raise ConfigError(f"{path}.timestampColumn: needs split 'temporal', got split {cfg.split!r}")
        if cfg.timestamp_column and cfg.timestamp_column in (cfg.target_column, *cfg.feature_columns):
            raise ConfigError(
                f"{path}.timestampColumn: {cfg.timestamp_column!r} is the target or a feature column; it only orders "
                "the rows"
            )
        if source == "file" and not cfg.path:
            raise ConfigError(f"{path}.path: required when source is 'file'")
        if source == "uri" and not cfg.uri:
            raise ConfigError(f"{path}.uri: required when source is 'uri'")
        if cfg.format and source != "uri":
            raise ConfigError(f"{path}.format: only meaningful with source 'uri', got source {source!r}")
        if not (
            cfg.validation_fraction > 0 and cfg.test_fraction > 0 and cfg.validation_fraction + cfg.test_fraction < 0.9
        ):
            raise ConfigError(
                f"{path}.validationFraction/testFraction: each > 0 and together < 0.9, "
                f"got {cfg.validation_fraction} and {cfg.test_fraction}"
            )
        return cfg


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_epochs: int = 1
    gradient_clip_norm: float | None = 1.0
    early_stopping: bool = True
    patience: int = 5
    min_delta: float = 0.0
    checkpoint_every: int = 5
    mixed_precision: bool = False
    # Fewer optimizer steps than this (epochs x steps per epoch) extend the run; 0 turns it off.
    min_steps: int = 500

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: str = "training") -> TrainingConfig:
        sched = _section(raw, "scheduler", path)
        early = _section(raw, "earlyStopping", path)
        clip = raw.get("gradientClipNorm", 1.0)
        cfg = cls(
            epochs=_get(raw, "epochs", 30, int, path),
            batch_size=_get(raw, "batchSize", 64, int, path),
            learning_rate=_get(raw, "learningRate", 1e-3, float, path),
            optimizer=_choice(raw, "optimizer", "adamw", ("adamw", "sgd"), path),
            weight_decay=_get(raw, "weightDecay", 0.01, float, path),
            momentum=_get(raw, "momentum", 0.9, float, path),
            scheduler=_choice(sched, "type", "cosine", ("cosine", "constant"), f"{path}.scheduler"),
            warmup_epochs=_get(sched, "warmupEpochs", 1, int, f"{path}.scheduler"),
            # null or 0 turns clipping off; the norm is still measured and reported.
            gradient_clip_norm=float(clip) if clip else None,
            early_stopping=_get(early, "enabled", True, bool, f"{path}.earlyStopping"),
            patience=_get(early, "patience", 5, int, f"{path}.earlyStopping"),
            min_delta=_get(early, "minDelta", 0.0, float, f"{path}.earlyStopping"),
            checkpoint_every=_get(raw, "checkpointEvery", 5, int, path),
            mixed_precision=_get(raw, "mixedPrecision", False, bool, path),
            min_steps=_get(raw, "minSteps", 500, int, path),
        )
        for name in ("epochs", "batch_size", "checkpoint_every", "patience"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"{path}.{name}: must be >= 1, got {getattr(cfg, name)}")
        if cfg.min_steps < 0:
            raise ConfigError(f"{path}.minSteps: must be >= 0 (0 = off), got {cfg.min_steps}")
        return cfg


@dataclass(frozen=True)
class CrossValidationConfig:
    """validation.crossValidation: k stratified folds of the training+validation rows (crossval.py)."""

    folds: int
    max_std: float = 0.1

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: str) -> CrossValidationConfig:
        folds = raw.get("folds")
        if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= 10:
            raise ConfigError(f"{path}.folds: must be an integer from 2 to 10, got {folds!r}")
        max_std = float(_get(raw, "maxStd", 0.1, float, path))
        if not 0.0 <= max_std <= 1.0:
            raise ConfigError(f"{path}.maxStd: must be between 0 and 1, got {max_std!r}")
        return cls(folds=folds, max_std=max_std)

    def to_dict(self) -> dict[str, Any]:
        return {"folds": self.folds, "maxStd": self.max_std}


@dataclass(frozen=True)
class ValidationConfig:
    min_accuracy: float | None = 0.85
    max_latency_p95_ms: float | None = 100.0
    # train - test of the primary metric (balanced accuracy / R²): data that model selection never saw.
    max_overfitting_gap: float | None = 0.15
    require_convergence: bool = True
    max_rmse: float | None = None
    min_r2: float | None = None
    min_balanced_accuracy: float | None = None
    # The primary metric must beat the trivial baseline (majority class / mean) by this much, and may
    # lie at most -min_margin_over_linear below the linear one (logistic / ridge regression).
    min_margin_over_trivial: float | None = 0.05
    min_margin_over_linear: float | None = -0.05
    decide_on: str = "estimate"  # estimate | lowerBound (of the 95 % Wilson interval of test accuracy)
    champion_model_deployment: str | None = None
    champion_tolerance: float = 0.0
    cross_validation: CrossValidationConfig | None = None  # off when unset

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: str = "validation") -> ValidationConfig:
        def optional(key: str, default: float | None) -> float | None:
            # An explicit null switches a threshold off; a missing key keeps the default.
            if key in raw and raw[key] is None:
                return None
            value = _get(raw, key, default, float, path)
            return None if value is None else float(value)

        champion = _section(raw, "champion", path)
        champion_name = _get(champion, "modelDeployment", None, str, f"{path}.champion") if champion else None
        if champion and not champion_name:
            raise ConfigError(f"{path}.champion.modelDeployment: required when champion is set, got {champion!r}")
        tolerance = _get(champion, "tolerance", 0.0, float, f"{path}.champion")
        if tolerance < 0:
            raise ConfigError(f"{path}.champion.tolerance: must be >= 0, got {tolerance}")
        return cls(
            min_accuracy=optional("minAccuracy", 0.85),
            max_latency_p95_ms=optional("maxLatencyP95Ms", 100.0),
            max_overfitting_gap=optional("maxOverfittingGap", 0.15),
            require_convergence=_get(raw, "requireConvergence", True, bool, path),
            max_rmse=optional("maxRmse", None),
            min_r2=optional("minR2", None),
            min_balanced_accuracy=optional("minBalancedAccuracy", None),
            min_margin_over_trivial=optional("minMarginOverTrivial", 0.05),
            min_margin_over_linear=optional("minMarginOverLinear", -0.05),
            decide_on=_choice(raw, "decideOn", "estimate", ("estimate", "lowerBound"), path),
            champion_model_deployment=champion_name,
            champion_tolerance=tolerance,
            cross_validation=(
                CrossValidationConfig.from_dict(_section(raw, "crossValidation", path), f"{path}.crossValidation")
                if raw.get("crossValidation") is not None
                else None
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "minAccuracy": self.min_accuracy,
            "maxLatencyP95Ms": self.max_latency_p95_ms,
            "maxOverfittingGap": self.max_overfitting_gap,
            "requireConvergence": self.require_convergence,
            "maxRmse": self.max_rmse,
            "minR2": self.min_r2,
            "minBalancedAccuracy": self.min_balanced_accuracy,
            "minMarginOverTrivial": self.min_margin_over_trivial,
            "minMarginOverLinear": self.min_margin_over_linear,
            "decideOn": self.decide_on,
            "champion": (
                None
                if self.champion_model_deployment is None
                else {"modelDeployment": self.champion_model_deployment, "tolerance": self.champion_tolerance}
            ),
            "crossValidation": None if self.cross_validation is None else self.cross_validation.to_dict(),
        }


@dataclass(frozen=True)
class OutputConfig:
    model_name: str = "model"
    version: str = "1.0.0"
    torchscript: bool = False
    onnx: bool = False
    quantize_int8: bool = False
    # Largest drop in the primary test metric (accuracy or R²) an export may show against the float model.
    max_export_drop: float = 0.02

    @classmethod
    def from_dict(cls, raw: dict[str, Any], default_name: str, path: str = "output") -> OutputConfig:
        cfg = cls(
            model_name=_get(raw, "modelName", default_name, str, path),
            version=_get(raw, "version", "1.0.0", str, path),
            torchscript=_get(raw, "torchscript", False, bool, path),
            onnx=_get(raw, "onnx", False, bool, path),
            quantize_int8=_get(raw, "quantizeInt8", False, bool, path),
            max_export_drop=_get(raw, "maxExportDrop", 0.02, float, path),
        )
        if not 0.0 <= cfg.max_export_drop <= 1.0:
            raise ConfigError(f"{path}.maxExportDrop: must be between 0 and 1, got {cfg.max_export_drop}")
        return cfg

    @property
    def export_formats(self) -> list[str]:
        """The optional exports asked for, in the order they are written."""
        wanted = {"torchscript": self.torchscript, "int8": self.quantize_int8, "onnx": self.onnx}
        return [fmt for fmt, on in wanted.items() if on]


@dataclass(frozen=True)
class JobConfig:
    """Everything one training run and its validation need, parsed once."""

    name: str
    namespace: str
    model: ModelConfig
    dataset: DatasetConfig
    training: TrainingConfig
    validation: ValidationConfig
    output: OutputConfig
    backend: str
    artifact_root: Path
    run_dir: Path
    # paths.championRunDir: the run directory (relative to artifact_root) of the model that
    # validation.champion's ModelDeployment serves; the operator resolves it.
    champion_run_dir: str | None = None
    # paths.championAbsent / championError: why there is nothing to beat (passes) or nothing reachable (fails).
    champion_absent: str | None = None
    champion_error: str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> JobConfig:
        name = _get(raw, "name", "job", str, "")
        namespace = _get(raw, "namespace", "default", str, "")
        paths = _section(raw, "paths", "")
        root = Path(_get(paths, "artifactRoot", "/artifacts", str, "paths"))
        run_dir = Path(_get(paths, "runDir", str(root / namespace / name), str, "paths"))
        distributed = _section(raw, "distributed", "")
        return cls(
            name=name,
            namespace=namespace,
            model=ModelConfig.from_dict(_section(raw, "model", "")),
            dataset=DatasetConfig.from_dict(
                _section(raw, "dataset", ""), downloaded_file=_get(paths, "datasetFile", "", str, "paths")
            ),
            training=TrainingConfig.from_dict(_section(raw, "training", "")),
            validation=ValidationConfig.from_dict(_section(raw, "validation", "")),
            output=OutputConfig.from_dict(_section(raw, "output", ""), default_name=name),
            backend=_choice(distributed, "backend", "auto", ("auto", "gloo", "nccl"), "distributed"),
            artifact_root=root,
            run_dir=run_dir,
            champion_run_dir=_get(paths, "championRunDir", None, str, "paths"),
            champion_absent=_get(paths, "championAbsent", None, str, "paths"),
            champion_error=_get(paths, "championError", None, str, "paths"),
        )


def load_config(path: str | os.PathLike[str] | None = None) -> JobConfig:
    """Read the config from ``path`` or from the file named by ``$FLOWNEXUS_CONFIG``."""
    location = path if path is not None else os.environ.get(CONFIG_ENV)
    if not location:
        raise ConfigError(f"no config: set ${CONFIG_ENV} to the JSON file the operator wrote")
    with open(location, encoding="utf-8") as fh:
        raw = json.load(fh)
    if not isinstance(raw, dict):
        raise ConfigError(f"{location}: the config must be a JSON object")
    return JobConfig.from_dict(raw)
