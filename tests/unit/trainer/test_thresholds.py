"""The gate names every failed threshold by its spec field; convergence is judged from the curves."""

from __future__ import annotations

import json
from pathlib import Path

from flownexus_trainer.config import ValidationConfig
from flownexus_trainer.thresholds import Measured, assess_convergence, evaluate_thresholds, failed
from flownexus_trainer.validate import write_termination_message


def measured(**overrides: object) -> Measured:
    base = dict(
        task="classification", test_accuracy=0.97, test_rmse=None, test_r2=None,
        latency_p95_ms=1.0, train_val_gap=0.01, converged=True, convergence_reason="plateau",
    )  # fmt: skip
    base.update(overrides)
    return Measured(**base)  # type: ignore[arg-type]


def test_a_good_model_passes_every_default_threshold() -> None:
    results = evaluate_thresholds(ValidationConfig(), measured())
    assert {r.name for r in results} == {"minAccuracy", "maxLatencyP95Ms", "maxTrainValGap", "requireConvergence"}
    assert failed(results) == []


def test_each_failed_threshold_is_named_with_value_and_limit() -> None:
    results = evaluate_thresholds(
        ValidationConfig(),
        measured(test_accuracy=0.8, latency_p95_ms=150.0, train_val_gap=0.2, converged=False,
                 convergence_reason="still moving"),
    )  # fmt: skip
    messages = {r.name: r.message for r in failed(results)}
    assert set(messages) == {"minAccuracy", "maxLatencyP95Ms", "maxTrainValGap", "requireConvergence"}
    assert messages["minAccuracy"] == "minAccuracy: test accuracy 0.8 < 0.85"
    assert messages["maxLatencyP95Ms"] == "maxLatencyP95Ms: p95 latency (ms) 150 > 100"
    assert "still moving" in messages["requireConvergence"]


def test_regression_uses_rmse_and_r2_and_skips_accuracy() -> None:
    cfg = ValidationConfig(max_rmse=10.0, min_r2=0.5)
    results = evaluate_thresholds(cfg, measured(task="regression", test_accuracy=None, test_rmse=12.0, test_r2=0.6))
    assert [r.name for r in failed(results)] == ["maxRmse"]
    assert "minAccuracy" not in {r.name for r in results}


def test_thresholds_set_to_null_are_off() -> None:
    cfg = ValidationConfig(
        min_accuracy=None, max_latency_p95_ms=None, max_train_val_gap=None, require_convergence=False
    )
    assert evaluate_thresholds(cfg, measured(test_accuracy=0.1)) == []


def history(val_losses: list[float]) -> list[dict[str, float]]:
    return [{"epoch": i + 1, "loss": v, "valLoss": v} for i, v in enumerate(val_losses)]


def test_convergence() -> None:
    assert assess_convergence(history([2.0, 1.0, 0.50, 0.49, 0.48]), stopped_early=False)[0]
    assert not assess_convergence(history([2.0, 1.5, 1.0, 0.5]), stopped_early=False)[0]  # still falling
    assert not assess_convergence(history([1.0, 1.1, 1.2]), stopped_early=True)[0]  # never improved
    assert not assess_convergence(history([1.0, float("nan"), 0.5]), stopped_early=False)[0]
    assert assess_convergence(history([2.0, 1.0, 1.5, 2.0]), stopped_early=True)[0]


def test_termination_message_is_written_when_possible(tmp_path: Path) -> None:
    target = tmp_path / "termination-log"
    write_termination_message({"passed": False, "failed": ["x" * 500] * 20}, target)
    assert len(target.read_text()) <= 4096 and json.loads(target.read_text())["passed"] is False
    write_termination_message({"passed": True}, tmp_path / "missing-dir" / "log")  # no error outside a pod
