"""The TorchServe handler with a mock context and a tiny model, laid out as an unpacked archive."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from ts.metrics.metric_type_enum import MetricTypes
from ts.utils.util import PredictionException

from flownexus_trainer import handler as handler_module
from flownexus_trainer.export import stage_archive
from flownexus_trainer.handler import LATENCY_METRIC, FlowNexusHandler, parse_rows
from flownexus_trainer.models import build_model

FEATURES = 4


class FakeMetric:
    def __init__(self) -> None:
        self.observed: list[tuple[float, list[str]]] = []

    def add_or_update(self, value: float, dimension_values: list[str]) -> None:
        self.observed.append((value, dimension_values))


class FakeMetrics:
    def __init__(self) -> None:
        self.registered: dict[str, tuple[FakeMetric, MetricTypes, list[str]]] = {}

    def add_metric_to_cache(
        self, name: str, unit: str, dimension_names: list[str], metric_type: MetricTypes
    ) -> FakeMetric:
        metric = FakeMetric()
        self.registered[name] = (metric, metric_type, dimension_names)
        return metric

    def add_time(self, *args: Any, **kwargs: Any) -> None:
        pass


class FakeContext:
    """The parts of ts.context.Context that BaseHandler and our handler touch."""

    def __init__(self, model_dir: Path) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.manifest = {"model": {"modelName": "tiny", "modelVersion": "2.0", "modelFile": "served_model.py",
                                   "serializedFile": "model.pt"}}  # fmt: skip
        self.model_name = "tiny"
        self.model_yaml_config: dict[str, Any] = {}
        self.metrics = FakeMetrics()
        self.statuses: dict[int, tuple[int, str]] = {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def get_request_header(self, idx: int, key: str) -> None:
        return None


def trained_model_dir(root: Path, task: str) -> Path:
    model_dir = root / "model"
    model_dir.mkdir()
    spec = {"architecture": "mlp", "hiddenSizes": [8]}
    outputs = 3 if task == "classification" else 1
    torch.save(build_model(spec, FEATURES, outputs).state_dict(), model_dir / "model.pt")
    config = {"model": spec, "numFeatures": FEATURES, "numOutputs": outputs, "task": task,
              "classLabels": ["setosa", "versicolor", "virginica"] if outputs == 3 else []}  # fmt: skip
    (model_dir / "model_config.json").write_text(json.dumps(config))
    norm = {"mean": [1.0] * FEATURES, "std": [2.0] * FEATURES, "targetMean": 100.0, "targetStd": 10.0}
    (model_dir / "normalization.json").write_text(json.dumps(norm))
    return model_dir


def make_handler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: str = "classification"
) -> tuple[FlowNexusHandler, FakeContext]:
    unpacked = tmp_path / "unpacked"
    stage_archive(trained_model_dir(tmp_path, task), unpacked)
    # TorchServe puts the unpacked archive on sys.path; forget modules another test imported.
    monkeypatch.syspath_prepend(str(unpacked))
    for name in ("served_model", "flownexus_models"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    context = FakeContext(unpacked)
    handler = FlowNexusHandler()
    handler.initialize(context)
    return handler, context


def request(body: Any) -> dict[str, Any]:
    return {"body": json.dumps(body).encode()}


def test_single_vector_gets_one_prediction_with_probabilities(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handler, context = make_handler(tmp_path, monkeypatch)
    [response] = handler.handle([request([0.5, 1.0, 2.0, 3.0])], context)
    [prediction] = response["predictions"]
    assert prediction["label"] in {"setosa", "versicolor", "virginica"}
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_batched_requests_are_split_back_per_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handler, context = make_handler(tmp_path, monkeypatch)
    rows = [[0.0] * FEATURES, [1.0] * FEATURES]
    responses = handler.handle([request({"inputs": rows}), {"data": {"inputs": [2.0] * FEATURES}}], context)
    assert [len(r["predictions"]) for r in responses] == [2, 1]
    metric, kind, dims = context.metrics.registered[LATENCY_METRIC]
    assert kind == MetricTypes.HISTOGRAM and dims == ["ModelName", "ModelVersion"]
    assert len(metric.observed) == 2 and metric.observed[0][1] == ["tiny", "2.0"]
    assert all(0 < seconds < 5 for seconds, _ in metric.observed)


def test_malformed_request_alone_is_a_400(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handler, context = make_handler(tmp_path, monkeypatch)
    with pytest.raises(PredictionException) as raised:
        handler.handle([request({"inputs": [1.0, 2.0]})], context)
    assert raised.value.error_code == 400 and "expected 4 features, got 2" in raised.value.message


def test_malformed_request_in_a_batch_fails_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handler, context = make_handler(tmp_path, monkeypatch)
    responses = handler.handle([request({"wrong": 1}), request([1.0] * FEATURES)], context)
    assert "error" in responses[0] and len(responses[1]["predictions"]) == 1
    assert context.statuses[0][0] == 400 and 1 not in context.statuses


def test_regression_values_come_back_in_target_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handler, context = make_handler(tmp_path, monkeypatch, task="regression")
    [response] = handler.handle([request({"inputs": [[1.0] * FEATURES]})], context)
    expected = handler.model(torch.zeros(1, FEATURES)).item() * 10.0 + 100.0  # inputs equal the mean: zeros
    assert response["predictions"][0]["value"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid JSON"),
        ({"inputs": []}, "non-empty list"),
        ({"inputs": [[1, 2, 3, 4], [1, 2]]}, r"inputs\[1\]: expected 4 features, got 2"),
        ({"inputs": [1, 2, "x", 4]}, r"inputs\[2\]: expected a finite number"),
        ({"inputs": [1, 2, True, 4]}, r"inputs\[2\]: expected a finite number"),
        (b'{"inputs": [1, 2, NaN, 4]}', "finite number"),
        ({"instances": [1, 2, 3, 4]}, "inputs"),
        (None, "empty request body"),
    ],
)
def test_parse_rows_names_what_is_wrong(body: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rows(body, FEATURES)


def test_handler_module_defines_exactly_one_class() -> None:
    # TorchServe refuses a handler module with more than one class of its own.
    own = [c for _, c in inspect.getmembers(handler_module, inspect.isclass) if c.__module__ == handler_module.__name__]
    assert own == [FlowNexusHandler]
