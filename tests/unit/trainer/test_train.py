"""The training loop on tiny data: learning happens, resume replays exactly, early stopping stops."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from flownexus_trainer.config import TrainingConfig
from flownexus_trainer.distributed import DistContext
from flownexus_trainer.progress import Progress
from flownexus_trainer.train import (
    EarlyStopping,
    Trainer,
    lr_factor,
    per_process_batch,
    plan_run,
    truncate_metrics,
)

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


class Recorder:
    """A ProgressSink that remembers reports and can simulate a crash after a given epoch."""

    def __init__(self, crash_after: int | None = None) -> None:
        self.reports: list[Progress] = []
        self.crash_after = crash_after

    def report(self, progress: Progress) -> None:
        self.reports.append(progress)
        if self.crash_after is not None and progress.epoch == self.crash_after and progress.phase == "Running":
            raise SystemExit("simulated SIGKILL")

    @property
    def epochs(self) -> list[int]:
        return [p.epoch for p in self.reports if p.phase == "Running"]


def test_training_learns_and_writes_the_model(make_config: Any) -> None:
    cfg = make_config(training={"epochs": 6})
    sink = Recorder()
    Trainer(cfg, SINGLE, sink).run()
    metrics = [p.metrics for p in sink.reports if p.metrics]
    assert metrics[-1].loss < metrics[0].loss
    assert metrics[-1].val_accuracy is not None and metrics[-1].val_accuracy > 0.5
    assert all(m.grad_norm > 0 and m.samples_per_second > 0 for m in metrics)
    for name in ("model/model.pt", "model/model_config.json", "model/normalization.json", "training_summary.json"):
        assert (cfg.run_dir / name).exists(), name
    final = sink.reports[-1]
    assert final.phase == "Trained" and final.latest_checkpoint is not None and final.latest_checkpoint.epoch == 6
    assert final.latest_checkpoint.path == "test/tiny/checkpoints/ckpt-epoch-00006.pt"  # relative to the store
    assert final.best["epoch"] >= 1 and "valAccuracy" in final.best


def test_resume_continues_after_the_checkpoint_and_matches_an_uninterrupted_run(
    make_config: Any, tmp_path: Path
) -> None:
    straight = make_config(paths={"runDir": str(tmp_path / "straight")})
    Trainer(straight, SINGLE, Recorder()).run()

    resumed = make_config(paths={"runDir": str(tmp_path / "resumed")})
    with pytest.raises(SystemExit):
        Trainer(resumed, SINGLE, Recorder(crash_after=3)).run()  # checkpoint at 2, dies during 3
    second = Recorder()
    trainer = Trainer(resumed, SINGLE, second)
    assert trainer.state.epoch == 2
    assert trainer.optimizer.state_dict()["state"][0]["step"].item() > 0  # optimizer moments restored
    trainer.run()
    assert second.epochs == [3, 4]  # epochs before the checkpoint are not repeated

    a = torch.load(straight.run_dir / "model/model.pt", weights_only=True)
    b = torch.load(resumed.run_dir / "model/model.pt", weights_only=True)
    assert all(torch.allclose(a[k], b[k]) for k in a)


def test_a_finished_run_restarted_does_not_train_again(make_config: Any) -> None:
    cfg = make_config()
    Trainer(cfg, SINGLE, Recorder()).run()
    again = Recorder()
    Trainer(cfg, SINGLE, again).run()
    assert again.epochs == []


def test_early_stopping_waits_patience_epochs_without_improvement() -> None:
    stop = EarlyStopping(patience=2, min_delta=0.01)
    assert stop.update(1, 1.0) and not stop.should_stop
    assert not stop.update(2, 0.995)  # within min_delta: not an improvement
    assert not stop.should_stop
    stop.update(3, 1.2)
    assert stop.should_stop and stop.best_epoch == 1


def test_early_stopping_ends_a_run_that_cannot_improve(make_config: Any) -> None:
    cfg = make_config(training={"epochs": 30, "learningRate": 0.0, "earlyStopping": {"patience": 2}})
    sink = Recorder()
    Trainer(cfg, SINGLE, sink).run()
    assert len(sink.epochs) == 3 and sink.reports[-1].stopped_early


def test_warmup_then_cosine() -> None:
    assert lr_factor(0, warmup_steps=4, total_steps=20, kind="cosine") == pytest.approx(0.25)
    assert lr_factor(4, 4, 20, "cosine") == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(15, 4, 20, "constant") == 1.0


def test_regression_and_other_architectures_train(make_config: Any) -> None:
    cfg = make_config(
        model={"architecture": "residual_mlp", "hiddenSize": 8, "numBlocks": 1},
        dataset={"task": "regression"},
        training={"epochs": 2, "optimizer": "sgd", "scheduler": {"type": "constant"}},
    )
    sink = Recorder()
    Trainer(cfg, SINGLE, sink).run()
    last = [p.metrics for p in sink.reports if p.metrics][-1]
    assert last.rmse is not None and math.isfinite(last.rmse) and last.accuracy is None


def test_truncate_metrics_drops_epochs_after_the_resume_point(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(1, 6)))
    truncate_metrics(path, 3)
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1, 2, 3]


PLANS = [
    # batchSize, world size, samples per process, epochs, minSteps -> per-process batch, steps/epoch, epochs, patience
    (64, 1, 1257, 30, 500, 64, 20, 30, 5),  # digits: 600 steps already
    (64, 2, 629, 30, 500, 32, 20, 30, 5),  # the same global batch on 2 processes: same steps per epoch
    (64, 3, 419, 30, 500, 22, 20, 30, 5),  # 64 / 3 rounds up to 22
    (64, 1, 106, 30, 500, 64, 2, 250, 42),  # iris: 60 steps extended to 500, patience stretched alike
    (64, 1, 106, 30, 0, 64, 2, 30, 5),  # minSteps 0 turns the extension off
]  # fmt: skip


@pytest.mark.parametrize(("batch", "world", "samples", "epochs", "min_steps", "per", "spe", "planned", "pat"), PLANS)
def test_plan_shares_the_global_batch_and_extends_short_runs_to_min_steps(
    batch: int, world: int, samples: int, epochs: int, min_steps: int, per: int, spe: int, planned: int, pat: int
) -> None:
    cfg = TrainingConfig.from_dict({"batchSize": batch, "epochs": epochs, "minSteps": min_steps})
    plan = plan_run(cfg, samples, world)
    assert (plan.per_process_batch, plan.steps_per_epoch, plan.epochs, plan.patience) == (per, spe, planned, pat)
    assert plan.total_steps == planned * spe and plan.total_steps >= min(min_steps, plan.total_steps)
    assert plan.warmup_steps == round(plan.total_steps / epochs)  # one warmup epoch keeps its share of the run
    assert (plan.extended_from is not None) == (planned != epochs)


def test_a_global_batch_smaller_than_the_gang_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"training\.batchSize: 2 is the global batch .* processes \(4\)"):
        per_process_batch(2, 4)


def test_min_steps_extends_a_tiny_run_and_the_summary_records_it(make_config: Any) -> None:
    cfg = make_config(training={"epochs": 2, "minSteps": 40, "earlyStopping": {"enabled": False}})
    sink = Recorder()
    trainer = Trainer(cfg, SINGLE, sink)
    trainer.run()
    # 168 training rows / batch 32 = 6 steps per epoch: 2 epochs are 12 steps, 7 epochs reach 40.
    assert trainer.steps_per_epoch == 6 and sink.epochs == list(range(1, 8))
    assert sink.reports[-1].total_epochs == 7
    summary = json.loads((cfg.run_dir / "training_summary.json").read_text())
    assert summary["extendedByMinSteps"] is True
    assert (summary["configuredEpochs"], summary["plannedEpochs"], summary["stepsPerEpoch"]) == (2, 7, 6)
    assert summary["globalBatchSize"] == 32 and summary["perProcessBatchSize"] == 32
