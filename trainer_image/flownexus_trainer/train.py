"""The training loop every worker process runs (``torchrun ... -m flownexus_trainer.train``).

DDP over a DistributedSampler; AdamW or SGD with a warmup + cosine schedule stepped per batch;
gradient clipping; early stopping on validation loss; checkpoints every N epochs that a restarted
gang resumes from. Seeds are fixed and per-rank RNG states are checkpointed, so a resumed run
follows the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset
from torch.utils.data.distributed import DistributedSampler

from .checkpoint import atomic_write_bytes, load_latest_checkpoint, save_checkpoint
from .config import JobConfig, TrainingConfig, load_config
from .data import Splits, load_splits
from .distributed import DistContext, all_reduce_sum, broadcast_from_main, gather_to_all, init_distributed, shutdown
from .errors import failure_summary, write_termination_message
from .models import build_model
from .progress import CheckpointRef, EpochMetrics, Progress, ProgressSink, default_sinks

log = logging.getLogger(__name__)

EVAL_CHUNK = 2048


@dataclass
class EarlyStopping:
    """Stops after ``patience`` epochs without a validation-loss improvement larger than ``min_delta``."""

    patience: int
    min_delta: float = 0.0
    enabled: bool = True
    best: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, epoch: int, val_loss: float) -> bool:
        """Record one epoch; True when it is the new best."""
        if val_loss < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.enabled and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


@dataclass
class RunState:
    """What survives a restart besides model/optimizer/scheduler: progress and the best weights."""

    epoch: int = 0
    stopped_early: bool = False
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    best_metrics: dict[str, Any] = field(default_factory=dict)
    resumed_from: str | None = None
    latest_checkpoint: CheckpointRef | None = None


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Linear warmup to the base rate, then cosine decay to zero (or constant)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(params: Any, cfg: TrainingConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


@dataclass(frozen=True)
class Plan:
    """How many samples each process steps with and for how long, from the config and the data size."""

    per_process_batch: int
    steps_per_epoch: int
    epochs: int
    warmup_steps: int
    total_steps: int
    patience: int
    extended_from: int | None  # the configured epochs when minSteps extended the run


def per_process_batch(batch_size: int, world_size: int) -> int:
    """``training.batchSize`` is the global batch: each of ``world_size`` processes takes its share.

    Rounded up when it does not divide, so the effective global batch is at most world_size - 1
    larger than asked; fewer samples than processes cannot be shared and is an error.
    """
    if batch_size < world_size:
        raise ValueError(
            f"training.batchSize: {batch_size} is the global batch and must be at least the number of "
            f"training processes ({world_size})"
        )
    return math.ceil(batch_size / world_size)


def plan_run(cfg: TrainingConfig, samples_per_process: int, world_size: int) -> Plan:
    """Batch per process, steps per epoch, epochs and the LR schedule's length.

    When ``epochs`` x steps per epoch is below ``minSteps`` (small datasets), the run gets as many
    more epochs as reach ``minSteps`` steps, and the schedule (warmup and cosine) stretches with it,
    keeping warmup's share of the run; early stopping's patience stretches by the same factor, so it
    still waits the same share of the run (and the same number of optimizer steps).
    """
    batch = per_process_batch(cfg.batch_size, world_size)
    steps_per_epoch = max(1, math.ceil(samples_per_process / batch))
    epochs, extended_from = cfg.epochs, None
    if cfg.min_steps and cfg.epochs * steps_per_epoch < cfg.min_steps:
        epochs, extended_from = math.ceil(cfg.min_steps / steps_per_epoch), cfg.epochs
    total = epochs * steps_per_epoch
    warmup = round(total * cfg.warmup_epochs / cfg.epochs)
    patience = math.ceil(cfg.patience * epochs / cfg.epochs)
    return Plan(batch, steps_per_epoch, epochs, warmup, total, patience, extended_from)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainingConfig, plan: Plan
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, total = plan.warmup_steps, plan.total_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, cfg.scheduler))


def loss_fn(task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(output, target)
    return F.mse_loss(output.squeeze(-1), target)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, target_std: float = 1.0
) -> dict[str, float]:
    """Loss plus accuracy (classification) or RMSE in target units and R² (regression) over a whole split."""
    was_training = model.training
    model.eval()
    outputs = torch.cat([model(chunk) for chunk in torch.split(x, EVAL_CHUNK)])
    model.train(was_training)
    loss = float(loss_fn(task, outputs, y))
    if task == "classification":
        return {"loss": loss, "accuracy": float((outputs.argmax(-1) == y).float().mean())}
    mse = float(F.mse_loss(outputs.squeeze(-1), y))
    sst = float(((y - y.mean()) ** 2).mean()) or 1.0
    return {"loss": loss, "rmse": math.sqrt(mse) * target_std, "r2": 1.0 - mse / sst}


class Trainer:
    """One training run on one rank; rank 0 also reports, checkpoints and writes the model."""

    def __init__(
        self, cfg: JobConfig, ctx: DistContext, sink: ProgressSink | None = None, splits: Splits | None = None
    ) -> None:
        self.cfg, self.ctx, self.tcfg = cfg, ctx, cfg.training
        self.sink = sink
        self.ckpt_dir = cfg.run_dir / "checkpoints"
        # ``splits``: train on these arrays instead of loading the dataset (crossval.py's folds).
        self.splits: Splits = load_splits(cfg.dataset, cfg.artifact_root) if splits is None else splits
        self.task = self.splits.task
        self.amp = self.tcfg.mixed_precision and ctx.device.type == "cuda"
        if self.tcfg.mixed_precision and not self.amp:
            log.info("%s/%s: mixedPrecision is ignored on CPU", cfg.namespace, cfg.name)
        self._tensors()
        torch.manual_seed(cfg.dataset.seed)
        self.model = build_model(cfg.model.to_dict(), self.splits.num_features, self.splits.num_outputs).to(ctx.device)
        self.sampler: DistributedSampler[Any] = DistributedSampler(
            TensorDataset(self.x_train), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.dataset.seed
        )
        self.plan = plan_run(self.tcfg, len(self.sampler), ctx.world_size)
        self.steps_per_epoch, self.epochs = self.plan.steps_per_epoch, self.plan.epochs
        if self.plan.extended_from is not None:
            log.info(
                "%s/%s: %d epochs x %d steps is below training.minSteps (%d): training up to %d epochs "
                "(early-stopping patience %d epochs)",
                cfg.namespace,
                cfg.name,
                self.plan.extended_from,
                self.steps_per_epoch,
                self.tcfg.min_steps,
                self.epochs,
                self.plan.patience,
            )
        self.state = RunState()
        self.early = EarlyStopping(self.plan.patience, self.tcfg.min_delta, self.tcfg.early_stopping)
        resume = self._find_resume()
        if resume is not None:
            self.model.load_state_dict(resume["model"])
        # DDP broadcasts rank 0's weights at construction, so restored weights must be in place first.
        self.net: nn.Module = (
            DistributedDataParallel(self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
            if ctx.distributed
            else self.model
        )
        self.params = list(self.net.parameters())
        self.optimizer = make_optimizer(self.params, self.tcfg)
        self.scheduler = make_scheduler(self.optimizer, self.tcfg, self.plan)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        if resume is not None:
            self._restore(resume)

    def _tensors(self) -> None:
        s, dev = self.splits, self.ctx.device
        self.x_train, self.x_val = torch.from_numpy(s.x_train).to(dev), torch.from_numpy(s.x_val).to(dev)
        self.y_train, self.y_val = torch.from_numpy(s.y_train).to(dev), torch.from_numpy(s.y_val).to(dev)

    # --- checkpoints -------------------------------------------------------------------------

    def _find_resume(self) -> dict[str, Any] | None:
        found = None
        if self.ctx.is_main:
            latest = load_latest_checkpoint(self.ckpt_dir)
            found = str(latest[0]) if latest else None
        # Every rank must resume from the same file, so rank 0 picks and the others follow.
        path = broadcast_from_main(self.ctx, found)
        if path is None:
            return None
        state: dict[str, Any] = torch.load(path, map_location=self.ctx.device, weights_only=True)
        self.state.resumed_from = path
        self.state.latest_checkpoint = self._checkpoint_ref(int(state["epoch"]), path)
        log.info("%s/%s: resuming from %s (epoch %d)", self.cfg.namespace, self.cfg.name, path, state["epoch"])
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.early.load_state_dict(state["early_stopping"])
        self.state.epoch = int(state["epoch"])
        self.state.stopped_early = bool(state["stopped_early"])
        self.state.best_state = state["best_model"]
        self.state.best_metrics = json.loads(state["best_metrics"])
        rng = state["rng"]
        if len(rng) == self.ctx.world_size:
            self._set_rng(rng[self.ctx.rank])
        else:
            # A gang of another size cannot replay the same dropout masks; reseed deterministically.
            log.warning("world size changed (%d -> %d): RNG reseeded", len(rng), self.ctx.world_size)
            torch.manual_seed(self.cfg.dataset.seed + self.state.epoch * 1000 + self.ctx.rank)

    def _rng_state(self) -> dict[str, torch.Tensor]:
        # Training draws randomness only from torch (dropout); shuffling is seeded by (seed, epoch).
        rng = {"cpu": torch.get_rng_state()}
        if self.ctx.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.ctx.device).cpu()
        return rng

    def _set_rng(self, rng: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(rng["cpu"].cpu())
        if "cuda" in rng and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.ctx.device)

    def _checkpoint_ref(self, epoch: int, path: str | Path) -> CheckpointRef:
        try:
            relative = str(Path(path).relative_to(self.cfg.artifact_root))
        except ValueError:
            relative = str(path)
        return CheckpointRef(epoch, relative)

    def _checkpoint(self, epoch: int) -> None:
        rng = gather_to_all(self.ctx, self._rng_state())  # collective: every rank calls it
        if not self.ctx.is_main:
            return
        path = save_checkpoint(
            self.ckpt_dir,
            epoch,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "early_stopping": self.early.state_dict(),
                "stopped_early": self.state.stopped_early,
                "best_model": self.state.best_state,
                "best_metrics": json.dumps(self.state.best_metrics),
                "rng": rng,
                "world_size": self.ctx.world_size,
            },
        )
        self.state.latest_checkpoint = self._checkpoint_ref(epoch, path)

    # --- the loop ----------------------------------------------------------------------------

    def _step(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step; returns the loss, the outputs and the gradient norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        # Clipping to +inf measures the norm without changing the gradients.
        clip = self.tcfg.gradient_clip_norm or math.inf
        if self.amp:
            with torch.autocast(device_type=self.ctx.device.type):
                out = self.net(xb)
                loss = loss_fn(self.task, out, yb)
            self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            self.scaler.unscale_(self.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(self.params, clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            # The scaler's bookkeeping costs per step; on CPU (no AMP) skip it entirely.
            out = self.net(xb)
            loss = loss_fn(self.task, out, yb)
            loss.backward()  # type: ignore[no-untyped-call]
            grad_norm = nn.utils.clip_grad_norm_(self.params, clip)
            self.optimizer.step()
        self.scheduler.step()
        return loss.detach(), out.detach(), grad_norm.detach()

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self.net.train()
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(self.sampler)), device=self.ctx.device)
        # Keep per-step values on the device and reduce once per epoch: no host sync inside the loop.
        losses, grad_norms, corrects, sizes = [], [], [], []
        for batch in torch.split(order, self.plan.per_process_batch):
            yb = self.y_train[batch]
            loss, out, grad_norm = self._step(self.x_train[batch], yb)
            losses.append(loss)
            grad_norms.append(grad_norm)
            sizes.append(len(batch))
            if self.task == "classification":
                corrects.append((out.argmax(-1) == yb).sum())
        dev = self.ctx.device
        weights = torch.tensor(sizes, dtype=torch.float64, device=dev)
        totals = torch.stack(
            [
                (torch.stack(losses).double() * weights).sum(),
                torch.stack(corrects).double().sum() if corrects else torch.zeros((), dtype=torch.float64, device=dev),
                torch.stack(grad_norms).double().sum(),
                weights.sum(),
                torch.tensor(float(len(sizes)), dtype=torch.float64, device=dev),
            ]
        )
        loss_total, correct_total, grad_total, n, steps = all_reduce_sum(self.ctx, totals).tolist()
        out_metrics = {"loss": loss_total / n, "grad_norm": grad_total / steps, "samples": n}
        if self.task == "classification":
            out_metrics["accuracy"] = correct_total / n
        else:
            mse = loss_total / n  # targets are standardized on train: variance 1
            out_metrics["rmse"] = math.sqrt(mse) * self.splits.normalization.target_std
            out_metrics["r2"] = 1.0 - mse
        return out_metrics

    def _epoch_metrics(
        self, epoch: int, train: dict[str, float], val: dict[str, float], seconds: float
    ) -> EpochMetrics:
        return EpochMetrics(
            epoch=epoch,
            total_epochs=self.epochs,
            loss=train["loss"],
            val_loss=val["loss"],
            learning_rate=float(self.scheduler.get_last_lr()[0]),
            grad_norm=train["grad_norm"],
            samples_per_second=train["samples"] / max(seconds, 1e-9),
            accuracy=train.get("accuracy"),
            val_accuracy=val.get("accuracy"),
            rmse=train.get("rmse"),
            val_rmse=val.get("rmse"),
            r2=train.get("r2"),
            val_r2=val.get("r2"),
            seconds=seconds,
        )

    def _report(self, progress: Progress) -> None:
        if self.ctx.is_main and self.sink is not None:
            self.sink.report(progress)

    def run(self) -> RunState:
        """Train from the resumed epoch to the end (or early stop); rank 0 writes the final model."""
        metrics: EpochMetrics | None = None
        if self.ctx.is_main:
            truncate_metrics(self.cfg.run_dir / "metrics.jsonl", self.state.epoch)
        epoch = self.state.epoch
        while epoch < self.epochs and not self.state.stopped_early:
            epoch += 1
            started = time.perf_counter()
            train = self._train_epoch(epoch)
            seconds = time.perf_counter() - started
            val = evaluate(self.model, self.x_val, self.y_val, self.task, self.splits.normalization.target_std)
            metrics = self._epoch_metrics(epoch, train, val, seconds)
            if self.early.update(epoch, val["loss"]):
                self.state.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                self.state.best_metrics = metrics.status_json()
            self.state.stopped_early = self.early.should_stop
            self.state.epoch = epoch
            last = epoch == self.epochs or self.state.stopped_early
            if epoch % self.tcfg.checkpoint_every == 0 or last:
                self._checkpoint(epoch)
            self._report(self._progress("Running", metrics))
        if self.state.stopped_early:
            log.info(
                "%s/%s: early stop at epoch %d (best %d)",
                self.cfg.namespace,
                self.cfg.name,
                epoch,
                self.early.best_epoch,
            )
        if self.ctx.is_main:
            self._write_model()
        # Carries the last epoch again: a paced-out Running report must not be its final word.
        self._report(self._progress("Trained", metrics, "training finished"))
        return self.state

    def _progress(self, phase: str, metrics: EpochMetrics | None, message: str = "") -> Progress:
        s = self.state
        return Progress(
            phase, s.epoch, self.epochs, metrics, s.best_metrics, s.latest_checkpoint, s.stopped_early, message
        )

    # --- outputs -----------------------------------------------------------------------------

    def _write_model(self) -> None:
        """The best weights plus everything serving and the validator need to use them."""
        out = self.cfg.run_dir / "model"
        weights = self.state.best_state or self.model.state_dict()
        buffer = _serialize(weights)
        atomic_write_bytes(out / "model.pt", buffer)
        s = self.splits
        model_config = {
            "model": self.cfg.model.to_dict(),
            "numFeatures": s.num_features,
            "numOutputs": s.num_outputs,
            "task": s.task,
            "classLabels": s.class_labels,
            "featureNames": s.feature_names,
            "inputSchema": s.input_schema(),  # data.py: columns and one-hot categories, for object rows in serving
        }
        summary = {
            "epochsRun": self.state.epoch,
            "stoppedEarly": self.state.stopped_early,
            "best": self.state.best_metrics,
            "worldSize": self.ctx.world_size,
            "backend": self.ctx.backend or "none",
            "resumedFrom": self.state.resumed_from,
            "datasetFingerprint": s.fingerprint,
            "datasetSha256": s.source_sha256,
            "globalBatchSize": self.plan.per_process_batch * self.ctx.world_size,
            "perProcessBatchSize": self.plan.per_process_batch,
            "stepsPerEpoch": self.steps_per_epoch,
            "plannedEpochs": self.epochs,
            "configuredEpochs": self.tcfg.epochs,
            "minSteps": self.tcfg.min_steps,
            "patienceEpochs": self.plan.patience,
            "extendedByMinSteps": self.plan.extended_from is not None,
        }
        atomic_write_bytes(out / "model_config.json", json.dumps(model_config, indent=2).encode())
        atomic_write_bytes(out / "normalization.json", json.dumps(s.normalization.to_dict()).encode())
        atomic_write_bytes(self.cfg.run_dir / "training_summary.json", json.dumps(summary, indent=2).encode())
        log.info("%s/%s: model written to %s", self.cfg.namespace, self.cfg.name, out)


def _serialize(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop metric lines after the resumed epoch: the restarted run will log them again."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line and json.loads(line)["epoch"] <= last_epoch
    ]
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="config JSON (default: $FLOWNEXUS_CONFIG)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = load_config(args.config)
    except Exception as exc:
        write_termination_message(failure_summary(exc))
        raise
    ctx = init_distributed(cfg.backend)
    finished = False
    try:
        sink = default_sinks(cfg.namespace, cfg.name, cfg.run_dir / "metrics.jsonl") if ctx.is_main else None
        try:
            Trainer(cfg, ctx, sink).run()
        except Exception as exc:
            # The pod's own error reaches the TrainingJob's status through the termination message.
            write_termination_message(failure_summary(exc))
            if sink is not None:
                sink.report(Progress("Failed", 0, cfg.training.epochs, message=f"{type(exc).__name__}: {exc}"))
            raise
        finished = True
    finally:
        shutdown(ctx, finished=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
