"""The custom-trainer SDK in one process: the data it gives, what it reports and checkpoints, the model it exports,
and that the validator, the archive and the serving handler take that model without the user's code."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flownexus_trainer import sdk, validate
from flownexus_trainer.config import load_config
from flownexus_trainer.data import load_splits
from flownexus_trainer.export import StandardizedInput, build_mar, stage_archive
from flownexus_trainer.handler import FlowNexusHandler
from tests.unit.trainer.test_handler import FakeContext


def write_config(root: Path, dataset: dict[str, Any], **extra: Any) -> Path:
    raw = {
        "name": "byom",
        "namespace": "unit",
        "model": {"architecture": "custom"},
        "dataset": dataset,
        "training": {"epochs": 40, "batchSize": 32, "learningRate": 0.01},
        "validation": {"minAccuracy": 0.8, "maxLatencyP95Ms": None},
        "output": {"modelName": "byom", "version": "1.0.0"},
        "paths": {"artifactRoot": str(root), "runDir": str(root / "unit" / "byom")},
        **extra,
    }
    path = root / "config.json"
    path.write_text(json.dumps(raw))
    return path


class Net(nn.Module):
    """A user's network: standardized rows in, logits (or one value) out."""

    def __init__(self, features: int, outputs: int, flat: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, outputs))
        self.flat = flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out.squeeze(-1) if self.flat else out


def train(ctx: sdk.Context, epochs: int, start: int = 0, net: nn.Module | None = None) -> nn.Module:
    """The smallest loop that keeps the contract: full-batch steps, a report and a checkpoint per epoch."""
    data = ctx.load_data()
    torch.manual_seed(0)
    net = net or Net(data.num_features, data.num_outputs, flat=data.task == "regression")
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    x, y, _, _ = data.tensors()
    for epoch in range(start + 1, epochs + 1):
        opt.zero_grad()
        out = net(x)
        loss = F.cross_entropy(out, y) if data.task == "classification" else F.mse_loss(out, y)
        loss.backward()
        opt.step()
        val = ctx.evaluate(net)
        ctx.report_epoch(epoch, loss.item(), val["loss"], val_accuracy=val.get("accuracy"), lr=0.05)
        ctx.save_checkpoint(epoch, {"model": net.state_dict(), "optimizer": opt.state_dict()})
    return net


@pytest.fixture
def iris(tmp_path: Path) -> tuple[sdk.Context, Path]:
    config = write_config(tmp_path, {"source": "builtin", "name": "iris"})
    return sdk.init(config), config


def test_load_data_gives_train_and_validation_rows_only(iris: tuple[sdk.Context, Path]) -> None:
    ctx, config = iris
    data = ctx.load_data()
    splits = load_splits(load_config(config).dataset)
    assert not hasattr(data, "x_test") and not hasattr(data, "y_test")
    np.testing.assert_array_equal(data.x_train, splits.x_train)
    np.testing.assert_array_equal(data.y_val, splits.y_val)
    assert (data.num_features, data.num_classes, data.num_outputs, data.task) == (4, 3, 3, "classification")
    assert data.class_labels == splits.class_labels and ctx.normalization == splits.normalization
    # Nothing the SDK keeps for the export holds a test row either.
    assert ctx._splits is not None and len(ctx._splits.x_test) == 0 and len(ctx._splits.y_test) == 0


def test_epoch_indices_shard_the_training_rows_like_the_builtin_trainer(iris: tuple[sdk.Context, Path]) -> None:
    ctx, _ = iris
    first, again, other = ctx.epoch_indices(1), ctx.epoch_indices(1), ctx.epoch_indices(2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert sorted(first.tolist()) == list(range(len(ctx.load_data().x_train)))


def test_export_writes_a_raw_input_torchscript_that_the_validator_loads_without_the_users_code(
    iris: tuple[sdk.Context, Path],
) -> None:
    ctx, _ = iris
    net = train(ctx, 5)
    path = ctx.export(net)
    assert path == ctx.run_dir / "model" / "model.pt"
    spec = json.loads((ctx.run_dir / "model" / "model_config.json").read_text())
    assert (spec["format"], spec["rawInput"], spec["numFeatures"], spec["numOutputs"]) == ("torchscript", True, 4, 3)
    assert spec["inputSchema"]["columns"] == spec["featureNames"]
    data = ctx.load_data()
    raw = torch.from_numpy(data.normalization.invert(data.x_val).astype(np.float32))
    graph = torch.jit.load(str(path))
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(data.x_val))
        torch.testing.assert_close(graph(raw), expected, atol=1e-4, rtol=1e-4)
        model, _ = validate.load_trained_model(ctx.run_dir / "model")
        assert isinstance(model, StandardizedInput)
        torch.testing.assert_close(model(torch.from_numpy(data.x_val)), expected, atol=1e-4, rtol=1e-4)
    summary = json.loads((ctx.run_dir / "training_summary.json").read_text())
    assert summary["epochsRun"] == 5 and summary["trainer"] == "custom" and summary["stoppedEarly"] is False
    assert summary["datasetFingerprint"] == load_splits(ctx.config.dataset).fingerprint


def test_report_epoch_writes_the_metrics_lines_and_a_resumed_run_drops_the_ones_after_its_checkpoint(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, {"source": "builtin", "name": "iris"})
    first = sdk.init(config)
    train(first, 6)
    (first.checkpoint_dir / "ckpt-epoch-00006.pt").unlink()  # killed after epoch 6 was logged, before its checkpoint
    second = sdk.init(config)
    resumed = second.load_checkpoint()
    assert resumed is not None and resumed.epoch == 5 and set(resumed.state) == {"model", "optimizer"}
    net = Net(4, 3)
    net.load_state_dict(resumed.state["model"])
    train(second, 8, start=resumed.epoch, net=net)
    lines = [json.loads(line) for line in (tmp_path / "unit" / "byom" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == list(range(1, 9))
    assert {"loss", "valLoss", "valAccuracy", "learningRate", "totalEpochs"} <= set(lines[-1])
    second.export(net)
    summary = json.loads((tmp_path / "unit" / "byom" / "training_summary.json").read_text())
    assert summary["resumedFrom"].endswith("ckpt-epoch-00005.pt") and summary["epochsRun"] == 8
    assert summary["best"]["epoch"] >= 1


def test_export_refuses_a_module_whose_output_breaks_the_contract(iris: tuple[sdk.Context, Path]) -> None:
    ctx, _ = iris
    with pytest.raises(ValueError, match=r"returned shape \(\d+, 2\) .* needs \(\d+, 3\)"):
        ctx.export(Net(4, 2))
    with pytest.raises(ValueError, match=r"example_rows must be raw feature rows \[N >= 2, 4\]"):
        ctx.export(Net(4, 3), np.zeros((3, 5)))


def test_a_custom_model_passes_the_gate_and_its_archive_holds_torchscript_only(iris: tuple[sdk.Context, Path]) -> None:
    ctx, config = iris
    ctx.export(train(ctx, 40))
    cfg = load_config(config)
    verdict = validate.validate(cfg)
    assert verdict["passed"], verdict["failedThresholds"]
    assert verdict["metrics"]["testAccuracy"] >= 0.8 and verdict["metrics"]["converged"] is True
    with zipfile.ZipFile(ctx.run_dir / "model-store" / "byom.mar") as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        assert "served_model.py" not in mar.namelist() and "flownexus_models.py" not in mar.namelist()
    assert "modelFile" not in manifest["model"] and manifest["model"]["serializedFile"] == "model.pt"


def test_the_exports_of_a_custom_model_are_its_graph_onnx_and_no_int8(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {"source": "builtin", "name": "iris"},
        output={"torchscript": True, "onnx": True, "quantizeInt8": True},
    )
    ctx = sdk.init(config)
    ctx.export(train(ctx, 40))
    verdict = validate.validate(load_config(config))
    exports = {e["format"]: e for e in verdict["artifacts"]["exports"]}
    assert exports["torchscript"]["status"] == "written" and exports["torchscript"]["check"]["argmaxAgreement"] == 1.0
    assert exports["int8"]["status"] == "skipped" and "custom" in exports["int8"]["reason"]
    assert exports["onnx"]["status"] in {"written", "skipped"}
    assert verdict["passed"], verdict["failedThresholds"]


def serve(model_dir: Path, staging: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FlowNexusHandler, FakeContext]:
    stage_archive(model_dir, staging)
    monkeypatch.syspath_prepend(str(staging))
    monkeypatch.delitem(sys.modules, "served_model", raising=False)
    context = FakeContext(staging)
    context.manifest = {"model": {"modelName": "tiny", "modelVersion": "2.0", "serializedFile": "model.pt"}}
    handler = FlowNexusHandler()
    handler.initialize(context)
    return handler, context


def test_the_handler_serves_a_custom_classifier_from_raw_rows(
    iris: tuple[sdk.Context, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, _ = iris
    net = train(ctx, 30)
    ctx.export(net)
    handler, context = serve(ctx.run_dir / "model", tmp_path / "unpacked", monkeypatch)
    data = ctx.load_data()
    raw = data.normalization.invert(data.x_val[:5])
    [answer] = handler.handle([{"body": json.dumps({"inputs": raw.tolist()}).encode()}], context)
    with torch.no_grad():
        expected = torch.softmax(net.eval()(torch.from_numpy(data.x_val[:5])), -1)
    for prediction, probs in zip(answer["predictions"], expected, strict=True):
        assert prediction["index"] == int(probs.argmax())
        assert prediction["label"] == data.class_labels[int(probs.argmax())]
        assert list(prediction["probabilities"].values()) == pytest.approx(probs.tolist(), abs=1e-4)


def test_the_handler_serves_a_custom_regression_in_target_units(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = sdk.init(write_config(tmp_path, {"source": "builtin", "name": "diabetes"}))
    net = train(ctx, 5)
    ctx.export(net)
    handler, context = serve(ctx.run_dir / "model", tmp_path / "unpacked", monkeypatch)
    data = ctx.load_data()
    norm = data.normalization
    row = {name: float(v) for name, v in zip(data.feature_names, norm.invert(data.x_val[:1])[0], strict=True)}
    [answer] = handler.handle([{"body": json.dumps({"inputs": row}).encode()}], context)
    with torch.no_grad():
        expected = float(net.eval()(torch.from_numpy(data.x_val[:1]))[0]) * norm.target_std + norm.target_mean
    assert answer["predictions"][0]["value"] == pytest.approx(expected, rel=1e-4)


def test_build_mar_archives_a_custom_model_without_a_model_file(iris: tuple[sdk.Context, Path], tmp_path: Path) -> None:
    ctx, _ = iris
    ctx.export(Net(4, 3))
    mar = build_mar(ctx.run_dir / "model", tmp_path / "store", "byom", "1.0.0")
    with zipfile.ZipFile(mar) as archive:
        names = set(archive.namelist())
    assert {"model.pt", "flownexus_handler.py", "model_config.json", "normalization.json"} <= names
