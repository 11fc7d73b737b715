"""The TorchServe handler with a mock context and a tiny model, laid out as an unpacked archive."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ts.metrics.metric_type_enum import MetricTypes
from ts.utils.util import PredictionException

from flownexus_trainer import handler as handler_module
from flownexus_trainer.data import canonical_label
from flownexus_trainer.distributed import DistContext
from flownexus_trainer.export import stage_archive
from flownexus_trainer.handler import (
    LATENCY_METRIC,
    UNSEEN_METRIC,
    FlowNexusHandler,
    canonical_category,
    make_schema,
    parse_request,
    parse_rows,
)
from flownexus_trainer.models import build_model
from flownexus_trainer.progress import Progress
from flownexus_trainer.train import Trainer

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)

FEATURES = 4


class Recorder:
    def __init__(self) -> None:
        self.reports: list[Progress] = []

    def report(self, progress: Progress) -> None:
        self.reports.append(progress)


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


# --- object rows keyed by column name, categorical columns ---------------------------------------

SCHEMA = {"columns": ["size", "color", "weight"], "categorical": {"color": ["1", "blue", "red"]}}


@pytest.mark.parametrize(
    ("row", "features", "unseen"),
    [
        ({"size": 2, "color": "red", "weight": 0.5}, [2.0, 0.0, 0.0, 1.0, 0.5], []),
        ({"weight": 0.5, "color": "blue", "size": 2}, [2.0, 0.0, 1.0, 0.0, 0.5], []),  # key order does not matter
        ({"size": 2, "color": 1.0, "weight": 0}, [2.0, 1.0, 0.0, 0.0, 0.0], []),  # 1.0 is category "1"
        ({"size": 2, "color": " 1 ", "weight": 0}, [2.0, 1.0, 0.0, 0.0, 0.0], []),
        ({"size": 2, "color": "purple", "weight": 0}, [2.0, 0.0, 0.0, 0.0, 0.0], ["color"]),  # unseen: zeros
    ],
)
def test_object_rows_are_one_hot_encoded_like_training(
    row: dict[str, Any], features: list[float], unseen: list[str]
) -> None:
    assert parse_request({"inputs": [row]}, 5, SCHEMA) == ([features], [unseen])


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"size": 2, "weight": 0.5}, r'inputs\[0\]: missing column "color"'),
        ({"size": 2, "color": "red", "weight": "x"}, r'inputs\[0\]\["weight"\]: expected a finite number, got .x.'),
        ({"size": None, "color": "red", "weight": 1}, r'inputs\[0\]\["size"\]: expected a finite number, got None'),
        ({"size": 2, "color": True, "weight": 1}, r'inputs\[0\]\["color"\]: expected a category'),
        ({"size": 2, "color": "red", "weight": 1, "colour": "x"}, r'inputs\[0\]: unknown column "colour"'),
    ],
)
def test_object_rows_name_the_missing_column_or_bad_value(row: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_request({"inputs": [row]}, 5, SCHEMA)


def test_object_rows_without_a_schema_ask_for_numbers() -> None:
    with pytest.raises(ValueError, match="this model has no column names; send a list of 5 numbers"):
        parse_request({"inputs": {"a": 1}}, 5, None)


@pytest.mark.parametrize("text", ["1", "1.0", " 1 ", "01", "-0", "2.50", "1e3", "cat", " Cat ", "1_000", "inf", "0.1"])
def test_serving_spells_categories_as_training_does(text: str) -> None:
    assert canonical_category(text) == canonical_label(text)


def test_a_schema_that_does_not_match_the_model_is_refused() -> None:
    spec = {"numFeatures": 4, "inputSchema": SCHEMA}
    with pytest.raises(ValueError, match="inputSchema gives 5 features"):
        make_schema(spec)
    assert make_schema({"numFeatures": 2, "featureNames": ["a", "b"]}) == {"columns": ["a", "b"], "categorical": {}}
    assert make_schema({"numFeatures": 3, "featureNames": ["a", "b"]}) is None


def test_object_rows_on_a_model_without_column_names_are_a_400(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler, context = make_handler(tmp_path, monkeypatch)  # featureNames absent: numeric rows only
    with pytest.raises(PredictionException) as raised:
        handler.handle([request({"inputs": {"a": 1}})], context)
    assert raised.value.error_code == 400 and "no column names" in raised.value.message


def test_categorical_round_trip_train_on_csv_then_serve_an_object_row(
    make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CSV whose label is decided by a category: the real trainer learns it, the handler answers by name."""
    rng = np.random.default_rng(0)
    colors = ["red", "green", "blue"]
    lines = ["size,color,label"]
    for _ in range(240):
        color = colors[int(rng.integers(3))]
        lines.append(f"{rng.normal():.3f},{color},{'warm' if color == 'red' else 'cold'}")
    (tmp_path / "paint.csv").write_text("\n".join(lines) + "\n")
    cfg = make_config(
        dataset={"source": "file", "path": "paint.csv", "targetColumn": "label", "categoricalColumns": ["color"]},
        training={"epochs": 8},
    )
    Trainer(cfg, SINGLE, Recorder()).run()
    model_dir = cfg.run_dir / "model"
    spec = json.loads((model_dir / "model_config.json").read_text())
    assert spec["inputSchema"] == {"columns": ["size", "color"], "categorical": {"color": ["blue", "green", "red"]}}
    assert spec["featureNames"] == ["size", "color=blue", "color=green", "color=red"]

    unpacked = tmp_path / "unpacked"
    stage_archive(model_dir, unpacked)
    monkeypatch.syspath_prepend(str(unpacked))
    for name in ("served_model", "flownexus_models"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    context = FakeContext(unpacked)
    handler = FlowNexusHandler()
    handler.initialize(context)
    rows = [{"size": 0.1, "color": "red"}, {"size": 0.1, "color": "blue"}, {"size": 0.1, "color": "purple"}]
    [response] = handler.handle([request({"inputs": rows})], context)
    warm, cold, unseen = response["predictions"]
    assert warm["label"] == "warm" and cold["label"] == "cold"
    assert unseen["unseenCategories"] == ["color"] and "unseenCategories" not in warm
    counter, kind, dims = context.metrics.registered[UNSEEN_METRIC]
    assert kind == MetricTypes.COUNTER and dims == ["ModelName", "ModelVersion", "Column"]
    assert counter.observed == [(1, ["tiny", "2.0", "color"])]
    # The same row as numbers (size, then the one-hot columns) gives the same answer.
    [numeric] = handler.handle([request({"inputs": [[0.1, 0.0, 0.0, 1.0]]})], context)
    assert numeric["predictions"][0]["probabilities"] == warm["probabilities"]
    with pytest.raises(PredictionException) as raised:
        handler.handle([request({"inputs": {"size": "big", "color": "red"}})], context)
    assert raised.value.error_code == 400 and 'inputs[0]["size"]: expected a finite number' in raised.value.message
