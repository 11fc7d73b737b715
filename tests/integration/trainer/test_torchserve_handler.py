"""The validated .mar inside a real TorchServe (Java frontend, Python worker) on loopback."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sklearn.datasets import load_digits

from tests.integration.trainer.procs import TorchServe

pytestmark = pytest.mark.integration


def post(server: TorchServe, body: bytes, content_type: str = "application/json") -> tuple[int, Any]:
    request = urllib.request.Request(
        f"{server.inference}/predictions/digits", data=body, method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_single_request_gets_a_prediction_with_probabilities(torchserve: TorchServe) -> None:
    digits = load_digits()
    status, body = post(torchserve, json.dumps({"inputs": digits.data[0].tolist()}).encode())
    assert status == 200, body
    [prediction] = body["predictions"]
    assert prediction["label"] == str(digits.target[0])
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)


def test_batched_request_gets_one_prediction_per_row(torchserve: TorchServe) -> None:
    digits = load_digits()
    rows = digits.data[:16]
    status, body = post(torchserve, json.dumps({"inputs": rows.tolist()}).encode())
    assert status == 200, body
    labels = [p["label"] for p in body["predictions"]]
    assert len(labels) == 16
    assert sum(label == str(t) for label, t in zip(labels, digits.target[:16], strict=True)) >= 14


@pytest.mark.parametrize(
    "body",
    [b'{"inputs": [1, 2, 3]}', b"not json at all", b'{"inputs": [[1, 2, "x"]]}', b'{"rows": []}'],
)
def test_malformed_input_is_a_clear_4xx(torchserve: TorchServe, body: bytes) -> None:
    status, answer = post(torchserve, body)
    assert 400 <= status < 500, (status, answer)
    assert answer.get("message"), answer


def test_latency_histogram_is_on_the_metrics_port(torchserve: TorchServe) -> None:
    post(torchserve, json.dumps({"inputs": [0.0] * 64}).encode())
    with urllib.request.urlopen(f"{torchserve.metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    buckets = [line for line in text.splitlines() if line.startswith("flownexus_inference_latency_seconds_bucket")]
    assert any(
        'le="0.1"' in line and 'ModelName="digits"' in line and 'ModelVersion="1.0.0"' in line for line in buckets
    )
    count = next(line for line in text.splitlines() if line.startswith("flownexus_inference_latency_seconds_count"))
    assert float(count.rsplit(" ", 1)[1]) >= 1
    assert "# TYPE flownexus_inference_latency_seconds histogram" in text


def test_server_side_batch_answers_each_request_and_fails_only_the_malformed_one(torchserve: TorchServe) -> None:
    # Concurrent requests land in one TorchServe batch (batchSize 8, maxBatchDelay 100 ms).
    digits = load_digits()
    bodies = [json.dumps({"inputs": row.tolist()}).encode() for row in digits.data[:7]]
    bodies.append(b'{"inputs": [1, 2, 3]}')

    def call(body: bytes) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"{torchserve.inference}/predictions/digits",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        results = list(pool.map(call, bodies))
    assert [status for status, _ in results] == [200] * 7 + [400], results
    assert [r["predictions"][0]["label"] for _, r in results[:7]] == [str(t) for t in digits.target[:7]]
