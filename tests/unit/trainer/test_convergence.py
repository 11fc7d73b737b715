"""Convergence means the model learned and its validation loss stopped improving, whatever the LR schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from flownexus_trainer.config import JobConfig
from flownexus_trainer.distributed import DistContext
from flownexus_trainer.progress import Progress
from flownexus_trainer.thresholds import assess_convergence
from flownexus_trainer.train import Trainer, lr_factor

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


def history(val: list[float], train: list[float] | None = None) -> list[dict[str, float]]:
    train = train if train is not None else val
    return [{"epoch": i + 1, "loss": t, "valLoss": v} for i, (t, v) in enumerate(zip(train, val, strict=True))]


FLAT_AFTER_LEARNING = [2.3, 0.8, 0.4, 0.3, 0.25, 0.24, 0.24, 0.239, 0.239, 0.239, 0.239, 0.239]
STUCK_AT_CHANCE = [2.302, 2.300, 2.299, 2.298, 2.2975, 2.2972, 2.2971, 2.2970, 2.2970, 2.2970]

CASES: list[tuple[str, list[float], list[float] | None, bool, bool, str]] = [
    # name, val losses, train losses (None: same), stopped early, converged, reason contains
    ("learned then flat", FLAT_AFTER_LEARNING, None, False, True, "levelled off"),
    # A decayed LR makes a stuck run perfectly flat: still not converged, because nothing was learned.
    ("stuck at chance, flat", STUCK_AT_CHANCE, None, False, False, "did not learn"),
    ("stuck at chance, early stop", STUCK_AT_CHANCE, None, True, False, "did not learn"),
    ("still falling", [2.0, 1.5, 1.1, 0.8, 0.6, 0.45, 0.35, 0.27, 0.21, 0.17], None, False, False, "still improving"),
    ("early stopping after learning", [2.0, 1.0, 0.5, 0.6, 0.7], None, True, True, "early stopping"),
    ("overfits after the best: best kept", [2.0, 0.5, 0.3, 0.35, 0.4, 0.5, 0.6], None, False, True, "levelled off"),
    ("never improved", [1.0, 1.1, 1.2], None, True, False, "did not learn"),
    ("NaN", [1.0, float("nan"), 0.5], None, False, False, "NaN"),
    ("one epoch", [1.0], None, False, False, "only 1 epoch"),
    ("too short to see a plateau", [2.0, 0.5, 0.4], None, False, False, "too few"),
    # Learned within epoch 1 (large data): epoch 1's averaged train loss shows it, val alone does not.
    ("learned inside epoch 1", [0.30, 0.29, 0.285, 0.284, 0.284, 0.284], [1.2, 0.3, 0.29, 0.29, 0.29, 0.29], False,
     True, "levelled off"),
    # Near-zero losses: a relative change of a tiny number is no improvement worth waiting for.
    ("near zero", [1.0, 0.01, 0.002, 0.0015, 0.0012, 0.0011, 0.00105], None, False, True, "levelled off"),
]  # fmt: skip


# Measured (bench runs): val loss per epoch of 30-epoch cosine runs, 2 and 20 optimizer steps per epoch.
IRIS_UNDERTRAINED = [
    1.086, 1.0045, 0.9267, 0.8553, 0.7907, 0.7318, 0.6785, 0.6319, 0.5899, 0.5531, 0.5211, 0.4937, 0.4706, 0.451,
    0.4346, 0.4214, 0.4109, 0.4015, 0.3939, 0.3875, 0.3822, 0.3779, 0.3746, 0.372, 0.3703, 0.369, 0.3682, 0.3677,
    0.3675, 0.3675,
]  # fmt: skip
DIGITS_DEFAULT = [
    2.1035, 1.4702, 0.7823, 0.4662, 0.3283, 0.2616, 0.2263, 0.2009, 0.184, 0.1703, 0.1559, 0.1461, 0.1415, 0.1392,
    0.1348, 0.1302, 0.1274, 0.126, 0.1238, 0.122, 0.1209, 0.1203, 0.1202, 0.1199, 0.1191, 0.119, 0.1188, 0.1184,
    0.1184, 0.1184,
]  # fmt: skip


def with_lr(entries: list[dict[str, float]], steps_per_epoch: int, kind: str) -> list[dict[str, float]]:
    """Each epoch's last learning rate, as the trainer records it (peak 1e-3, one warmup epoch)."""
    total = len(entries) * steps_per_epoch
    for i, entry in enumerate(entries):
        step = (i + 1) * steps_per_epoch - 1
        entry["learningRate"] = 1e-3 * lr_factor(step, steps_per_epoch, total, kind)
    return entries


def test_a_run_the_cosine_schedule_flattened_before_it_converged_is_still_improving() -> None:
    # Iris at 60 optimizer steps: flat at the end only because the learning rate decayed to zero.
    converged, why = assess_convergence(with_lr(history(IRIS_UNDERTRAINED), 2, "cosine"), stopped_early=False)
    assert not converged and "still improving" in why and "schedule ended the run" in why, why
    # Without learning rates in the history the losses alone cannot tell: levelled off.
    assert assess_convergence(history(IRIS_UNDERTRAINED), stopped_early=False)[0]


@pytest.mark.parametrize("kind", ["cosine", "constant"])
def test_a_run_that_levelled_off_converged_whatever_the_schedule(kind: str) -> None:
    converged, why = assess_convergence(with_lr(history(DIGITS_DEFAULT), 20, kind), stopped_early=False)
    assert converged and "levelled off" in why, why


@pytest.mark.parametrize(("name", "val", "train", "stopped", "expected", "reason"), CASES, ids=[c[0] for c in CASES])
def test_convergence_verdict_on_synthetic_histories(
    name: str, val: list[float], train: list[float] | None, stopped: bool, expected: bool, reason: str
) -> None:
    converged, why = assess_convergence(history(val, train), stopped_early=stopped)
    assert converged is expected, why
    assert reason in why


class History:
    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []

    def report(self, progress: Progress) -> None:
        if progress.phase == "Running" and progress.metrics is not None:
            self.epochs.append(progress.metrics.status_json())


def train_digits(tmp_path: Path, **training: Any) -> tuple[bool, str, float]:
    cfg = JobConfig.from_dict(
        {
            "name": "digits",
            "namespace": "test",
            "model": {"architecture": "mlp"},
            "dataset": {"source": "builtin", "name": "digits"},
            "training": training,
            "paths": {"artifactRoot": str(tmp_path), "runDir": str(tmp_path / "run")},
        }
    )
    sink = History()
    state = Trainer(cfg, SINGLE, sink).run()
    converged, reason = assess_convergence(sink.epochs, state.stopped_early)
    return converged, reason, float(state.best_metrics["valAccuracy"])


def test_a_real_run_stuck_at_chance_did_not_converge(tmp_path: Path) -> None:
    converged, reason, accuracy = train_digits(tmp_path, learningRate=1e-5, epochs=5, minSteps=0)
    assert accuracy < 0.4
    assert not converged and "did not learn" in reason


def test_a_real_default_run_converged(tmp_path: Path) -> None:
    converged, reason, accuracy = train_digits(tmp_path)
    assert accuracy > 0.95
    assert converged, reason
