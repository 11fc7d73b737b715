"""Bring your own model: what a custom trainer's code (``model.architecture: custom``, ``spec.trainer``) calls so
that the validation gate, the report, the model archive, a ModelDeployment and its canary work as they do for the
built-in architectures.

The user's image is built ``FROM`` the trainer image; torchrun runs ``spec.trainer.command`` in each process::

    from flownexus_trainer import sdk

    with sdk.init() as ctx:                       # rank, device, config, run dir; the process group joined
        data = ctx.load_data()                    # train + validation rows (standardized); never test rows
        model = DistributedDataParallel(MyNet(data.num_features, data.num_outputs))
        resumed = ctx.load_checkpoint()           # the whole gang resumes from rank 0's latest checkpoint
        for epoch in range(start, epochs + 1):
            ...                                   # train on ctx.epoch_indices(epoch)
            ctx.report_epoch(epoch, train_loss, val_loss, val_accuracy=acc, lr=lr)
            ctx.save_checkpoint(epoch, {"model": ..., "optimizer": ...})
        ctx.export(model)                         # rank 0: TorchScript on raw rows + metadata

The contract, which ``export`` writes into the run directory (``<runDir>``):

- ``model/model.pt``: TorchScript that takes RAW feature rows (float32 ``[N, F]``, the features in
  ``featureNames`` order, as a client sends them) and returns logits ``[N, classes]`` (classification) or values
  ``[N, 1]`` in the target's units (regression). The training split's standardization is inside the graph.
- ``model/model_config.json`` (``"format": "torchscript"``, ``"rawInput": true``, the input schema, the class
  labels) and ``model/normalization.json``: what the validator and the serving handler read.
- ``training_summary.json``, and ``metrics.jsonl`` (one line per ``report_epoch``): the gate's convergence check
  reads the losses; ``status.progress`` of the TrainingJob shows each epoch.
- ``checkpoints/ckpt-epoch-NNNNN.pt``: written atomically by rank 0, two kept.

The validator never runs the user's code: it loads the TorchScript file. Test rows exist only in the validator.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset
from torch.utils.data.distributed import DistributedSampler

from .checkpoint import atomic_write_bytes, load_latest_checkpoint, save_checkpoint
from .config import JobConfig, load_config
from .data import Normalization, Splits, load_splits
from .distributed import DistContext, broadcast_from_main, init_distributed, shutdown
from .errors import failure_summary, write_termination_message
from .export import Preprocessing, RawInputModel, to_torchscript
from .progress import CheckpointRef, EpochMetrics, Progress, ProgressSink, default_sinks
from .train import EarlyStopping, evaluate, per_process_batch, truncate_metrics

__all__ = ["Checkpoint", "Context", "Data", "EarlyStopping", "init"]

log = logging.getLogger(__name__)

# A number as a loop has it: a float, or a 0-d tensor (a loss, get_last_lr()'s entries); report_epoch takes float().
Number = float | torch.Tensor
MODEL_FORMAT = "torchscript"
EXAMPLE_ROWS = 64


@dataclass(frozen=True)
class Data:
    """The training and validation rows of the job's dataset, standardized with the training split's statistics.

    Features: float32 ``[N, num_features]``. Targets: class indices (int64) for classification, the target
    standardized (float32) for regression. ``normalization`` holds the statistics (``export`` puts them in the
    graph). The test rows are held out for the validator and never given to the trainer.
    """

    task: str
    x_train: NDArray[np.float32]
    y_train: NDArray[Any]
    x_val: NDArray[np.float32]
    y_val: NDArray[Any]
    feature_names: list[str]
    class_labels: list[str]
    normalization: Normalization

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        """Classes of a classification task; 0 for regression."""
        return len(self.class_labels)

    @property
    def num_outputs(self) -> int:
        """What the network must return per row: one logit per class, or one value."""
        return self.num_classes if self.task == "classification" else 1

    def tensors(
        self, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x_train, y_train, x_val, y_val`` as tensors on ``device``."""
        return tuple(  # type: ignore[return-value]
            torch.from_numpy(np.ascontiguousarray(a)).to(device)
            for a in (self.x_train, self.y_train, self.x_val, self.y_val)
        )


@dataclass(frozen=True)
class Checkpoint:
    """What ``load_checkpoint`` found: the epoch it was written after and the state given to ``save_checkpoint``."""

    epoch: int
    state: dict[str, Any]
    path: str


class _Outputs(nn.Module):
    """The user's network with a regression output of ``[N]`` made ``[N, 1]``, as the contract asks."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        if out.dim() == 1:
            out = out.unsqueeze(-1)
        return out


class Context:
    """One training process of a custom trainer: who it is in the gang, the job's config, and the contract's calls.

    Rank 0 alone writes (metrics, status, checkpoints, the model); every call may be made on every rank.
    """

    def __init__(self, cfg: JobConfig, dist: DistContext, sink: ProgressSink | None = None) -> None:
        self.config = cfg
        self.dist = dist
        self.sink = sink
        self._splits: Splits | None = None
        self._data: Data | None = None
        self._best_loss = math.inf
        self._best: dict[str, Any] = {}
        self._last_epoch = 0
        self._total_epochs = cfg.training.epochs
        self._reported = False
        self._resumed_from: str | None = None
        self._latest: CheckpointRef | None = None
        self._clock = time.perf_counter()
        self._finished = False

    # --- who and where ---------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def local_rank(self) -> int:
        return self.dist.local_rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def device(self) -> torch.device:
        """cuda:<local rank> when GPUs are visible, else the CPU."""
        return self.dist.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes."""
        return self.dist.is_main

    @property
    def distributed(self) -> bool:
        """More than one process: wrap the network in DistributedDataParallel."""
        return self.dist.distributed

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    @property
    def checkpoint_dir(self) -> Path:
        return self.config.run_dir / "checkpoints"

    @property
    def per_process_batch(self) -> int:
        """``training.batchSize`` is the global batch; this process's share of it."""
        return per_process_batch(self.config.training.batch_size, self.world_size)

    # --- data ------------------------------------------------------------------------------------

    def load_data(self) -> Data:
        """The job's dataset, split exactly as the validator splits it; only train and validation rows."""
        if self._data is None:
            splits = load_splits(self.config.dataset, self.config.artifact_root)
            empty_x = np.zeros((0, splits.num_features), dtype=np.float32)
            # What the SDK keeps for export (schema, fingerprint, normalization) holds no test row either.
            self._splits = dataclasses.replace(splits, x_test=empty_x, y_test=splits.y_test[:0])
            self._data = Data(
                task=splits.task,
                x_train=splits.x_train,
                y_train=splits.y_train,
                x_val=splits.x_val,
                y_val=splits.y_val,
                feature_names=list(splits.feature_names),
                class_labels=list(splits.class_labels),
                normalization=splits.normalization,
            )
        return self._data

    @property
    def normalization(self) -> Normalization:
        """The training split's standardization (``load_data``'s rows are already standardized with it)."""
        return self.load_data().normalization

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This process's share of the training rows for ``epoch``, shuffled by (dataset.seed, epoch) as the
        built-in trainer does; the shares of all processes cover the split (padded to equal length)."""
        data = self.load_data()
        sampler: DistributedSampler[Any] = DistributedSampler(
            TensorDataset(torch.zeros(len(data.x_train))),
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=True,
            seed=self.config.dataset.seed,
        )
        sampler.set_epoch(epoch)
        return torch.tensor(list(iter(sampler)), dtype=torch.long)

    def evaluate(self, module: nn.Module, split: str = "val") -> dict[str, float]:
        """Loss plus accuracy (classification) or RMSE in target units and R² (regression) on ``train`` or ``val``,
        with the loss the built-in trainer uses (cross-entropy / MSE on the standardized target)."""
        if split not in ("train", "val"):
            raise ValueError(f"split: 'train' or 'val', got {split!r} (the test rows are the validator's)")
        data = self.load_data()
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        net = module.module if isinstance(module, DistributedDataParallel) else module
        return evaluate(
            _Outputs(net), torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device), data.task,
            data.normalization.target_std,
        )  # fmt: skip

    # --- progress --------------------------------------------------------------------------------

    def report_epoch(
        self,
        epoch: int,
        train_loss: Number,
        val_loss: Number,
        *,
        train_accuracy: Number | None = None,
        val_accuracy: Number | None = None,
        val_rmse: Number | None = None,
        val_r2: Number | None = None,
        lr: Number | None = None,
        grad_norm: Number | None = None,
        samples: int | None = None,
        total_epochs: int | None = None,
    ) -> None:
        """One finished epoch (1-based): the log line, a ``metrics.jsonl`` line and ``status.progress``, as the
        built-in trainer reports them. Rank 0 reports; other ranks return. The gate's convergence check reads the
        losses (``train_loss``: the epoch's mean training loss; ``val_loss``: the validation loss), and ``lr``
        when given. ``samples``: rows trained on in the epoch by all processes (default: the training split)."""
        if total_epochs is not None:
            self._total_epochs = total_epochs
        now = time.perf_counter()
        seconds, self._clock = now - self._clock, now
        self._last_epoch = epoch
        if not self.is_main:
            return
        if not self._reported:
            # A resumed (or restarted) run logs its epochs again from here: drop the lines a killed run left after.
            truncate_metrics(self.run_dir / "metrics.jsonl", epoch - 1)
            self._reported = True
        rows = samples if samples is not None else len(self.load_data().x_train)
        metrics = EpochMetrics(
            epoch=epoch,
            total_epochs=max(self._total_epochs, epoch),
            loss=float(train_loss),
            val_loss=float(val_loss),
            learning_rate=float(lr) if lr is not None else 0.0,
            grad_norm=float(grad_norm) if grad_norm is not None else 0.0,
            samples_per_second=rows / max(seconds, 1e-9),
            accuracy=None if train_accuracy is None else float(train_accuracy),
            val_accuracy=None if val_accuracy is None else float(val_accuracy),
            val_rmse=None if val_rmse is None else float(val_rmse),
            val_r2=None if val_r2 is None else float(val_r2),
            seconds=seconds,
        )
        if float(val_loss) < self._best_loss:
            self._best_loss, self._best = float(val_loss), metrics.status_json()
        self._report(self._progress("Running", metrics))

    def _progress(self, phase: str, metrics: EpochMetrics | None, message: str = "") -> Progress:
        return Progress(
            phase, self._last_epoch, max(self._total_epochs, self._last_epoch), metrics, self._best, self._latest,
            False, message,
        )  # fmt: skip

    def _report(self, progress: Progress) -> None:
        if self.is_main and self.sink is not None:
            self.sink.report(progress)

    # --- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, epoch: int, state: dict[str, Any]) -> Path | None:
        """Atomically write ``state`` (tensors, numbers, strings, lists, dicts: e.g. the model's and the
        optimizer's state_dict) as the checkpoint of a finished ``epoch``; rank 0 writes, the others return None.
        Unwrap DDP first (``model.module.state_dict()``) so the checkpoint loads into a bare network too."""
        if not self.is_main:
            return None
        sdk_state = {"bestLoss": self._best_loss, "best": self._best, "totalEpochs": self._total_epochs}
        path = save_checkpoint(self.checkpoint_dir, epoch, {"user": state, "sdk": json.dumps(sdk_state)})
        self._latest = self._checkpoint_ref(epoch, path)
        return path

    def load_checkpoint(self) -> Checkpoint | None:
        """The latest complete checkpoint, the same on every rank (rank 0 picks it), loaded onto this process's
        device; None on a fresh start. Call it on every rank, before the first epoch."""
        found = None
        if self.is_main:
            latest = load_latest_checkpoint(self.checkpoint_dir)
            found = str(latest[0]) if latest else None
        path = broadcast_from_main(self.dist, found)
        if path is None:
            return None
        raw: dict[str, Any] = torch.load(path, map_location=self.device, weights_only=True)
        sdk_state = json.loads(raw.get("sdk", "{}"))
        self._best_loss = float(sdk_state.get("bestLoss", math.inf))
        self._best = dict(sdk_state.get("best", {}))
        self._total_epochs = int(sdk_state.get("totalEpochs", self._total_epochs))
        epoch = int(raw["epoch"])
        self._last_epoch = epoch
        self._resumed_from = path
        self._latest = self._checkpoint_ref(epoch, path)
        log.info("%s/%s: resuming from %s (epoch %d)", self.config.namespace, self.config.name, path, epoch)
        return Checkpoint(epoch, dict(raw.get("user", {})), path)

    def _checkpoint_ref(self, epoch: int, path: str | Path) -> CheckpointRef:
        try:
            relative = str(Path(path).relative_to(self.config.artifact_root))
        except ValueError:
            relative = str(path)
        return CheckpointRef(epoch, relative)

    # --- the model -------------------------------------------------------------------------------

    def export(self, module: nn.Module, example_rows: Any = None, *, stopped_early: bool = False) -> Path | None:
        """Rank 0: write the final model as the contract says; other ranks return None.

        ``module`` (DDP-wrapped or not) takes STANDARDIZED rows, as ``load_data`` gives them, and returns logits
        ``[N, classes]`` or a value ``[N]``/``[N, 1]`` on the standardized target. It is wrapped in a graph that
        standardizes raw rows first (and, for regression, returns the target's units), scripted with
        torch.jit.script (torch.jit.trace on ``example_rows`` when scripting fails) and checked against the eager
        module on one row and on the batch. ``example_rows``: raw feature rows (float32 ``[N, F]``); default: the
        first validation rows, un-standardized. ``stopped_early``: your loop ended on early stopping (the gate
        then takes the run as converged when the loss had improved enough)."""
        if not self.is_main:
            return None
        data = self.load_data()
        splits = self._splits
        assert splits is not None
        net = module.module if isinstance(module, DistributedDataParallel) else module
        try:
            net = copy.deepcopy(net)
        except Exception:  # a module that cannot be copied is exported in place
            log.info("the module cannot be deep-copied; exporting it in place")
        net = net.to("cpu").eval()
        prep = Preprocessing.of(data.normalization, data.task)
        wrapped = RawInputModel(_Outputs(net), prep).eval()
        example = self._example(example_rows, prep, data)
        with torch.no_grad():
            out = wrapped(example)
        want = (len(example), data.num_outputs)
        if tuple(out.shape) != want:
            raise ValueError(
                f"export: the module returned shape {tuple(out.shape)} for {len(example)} rows, the contract needs "
                f"{want}: " + ("one logit per class" if data.task == "classification" else "one value per row")
            )
        scripted = to_torchscript(wrapped, example)
        out_dir = self.run_dir / "model"
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / ".model.pt.tmp"
        scripted.save(str(tmp))
        atomic_write_bytes(out_dir / "model.pt", tmp.read_bytes())
        tmp.unlink(missing_ok=True)
        model_config = {
            "model": self.config.model.to_dict(),
            "format": MODEL_FORMAT,
            "rawInput": True,
            "numFeatures": data.num_features,
            "numOutputs": data.num_outputs,
            "task": data.task,
            "classLabels": data.class_labels,
            "featureNames": data.feature_names,
            "inputSchema": splits.input_schema(),
        }
        summary = {
            "epochsRun": self._last_epoch,
            "stoppedEarly": stopped_early,
            "best": self._best,
            "worldSize": self.world_size,
            "backend": self.dist.backend or "none",
            "resumedFrom": self._resumed_from,
            "datasetFingerprint": splits.fingerprint,
            "datasetSha256": splits.source_sha256,  # as train.py's summary
            "trainer": "custom",
            "plannedEpochs": self._total_epochs,
            "configuredEpochs": self.config.training.epochs,
        }
        atomic_write_bytes(out_dir / "model_config.json", json.dumps(model_config, indent=2).encode())
        atomic_write_bytes(out_dir / "normalization.json", json.dumps(data.normalization.to_dict()).encode())
        atomic_write_bytes(self.run_dir / "training_summary.json", json.dumps(summary, indent=2).encode())
        log.info("%s/%s: model written to %s", self.config.namespace, self.config.name, out_dir)
        self._report(self._progress("Trained", None, "training finished"))
        return out_dir / "model.pt"

    def _example(self, rows: Any, prep: Preprocessing, data: Data) -> torch.Tensor:
        if rows is None:
            source = data.x_val if len(data.x_val) else data.x_train
            return torch.from_numpy(prep.raw_rows(source[:EXAMPLE_ROWS]))
        example = torch.as_tensor(np.asarray(rows, dtype=np.float32))
        if example.dim() != 2 or example.shape[1] != data.num_features or len(example) < 2:
            raise ValueError(
                f"export: example_rows must be raw feature rows [N >= 2, {data.num_features}], "
                f"got shape {tuple(example.shape)}"
            )
        return example

    # --- the end ---------------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> None:
        """Record a failure: the pod's termination message (the TrainingJob's status shows it) and a Failed report."""
        write_termination_message(failure_summary(exc))
        self._report(Progress("Failed", self._last_epoch, self._total_epochs, message=f"{type(exc).__name__}: {exc}"))

    def close(self, finished: bool = True) -> None:
        """Leave the process group (after a finished run, all ranks together)."""
        if not self._finished:
            self._finished = True
            shutdown(self.dist, finished=finished)

    def __enter__(self) -> Context:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            self.fail(exc)
        self.close(finished=exc is None)


def init(config: str | Path | None = None) -> Context:
    """Read the job config (``config`` or ``$FLOWNEXUS_CONFIG``), set up logging, join torchrun's process group
    (gloo on CPU, nccl on GPU, or ``distributed.backend``) and return this process's :class:`Context`."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )
    try:
        cfg = load_config(config)
    except Exception as exc:
        write_termination_message(failure_summary(exc))
        raise
    dist = init_distributed(cfg.backend)
    sink = default_sinks(cfg.namespace, cfg.name, cfg.run_dir / "metrics.jsonl") if dist.is_main else None
    return Context(cfg, dist, sink)
