"""TrainingJob: one distributed training run, then the validation gate that decides if it may be served."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from .common import (
    ApiModel,
    CelRule,
    Check,
    Condition,
    DatasetPath,
    ImageRef,
    Name,
    ObjectRef,
    ResourceRequirements,
    Rules,
    StatusModel,
    Version,
)

IMMUTABLE: Any = {"rule": "self == oldSelf", "message": "is immutable once the TrainingJob exists"}

# custom: the user's own network, trained by their code (spec.trainer) under the same contract (flownexus_trainer.sdk).
Architecture = Literal["mlp", "residual_mlp", "transformer", "lstm", "custom"]
BuiltinDataset = Literal["digits", "iris", "wine", "breast_cancer", "diabetes"]

MAX_WORKERS = 512
MAX_RESTARTS = 100
# The longest names derived from a TrainingJob's that must be DNS labels (63 characters): the hostname
# <name>-a<attempt>-<index> that an Indexed Job gives its pods (attempt up to maxRestarts + 1, index up to
# workers - 1; the Job's own name is also its pods' job-name label), the validator Job <name>-validate (its
# job-name label), and the headless Service <name>-workers.
LONGEST_SUFFIXES = (f"-a{MAX_RESTARTS + 1}-{MAX_WORKERS - 1}", "-validate", "-workers")
# The pods themselves are named <name>-a<attempt>-<index>-<random>, of which Kubernetes keeps 58 characters
# before the random part; the trainer-status admission policy knows rank 0's pod by the whole prefix.
POD_NAME_KEPT = 58
POD_PREFIX = f"{LONGEST_SUFFIXES[0]}-"
MAX_NAME_LENGTH = min(63 - max(len(s) for s in LONGEST_SUFFIXES), POD_NAME_KEPT - len(POD_PREFIX))

# Environment variables the training pods get from elsewhere; a user's value would silently lose (the
# operator's entries come after the user's) or break the gang (JOB_COMPLETION_INDEX is torchrun's node rank).
TORCHRUN_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
)
TORCHRUN_ENV_PREFIXES = ("PET_", "TORCHELASTIC_")  # torchrun reads its options from PET_*
OPERATOR_ENV = ("OMP_NUM_THREADS", "PYTHONUNBUFFERED")
OPERATOR_ENV_PREFIXES = ("FLOWNEXUS_",)
KUBELET_ENV_PREFIXES = ("KUBERNETES_",)  # the trainer reports progress to $KUBERNETES_SERVICE_HOST
RESERVED_ENV = frozenset({"JOB_COMPLETION_INDEX", *TORCHRUN_ENV, *OPERATOR_ENV})
RESERVED_ENV_PREFIXES = (*TORCHRUN_ENV_PREFIXES, *OPERATOR_ENV_PREFIXES, *KUBELET_ENV_PREFIXES)


def _cel_list(names: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{n}'" for n in names) + "]"


def _cel_prefixes(prefixes: tuple[str, ...]) -> str:
    return " && ".join(f"!self.startsWith('{p}')" for p in prefixes)


EnvName = Annotated[
    str,
    Field(min_length=1, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"),
    Rules(
        (
            Check(
                "self != 'JOB_COMPLETION_INDEX'",
                lambda n: n != "JOB_COMPLETION_INDEX",
                "{value} is reserved: the Job controller sets it to each worker pod's index, which is the "
                "pod's torchrun --node-rank",
            ),
            Check(
                f"!(self in {_cel_list(TORCHRUN_ENV)}) && {_cel_prefixes(TORCHRUN_ENV_PREFIXES)}",
                lambda n: n not in TORCHRUN_ENV and not n.startswith(TORCHRUN_ENV_PREFIXES),
                "{value} is reserved: torchrun sets it for each training process from the operator's "
                "rendezvous settings (MASTER_*, *RANK, *WORLD_SIZE, ROLE_NAME, PET_*, TORCHELASTIC_*)",
            ),
            Check(
                f"!(self in {_cel_list(OPERATOR_ENV)}) && {_cel_prefixes(OPERATOR_ENV_PREFIXES)}",
                lambda n: n not in OPERATOR_ENV and not n.startswith(OPERATOR_ENV_PREFIXES),
                "{value} is reserved: the operator sets it in the training pods (FLOWNEXUS_*, OMP_NUM_THREADS, "
                "PYTHONUNBUFFERED)",
            ),
            Check(
                _cel_prefixes(KUBELET_ENV_PREFIXES),
                lambda n: not n.startswith(KUBELET_ENV_PREFIXES),
                "{value} is reserved: the kubelet sets KUBERNETES_* and the trainer sends its progress, with "
                "its ServiceAccount token, to that API server",
            ),
        )
    ),
]
# A hidden layer's width, as bounded as the other widths.
LayerWidth = Annotated[int, Field(ge=1, le=8192)]


class ModelSpec(ApiModel):
    """The network to train; sizes that do not apply to the architecture are ignored."""

    cel_rules: ClassVar[list[CelRule]] = [
        {
            "rule": "self.architecture != 'transformer' || self.dModel % self.numHeads == 0",
            "message": "dModel must be divisible by numHeads for the transformer",
        },
    ]

    architecture: Architecture = Field(
        description="mlp, residual_mlp, transformer or lstm; or custom: your own network, trained by the code "
        "spec.trainer names (the sizes below are then ignored)."
    )
    hidden_sizes: list[LayerWidth] = Field(
        default_factory=lambda: [128, 64],
        min_length=1,
        max_length=16,
        description="Widths of the hidden layers of the mlp: 1 to 16 layers, each 1 to 8192 wide.",
    )
    hidden_size: int = Field(default=128, ge=1, le=8192, description="Width of residual_mlp blocks.")
    num_blocks: int = Field(default=2, ge=1, le=64, description="Residual blocks of residual_mlp.")
    d_model: int = Field(
        default=32, ge=1, le=4096, description="Embedding width of the transformer; hidden width of the lstm."
    )
    num_heads: int = Field(default=4, ge=1, le=64, description="Attention heads of the transformer.")
    num_layers: int = Field(default=2, ge=1, le=48, description="Layers of the transformer or lstm.")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout probability.")
    sequence_length: int = Field(
        default=0,
        ge=0,
        le=65_536,
        description="lstm: time steps a row is read as (features in time order, step 0 first); it must divide "
        "the feature count, each step then holds features/sequenceLength values. 0 picks square rows when the "
        "feature count is a square (digits: 8 steps of 8 pixels), else one feature per step.",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelSpec:
        if self.architecture == "transformer" and self.d_model % self.num_heads != 0:
            raise ValueError("dModel must be divisible by numHeads for the transformer")
        return self


MAX_SYNTHETIC_CELLS = 100_000_000


class SyntheticData(ApiModel):
    """Shape of generated data when dataset.source is synthetic."""

    cel_rules: ClassVar[list[CelRule]] = [
        {
            "rule": f"self.samples * self.features <= {MAX_SYNTHETIC_CELLS}",
            "message": f"samples x features must be at most {MAX_SYNTHETIC_CELLS:,}: every training process "
            "generates the whole table in memory (8 bytes a value)",
        },
    ]

    samples: int = Field(default=2000, ge=10, le=10_000_000, description="Number of rows.")
    features: int = Field(default=20, ge=1, le=100_000, description="Number of features.")
    classes: int = Field(default=3, ge=2, le=10_000, description="Classes (classification only).")
    noise: float = Field(default=0.1, ge=0.0, le=10.0, description="Label noise / regression noise.")

    @model_validator(mode="after")
    def _fits_in_memory(self) -> SyntheticData:
        if self.samples * self.features > MAX_SYNTHETIC_CELLS:
            raise ValueError(self.cel_rules[0]["message"])
        return self


# s3://<bucket>/<key> (a bucket name as S3 spells one) or pvc://<path relative to the artifact store root>; the
# key or path starts and ends with something other than '/'.
DATASET_URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]|pvc:/)/[^/\s]([^\s]*[^/\s])?$"
_DATASET_URI = re.compile(DATASET_URI_PATTERN)
# The format a dataset URI names by its extension (case-insensitive), when spec.dataset.format is unset.
DATASET_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".npz": "npz",
}
_KNOWN_EXTENSION_CEL = " || ".join(f"self.uri.lowerAscii().endsWith('{ext}')" for ext in DATASET_EXTENSIONS)
DatasetUri = Annotated[
    str,
    Field(min_length=1, max_length=1024),
    Rules(
        (
            Check(
                f"self.matches(r'{DATASET_URI_PATTERN}')",
                lambda u: _DATASET_URI.fullmatch(u) is not None,
                "{value} is not s3://<bucket>/<key> or pvc://<path relative to the artifact store root>",
            ),
            Check(
                "!self.split('/').exists(s, s == '..')",
                lambda u: ".." not in u.split("/"),
                "{value} may not contain a '..' segment: the dataset must stay inside the artifact store",
            ),
        )
    ),
]
TABLE_SOURCES = ("file", "uri")  # sources whose data is a table with named columns


def dataset_format(uri: str) -> str | None:
    """The format ``uri`` names by its extension (.csv/.tsv/.txt, .parquet/.pq, .npz), or None."""
    lowered = uri.lower()
    return next((fmt for ext, fmt in DATASET_EXTENSIONS.items() if lowered.endswith(ext)), None)


class DatasetSpec(ApiModel):
    """Where the data comes from and how it is split. An s3:// dataset is fetched from the NeuralCluster's S3
    artifact store before training; nothing else is downloaded."""

    cel_rules: ClassVar[list[CelRule]] = [
        {
            "rule": "self.source != 'builtin' || has(self.name)",
            "message": "name is required when source is builtin",
        },
        {
            "rule": "self.source != 'file' || has(self.path)",
            "message": "path is required when source is file",
        },
        {
            "rule": "self.source != 'builtin' || !has(self.name) || "
            "(self.name == 'diabetes') == (self.task == 'regression')",
            "message": "builtin diabetes is a regression task; digits, iris, wine and breast_cancer are classification",
        },
        {
            "rule": "self.validationFraction + self.testFraction < 0.9",
            "message": "validationFraction + testFraction must leave at least 10% for training",
        },
        {
            "rule": "self.source in ['file', 'uri'] || !has(self.categoricalColumns)",
            "message": "categoricalColumns needs source: file or uri (a table with named columns)",
        },
        {
            "rule": "!has(self.categoricalColumns) || !(self.targetColumn in self.categoricalColumns)",
            "message": "targetColumn cannot be one of categoricalColumns",
        },
        {
            "rule": "self.source != 'uri' || has(self.uri)",
            "message": "uri is required when source is uri",
        },
        {
            "rule": "self.source == 'uri' || !has(self.uri)",
            "message": "uri needs source: uri",
        },
        {
            "rule": "self.source == 'uri' || !has(self.format)",
            "message": "format needs source: uri (a file's path names its format by its extension)",
        },
        {
            "rule": f"self.source != 'uri' || !has(self.uri) || has(self.format) || {_KNOWN_EXTENSION_CEL}",
            "message": "uri has no known extension (.csv, .tsv, .txt, .parquet, .pq, .npz): set format to csv, "
            "parquet or npz",
        },
        {
            "rule": "self.source in ['file', 'uri'] || !has(self.featureColumns)",
            "message": "featureColumns needs source: file or uri (a table with named columns)",
        },
        {
            "rule": "self.source in ['file', 'uri'] || !has(self.timestampColumn)",
            "message": "timestampColumn needs source: file or uri (a table with named columns)",
        },
        {
            "rule": "!has(self.timestampColumn) || self.split == 'temporal'",
            "message": "timestampColumn needs split: temporal (it orders the rows a temporal split cuts; a random "
            "split does not use row order)",
        },
        {
            "rule": "!has(self.featureColumns) || !(self.targetColumn in self.featureColumns)",
            "message": "targetColumn cannot be one of featureColumns",
        },
        {
            "rule": "!has(self.timestampColumn) || self.timestampColumn != self.targetColumn",
            "message": "timestampColumn cannot be the targetColumn",
        },
        {
            "rule": "!has(self.timestampColumn) || !has(self.featureColumns) || "
            "!(self.timestampColumn in self.featureColumns)",
            "message": "timestampColumn cannot be one of featureColumns: it orders the rows and is not a feature",
        },
    ]

    source: Literal["builtin", "synthetic", "file", "uri"] = Field(
        default="builtin",
        description="builtin (scikit-learn's packaged data), synthetic, a file in the artifact store (path), or a "
        "dataset by URI (uri).",
    )
    name: BuiltinDataset | None = Field(
        default=None, description="The builtin dataset (scikit-learn's packaged data; diabetes is regression)."
    )
    path: DatasetPath | None = Field(
        default=None,
        description="CSV or NPZ file, relative to the artifact store root (no '..' segments).",
    )
    target_column: str = Field(default="target", max_length=256, description="Label column of a CSV file.")
    task: Literal["classification", "regression"] = Field(
        default="classification", description="classification or regression."
    )
    split: Literal["random", "temporal"] = Field(
        default="random", description="random (stratified for classification) or temporal (keeps row order)."
    )
    validation_fraction: float = Field(default=0.15, gt=0.0, lt=0.9, description="Share held out for validation.")
    test_fraction: float = Field(default=0.15, gt=0.0, lt=0.9, description="Share held out for the final test.")
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Seed of splits, init and shuffling.")
    synthetic: SyntheticData = Field(default_factory=SyntheticData, description="Shape of synthetic data.")
    categorical_columns: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None,
        max_length=256,
        description="CSV columns holding categories: each is one-hot encoded (categories from the training split; "
        "a value unseen in training encodes as all zeros) and the mapping is saved with the model. source: file only.",
    )
    missing_values: Literal["error", "dropRows"] = Field(
        default="error",
        description="A missing cell (empty, NaN, NA, n/a, null, none): error fails the job naming file, line and "
        "column; dropRows drops such rows and records how many.",
    )
    uri: DatasetUri | None = Field(
        default=None,
        description="source: uri only. s3://<bucket>/<key> (the NeuralCluster's artifact store must be S3 with "
        "this bucket: the object is downloaded before training) or pvc://<path relative to the artifact store "
        "root> (no '..' segments).",
    )
    format: Literal["csv", "parquet", "npz"] | None = Field(
        default=None,
        description="source: uri only. csv, parquet or npz; unset: from the uri's extension (.csv/.tsv/.txt, "
        ".parquet/.pq, .npz).",
    )
    feature_columns: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None,
        max_length=1024,
        description="The feature columns, in this order (source: file or uri, a CSV or Parquet table). Unset: every "
        "column but targetColumn and timestampColumn, in file order. A name that is not a column fails the job.",
    )
    timestamp_column: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="split: temporal only (source: file or uri, a CSV or Parquet table): the rows are stably "
        "sorted by this column (numbers, or ISO-8601 dates/times), ascending, before the split; it is not a feature.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> DatasetSpec:
        if self.source == "builtin" and self.name is None:
            raise ValueError("name is required when source is builtin")
        if self.source == "file" and self.path is None:
            raise ValueError("path is required when source is file")
        if (
            self.source == "builtin"
            and self.name is not None
            and (self.name == "diabetes") != (self.task == "regression")
        ):
            raise ValueError(
                "builtin diabetes is a regression task; digits, iris, wine and breast_cancer are classification"
            )
        if self.validation_fraction + self.test_fraction >= 0.9:
            raise ValueError("validationFraction + testFraction must leave at least 10% for training")
        if self.categorical_columns is not None and self.source not in TABLE_SOURCES:
            raise ValueError("categoricalColumns needs source: file or uri (a table with named columns)")
        if self.categorical_columns is not None and self.target_column in self.categorical_columns:
            raise ValueError("targetColumn cannot be one of categoricalColumns")
        if self.source == "uri" and self.uri is None:
            raise ValueError("uri is required when source is uri")
        if self.source != "uri" and self.uri is not None:
            raise ValueError("uri needs source: uri")
        if self.source != "uri" and self.format is not None:
            raise ValueError("format needs source: uri (a file's path names its format by its extension)")
        if self.uri is not None and self.format is None and dataset_format(self.uri) is None:
            raise ValueError(
                "uri has no known extension (.csv, .tsv, .txt, .parquet, .pq, .npz): set format to csv, parquet or npz"
            )
        if self.feature_columns is not None and self.source not in TABLE_SOURCES:
            raise ValueError("featureColumns needs source: file or uri (a table with named columns)")
        if self.timestamp_column is not None and self.source not in TABLE_SOURCES:
            raise ValueError("timestampColumn needs source: file or uri (a table with named columns)")
        if self.timestamp_column is not None and self.split != "temporal":
            raise ValueError(
                "timestampColumn needs split: temporal (it orders the rows a temporal split cuts; a random split "
                "does not use row order)"
            )
        if self.feature_columns is not None and self.target_column in self.feature_columns:
            raise ValueError("targetColumn cannot be one of featureColumns")
        if self.timestamp_column is not None and self.timestamp_column == self.target_column:
            raise ValueError("timestampColumn cannot be the targetColumn")
        if self.timestamp_column is not None and self.timestamp_column in (self.feature_columns or []):
            raise ValueError("timestampColumn cannot be one of featureColumns: it orders the rows and is not a feature")
        return self


class SchedulerSpec(ApiModel):
    """Learning-rate schedule."""

    type: Literal["cosine", "constant"] = Field(default="cosine", description="cosine (with warmup) or constant.")
    warmup_epochs: int = Field(default=1, ge=0, le=1000, description="Epochs of linear warmup.")


class EarlyStopping(ApiModel):
    """Stop when validation loss stops improving."""

    enabled: bool = Field(default=True, description="Whether early stopping is on.")
    patience: int = Field(default=5, ge=1, le=1000, description="Epochs without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0.0, description="Smallest decrease of val loss that counts.")


class TrainingSpec(ApiModel):
    """Optimisation settings."""

    cel_rules: ClassVar[list[CelRule]] = [
        {
            "rule": "self.scheduler.warmupEpochs < self.epochs",
            "message": "scheduler.warmupEpochs must be < epochs",
        },
    ]

    epochs: int = Field(default=30, ge=1, le=10_000, description="Maximum epochs.")
    batch_size: int = Field(
        default=64,
        ge=1,
        le=65_536,
        description="Global batch size: each of the W training processes (workers x procsPerWorker) takes "
        "ceil(batchSize / W) samples per step, so a run on more processes takes the same optimizer steps and "
        "learningRate keeps its meaning. Must be >= W.",
    )
    learning_rate: float = Field(default=1e-3, gt=0.0, le=10.0, description="Peak learning rate.")
    optimizer: Literal["adamw", "sgd"] = Field(default="adamw", description="adamw or sgd.")
    weight_decay: float = Field(default=0.01, ge=0.0, le=1.0, description="Decoupled weight decay.")
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="Momentum of sgd.")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="Learning-rate schedule.")
    gradient_clip_norm: float | None = Field(
        default=1.0,
        gt=0.0,
        description="Clip the global gradient norm to this value; unset disables clipping.",
    )
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping, description="Early stopping.")
    checkpoint_every: int = Field(default=5, ge=1, le=10_000, description="Write a checkpoint every N epochs.")
    mixed_precision: bool = Field(default=False, description="Automatic mixed precision; used on GPU only.")
    min_steps: int = Field(
        default=500,
        ge=0,
        le=10_000_000,
        description="Fewest optimizer steps: when epochs x steps per epoch is fewer (small datasets), the run "
        "takes as many more epochs as reach it, and warmup, the cosine schedule and early-stopping patience "
        "stretch by the same factor. 0 turns this off.",
    )

    @model_validator(mode="after")
    def _warmup_shorter(self) -> TrainingSpec:
        if self.scheduler.warmup_epochs >= self.epochs:
            raise ValueError("scheduler.warmupEpochs must be < epochs")
        return self


class EnvVar(ApiModel):
    """An extra environment variable for the training containers."""

    name: EnvName = Field(
        description="Name; variables that torchrun, the Job controller, the kubelet or the operator set are refused."
    )
    value: str = Field(default="", max_length=4096, description="Value.")


class DistributedSpec(ApiModel):
    """How many pods and processes train together."""

    cel_rules: ClassVar[list[CelRule]] = [
        {
            "rule": "self.backend != 'nccl' || self.gpusPerWorker > 0",
            "message": "backend nccl needs gpusPerWorker > 0",
        },
        {
            "rule": "self.gpusPerWorker == 0 || self.gpusPerWorker >= self.procsPerWorker",
            "message": "with GPUs, each process needs its own GPU: gpusPerWorker must be >= procsPerWorker",
        },
    ]

    workers: int = Field(default=1, ge=1, le=MAX_WORKERS, description="Worker pods (torchrun nodes).")
    procs_per_worker: int = Field(default=1, ge=1, le=64, description="Processes per pod (torchrun nproc-per-node).")
    gpus_per_worker: int = Field(default=0, ge=0, le=16, description="GPUs per pod; 0 trains on CPU.")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        default="auto", description="auto picks nccl with GPUs, gloo on CPU."
    )
    resources: ResourceRequirements | None = Field(
        default=None, description="Resources per pod; the NeuralCluster default when unset."
    )
    env: list[EnvVar] | None = Field(default=None, max_length=64, description="Extra environment variables.")

    @model_validator(mode="after")
    def _consistent(self) -> DistributedSpec:
        if self.backend == "nccl" and self.gpus_per_worker == 0:
            raise ValueError("backend nccl needs gpusPerWorker > 0")
        if self.gpus_per_worker and self.gpus_per_worker < self.procs_per_worker:
            raise ValueError("with GPUs, each process needs its own GPU: gpusPerWorker must be >= procsPerWorker")
        return self


class RunPolicy(ApiModel):
    """Lifecycle rules, as users know them from Kubernetes Jobs."""

    max_restarts: int = Field(default=3, ge=0, le=MAX_RESTARTS, description="Whole-gang restarts before Failed.")
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="Fail the TrainingJob when it has run longer than this."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, le=2**31 - 1, description="Delete the finished TrainingJob after this many seconds."
    )
    suspend: bool = Field(default=False, description="Stop the pods (keeping checkpoints) until unset.")


class ServedLatencySpec(ApiModel):
    """How the gate measures latency: the candidate archive in TorchServe, configured as a ModelDeployment serves
    it, called by closed-loop clients inside the validator pod. Batching, workers and resources left unset are
    those of validation.champion's ModelDeployment when one is named, else the ModelDeployment defaults."""

    batch_size: int | None = Field(
        default=None, ge=1, le=1024, description="TorchServe batchSize (spec.serving.batchSize; default 32)."
    )
    max_batch_delay_ms: int | None = Field(
        default=None,
        ge=0,
        le=60_000,
        description="TorchServe maxBatchDelay in ms (spec.serving.maxBatchDelayMs; default 5).",
    )
    workers: int | None = Field(
        default=None, ge=1, le=64, description="Python workers (spec.serving.workersPerModel; default 1)."
    )
    concurrency: int = Field(
        default=1, ge=1, le=256, description="Clients sending at the same time, each one request after the other."
    )
    requests: int = Field(default=300, ge=20, le=100_000, description="Measured requests, after 20 warm-up ones.")
    resources: ResourceRequirements | None = Field(
        default=None,
        description="Resources of the measuring container (TorchServe and its clients); the NeuralCluster's "
        "default serving resources when unset.",
    )


class ChampionSpec(ApiModel):
    """Champion vs challenger: the model a ModelDeployment serves now, scored on the same test rows."""

    model_deployment: Name = Field(
        description="The ModelDeployment (same namespace) whose served model this one must match or beat."
    )
    tolerance: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="How far below the champion's balanced accuracy (classification) or R² (regression) this "
        "model may score and still pass.",
    )


class CrossValidationSpec(ApiModel):
    """k-fold cross-validation of the training+validation rows, for datasets too small for one test split."""

    folds: int = Field(ge=2, le=10, description="Number of stratified folds; k models are trained in the validator.")
    max_std: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Maximum standard deviation of the fold scores (primary metric) before the estimate counts as "
        "too unstable to pass.",
    )


class ValidationThresholds(ApiModel):
    """The gate: a model is served only when every threshold holds.

    Quality is compared on one primary metric: balanced accuracy (the mean per-class recall) for
    classification, R² for regression, on the test split that neither training nor early stopping saw.
    """

    min_accuracy: float = Field(default=0.85, ge=0.0, le=1.0, description="Minimum test accuracy (classification).")
    max_latency_p95_ms: float = Field(
        default=100.0,
        gt=0.0,
        description="Maximum p95 latency in milliseconds of one-row requests to the model served by TorchServe "
        "(see servedLatency), measured by the client.",
    )
    min_balanced_accuracy: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Minimum test balanced accuracy (classification); unset = off."
    )
    min_margin_over_trivial: float = Field(
        default=0.05,
        ge=-1.0,
        le=1.0,
        description="The primary metric must exceed the trivial baseline's (majority class / mean prediction, "
        "fitted on the same training split) by at least this much; -1 switches it off for classification.",
    )
    min_margin_over_linear: float = Field(
        default=-0.05,
        ge=-1.0,
        le=1.0,
        description="The primary metric must reach the linear baseline's (logistic / ridge regression on the "
        "same split) plus this margin: -0.05 lets the network be at most 0.05 below; -1 switches it off for "
        "classification.",
    )
    max_overfitting_gap: float = Field(
        default=0.15,
        ge=0.0,
        le=10.0,
        description="Maximum train minus test primary metric (overfitting, on rows model selection never saw).",
    )
    decide_on: Literal["estimate", "lowerBound"] = Field(
        default="estimate",
        description="minAccuracy on the test accuracy (estimate) or on the lower end of its 95 % Wilson interval "
        "(lowerBound), for small test sets.",
    )
    champion: ChampionSpec | None = Field(
        default=None,
        description="Pass only if this model scores at least the champion's primary metric minus tolerance.",
    )
    require_convergence: bool = Field(default=True, description="Require the validation loss to have converged.")
    cross_validation: CrossValidationSpec | None = Field(
        default=None,
        description="Also train the same model on k folds of the training+validation rows (never the test rows) "
        "and fail when the fold scores vary more than maxStd or their mean is not minMarginOverTrivial above the "
        "trivial baseline; unset = off.",
    )
    max_rmse: float | None = Field(default=None, gt=0.0, description="Maximum test RMSE (regression).")
    min_r2: float | None = Field(default=None, le=1.0, description="Minimum test R² (regression).")
    served_latency: ServedLatencySpec = Field(
        default_factory=ServedLatencySpec,
        description="The TorchServe settings and load under which maxLatencyP95Ms is measured.",
    )


class ExportSpec(ApiModel):
    """What the validator writes when the model passes."""

    model_name: Name | None = Field(
        default=None, description="Model name in TorchServe; the TrainingJob name when unset."
    )
    version: Version = Field(
        default="1.0.0", description="Model version: letters, digits, '.', '_' and '-', at most 63 characters."
    )
    torchscript: bool = Field(
        default=False, description="Also export TorchScript (raw features in; standardization inside the graph)."
    )
    onnx: bool = Field(
        default=False, description="Also export ONNX, checked with onnxruntime (raw features in, as TorchScript)."
    )
    quantize_int8: bool = Field(
        default=False, description="Also export a dynamically int8-quantized TorchScript model, run one row at a time."
    )
    max_export_drop: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description=(
            "Largest drop in test accuracy (classification) or R² (regression) an export may show against the "
            "float model; an export beyond it is recorded as failed and its file is not kept."
        ),
    )


# One word of what torchrun runs: a script path, -m, a module name, or an argument of the user's code.
TrainerWord = Annotated[str, Field(min_length=1, max_length=1024)]
TrainerArg = Annotated[str, Field(max_length=4096)]
TRAINER_COMMAND_MESSAGE = (
    "trainer.command is what torchrun runs: a script path such as /opt/example/train_cnn.py, or -m and a module "
    "such as [-m, mypkg.train]; it may not start with another option (torchrun's own options are the operator's)"
)
CUSTOM_TRAINER_MESSAGE = (
    "model.architecture custom and trainer go together: set trainer (image, command) exactly when "
    "model.architecture is custom"
)
CUSTOM_CROSS_VALIDATION_MESSAGE = (
    "validation.crossValidation retrains the built-in architecture on each fold; it is not available with "
    "trainer (model.architecture custom)"
)


class CustomTrainer(ApiModel):
    """Your own training code (model.architecture custom): an image built FROM the trainer image and what torchrun
    runs in it. The code uses flownexus_trainer.sdk for the data, progress, checkpoints and the exported model,
    so the validation gate, the archive and serving work as for the built-in architectures."""

    cel_rules: ClassVar[list[CelRule]] = [
        {
            "rule": "self.command[0] == '-m' ? size(self.command) >= 2 && !self.command[1].startsWith('-') "
            ": !self.command[0].startsWith('-')",
            "message": TRAINER_COMMAND_MESSAGE,
        },
    ]

    image: ImageRef = Field(
        description="Image of the training pods, built FROM the NeuralCluster's trainer image (e.g. "
        "registry.example.com/team/custom-cnn:0.1.0). The validator and serving keep the cluster's images."
    )
    command: list[TrainerWord] = Field(
        min_length=1,
        max_length=64,
        description="What torchrun runs in each process: a script path ([/opt/example/train_cnn.py]) or -m and a "
        "module ([-m, mypkg.train]); it replaces -m flownexus_trainer.train.",
    )
    args: list[TrainerArg] | None = Field(
        default=None, max_length=64, description="Arguments after command, passed to the script as they are."
    )

    @model_validator(mode="after")
    def _runnable(self) -> CustomTrainer:
        head = self.command[0]
        if (head == "-m" and (len(self.command) < 2 or self.command[1].startswith("-"))) or (
            head != "-m" and head.startswith("-")
        ):
            raise ValueError(TRAINER_COMMAND_MESSAGE)
        return self


class TrainingJobSpec(ApiModel):
    """Desired state of a TrainingJob. Everything but runPolicy is fixed once the job exists."""

    cel_rules: ClassVar[list[CelRule]] = [
        {
            "rule": "!has(self.training) || !has(self.distributed) || self.training.batchSize >= "
            "self.distributed.workers * self.distributed.procsPerWorker",
            "message": "training.batchSize is the global batch: it must be at least distributed.workers x "
            "procsPerWorker (one row per process)",
        },
        {
            "rule": "!has(self.validation) || !has(self.validation.crossValidation) || !has(self.dataset.split) || "
            "self.dataset.split != 'temporal'",
            "message": "validation.crossValidation shuffles rows into folds: it needs dataset.split random, not "
            "temporal (a fold would train on later rows and be scored on earlier ones)",
        },
        {"rule": "(self.model.architecture == 'custom') == has(self.trainer)", "message": CUSTOM_TRAINER_MESSAGE},
        {
            "rule": "!has(self.trainer) || !has(self.validation) || !has(self.validation.crossValidation)",
            "message": CUSTOM_CROSS_VALIDATION_MESSAGE,
        },
    ]

    cluster_ref: ObjectRef = Field(
        description="The NeuralCluster that provides images, storage and limits.",
        json_schema_extra={"x-kubernetes-validations": [IMMUTABLE]},
    )
    model: ModelSpec = Field(description="The network.", json_schema_extra={"x-kubernetes-validations": [IMMUTABLE]})
    dataset: DatasetSpec = Field(
        description="The data.",
        json_schema_extra={"x-kubernetes-validations": [IMMUTABLE]},
    )
    training: TrainingSpec = Field(
        default_factory=TrainingSpec,
        description="Optimisation.",
        json_schema_extra={"x-kubernetes-validations": [IMMUTABLE]},
    )
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec,
        description="Pods and processes.",
        json_schema_extra={"x-kubernetes-validations": [IMMUTABLE]},
    )
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Restarts, deadlines, suspend.")
    validation: ValidationThresholds = Field(
        default_factory=ValidationThresholds,
        description="Thresholds of the validation gate.",
        json_schema_extra={"x-kubernetes-validations": [IMMUTABLE]},
    )
    output: ExportSpec = Field(
        default_factory=ExportSpec,
        description="Name, version and export formats.",
        json_schema_extra={"x-kubernetes-validations": [IMMUTABLE]},
    )
    trainer: CustomTrainer | None = Field(
        default=None,
        description="Your own training code; required with model.architecture custom and only then. "
        "See docs/BRING_YOUR_OWN_MODEL.md.",
        json_schema_extra={"x-kubernetes-validations": [IMMUTABLE]},
    )

    @model_validator(mode="after")
    def _a_row_per_process(self) -> TrainingJobSpec:
        if self.training.batch_size < self.distributed.workers * self.distributed.procs_per_worker:
            raise ValueError(self.cel_rules[0]["message"])
        if self.validation.cross_validation is not None and self.dataset.split == "temporal":
            raise ValueError(self.cel_rules[1]["message"])
        if (self.model.architecture == "custom") != (self.trainer is not None):
            raise ValueError(CUSTOM_TRAINER_MESSAGE)
        if self.trainer is not None and self.validation.cross_validation is not None:
            raise ValueError(CUSTOM_CROSS_VALIDATION_MESSAGE)
        return self


TrainingJobPhase = Literal[
    "Pending", "Created", "Running", "Restarting", "Validating", "Succeeded", "Failed", "Suspended"
]


class EpochMetrics(StatusModel):
    """Metrics of one epoch, reported by rank 0."""

    epoch: int = Field(default=0, description="Epochs completed.")
    total_epochs: int | None = Field(default=None, description="Planned epochs.")
    loss: float | None = Field(default=None, description="Training loss.")
    accuracy: float | None = Field(default=None, description="Training accuracy.")
    val_loss: float | None = Field(default=None, description="Validation loss.")
    val_accuracy: float | None = Field(default=None, description="Validation accuracy.")
    rmse: float | None = Field(default=None, description="Validation RMSE (regression).")
    r2: float | None = Field(default=None, description="Validation R² (regression).")
    learning_rate: float | None = Field(default=None, description="Learning rate.")
    grad_norm: float | None = Field(default=None, description="Global gradient norm before clipping.")
    samples_per_second: float | None = Field(default=None, description="Training throughput.")
    attempt: int | None = Field(default=None, description="Attempt that produced these metrics.")
    updated_at: str | None = Field(default=None, description="When rank 0 reported them (RFC 3339).")


class CheckpointRef(StatusModel):
    """The latest complete checkpoint."""

    epoch: int = Field(description="Epoch the checkpoint holds.")
    path: str = Field(description="Path in the artifact store.")


class ValidationResult(StatusModel):
    """What the validator measured and decided."""

    passed: bool = Field(description="True when every threshold held.")
    accuracy: float | None = Field(default=None, description="Test accuracy.")
    rmse: float | None = Field(default=None, description="Test RMSE.")
    r2: float | None = Field(default=None, description="Test R².")
    latency_p50_ms: float | None = Field(
        default=None, description="p50 served latency (ms): TorchServe with the serving settings, timed by clients."
    )
    latency_p95_ms: float | None = Field(default=None, description="p95 served latency (ms); maxLatencyP95Ms gates it.")
    latency_p99_ms: float | None = Field(default=None, description="p99 served latency (ms).")
    model_latency_p95_ms: float | None = Field(
        default=None, description="p95 of the model alone, in process at batch 1 (ms): what serving adds is the rest."
    )
    balanced_accuracy: float | None = Field(default=None, description="Test balanced accuracy (classification).")
    baseline_trivial: float | None = Field(
        default=None, description="Primary metric of the trivial baseline (majority class / mean) on the test split."
    )
    baseline_linear: float | None = Field(
        default=None, description="Primary metric of the linear baseline (logistic / ridge) on the test split."
    )
    champion_score: float | None = Field(
        default=None, description="Primary metric of the champion ModelDeployment's model on the same test rows."
    )
    overfitting_gap: float | None = Field(default=None, description="Train minus test primary metric.")
    macro_f1: float | None = Field(default=None, description="Test macro-averaged F1 (classification).")
    roc_auc: float | None = Field(default=None, description="Test ROC-AUC (two classes).")
    accuracy_interval: list[float] | None = Field(
        default=None, description="95 % Wilson interval [low, high] of the test accuracy."
    )
    converged: bool | None = Field(default=None, description="Whether validation loss converged.")
    cross_validation_mean: float | None = Field(
        default=None, description="Mean primary metric over the cross-validation folds (validation.crossValidation)."
    )
    cross_validation_std: float | None = Field(
        default=None, description="Standard deviation of the primary metric over the cross-validation folds."
    )
    failed_thresholds: list[str] = Field(default_factory=list, description="Every threshold that failed, named.")


class Artifacts(StatusModel):
    """Paths in the artifact store."""

    model_archive: str | None = Field(default=None, description="TorchServe .mar archive.")
    report: str | None = Field(default=None, description="report.md with the training curves.")
    metadata: str | None = Field(default=None, description="metadata.json (lineage).")
    metrics: str | None = Field(default=None, description="metrics.jsonl, one line per epoch.")


class TrainingJobStatus(StatusModel):
    """Observed state of a TrainingJob."""

    observed_generation: int | None = Field(default=None, description="Generation this status reflects.")
    phase: TrainingJobPhase | None = Field(default=None, description="Where the job is in its life.")
    reason: str | None = Field(default=None, description="Why the job is in this phase.")
    message: str | None = Field(default=None, description="Details for people.")
    attempt: int = Field(default=0, description="Current attempt (1 = first run).")
    queue_position: int | None = Field(
        default=None,
        description="While waiting for capacity: the job's place in its NeuralCluster's queue (1 = next).",
    )
    progress: EpochMetrics | None = Field(
        default=None, description="Live metrics of the latest epoch, patched by rank 0 of the training pods."
    )
    best_metrics: EpochMetrics | None = Field(
        default=None, description="Metrics of the best epoch (lowest validation loss), patched by rank 0."
    )
    latest_checkpoint: CheckpointRef | None = Field(
        default=None, description="Latest complete checkpoint, patched by rank 0."
    )
    validation: ValidationResult | None = Field(default=None, description="Verdict of the validator.")
    artifacts: Artifacts | None = Field(default=None, description="Paths of what the job produced.")
    start_time: str | None = Field(default=None, description="When the first attempt started.")
    completion_time: str | None = Field(default=None, description="When the job succeeded or failed.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Created, Running, Restarting, Trained, Validated, Succeeded, Failed, Suspended.",
    )
