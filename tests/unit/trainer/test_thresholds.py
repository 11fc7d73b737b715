"""The gate names every failed threshold by its spec field (convergence itself: test_convergence.py).

Table tests: each threshold passing and failing, with the exact message a user reads in status.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from flownexus_trainer.config import ConfigError, JobConfig, ValidationConfig
from flownexus_trainer.errors import write_termination_message
from flownexus_trainer.thresholds import ChampionScore, Measured, evaluate_thresholds, failed

# Thresholds that are off unless a row of a table switches them on.
ALL_OFF = ValidationConfig(
    min_accuracy=None, max_latency_p95_ms=None, max_overfitting_gap=None, require_convergence=False,
    min_margin_over_trivial=None, min_margin_over_linear=None,
)  # fmt: skip


def measured(**overrides: Any) -> Measured:
    """A good 10-class model on 270 test rows."""
    base: dict[str, Any] = dict(
        task="classification", test_accuracy=0.97, test_rmse=None, test_r2=None,
        latency_p95_ms=1.0, converged=True, convergence_reason="plateau",
        overfitting_gap=0.02, train_primary=0.99, test_balanced_accuracy=0.97, test_rows=270,
        accuracy_interval=(0.94, 0.98), baseline_trivial=0.1, baseline_linear=0.96,
    )  # fmt: skip
    base.update(overrides)
    return Measured(**base)


def regression(**overrides: Any) -> Measured:
    base: dict[str, Any] = dict(
        task="regression", test_accuracy=None, test_rmse=50.0, test_r2=0.46, test_balanced_accuracy=None,
        accuracy_interval=None, train_primary=0.54, overfitting_gap=0.08, baseline_trivial=-0.001,
        baseline_linear=0.40, test_rows=66,
    )  # fmt: skip
    base.update(overrides)
    return measured(**base)


def only(name: str, cfg: ValidationConfig, m: Measured) -> tuple[bool, str]:
    results = {r.name: r for r in evaluate_thresholds(cfg, m)}
    assert name in results, sorted(results)
    return results[name].passed, results[name].message


def test_a_good_model_passes_every_default_threshold() -> None:
    results = evaluate_thresholds(ValidationConfig(), measured())
    assert {r.name for r in results} == {
        "minAccuracy", "minMarginOverTrivial", "minMarginOverLinear", "maxLatencyP95Ms", "maxOverfittingGap",
        "requireConvergence",
    }  # fmt: skip
    assert failed(results) == []


def test_the_noise_majority_model_fails_only_against_the_baselines() -> None:
    """Accuracy 0.913 with 8.8 % positives: the majority class alone. The old gate passed it."""
    noise = measured(
        test_accuracy=0.913, test_balanced_accuracy=0.5, baseline_trivial=0.5, baseline_linear=0.5,
        accuracy_interval=(0.86, 0.95), train_primary=0.5, overfitting_gap=0.0, test_rows=150,
    )  # fmt: skip
    results = evaluate_thresholds(ValidationConfig(), noise)
    assert [r.message for r in failed(results)] == [
        "minMarginOverTrivial: balanced accuracy 0.500 is not above the majority-class baseline 0.500 by 0.05"
    ]


CLASSIFICATION_TABLE = [
    # (threshold, config, measured overrides, passed, message)
    ("minAccuracy", {"min_accuracy": 0.85}, {}, True, "minAccuracy: test accuracy 0.970 >= 0.85"),
    ("minAccuracy", {"min_accuracy": 0.85}, {"test_accuracy": 0.8, "accuracy_interval": (0.75, 0.84)}, False,
     "minAccuracy: test accuracy 0.800 < 0.85"),
    # 22 of 23 right: the estimate clears 0.85, the interval does not: said so.
    ("minAccuracy", {"min_accuracy": 0.85},
     {"test_accuracy": 22 / 23, "accuracy_interval": (0.7901, 0.9923), "test_rows": 23}, True,
     "minAccuracy: test accuracy 0.957 >= 0.85 (95 % interval 0.79-0.99 on 23 rows: too few rows to be sure)"),
    ("minAccuracy", {"min_accuracy": 0.85, "decide_on": "lowerBound"},
     {"test_accuracy": 22 / 23, "accuracy_interval": (0.7901, 0.9923), "test_rows": 23}, False,
     "minAccuracy: lower bound 0.790 of the test accuracy's 95 % interval 0.79-0.99 on 23 rows (estimate 0.957) "
     "< 0.85"),
    ("minAccuracy", {"min_accuracy": 0.85, "decide_on": "lowerBound"}, {}, True,
     "minAccuracy: lower bound 0.940 of the test accuracy's 95 % interval 0.94-0.98 on 270 rows (estimate 0.970) "
     ">= 0.85"),
    ("minAccuracy", {"min_accuracy": 0.85}, {"test_accuracy": None}, False,
     "minAccuracy: test accuracy was not measured"),
    ("minBalancedAccuracy", {"min_balanced_accuracy": 0.9}, {}, True,
     "minBalancedAccuracy: test balanced accuracy 0.970 >= 0.9"),
    ("minBalancedAccuracy", {"min_balanced_accuracy": 0.9}, {"test_balanced_accuracy": 0.61}, False,
     "minBalancedAccuracy: test balanced accuracy 0.610 < 0.9"),
    ("minMarginOverTrivial", {"min_margin_over_trivial": 0.05}, {}, True,
     "minMarginOverTrivial: balanced accuracy 0.970 is above the majority-class baseline 0.100 by 0.870 (>= 0.05)"),
    ("minMarginOverTrivial", {"min_margin_over_trivial": 0.05},
     {"test_balanced_accuracy": 0.53, "baseline_trivial": 0.5},
     False, "minMarginOverTrivial: balanced accuracy 0.530 is not above the majority-class baseline 0.500 by 0.05"),
    # Exactly the margin passes (0.55 - 0.5 is 0.04999... in floats).
    ("minMarginOverTrivial", {"min_margin_over_trivial": 0.05},
     {"test_balanced_accuracy": 0.55, "baseline_trivial": 0.5}, True,
     "minMarginOverTrivial: balanced accuracy 0.550 is above the majority-class baseline 0.500 by 0.050 (>= 0.05)"),
    ("minMarginOverTrivial", {"min_margin_over_trivial": 0.05}, {"classes_without_test_rows": ("7",)}, True,
     "minMarginOverTrivial: balanced accuracy 0.970 is above the majority-class baseline 0.100 by 0.870 (>= 0.05) "
     "(no test row of class '7': its recall is not in the balanced accuracy)"),
    ("minMarginOverTrivial", {"min_margin_over_trivial": 0.05}, {"baseline_trivial": None}, False,
     "minMarginOverTrivial: the majority-class baseline's balanced accuracy was not measured"),
    ("minMarginOverLinear", {"min_margin_over_linear": -0.03}, {"test_balanced_accuracy": 0.94}, True,
     "minMarginOverLinear: balanced accuracy 0.940 is within 0.03 of the logistic-regression baseline 0.960 (-0.020)"),
    ("minMarginOverLinear", {"min_margin_over_linear": -0.03}, {"test_balanced_accuracy": 0.90}, False,
     "minMarginOverLinear: balanced accuracy 0.900 is more than 0.03 below the logistic-regression baseline 0.960 "
     "(-0.060)"),
    ("minMarginOverLinear", {"min_margin_over_linear": 0.02}, {}, False,
     "minMarginOverLinear: balanced accuracy 0.970 is not above the logistic-regression baseline 0.960 by 0.02"),
    ("maxOverfittingGap", {"max_overfitting_gap": 0.05}, {}, True,
     "maxOverfittingGap: train - test balanced accuracy 0.020 <= 0.05 (train 0.990, test 0.970)"),
    ("maxOverfittingGap", {"max_overfitting_gap": 0.05},
     {"train_primary": 1.0, "test_balanced_accuracy": 0.88, "overfitting_gap": 0.12}, False,
     "maxOverfittingGap: train - test balanced accuracy 0.120 > 0.05 (train 1.000, test 0.880)"),
    ("maxLatencyP95Ms", {"max_latency_p95_ms": 100.0}, {"latency_p95_ms": 150.0}, False,
     "maxLatencyP95Ms: p95 latency (ms) 150 > 100"),
    ("requireConvergence", {"require_convergence": True}, {"converged": False, "convergence_reason": "still moving"},
     False, "requireConvergence: training did not converge (still moving)"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "cfg", "overrides", "passed", "message"), CLASSIFICATION_TABLE)
def test_classification_thresholds(
    name: str, cfg: dict[str, Any], overrides: dict[str, Any], passed: bool, message: str
) -> None:
    assert only(name, replace(ALL_OFF, **cfg), measured(**overrides)) == (passed, message)


REGRESSION_TABLE = [
    ("minR2", {"min_r2": 0.3}, {}, True, "minR2: test R² 0.460 >= 0.3"),
    ("maxRmse", {"max_rmse": 40.0}, {}, False, "maxRmse: test RMSE 50 > 40"),
    ("minMarginOverTrivial", {"min_margin_over_trivial": 0.05}, {}, True,
     "minMarginOverTrivial: R² 0.460 is above the mean-prediction baseline -0.001 by 0.461 (>= 0.05)"),
    ("minMarginOverTrivial", {"min_margin_over_trivial": 0.05}, {"test_r2": 0.02}, False,
     "minMarginOverTrivial: R² 0.020 is not above the mean-prediction baseline -0.001 by 0.05"),
    # The diabetes lstm: R² 0.18 against ridge's 0.40 passed the old gate.
    ("minMarginOverLinear", {"min_margin_over_linear": -0.05}, {"test_r2": 0.178}, False,
     "minMarginOverLinear: R² 0.178 is more than 0.05 below the ridge-regression baseline 0.400 (-0.222)"),
    ("minMarginOverLinear", {"min_margin_over_linear": -0.05}, {}, True,
     "minMarginOverLinear: R² 0.460 is within 0.05 of the ridge-regression baseline 0.400 (+0.060)"),
    ("maxOverfittingGap", {"max_overfitting_gap": 0.15}, {}, True,
     "maxOverfittingGap: train - test R² 0.080 <= 0.15 (train 0.540, test 0.460)"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "cfg", "overrides", "passed", "message"), REGRESSION_TABLE)
def test_regression_thresholds(
    name: str, cfg: dict[str, Any], overrides: dict[str, Any], passed: bool, message: str
) -> None:
    assert only(name, replace(ALL_OFF, **cfg), regression(**overrides)) == (passed, message)


CHAMPION_TABLE = [
    (ChampionScore("digits-prod", 0.95), 0.0, True,
     "champion: balanced accuracy 0.970 of this model >= 0.950 of the model ModelDeployment digits-prod serves, "
     "on the same 270 test rows"),
    (ChampionScore("digits-prod", 0.98), 0.0, False,
     "champion: balanced accuracy 0.970 of this model < 0.980 of the model ModelDeployment digits-prod serves, "
     "on the same 270 test rows"),
    (ChampionScore("digits-prod", 0.98), 0.01, True,
     "champion: balanced accuracy 0.970 of this model >= 0.980 - tolerance 0.01 of the model ModelDeployment "
     "digits-prod serves, on the same 270 test rows"),
    (ChampionScore("digits-prod", None, "it takes 5 features, this dataset has 64"), 0.0, False,
     "champion: the model ModelDeployment digits-prod serves could not be scored: it takes 5 features, this "
     "dataset has 64"),
    (None, 0.0, False, "champion: the model ModelDeployment digits-prod serves could not be scored: it was not scored"),
    # The operator found nothing to beat: a first deployment passes, and says so.
    (ChampionScore("digits-prod", None, absent="ModelDeployment digits-prod serves no model yet"), 0.0, True,
     "champion: nothing to beat: ModelDeployment digits-prod serves no model yet"),
]  # fmt: skip


@pytest.mark.parametrize(("champion", "tolerance", "passed", "message"), CHAMPION_TABLE)
def test_champion(champion: ChampionScore | None, tolerance: float, passed: bool, message: str) -> None:
    cfg = replace(ALL_OFF, champion_model_deployment="digits-prod", champion_tolerance=tolerance)
    assert only("champion", cfg, measured(champion=champion)) == (passed, message)


def test_no_champion_configured_means_no_champion_result() -> None:
    assert "champion" not in {r.name for r in evaluate_thresholds(ValidationConfig(), measured())}


def test_regression_uses_rmse_and_r2_and_skips_accuracy() -> None:
    cfg = ValidationConfig(max_rmse=10.0, min_r2=0.5)
    results = evaluate_thresholds(cfg, regression(test_rmse=12.0, test_r2=0.6))
    assert [r.name for r in failed(results)] == ["maxRmse"]
    assert not {"minAccuracy", "minBalancedAccuracy"} & {r.name for r in results}


def test_thresholds_set_to_null_are_off() -> None:
    assert evaluate_thresholds(ALL_OFF, measured(test_accuracy=0.1, test_balanced_accuracy=0.1)) == []


def test_validation_config_reads_the_new_fields_and_their_defaults() -> None:
    default = ValidationConfig.from_dict({})
    assert (default.min_margin_over_trivial, default.min_margin_over_linear) == (0.05, -0.05)
    assert (default.max_overfitting_gap, default.decide_on, default.min_balanced_accuracy) == (0.15, "estimate", None)
    assert default.champion_model_deployment is None
    cfg = ValidationConfig.from_dict(
        {"minMarginOverLinear": None, "decideOn": "lowerBound", "minBalancedAccuracy": 0.7,
         "champion": {"modelDeployment": "prod", "tolerance": 0.02}}
    )  # fmt: skip
    assert cfg.min_margin_over_linear is None and cfg.decide_on == "lowerBound" and cfg.min_balanced_accuracy == 0.7
    assert (cfg.champion_model_deployment, cfg.champion_tolerance) == ("prod", 0.02)
    assert cfg.to_dict()["champion"] == {"modelDeployment": "prod", "tolerance": 0.02}
    paths = {"artifactRoot": "/artifacts", "championRunDir": "ns/prod-run"}
    assert JobConfig.from_dict({"paths": paths}).champion_run_dir == "ns/prod-run"


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"decideOn": "upper"}, "validation.decideOn: must be one of ['estimate', 'lowerBound'], got 'upper'"),
        ({"champion": {"tolerance": 0.1}}, "validation.champion.modelDeployment: required when champion is set"),
        ({"champion": {"modelDeployment": "p", "tolerance": -0.1}}, "validation.champion.tolerance: must be >= 0"),
        ({"minMarginOverTrivial": "a lot"}, "validation.minMarginOverTrivial: expected"),
    ],
)
def test_bad_validation_config_names_the_field(raw: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        ValidationConfig.from_dict(raw)
    assert str(info.value).startswith(error)


def test_termination_message_is_written_when_possible(tmp_path: Path) -> None:
    target = tmp_path / "termination-log"
    write_termination_message({"passed": False, "failed": ["x" * 500] * 20}, target)
    assert len(target.read_text()) <= 4096 and json.loads(target.read_text())["passed"] is False
    write_termination_message({"passed": True}, tmp_path / "missing-dir" / "log")  # no error outside a pod
