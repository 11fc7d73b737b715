"""TorchServe handler for Flow Nexus models: JSON rows in, predictions with probabilities out.

Shipped inside every model archive, so it imports only torch and TorchServe. Request body:
``{"inputs": [[f1, f2, ...], ...]}`` (a batch) or ``{"inputs": [f1, f2, ...]}`` / a bare list (one row),
the model's features in order. A row may also be an object keyed by the original column names,
``{"inputs": [{"age": 31, "color": "red"}, ...]}`` or ``{"inputs": {...}}``: the handler applies the
one-hot mapping of categorical columns saved with the model (``inputSchema`` in ``model_config.json``;
``featureNames`` for models without one), then the standardization. A category unseen in training
encodes as all zeros; the prediction then lists it in ``unseenCategories`` and the counter
``flownexus_unseen_categories_total`` counts it per column.
Response per request: ``{"predictions": [{"label", "index", "probabilities"}]}`` for classification,
``{"predictions": [{"value"}]}`` for regression. Malformed input answers 400 with the reason.

A custom trainer's archive (``"rawInput": true`` in ``model_config.json``, flownexus_trainer.sdk) holds a
TorchScript graph that standardizes inside and answers in the target's units: the handler then passes the
encoded rows as they are and leaves the outputs alone; the request and response are the same.

Latency: TorchServe's own metrics have no histogram, so the handler publishes one,
``flownexus_inference_latency_seconds``: the time inside the handler (parse, forward, format) for each
answered request; the frontend's queueing and batching delay is not in it. The frontend's Prometheus buckets are fixed
(0.005 ... 10); observing seconds makes them span 5 ms ... 10 s, and 0.1 s is a bucket edge, so
a "p99 <= 100 ms" check is exact at the threshold.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

LATENCY_METRIC = "flownexus_inference_latency_seconds"
UNSEEN_METRIC = "flownexus_unseen_categories_total"
MAX_ROWS_PER_REQUEST = 1024
_LISTED_COLUMNS = 20

# The input schema: {"columns": [names a client sends, in order], "categorical": {name: [categories]}}.
Schema = dict[str, Any]


def canonical_category(value: Any) -> str:
    """The spelling training used for a category (data.canonical_label): 1, 1.0, "1", " 1 " are "1"."""
    s = str(value).strip()
    if "_" in s:
        return s
    try:
        number = float(s)
    except ValueError:
        return s
    if not math.isfinite(number):
        return s
    if number.is_integer() and abs(number) < 2**53:
        return str(int(number))
    return repr(number)


def make_schema(spec: dict[str, Any]) -> Schema | None:
    """The input schema of a model_config.json, or None when rows can only be numeric lists.

    Models trained before ``inputSchema`` existed have ``featureNames``: one column per feature.
    A schema whose one-hot width does not match ``numFeatures`` is an error (the archive is broken).
    """
    num_features = int(spec["numFeatures"])
    raw = spec.get("inputSchema")
    if raw is None:
        names = spec.get("featureNames") or []
        if len(names) != num_features or len(set(names)) != len(names):
            return None
        raw = {"columns": names, "categorical": {}}
    columns = [str(c) for c in raw.get("columns") or []]
    categorical = {str(k): [str(c) for c in v] for k, v in (raw.get("categorical") or {}).items()}
    width = sum(len(categorical[c]) if c in categorical else 1 for c in columns)
    if width != num_features or not set(categorical) <= set(columns):
        raise ValueError(
            f"model_config.json: inputSchema gives {width} features for columns {columns[:_LISTED_COLUMNS]}, "
            f"the model has {num_features}"
        )
    return {"columns": columns, "categorical": categorical}


def _listed(columns: list[str]) -> str:
    more = f" and {len(columns) - _LISTED_COLUMNS} more" if len(columns) > _LISTED_COLUMNS else ""
    return ", ".join(f'"{c}"' for c in columns[:_LISTED_COLUMNS]) + more


def encode_object_row(row: dict[str, Any], schema: Schema, where: str) -> tuple[list[float], list[str]]:
    """One ``{"column": value}`` row as the model's features, and the columns whose category was unseen."""
    columns: list[str] = schema["columns"]
    categorical: dict[str, list[str]] = schema["categorical"]
    unknown = [k for k in row if k not in categorical and k not in columns]
    if unknown:
        raise ValueError(f'{where}: unknown column "{unknown[0]}" (columns: {_listed(columns)})')
    features: list[float] = []
    unseen: list[str] = []
    for column in columns:
        if column not in row:
            raise ValueError(f'{where}: missing column "{column}" (columns: {_listed(columns)})')
        value = row[column]
        if column in categorical:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ValueError(f'{where}["{column}"]: expected a category (a string), got {value!r}')
            categories = categorical[column]
            category = canonical_category(value)
            one_hot = [1.0 if c == category else 0.0 for c in categories]
            if category not in categories:
                unseen.append(column)
            features.extend(one_hot)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f'{where}["{column}"]: expected a finite number, got {value!r}')
        else:
            features.append(float(value))
    return features, unseen


def parse_request(
    body: Any, num_features: int, schema: Schema | None = None
) -> tuple[list[list[float]], list[list[str]]]:
    """Turn one request body into feature rows (and, per row, the columns with an unseen category).

    Raises ValueError naming the bad part. ValueError rather than an own exception class: TorchServe
    requires the handler module to define exactly one class.
    """
    if body is None or body in (b"", ""):
        raise ValueError('empty request body: send {"inputs": [[...], ...]} as JSON')
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", errors="replace")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except json.JSONDecodeError as exc:
            raise ValueError(f"body is not valid JSON: {exc.msg}") from exc
    if isinstance(body, dict):
        if "inputs" not in body:
            raise ValueError('body must be {"inputs": [[...], ...]} or a list of numbers')
        body = body["inputs"]
        if isinstance(body, dict):
            body = [body]  # {"inputs": {"column": value, ...}}: one object row
    if not isinstance(body, list) or not body:
        raise ValueError("inputs: expected a non-empty list")
    rows = body if isinstance(body[0], (list, dict)) else [body]
    if len(rows) > MAX_ROWS_PER_REQUEST:
        raise ValueError(f"inputs: at most {MAX_ROWS_PER_REQUEST} rows per request, got {len(rows)}")
    out: list[list[float]] = []
    unseen: list[list[str]] = []
    for i, row in enumerate(rows):
        where = f"inputs[{i}]" if rows is body else "inputs"
        if isinstance(row, dict):
            if schema is None:
                raise ValueError(f"{where}: this model has no column names; send a list of {num_features} numbers")
            features, missed = encode_object_row(row, schema, where)
            out.append(features)
            unseen.append(missed)
            continue
        if not isinstance(row, list) or len(row) != num_features:
            size = len(row) if isinstance(row, list) else type(row).__name__
            raise ValueError(f"{where}: expected {num_features} features, got {size}")
        for j, value in enumerate(row):
            # bool is an int in Python, but true/false is not a feature value.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{where}[{j}]: expected a finite number, got {value!r}")
        out.append(row)
        unseen.append([])
    return out, unseen


def parse_rows(body: Any, num_features: int, schema: Schema | None = None) -> list[list[float]]:
    """The feature rows of one request body (see parse_request)."""
    return parse_request(body, num_features, schema)[0]


class FlowNexusHandler(BaseHandler):  # type: ignore[misc]
    """BaseHandler loads the model; this adds input parsing (numeric or object rows), standardization and the
    output format."""

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        model_dir = Path(context.system_properties.get("model_dir"))
        spec = json.loads((model_dir / "model_config.json").read_text(encoding="utf-8"))
        norm = json.loads((model_dir / "normalization.json").read_text(encoding="utf-8"))
        self.task: str = spec["task"]
        self.num_features: int = spec["numFeatures"]
        self.labels: list[str] = spec.get("classLabels") or []
        self.schema: Schema | None = make_schema(spec)
        self.mean = torch.tensor(norm["mean"], dtype=torch.float32)
        self.std = torch.tensor(norm["std"], dtype=torch.float32)
        self.target_mean, self.target_std = float(norm.get("targetMean", 0.0)), float(norm.get("targetStd", 1.0))
        # A custom trainer's TorchScript: raw features in, logits or target units out (the graph standardizes).
        self.raw_input = bool(spec.get("rawInput", False))
        self.version = str(context.manifest.get("model", {}).get("modelVersion", ""))
        self.latency = context.metrics.add_metric_to_cache(
            LATENCY_METRIC, unit="s", dimension_names=["ModelName", "ModelVersion"], metric_type=MetricTypes.HISTOGRAM
        )
        self.unseen_metric = context.metrics.add_metric_to_cache(
            UNSEEN_METRIC,
            unit="count",
            dimension_names=["ModelName", "ModelVersion", "Column"],
            metric_type=MetricTypes.COUNTER,
        )
        self._batch: list[tuple[int, str | None]] = []
        self._unseen: list[list[str]] = []
        self._started = 0.0

    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        """All valid rows of the batch as one standardized tensor; bad requests are marked 400."""
        self._started = time.perf_counter()
        rows: list[list[float]] = []
        self._batch = []
        self._unseen = []
        for idx, request in enumerate(data):
            body = request.get("data") if request.get("data") is not None else request.get("body")
            try:
                parsed, unseen = parse_request(body, self.num_features, self.schema)
            except ValueError as exc:
                self._batch.append((0, str(exc)))
                self.context.set_response_status(code=400, phrase=str(exc), idx=idx)
                continue
            self._batch.append((len(parsed), None))
            rows.extend(parsed)
            self._unseen.extend(unseen)
        if not rows:
            # Every request in the batch is malformed (the usual single-request case): answer 400.
            raise PredictionException(self._batch[0][1] if self._batch else "empty request", 400)
        features = torch.tensor(rows, dtype=torch.float32)
        return features if self.raw_input else (features - self.mean) / self.std

    def postprocess(self, data: torch.Tensor) -> list[dict[str, Any]]:
        """Split the batch output back into one response per request, and observe the latency."""
        predictions = self._format(data.float().cpu())
        for prediction, unseen in zip(predictions, self._unseen, strict=True):
            if unseen:
                # Encoded as all zeros: the answer is still given, and the client is told.
                prediction["unseenCategories"] = unseen
                for column in unseen:
                    self.unseen_metric.add_or_update(1, [self.context.model_name, self.version, column])
        responses: list[dict[str, Any]] = []
        offset = 0
        for count, error in self._batch:
            if error is not None:
                responses.append({"error": error})
                continue
            responses.append({"predictions": predictions[offset : offset + count]})
            offset += count
        elapsed = time.perf_counter() - self._started
        for _ in range(sum(1 for _, error in self._batch if error is None)):
            self.latency.add_or_update(elapsed, [self.context.model_name, self.version])
        return responses

    def _format(self, output: torch.Tensor) -> list[dict[str, Any]]:
        if self.task == "regression":
            values = output.reshape(-1) if self.raw_input else output.squeeze(-1) * self.target_std + self.target_mean
            return [{"value": float(v)} for v in values]
        probs = torch.softmax(output, dim=-1)
        labels = self.labels or [str(i) for i in range(probs.shape[-1])]
        return [
            {
                "label": labels[int(row.argmax())],
                "index": int(row.argmax()),
                "probabilities": {label: round(float(p), 6) for label, p in zip(labels, row, strict=True)},
            }
            for row in probs
        ]
