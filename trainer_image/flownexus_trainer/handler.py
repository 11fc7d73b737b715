"""TorchServe handler for Flow Nexus models: JSON rows in, predictions with probabilities out.

Shipped inside every model archive, so it imports only torch and TorchServe. Request body:
``{"inputs": [[f1, f2, ...], ...]}`` (a batch) or ``{"inputs": [f1, f2, ...]}`` / a bare list (one row).
Response per request: ``{"predictions": [{"label", "index", "probabilities"}]}`` for classification,
``{"predictions": [{"value"}]}`` for regression. Malformed input answers 400 with the reason.

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
MAX_ROWS_PER_REQUEST = 1024


def parse_rows(body: Any, num_features: int) -> list[list[float]]:
    """Turn one request body into feature rows, or raise ValueError naming the bad part.

    ValueError rather than an own exception class: TorchServe requires the handler module to define
    exactly one class.
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
    if not isinstance(body, list) or not body:
        raise ValueError("inputs: expected a non-empty list")
    rows = body if isinstance(body[0], list) else [body]
    if len(rows) > MAX_ROWS_PER_REQUEST:
        raise ValueError(f"inputs: at most {MAX_ROWS_PER_REQUEST} rows per request, got {len(rows)}")
    for i, row in enumerate(rows):
        where = f"inputs[{i}]" if rows is body else "inputs"
        if not isinstance(row, list) or len(row) != num_features:
            size = len(row) if isinstance(row, list) else type(row).__name__
            raise ValueError(f"{where}: expected {num_features} features, got {size}")
        for j, value in enumerate(row):
            # bool is an int in Python, but true/false is not a feature value.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{where}[{j}]: expected a finite number, got {value!r}")
    return rows


class FlowNexusHandler(BaseHandler):  # type: ignore[misc]
    """BaseHandler loads the model; this adds input parsing, standardization and the output format."""

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        model_dir = Path(context.system_properties.get("model_dir"))
        spec = json.loads((model_dir / "model_config.json").read_text(encoding="utf-8"))
        norm = json.loads((model_dir / "normalization.json").read_text(encoding="utf-8"))
        self.task: str = spec["task"]
        self.num_features: int = spec["numFeatures"]
        self.labels: list[str] = spec.get("classLabels") or []
        self.mean = torch.tensor(norm["mean"], dtype=torch.float32)
        self.std = torch.tensor(norm["std"], dtype=torch.float32)
        self.target_mean, self.target_std = float(norm.get("targetMean", 0.0)), float(norm.get("targetStd", 1.0))
        self.version = str(context.manifest.get("model", {}).get("modelVersion", ""))
        self.latency = context.metrics.add_metric_to_cache(
            LATENCY_METRIC, unit="s", dimension_names=["ModelName", "ModelVersion"], metric_type=MetricTypes.HISTOGRAM
        )
        self._batch: list[tuple[int, str | None]] = []
        self._started = 0.0

    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        """All valid rows of the batch as one standardized tensor; bad requests are marked 400."""
        self._started = time.perf_counter()
        rows: list[list[float]] = []
        self._batch = []
        for idx, request in enumerate(data):
            body = request.get("data") if request.get("data") is not None else request.get("body")
            try:
                parsed = parse_rows(body, self.num_features)
            except ValueError as exc:
                self._batch.append((0, str(exc)))
                self.context.set_response_status(code=400, phrase=str(exc), idx=idx)
                continue
            self._batch.append((len(parsed), None))
            rows.extend(parsed)
        if not rows:
            # Every request in the batch is malformed (the usual single-request case): answer 400.
            raise PredictionException(self._batch[0][1] if self._batch else "empty request", 400)
        return (torch.tensor(rows, dtype=torch.float32) - self.mean) / self.std

    def postprocess(self, data: torch.Tensor) -> list[dict[str, Any]]:
        """Split the batch output back into one response per request, and observe the latency."""
        predictions = self._format(data.float().cpu())
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
            values = output.squeeze(-1) * self.target_std + self.target_mean
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
