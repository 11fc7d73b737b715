"""validation.crossValidation: k folds of the training+validation rows, trained with the real Trainer on iris."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flownexus.trainingjob.decide import JobState, decide
from flownexus_trainer.config import ConfigError, JobConfig, ValidationConfig
from flownexus_trainer.crossval import CROSSVAL_DIR, cross_validate, fold_indices, fold_splits, raw_rows
from flownexus_trainer.data import load_splits
from flownexus_trainer.distributed import DistContext
from flownexus_trainer.progress import MetricsFileSink
from flownexus_trainer.thresholds import CrossValScores, Measured, evaluate_thresholds
from flownexus_trainer.train import Trainer
from flownexus_trainer.validate import termination_summary, validate
from tests.unit.test_trainingjob_decide import OK, spec, status

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
LEARNS = {"epochs": 40, "learningRate": 0.01, "batchSize": 16, "minSteps": 0}
# Not the gate's other thresholds: these tests are about crossValidation alone.
ONLY_CV: dict[str, Any] = {
    "minAccuracy": None, "maxLatencyP95Ms": None, "maxOverfittingGap": None, "requireConvergence": False,
    "minMarginOverLinear": None,
}  # fmt: skip


def iris(root: Path, training: dict[str, Any], validation: dict[str, Any] | None = None) -> JobConfig:
    return JobConfig.from_dict(
        {
            "name": "cv",
            "namespace": "test",
            "model": {"architecture": "mlp", "hiddenSizes": [16]},
            "dataset": {"source": "builtin", "name": "iris"},
            "training": training,
            "validation": {**ONLY_CV, **(validation or {})},
            "paths": {"artifactRoot": str(root), "runDir": str(root / "test" / "cv")},
        }
    )


def test_fold_rows_cover_train_and_validation_rows_once_stratified_never_test_rows(tmp_path: Path) -> None:
    cfg = iris(tmp_path, LEARNS)
    splits = load_splits(cfg.dataset, cfg.artifact_root)
    x, y = raw_rows(splits)
    assert len(y) == len(splits.y_train) + len(splits.y_val)  # the 23 test rows are not among them
    folds = fold_indices(y, "classification", 5, cfg.dataset.seed)
    held = np.concatenate([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(len(y)))  # each row held out exactly once
    whole = np.bincount(y) / len(y)
    for train, held_out in folds:
        assert not set(train.tolist()) & set(held_out.tolist())
        assert np.abs(np.bincount(y[held_out], minlength=3) / len(held_out) - whole).max() < 0.1
    # A fold's arrays are the raw rows re-standardized on its own training rows; its test rows are the held-out fold.
    fold = fold_splits(splits, x, y, folds[0][0], folds[0][1], 0.15 / 0.85, cfg.dataset.seed)
    assert len(fold.y_test) == len(folds[0][1])
    assert np.abs(fold.x_train.mean(axis=0)).max() < 1e-5
    # The rows are exactly the training then validation rows: the test rows are not among them.
    both = np.concatenate([splits.x_train, splits.x_val])
    assert np.allclose(splits.normalization.apply(x), both, atol=1e-4)


def test_raw_rows_undo_the_standardization_of_the_training_split(tmp_path: Path) -> None:
    from sklearn.datasets import load_iris

    splits = load_splits(iris(tmp_path, LEARNS).dataset, tmp_path)
    x, _ = raw_rows(splits)
    original = {tuple(np.round(r, 3)) for r in load_iris().data}
    assert {tuple(np.round(r, 3)) for r in x} <= original


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"folds": 1}, "validation.crossValidation.folds: must be an integer from 2 to 10, got 1"),
        ({"folds": 11}, "validation.crossValidation.folds: must be an integer from 2 to 10, got 11"),
        ({"folds": "5"}, "validation.crossValidation.folds: must be an integer from 2 to 10, got '5'"),
        ({}, "validation.crossValidation.folds: must be an integer from 2 to 10, got None"),
        ({"folds": 3, "maxStd": 2}, "validation.crossValidation.maxStd: must be between 0 and 1, got 2.0"),
        (7, "validation.crossValidation: must be an object, got 7"),
    ],
)
def test_bad_cross_validation_config_names_the_field(raw: Any, error: str) -> None:
    with pytest.raises(ConfigError) as exc:
        ValidationConfig.from_dict({"crossValidation": raw})
    assert str(exc.value) == error


def test_cross_validation_is_off_unless_set() -> None:
    assert ValidationConfig.from_dict({}).cross_validation is None
    assert ValidationConfig.from_dict({"crossValidation": {"folds": 4}}).to_dict()["crossValidation"] == {
        "folds": 4,
        "maxStd": 0.1,
    }


def _measured(cv: CrossValScores | None) -> Measured:
    return Measured("classification", 0.9, None, None, 1.0, True, "", cross_validation=cv)


@pytest.mark.parametrize(
    ("scores", "passed", "words"),
    [
        ((0.9, 0.95, 1.0), True, "balanced accuracy 0.950 ± 0.041 over 3 folds (min 0.900)"),
        ((0.6, 0.95, 1.0), False, "the folds vary more than maxStd 0.1"),
        ((0.35, 0.36, 0.37), False, "the mean is not 0.05 above the majority-class baseline's 0.333"),
    ],
)
def test_cross_validation_result_from_fold_scores(scores: tuple[float, ...], passed: bool, words: str) -> None:
    arr = np.asarray(scores)
    cv = CrossValScores(scores, float(arr.mean()), float(arr.std()), float(arr.min()), 1 / 3, 0.1)
    cfg = ValidationConfig.from_dict({**ONLY_CV, "crossValidation": {"folds": 3}})
    (result,) = [r for r in evaluate_thresholds(cfg, _measured(cv)) if r.name == "crossValidation"]
    assert result.passed is passed
    assert words in result.message


def test_cross_validation_not_measured_fails() -> None:
    cfg = ValidationConfig.from_dict({**ONLY_CV, "crossValidation": {"folds": 3}})
    (result,) = [r for r in evaluate_thresholds(cfg, _measured(None)) if r.name == "crossValidation"]
    assert not result.passed and result.message == "crossValidation: was not measured"


def test_iris_three_folds_train_three_models_and_pass(tmp_path: Path) -> None:
    cfg = iris(tmp_path, LEARNS, {"crossValidation": {"folds": 3, "maxStd": 0.15}})
    cv = cross_validate(cfg, load_splits(cfg.dataset, cfg.artifact_root), SINGLE)
    assert len(cv.scores) == 3 and cv.mean > 0.8 and cv.min == min(cv.scores)
    (result,) = [r for r in evaluate_thresholds(cfg.validation, _measured(cv)) if r.name == "crossValidation"]
    assert result.passed, result.message
    for i in (1, 2, 3):
        fold = cfg.run_dir / CROSSVAL_DIR / f"fold-{i}"
        assert (fold / "metrics.jsonl").read_text().count("\n") >= 1  # each fold's metrics stay
        assert not (fold / "model").exists() and not (fold / "checkpoints").exists()  # its weights do not


def test_a_model_that_cannot_learn_fails_cross_validation_with_the_mean(tmp_path: Path) -> None:
    cfg = iris(
        tmp_path,
        {"epochs": 2, "learningRate": 1e-7, "minSteps": 0, "scheduler": {"type": "constant"}},
        {"crossValidation": {"folds": 3}},
    )
    cv = cross_validate(cfg, load_splits(cfg.dataset, cfg.artifact_root), SINGLE)
    (result,) = [r for r in evaluate_thresholds(cfg.validation, _measured(cv)) if r.name == "crossValidation"]
    assert not result.passed
    assert f"balanced accuracy {cv.mean:.3f} ± {cv.std:.3f} over 3 folds" in result.message
    assert "above the majority-class baseline" in result.message


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    cfg = iris(root, LEARNS)
    Trainer(cfg, SINGLE, MetricsFileSink(cfg.run_dir / "metrics.jsonl")).run()
    return cfg.run_dir


def _validated(trained: Path, root: Path, validation: dict[str, Any]) -> tuple[JobConfig, dict[str, Any]]:
    cfg = iris(root, LEARNS, validation)
    shutil.copytree(trained, cfg.run_dir)
    return cfg, validate(cfg)


def test_unset_cross_validation_trains_nothing_more_and_adds_no_result(trained: Path, tmp_path: Path) -> None:
    cfg, verdict = _validated(trained, tmp_path, {})
    assert not (cfg.run_dir / CROSSVAL_DIR).exists()
    assert "crossValidation" not in {r["name"] for r in verdict["results"]}
    assert "crossValidation" not in verdict["metrics"]
    assert "crossValidation" not in termination_summary(verdict)


def test_validate_with_cross_validation_records_folds_in_metadata_and_mean_in_summary(
    trained: Path, tmp_path: Path
) -> None:
    cfg, verdict = _validated(trained, tmp_path, {"crossValidation": {"folds": 3, "maxStd": 0.15}})
    (result,) = [r for r in verdict["results"] if r["name"] == "crossValidation"]
    assert result["passed"], result["message"]
    metadata = json.loads((cfg.run_dir / "metadata.json").read_text())
    folds = metadata["metrics"]["crossValidation"]
    assert folds["folds"] == 3 and len(folds["scores"]) == 3
    summary = termination_summary(verdict)["crossValidation"]
    assert summary == {"mean": round(folds["mean"], 4), "std": round(folds["std"], 4)}
    # Through the termination log into the operator's status.
    obs = replace(OK, worker_job=JobState.SUCCEEDED, validator_job=JobState.SUCCEEDED,
                  verdict=json.loads(json.dumps(termination_summary(verdict))))  # fmt: skip
    st = decide(spec(), status(attempt=1, phase="Validating"), obs, 1).status.validation
    assert st is not None
    assert (st.cross_validation_mean, st.cross_validation_std) == (summary["mean"], summary["std"])
