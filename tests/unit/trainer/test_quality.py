"""Quality metrics, the Wilson interval and the baselines; the gate on really trained models.

The trained cases use the real trainer and the real validator pieces: a CSV of pure noise with 9 %
positives gives a majority-class model that the old accuracy-only gate passed (accuracy ~0.91) and
this gate fails against the majority-class baseline; digits with the default mlp passes; a champion
that was trained properly blocks a challenger that barely trained.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from flownexus.trainingjob.decide import JobState, decide
from flownexus_trainer import quality
from flownexus_trainer.config import JobConfig
from flownexus_trainer.data import load_splits
from flownexus_trainer.distributed import DistContext
from flownexus_trainer.errors import TERMINATION_LIMIT
from flownexus_trainer.progress import MetricsFileSink
from flownexus_trainer.thresholds import ThresholdResult, evaluate_thresholds, failed
from flownexus_trainer.train import Trainer
from flownexus_trainer.validate import (
    champion_primary,
    load_trained_model,
    measure,
    read_history,
    score_champion,
    termination_summary,
    validate,
)
from tests.unit.test_trainingjob_decide import OK, spec, status

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


# ---- Wilson interval ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        (0, 10, 0.0, 0.2775),  # the textbook values of the 95 % Wilson score interval
        (1, 10, 0.0179, 0.4042),
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (23, 23, 0.8569, 1.0),  # a perfect score on iris's 23 test rows still allows 0.86
        (22, 23, 0.7901, 0.9923),
        (81, 263, 0.2553, 0.3662),
    ],
)
def test_wilson_interval_matches_known_values(successes: int, n: int, low: float, high: float) -> None:
    lo, hi = quality.wilson_interval(successes, n)
    assert (round(lo, 4), round(hi, 4)) == (low, high)


def test_wilson_interval_narrows_with_more_rows_around_the_same_rate() -> None:
    small, large = quality.wilson_interval(9, 10), quality.wilson_interval(900, 1000)
    assert small[0] < large[0] < 0.9 < large[1] < small[1]


@pytest.mark.parametrize(("successes", "n"), [(0, 0), (-1, 10), (11, 10)])
def test_wilson_interval_refuses_impossible_counts(successes: int, n: int) -> None:
    with pytest.raises(ValueError, match="wilson_interval"):
        quality.wilson_interval(successes, n)


# ---- metrics -----------------------------------------------------------------------------------------


def test_classification_metrics_per_class_confusion_and_balanced_accuracy() -> None:
    # 8 rows of class a, 2 of b; the model gets 7 a right, 1 b right.
    y_true = np.array([0] * 8 + [1] * 2)
    y_pred = np.array([0] * 7 + [1] + [1, 0])
    scores = np.array([0.1] * 7 + [0.6] + [0.9, 0.4])
    m = quality.classification_metrics(y_true, y_pred, ["a", "b"], scores)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["balancedAccuracy"] == pytest.approx((7 / 8 + 1 / 2) / 2)
    assert m["confusionMatrix"] == [[7, 1], [1, 1]]
    a, b = m["perClass"]
    assert (a["label"], a["support"], a["recall"]) == ("a", 8, pytest.approx(7 / 8))
    assert (b["label"], b["support"], b["precision"], b["recall"]) == ("b", 2, 0.5, 0.5)
    assert m["macroF1"] == pytest.approx((a["f1"] + b["f1"]) / 2)
    assert m["rocAuc"] == pytest.approx(15 / 16)  # one (b, a) pair of 16 ranked wrong: 0.4 < 0.6
    assert m["accuracyInterval"] == pytest.approx(list(quality.wilson_interval(8, 10)))
    assert m["classesWithoutTestRows"] == []


def test_majority_predictions_score_one_over_classes_in_balanced_accuracy() -> None:
    y_true = np.array([0] * 91 + [1] * 9)
    m = quality.classification_metrics(y_true, np.zeros(100, dtype=int), ["neg", "pos"])
    assert m["accuracy"] == pytest.approx(0.91) and m["balancedAccuracy"] == pytest.approx(0.5)
    assert m["perClass"][1]["f1"] == 0.0 and m["rocAuc"] is None  # no scores given


def test_a_class_without_test_rows_is_reported() -> None:
    m = quality.classification_metrics(np.array([0, 0, 2]), np.array([0, 1, 2]), ["x", "y", "z"])
    assert m["classesWithoutTestRows"] == ["y"]
    assert m["perClass"][1]["support"] == 0


def test_regression_metrics_in_the_units_given() -> None:
    m = quality.regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 6.0]))
    assert m["rmse"] == pytest.approx(1.0) and m["mae"] == pytest.approx(0.5)
    assert m["r2"] == pytest.approx(1 - 4 / 5)


# ---- baselines ---------------------------------------------------------------------------------------


def test_baselines_on_a_tiny_separable_dataset() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 2)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    y[:5] = 0  # a majority class, so the trivial baseline is not a coin
    b = quality.baselines("classification", x[:40], y[:40], x[40:], y[40:], ["0", "1"])
    assert b["trivial"].name == "majority-class" and b["trivial"].score("classification") == pytest.approx(0.5)
    assert b["linear"].name == "logistic-regression" and b["linear"].score("classification") >= 0.9
    assert b["linear"].metrics["rocAuc"] is not None


def test_regression_baselines_mean_is_near_zero_and_ridge_fits_a_line() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + rng.normal(scale=0.1, size=80)).astype(np.float32)
    b = quality.baselines("regression", x[:60], y[:60], x[60:], y[60:], [], target_std=10.0)
    assert b["trivial"].name == "mean-prediction" and b["trivial"].score("regression") <= 0.05
    assert b["linear"].name == "ridge-regression" and b["linear"].score("regression") > 0.95
    # RMSE is in target units: the standardized error times target_std.
    direct = quality.regression_metrics(y[60:], np.full(20, y[:60].mean()))["rmse"]
    assert b["trivial"].metrics["rmse"] == pytest.approx(direct * 10.0, rel=1e-5)


def test_baselines_are_cheap_on_digits() -> None:
    x, y = load_digits(return_X_y=True)
    x = ((x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)).astype(np.float32)
    started = time.perf_counter()
    b = quality.baselines("classification", x[:1257], y[:1257], x[1257:], y[1257:], [str(i) for i in range(10)])
    assert time.perf_counter() - started < 1.0
    assert b["linear"].score("classification") > 0.85


# ---- the gate on trained models ----------------------------------------------------------------------


def job(root: Path, name: str, **sections: Any) -> JobConfig:
    raw: dict[str, Any] = {
        "name": name,
        "namespace": "test",
        "model": {"architecture": "mlp"},
        "dataset": {"source": "builtin", "name": "digits"},
        "paths": {"artifactRoot": str(root), "runDir": str(root / "test" / name)},
    }
    raw.update(sections)
    return JobConfig.from_dict(raw)


def train(cfg: JobConfig) -> None:
    """Train in-process as rank 0 does, metrics.jsonl included (convergence is judged from it)."""
    Trainer(cfg, SINGLE, MetricsFileSink(cfg.run_dir / "metrics.jsonl")).run()


def gate(cfg: JobConfig) -> tuple[dict[str, Any], list[ThresholdResult]]:
    """What validate() measures and decides, without the exports a passing model gets."""
    model, _ = load_trained_model(cfg.run_dir / "model")
    summary = json.loads((cfg.run_dir / "training_summary.json").read_text())
    splits = load_splits(cfg.dataset, cfg.artifact_root)
    champion = score_champion(cfg, splits)
    metrics, measured = measure(
        model, splits, read_history(cfg.run_dir / "metrics.jsonl"), bool(summary["stoppedEarly"]), champion
    )
    return metrics, evaluate_thresholds(cfg.validation, measured)


def by_name(results: list[ThresholdResult]) -> dict[str, ThresholdResult]:
    return {r.name: r for r in results}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny networks train fastest on one thread; on a busy shared machine more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def digits(store: Path) -> JobConfig:
    """digits with the default mlp and default training: the model a user gets out of the box."""
    cfg = job(store, "digits")
    train(cfg)
    return cfg


def test_noise_with_few_positives_fails_the_gate_naming_the_majority_baseline(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 10))
    y = (rng.random(1000) < 0.09).astype(int)
    lines = [",".join([*(f"f{i}" for i in range(10)), "target"])]
    lines += [",".join([*(f"{v:.6f}" for v in row), str(t)]) for row, t in zip(x, y, strict=True)]
    (tmp_path / "noise.csv").write_text("\n".join(lines) + "\n")
    cfg = job(tmp_path, "noise", dataset={"source": "file", "path": "noise.csv"})
    train(cfg)

    metrics, results = gate(cfg)
    r = by_name(results)
    # The old gate's only quality check passes: the majority class alone is right 9 times in 10.
    assert r["minAccuracy"].passed and metrics["testAccuracy"] > 0.85
    assert not r["minMarginOverTrivial"].passed, r["minMarginOverTrivial"].message
    assert r["minMarginOverTrivial"].message.startswith("minMarginOverTrivial: balanced accuracy 0.5")
    assert "is not above the majority-class baseline 0.500 by 0.05" in r["minMarginOverTrivial"].message
    assert metrics["baselineTrivial"] == pytest.approx(0.5)

    # The whole validator agrees, and the operator gets the numbers in the termination summary.
    verdict = validate(cfg)
    assert verdict["passed"] is False
    assert any("majority-class baseline" in f["message"] for f in verdict["failedThresholds"])
    summary = termination_summary(verdict)
    assert summary["baselines"]["trivial"] == pytest.approx(0.5) and summary["balancedAccuracy"] < 0.55
    assert not (cfg.run_dir / "model-store" / "noise.mar").exists()

    # Through the termination log into the operator's status, as the pod's verdict travels.
    obs = replace(OK, worker_job=JobState.SUCCEEDED, validator_job=JobState.SUCCEEDED,
                  verdict=json.loads(json.dumps(summary)))  # fmt: skip
    plan = decide(spec(), status(attempt=1, phase="Validating"), obs, 1)
    st = plan.status.validation
    assert plan.status.phase == "Failed" and st is not None
    assert st.balanced_accuracy == summary["balancedAccuracy"] and st.baseline_trivial == pytest.approx(0.5)
    assert st.baseline_linear == summary["baselines"]["linear"] and st.overfitting_gap == summary["overfittingGap"]
    assert st.accuracy_interval == summary["accuracyInterval"] and st.champion_score is None
    assert any("majority-class baseline" in f for f in st.failed_thresholds)


def test_digits_with_the_default_mlp_passes_every_default_threshold(digits: JobConfig) -> None:
    metrics, results = gate(digits)
    assert failed(results) == [], [r.message for r in failed(results)]
    names = {r.name for r in results}
    assert {"minAccuracy", "minMarginOverTrivial", "minMarginOverLinear", "maxOverfittingGap"} <= names
    assert metrics["testBalancedAccuracy"] > 0.93 and metrics["baselineTrivial"] == pytest.approx(0.1)
    quality_section = metrics["quality"]
    assert len(quality_section["test"]["confusionMatrix"]) == 10
    assert [c["label"] for c in quality_section["test"]["perClass"]] == [str(i) for i in range(10)]


def test_a_ten_class_termination_summary_with_every_failure_fits_in_the_termination_log(
    digits: JobConfig, store: Path
) -> None:
    """A digits run that fails as many thresholds as it can, with a champion that cannot be scored."""
    strict = {
        "minAccuracy": 0.9999, "minBalancedAccuracy": 0.9999, "minMarginOverTrivial": 0.99,
        "minMarginOverLinear": 0.5, "maxOverfittingGap": 0.0, "maxLatencyP95Ms": 0.000001,
        "decideOn": "lowerBound", "champion": {"modelDeployment": "digits-production-with-a-long-name"},
    }  # fmt: skip
    cfg = job(
        store, "digits", validation=strict,
        paths={"artifactRoot": str(store), "runDir": str(digits.run_dir), "championRunDir": "test/missing-run"},
    )  # fmt: skip
    verdict = validate(cfg)
    assert verdict["passed"] is False and len(verdict["failedThresholds"]) >= 7
    summary = termination_summary(verdict)
    payload = json.dumps(summary, separators=(",", ":"))
    assert len(payload) < TERMINATION_LIMIT // 2, len(payload)
    assert summary["champion"]["modelDeployment"] == "digits-production-with-a-long-name"
    assert "does not exist" in summary["champion"]["error"]
    assert len(summary["accuracyInterval"]) == 2 and summary["overfittingGap"] is not None
    report = (digits.run_dir / "report.md").read_text()
    assert "| linear baseline (logistic-regression) |" in report and "Confusion matrix" in report
    metadata = json.loads((digits.run_dir / "metadata.json").read_text())
    assert metadata["metrics"]["quality"]["baselines"]["trivial"]["name"] == "majority-class"
    assert metadata["thresholds"]["champion"]["modelDeployment"] == "digits-production-with-a-long-name"


def test_a_better_champion_blocks_a_worse_challenger_naming_both_numbers(digits: JobConfig, store: Path) -> None:
    weak = job(
        store, "weak",
        training={"epochs": 1, "learningRate": 1e-5, "minSteps": 0, "earlyStopping": {"enabled": False}},
        validation={"champion": {"modelDeployment": "digits-prod", "tolerance": 0.01}},
        paths={"artifactRoot": str(store), "runDir": str(store / "test" / "weak"), "championRunDir": "test/digits"},
    )  # fmt: skip
    train(weak)
    metrics, results = gate(weak)
    champ = by_name(results)["champion"]
    assert not champ.passed
    challenger, champion = metrics["testBalancedAccuracy"], metrics["championScore"]
    assert champion > 0.93 and challenger < champion - 0.01
    assert champ.message == (
        f"champion: balanced accuracy {challenger:.3f} of this model < {champion:.3f} - tolerance 0.01 of the model "
        "ModelDeployment digits-prod serves, on the same 270 test rows"
    )
    # The same champion scored against itself: it passes with tolerance 0, both numbers equal.
    own = job(
        store, "digits", validation={"champion": {"modelDeployment": "digits-prod"}},
        paths={"artifactRoot": str(store), "runDir": str(digits.run_dir), "championRunDir": "test/digits"},
    )  # fmt: skip
    metrics, results = gate(own)
    assert by_name(results)["champion"].passed and metrics["championScore"] == metrics["testBalancedAccuracy"]


def test_the_champion_is_scored_with_its_own_standardization(digits: JobConfig, tmp_path: Path) -> None:
    """A champion fitted with another standardization (every feature shifted by one sd and scaled by two),
    whose first layer compensates exactly, is the same function of the raw rows: the same score. Fed this
    job's standardized rows instead, it would score differently."""
    splits = load_splits(digits.dataset, digits.artifact_root)
    own = champion_primary(digits.run_dir / "model", splits)
    copy = tmp_path / "model"
    shutil.copytree(digits.run_dir / "model", copy)
    norm = json.loads((copy / "normalization.json").read_text())
    (copy / "normalization.json").write_text(
        json.dumps({**norm, "mean": [m + s for m, s in zip(norm["mean"], norm["std"], strict=True)],
                    "std": [2 * s for s in norm["std"]]})
    )  # fmt: skip
    # Their input is x' = (x - 1) / 2 for our standardized x: W' = 2 W and b' = b + W 1 give W' x' + b' = W x + b.
    weights = torch.load(copy / "model.pt", weights_only=True)
    first = weights["net.0.weight"].clone()
    weights["net.0.weight"] = 2 * first
    weights["net.0.bias"] = weights["net.0.bias"] + first.sum(dim=1)
    torch.save(weights, copy / "model.pt")
    assert champion_primary(copy, splits) == pytest.approx(own, abs=1e-9)
    # The same weights behind this job's own standardization: a different model, a different score.
    shutil.copyfile(digits.run_dir / "model" / "normalization.json", copy / "normalization.json")
    assert abs(champion_primary(copy, splits) - own) > 0.01


@pytest.mark.parametrize(
    ("champion_run_dir", "setup", "why"),
    [
        (None, None, "no run directory of its model was given (paths.championRunDir)"),
        ("../elsewhere", None, "is outside the artifact store"),
        ("test/gone", None, "gone/model/model_config.json does not exist"),
        ("test/wrong-width", "features", "it takes 5 features, this dataset has 64"),
    ],
)
def test_a_champion_that_cannot_be_scored_fails_saying_why(
    digits: JobConfig, store: Path, champion_run_dir: str | None, setup: str | None, why: str
) -> None:
    if setup == "features":
        target = store / "test" / "wrong-width" / "model"
        shutil.copytree(digits.run_dir / "model", target, dirs_exist_ok=True)
        spec = json.loads((target / "model_config.json").read_text())
        (target / "model_config.json").write_text(json.dumps({**spec, "numFeatures": 5}))
    paths: dict[str, Any] = {"artifactRoot": str(store), "runDir": str(digits.run_dir)}
    if champion_run_dir is not None:
        paths["championRunDir"] = champion_run_dir
    cfg = job(store, "digits", validation={"champion": {"modelDeployment": "prod"}}, paths=paths)
    _, results = gate(cfg)
    champ = by_name(results)["champion"]
    assert not champ.passed
    assert champ.message.startswith("champion: the model ModelDeployment prod serves could not be scored: ")
    assert why in champ.message


@pytest.mark.parametrize(
    ("paths", "absent", "error"),
    [
        ({"championAbsent": "ModelDeployment prod serves no model yet"}, "serves no model yet", ""),
        ({"championError": "ModelDeployment prod keeps its models in another artifact store"}, "", "another artifact"),
        ({}, "", "no run directory of its model was given"),
    ],
)
def test_what_the_operator_found_about_the_champion_reaches_the_gate(
    tmp_path: Path, paths: dict[str, str], absent: str, error: str
) -> None:
    cfg = JobConfig.from_dict(
        {
            "dataset": {"source": "builtin", "name": "iris"},
            "validation": {"champion": {"modelDeployment": "prod"}},
            "paths": {"artifactRoot": str(tmp_path), **paths},
        }
    )
    champion = score_champion(cfg, load_splits(cfg.dataset, tmp_path))
    assert champion is not None and champion.score is None
    assert absent in champion.absent and (absent or not champion.absent)
    assert error in champion.error and (error or not champion.error)
