"""Exports take raw rows, answer like the float model, are refused past maxExportDrop, and ship a schema.

The models here are really trained (in-process, a few epochs) on digits (raw pixels 0..16, so a graph
without the standardization answers visibly differently) and on diabetes (regression, raw target).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from torch import nn

from flownexus_trainer import export as export_module
from flownexus_trainer.config import ConfigError, JobConfig, OutputConfig
from flownexus_trainer.data import Splits, load_splits
from flownexus_trainer.distributed import DistContext
from flownexus_trainer.export import (
    FILES,
    ONNX_OPSET,
    SCHEMA_FILE,
    SCHEMA_VERSION,
    ModelSignature,
    Preprocessing,
    build_schema,
    compare,
    export_failures,
    gate_message,
    load_onnx,
    load_torchscript,
    missing_onnx_packages,
    run_exports,
)
from flownexus_trainer.models import build_model
from flownexus_trainer.train import Trainer
from flownexus_trainer.validate import _exports, load_trained_model, validate
from tests.unit.trainer.conftest import raw_config
from tests.unit.trainer.test_models import SPECS

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
ALL = ["torchscript", "int8", "onnx"]

JOBS: dict[str, dict[str, Any]] = {
    "digits-mlp": {
        "model": {"architecture": "mlp", "hiddenSizes": [32], "dropout": 0.0},
        "dataset": {"source": "builtin", "name": "digits"},
        "training": {"epochs": 6, "learningRate": 0.005},
    },
    "digits-lstm": {
        "model": {"architecture": "lstm", "dModel": 12, "numLayers": 1, "dropout": 0.0},
        "dataset": {"source": "builtin", "name": "digits"},
        "training": {"epochs": 3, "learningRate": 0.01},
    },
    "diabetes-mlp": {
        "model": {"architecture": "mlp", "hiddenSizes": [16], "dropout": 0.0},
        "dataset": {"source": "builtin", "name": "diabetes"},
        "training": {"epochs": 10, "learningRate": 0.01},
    },
}

onnx_installed = pytest.mark.skipif(bool(missing_onnx_packages()), reason="onnx/onnxscript/onnxruntime not installed")


@dataclass
class Trained:
    cfg: JobConfig
    model: nn.Module
    splits: Splits
    prep: Preprocessing
    sig: ModelSignature

    @property
    def x_raw(self) -> NDArray[np.float32]:
        return self.prep.raw_rows(self.splits.x_test)

    @property
    def y_raw(self) -> NDArray[Any]:
        return self.prep.raw_targets(self.splits.y_test)

    def float_answers(self) -> NDArray[Any]:
        """The float network on the standardized test rows, outputs in the client's units."""
        with torch.no_grad():
            out: NDArray[Any] = self.model(torch.from_numpy(self.splits.x_test)).numpy()
        return out * self.prep.target_std + self.prep.target_mean if self.prep.regression else out


def _train(root: Path, job: str) -> Trained:
    raw = raw_config(root, name=job, **JOBS[job])
    raw["paths"] = {"artifactRoot": str(root), "runDir": str(root / job)}
    cfg = JobConfig.from_dict(raw)
    Trainer(cfg, SINGLE, None).run()
    model, _ = load_trained_model(cfg.run_dir / "model")
    splits = load_splits(cfg.dataset, cfg.artifact_root)
    prep = Preprocessing.of(splits.normalization, splits.task)
    sig = ModelSignature(splits.task, splits.feature_names, splits.class_labels, splits.num_outputs, prep)
    return Trained(cfg, model, splits, prep, sig)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    root = tmp_path_factory.mktemp("trained")
    return {job: _train(root, job) for job in JOBS}


def _tiny_signature(mean: float = 0.0, std: float = 1.0) -> ModelSignature:
    prep = Preprocessing(mean=[mean] * 5, std=[std] * 5)
    return ModelSignature("classification", [f"f{i}" for i in range(5)], ["a", "b", "c"], 3, prep)


def _run(path: Path) -> Any:
    return load_onnx(path) if path.suffix == ".onnx" else load_torchscript(path)


# --- the exported files answer raw rows like the float model ------------------------------------


@onnx_installed
@pytest.mark.parametrize("job", JOBS)
def test_every_export_answers_raw_rows_like_the_float_model(
    job: str, trained: dict[str, Trained], tmp_path: Path
) -> None:
    t = trained[job]
    results = {r.format: r for r in run_exports(t.model, t.sig, t.x_raw, t.y_raw, tmp_path, ALL, max_drop=0.02)}
    assert {f: r.status for f, r in results.items()} == dict.fromkeys(ALL, "written"), results
    expected = t.float_answers()
    rows = torch.from_numpy(t.x_raw)
    scale = t.prep.target_std if t.prep.regression else 1.0
    for fmt in ALL:
        got = _run(tmp_path / FILES[fmt])(rows).numpy()
        assert got.shape == expected.shape, fmt
        if fmt == "int8":
            if t.prep.regression:
                assert np.abs(got - expected).max() < 0.1 * scale
            else:
                assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.95
        else:
            assert np.abs(got - expected).max() < 1e-3 * scale, fmt
    # The standardization really is inside the graph: already-standardized rows give other answers.
    fed_standardized = _run(tmp_path / FILES["torchscript"])(torch.from_numpy(t.splits.x_test)).numpy()
    assert np.abs(fed_standardized - expected).max() > 0.1 * scale


@onnx_installed
def test_onnx_is_written_and_checked_with_onnxruntime(trained: dict[str, Trained], tmp_path: Path) -> None:
    t = trained["digits-mlp"]
    [result] = run_exports(t.model, t.sig, t.x_raw, t.y_raw, tmp_path, ["onnx"])
    assert result.status == "written" and result.passed is True, result.reason
    assert result.agreement is not None and result.agreement.argmax_agreement == 1.0
    assert result.to_json()["check"]["maxAbsDiff"] < 1e-4


@pytest.mark.parametrize("job", ["digits-mlp", "digits-lstm"])
def test_int8_answers_do_not_depend_on_the_rest_of_the_batch(
    job: str, trained: dict[str, Trained], tmp_path: Path
) -> None:
    t = trained[job]
    [result] = run_exports(t.model, t.sig, t.x_raw, t.y_raw, tmp_path, ["int8"])
    assert result.status == "written", result.reason
    assert result.agreement is not None and result.agreement.batch_dependence == 0.0
    run = load_torchscript(tmp_path / FILES["int8"])
    rows = torch.from_numpy(t.x_raw[:16])
    alone = torch.cat([run(rows[i : i + 1]) for i in range(16)])
    outlier = torch.full_like(rows[:1], 1000.0)  # a wild row would widen a per-batch activation range
    assert torch.equal(run(rows), alone)
    assert torch.equal(run(torch.cat([rows, outlier]))[:16], alone)


@pytest.mark.parametrize("arch", SPECS)
def test_torchscript_int8_and_onnx_build_for_every_architecture(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(SPECS[arch], num_features=5, num_outputs=3).eval()
    sig = _tiny_signature(mean=10.0, std=2.0)
    x_raw = (torch.randn(12, 5) * 2 + 10).numpy()
    y = np.arange(12) % 3
    # ONNX of the trained mlp and lstm is checked above; here only the architectures not trained there.
    with_onnx = arch in ("transformer", "residual_mlp") and not missing_onnx_packages()
    formats = ["torchscript", "int8", *(["onnx"] if with_onnx else [])]
    # Random weights and random labels: this checks the files build and load, not their quality.
    results = {r.format: r for r in run_exports(model, sig, x_raw, y, tmp_path, formats, max_drop=1.0)}
    assert {f: r.status for f, r in results.items()} == dict.fromkeys(formats, "written"), results
    with torch.no_grad():
        expected = model((torch.from_numpy(x_raw) - 10.0) / 2.0)
    scripted = load_torchscript(tmp_path / FILES["torchscript"])
    assert torch.allclose(scripted(torch.from_numpy(x_raw)), expected, atol=1e-4)


# --- the maxExportDrop gate ---------------------------------------------------------------------


def test_an_export_past_max_export_drop_is_refused_and_its_file_removed(
    trained: dict[str, Trained], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = trained["digits-mlp"]
    real_quantize = export_module.quantize_int8

    def damaged(model: nn.Module) -> nn.Module:
        # A quantization that mixes up classes 0 and 1 (about a fifth of digits' rows): a really worse model.
        broken = build_model(t.cfg.model.to_dict(), t.splits.num_features, t.splits.num_outputs)
        broken.load_state_dict(model.state_dict())
        with torch.no_grad():
            head = [m for m in broken.modules() if isinstance(m, nn.Linear)][-1]
            head.weight[[0, 1]] = head.weight[[1, 0]].clone()
            head.bias[[0, 1]] = head.bias[[1, 0]].clone()
        return real_quantize(broken)

    monkeypatch.setattr(export_module, "quantize_int8", damaged)
    (tmp_path / FILES["int8"]).write_bytes(b"a previous run's file")
    [result] = run_exports(t.model, t.sig, t.x_raw, t.y_raw, tmp_path, ["int8"], max_drop=0.02)
    assert result.status == "failed" and result.passed is False
    assert result.agreement is not None and result.agreement.drop > 0.1
    assert result.reason.startswith("int8 export: test accuracy drop ")
    assert f"{result.agreement.drop:.4f}" in result.reason and "output.maxExportDrop 0.02" in result.reason
    assert not (tmp_path / FILES["int8"]).exists()
    assert export_failures([result]) == [result.reason]
    assert result.to_json()["check"]["maxDrop"] == 0.02


@pytest.mark.parametrize(
    ("task", "reference", "exported", "y", "expected"),
    [
        # classification: 4 rows, export flips one correct answer -> agreement 0.75, accuracy 1.0 -> 0.75
        ("classification", [[2, 0], [0, 2], [2, 0], [0, 2]], [[2, 0], [0, 2], [0, 2], [0, 2]], [0, 1, 0, 1],
         {"metric": "accuracy", "float": 1.0, "export": 0.75, "drop": 0.25, "argmaxAgreement": 0.75,
          "maxAbsDiff": 2.0}),
        # an export that fixes a wrong answer has a negative drop
        ("classification", [[2, 0], [2, 0]], [[2, 0], [0, 2]], [0, 1],
         {"float": 0.5, "export": 1.0, "drop": -0.5, "argmaxAgreement": 0.5}),
        # regression: identical predictions -> no drop
        ("regression", [[1.0], [2.0], [3.0]], [[1.0], [2.0], [3.0]], [1.0, 2.0, 3.0],
         {"metric": "r2", "float": 1.0, "export": 1.0, "drop": 0.0, "maxAbsDiff": 0.0}),
        # regression: predictions off by 1 on a target with variance 2/3 -> R² 1 - 3/2 = -0.5
        ("regression", [[1.0], [2.0], [3.0]], [[2.0], [3.0], [4.0]], [1.0, 2.0, 3.0],
         {"float": 1.0, "export": -0.5, "drop": 1.5, "maxAbsDiff": 1.0}),
    ],
)  # fmt: skip
def test_compare_measures_agreement_and_drop(
    task: str, reference: list[Any], exported: list[Any], y: list[Any], expected: dict[str, Any]
) -> None:
    got = compare(task, np.array(reference), np.array(exported), np.array(y)).to_json()
    assert {k: got[k] for k in expected} == expected


def test_compare_refuses_outputs_of_another_shape() -> None:
    with pytest.raises(ValueError, match=r"export output shape \(2, 3\) differs from the float model's \(2, 2\)"):
        compare("classification", np.zeros((2, 2)), np.zeros((2, 3)), np.zeros(2))


@pytest.mark.parametrize(
    ("drop", "limit", "refused"), [(0.0, 0.02, False), (0.02, 0.02, False), (0.0201, 0.02, True), (-0.1, 0.0, False)]
)
def test_gate_message_refuses_only_a_drop_past_the_limit(drop: float, limit: float, refused: bool) -> None:
    agreement = compare("regression", np.array([[0.0], [2.0]]), np.array([[0.0], [2.0]]), np.array([0.0, 2.0]))
    agreement = type(agreement)(**{**agreement.__dict__, "export_score": agreement.float_score - drop})
    message = gate_message("onnx", agreement, limit)
    assert (message is not None) == refused
    if message:
        assert message.startswith("onnx export: test r2 drop 0.0201") and f"output.maxExportDrop {limit:g}" in message


def test_max_export_drop_is_read_and_range_checked() -> None:
    assert OutputConfig.from_dict({}, "m").max_export_drop == 0.02
    assert OutputConfig.from_dict({"maxExportDrop": 0}, "m").max_export_drop == 0.0
    assert OutputConfig.from_dict({"onnx": True, "quantizeInt8": True}, "m").export_formats == ["int8", "onnx"]
    with pytest.raises(ConfigError, match=r"output\.maxExportDrop: must be between 0 and 1, got 1\.5"):
        OutputConfig.from_dict({"maxExportDrop": 1.5}, "m")


# --- schema.json and the validator's artifacts entry --------------------------------------------


def test_schema_json_describes_the_raw_input_and_the_written_files(trained: dict[str, Trained], tmp_path: Path) -> None:
    t = trained["digits-mlp"]
    formats = ["torchscript", "onnx"] if not missing_onnx_packages() else ["torchscript"]
    run_exports(t.model, t.sig, t.x_raw, t.y_raw, tmp_path, formats)
    schema = json.loads((tmp_path / SCHEMA_FILE).read_text())
    assert schema["schemaVersion"] == SCHEMA_VERSION and schema["task"] == "classification"
    assert schema["input"] == {
        "name": "inputs", "dtype": "float32", "shape": ["batch", 64], "featureNames": t.splits.feature_names,
        "features": "raw", "standardizedInGraph": True, "encoding": None,
    }  # fmt: skip
    assert schema["output"]["classLabels"] == [str(i) for i in range(10)] and schema["output"]["kind"] == "logits"
    assert schema["output"]["shape"] == ["batch", 10] and schema["output"]["targetDestandardizedInGraph"] is False
    assert schema["normalization"]["mean"] == t.prep.mean
    assert schema["exports"]["torchscript"] == {"file": FILES["torchscript"], "runtime": "torch"}
    if "onnx" in formats:
        assert schema["exports"]["onnx"] == {"file": FILES["onnx"], "runtime": "onnxruntime", "opset": ONNX_OPSET}


def test_schema_json_for_regression_says_the_target_comes_back_in_its_units(
    trained: dict[str, Trained], tmp_path: Path
) -> None:
    t = trained["diabetes-mlp"]
    run_exports(t.model, t.sig, t.x_raw, t.y_raw, tmp_path, ["torchscript"])
    schema = json.loads((tmp_path / SCHEMA_FILE).read_text())
    assert schema["task"] == "regression" and schema["output"]["kind"] == "value"
    assert schema["output"]["targetDestandardizedInGraph"] is True and schema["output"]["classLabels"] == []
    assert schema["normalization"]["targetStd"] == pytest.approx(t.prep.target_std)


def test_schema_json_records_declared_categorical_columns() -> None:
    encoding = {"columns": ["size", "colour"], "categorical": {"colour": ["blue", "red"]}}
    names = ["size", "colour=blue", "colour=red"]
    sig = ModelSignature("regression", names, [], 1, Preprocessing([0.0] * 3, [1.0] * 3, regression=True), encoding)
    schema = build_schema(sig, [])
    assert schema["input"]["encoding"] == encoding and schema["input"]["shape"] == ["batch", 3]
    assert "already one-hot-encoded" in schema["input"]["note"]
    assert "note" not in build_schema(_tiny_signature(), [])["input"]


def test_validator_exports_record_the_check_and_the_schema(trained: dict[str, Trained]) -> None:
    t = trained["digits-mlp"]
    cfg = JobConfig.from_dict(
        {**raw_config(t.cfg.artifact_root, name="digits-mlp", **JOBS["digits-mlp"]),
         "paths": {"artifactRoot": str(t.cfg.artifact_root), "runDir": str(t.cfg.run_dir)},
         "output": {"torchscript": True, "quantizeInt8": True, "maxExportDrop": 0.05}}
    )  # fmt: skip
    artifacts, failures = _exports(cfg, t.model, t.splits)
    assert failures == []
    exports = {e["format"]: e for e in artifacts["exports"]}
    assert exports["int8"]["status"] == "written" and exports["int8"]["path"] == "digits-mlp/exports/" + FILES["int8"]
    assert exports["int8"]["check"]["maxDrop"] == 0.05 and exports["int8"]["check"]["rows"] == len(t.splits.x_test)
    assert artifacts["exportSchema"] == "digits-mlp/exports/schema.json"
    assert (cfg.run_dir / "exports" / SCHEMA_FILE).is_file()


# --- recorded, not raised -------------------------------------------------------------------------


def test_onnx_is_skipped_with_a_reason_when_a_package_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    model = build_model(SPECS["mlp"], num_features=5, num_outputs=3)
    sig = _tiny_signature()
    [result] = run_exports(model, sig, np.zeros((2, 5), np.float32), np.zeros(2), tmp_path, ["onnx"])
    assert result.status == "skipped" and result.passed is None and "onnxruntime" in result.reason
    assert export_failures([result]) == []


def test_a_failing_export_is_recorded_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("no space left on device")

    monkeypatch.setattr("flownexus_trainer.export.export_torchscript", broken)
    model = build_model(SPECS["mlp"], num_features=5, num_outputs=3)
    sig = _tiny_signature()
    [result] = run_exports(model, sig, np.zeros((2, 5), np.float32), np.zeros(2), tmp_path, ["torchscript"])
    assert result.status == "failed" and "no space left" in result.reason
    assert export_failures([result]) == ["torchscript export: RuntimeError: no space left on device"]


def test_preprocessing_refuses_a_zero_std() -> None:
    with pytest.raises(ValueError, match=r"normalization\.std\[1\]: must be a finite number > 0, got 0\.0"):
        Preprocessing(mean=[0.0, 0.0], std=[1.0, 0.0])


def test_a_requested_export_past_max_export_drop_rejects_the_model_and_ships_nothing(
    trained: dict[str, Trained],
) -> None:
    t = trained["diabetes-mlp"]
    off = {"minMarginOverTrivial": -1.0, "minMarginOverLinear": -1.0, "maxOverfittingGap": 1.0,
           "requireConvergence": False, "maxLatencyP95Ms": None}
    cfg = JobConfig.from_dict(
        {**raw_config(t.cfg.artifact_root, name="diabetes-mlp", **JOBS["diabetes-mlp"]),
         "paths": {"artifactRoot": str(t.cfg.artifact_root), "runDir": str(t.cfg.run_dir)},
         "validation": off,
         # int8 changes a regression model's answers a little: any R² drop is past a limit of 0.
         "output": {"torchscript": True, "quantizeInt8": True, "maxExportDrop": 0.0}}
    )  # fmt: skip
    verdict = validate(cfg)
    assert verdict["passed"] is False
    assert [f["name"] for f in verdict["failedThresholds"]] == ["maxExportDrop"]
    assert "int8" in verdict["failedThresholds"][0]["message"]
    assert "modelArchive" not in verdict["artifacts"] and "exports" not in verdict["artifacts"]
    assert not (cfg.run_dir / "model-store" / "diabetes-mlp.mar").exists()
    assert not list((cfg.run_dir / "exports").glob("*.pt")) and not (cfg.run_dir / "exports" / SCHEMA_FILE).exists()
