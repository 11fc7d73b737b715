"""The trainer's per-epoch overhead against a minimal hand-written PyTorch loop (aim: within 10 %).

Same model, data, batch size, optimizer and seed. The trainer adds what production needs
(DistributedSampler order, gradient-norm measurement and clipping, per-step LR schedule, metric
accumulation); the minimal loop does only forward, backward and step. Runs are interleaved and the
median epoch time is compared, because the machine may be busy. Usage: ``python bench/trainer_overhead.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer_image"))

from flownexus_trainer.config import JobConfig
from flownexus_trainer.distributed import DistContext
from flownexus_trainer.models import build_model
from flownexus_trainer.train import Trainer

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)

CASES: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {
    # name: (model spec, dataset spec, batch size)
    "digits mlp 64-128-64-10": (
        {"architecture": "mlp", "hiddenSizes": [128, 64], "dropout": 0.1},
        {"source": "builtin", "name": "digits"},
        64,
    ),
    "compute-bound mlp 256-1024-1024-10": (
        {"architecture": "mlp", "hiddenSizes": [1024, 1024], "dropout": 0.0},
        {"source": "synthetic", "synthetic": {"samples": 8000, "features": 256, "classes": 10}},
        256,
    ),
}


def minimal_epoch(
    model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, batch: int, epoch: int
) -> None:
    generator = torch.Generator().manual_seed(epoch)
    for idx in torch.split(torch.randperm(len(x), generator=generator), batch):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
        opt.step()


def featured_epoch(
    model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, batch: int, epoch: int
) -> None:
    """Hand-written, but with the trainer's features: clipping, per-step LR, loss/accuracy sums."""
    generator = torch.Generator().manual_seed(epoch)
    loss_sum, correct = torch.zeros(()), torch.zeros(())
    for idx in torch.split(torch.randperm(len(x), generator=generator), batch):
        opt.zero_grad(set_to_none=True)
        out = model(x[idx])
        loss = F.cross_entropy(out, y[idx])
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for group in opt.param_groups:
            group["lr"] = group["lr"] * 0.9999
        loss_sum += loss.detach() * len(idx)
        correct += (out.argmax(-1) == y[idx]).sum()


Timing = tuple[float, float]  # (min, median) seconds per epoch


def bench_case(
    root: Path, model_spec: dict[str, Any], data_spec: dict[str, Any], batch: int, epochs: int
) -> tuple[Timing, Timing, Timing]:
    cfg = JobConfig.from_dict({
        "name": "overhead", "model": model_spec, "dataset": data_spec,
        "training": {
            "epochs": 10_000, "batchSize": batch, "checkpointEvery": 10_000, "earlyStopping": {"enabled": False},
        },
        "paths": {"artifactRoot": str(root), "runDir": str(root / "overhead")},
    })  # fmt: skip
    trainer = Trainer(cfg, SINGLE, sink=None)
    torch.manual_seed(0)
    model = build_model(cfg.model.to_dict(), trainer.splits.num_features, trainer.splits.num_outputs)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.training.learning_rate, weight_decay=cfg.training.weight_decay)
    x, y = trainer.x_train, trainer.y_train
    loops: list[Callable[[int], object]] = [
        trainer._train_epoch,
        lambda e: minimal_epoch(model, opt, x, y, batch, e),
        lambda e: featured_epoch(model, opt, x, y, batch, e),
    ]
    times: list[list[float]] = [[], [], []]
    for epoch in range(1, epochs + 1):
        # Rotate which loop goes first so that none always runs on a warmer cache.
        for which in [(epoch + k) % 3 for k in range(3)]:
            started = time.perf_counter()
            loops[which](epoch)
            times[which].append(time.perf_counter() - started)
    # The first epoch pays one-off allocation costs; the minimum is the least disturbed by other work
    # on a shared machine, the median shows what a typical epoch costs.
    ours, minimal, featured = ((min(t[1:]), statistics.median(t[1:])) for t in times)
    return ours, minimal, featured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# trainer overhead, 1 process x {args.threads} thread(s), {args.epochs - 1} interleaved epochs each")
    print("| case | trainer ms/epoch (min / median) | minimal loop | hand-written with clip+schedule+metrics "
          "| trainer vs minimal (min / median) | trainer vs same-features loop (min / median) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model_spec, data_spec, batch) in CASES.items():
            ours, minimal, featured = bench_case(Path(tmp), model_spec, data_spec, batch, args.epochs)
            cells = [f"{t[0] * 1e3:.1f} / {t[1] * 1e3:.1f}" for t in (ours, minimal, featured)]
            cells += [f"{ours[0] / ref[0] - 1:+.1%} / {ours[1] / ref[1] - 1:+.1%}" for ref in (minimal, featured)]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
