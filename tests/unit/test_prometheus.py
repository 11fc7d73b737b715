"""PromQL presets (exact strings) and the HTTP client against a canned Prometheus on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from flownexus.prometheus import (
    CanarySelector,
    HttpPrometheus,
    NoData,
    PrometheusError,
    error_rate_query,
    latency_p99_ms_query,
    parse_response,
)

SEL = CanarySelector(model_name="digits", pod_prefix="digits-canary-", archive_version="2.0.0")


REQ = 'ts_inference_requests_total{model_name="digits",hostname=~"digits-canary-.+"}'
BUCKETS = (
    'flownexus_edge_request_duration_seconds_bucket{ModelName="digits",Hostname=~"digits-canary-.+",'
    'ModelVersion="2.0.0",code="2xx"}'
)


def test_error_rate_query_is_5xx_over_all_requests_of_the_canary() -> None:
    """Checked against a real Prometheus 2.42 scraping a real TorchServe 0.12 (0.0 healthy, 0.4 with 503s)."""
    assert error_rate_query(SEL, "5m") == (
        '(sum(rate(Requests5XX{Hostname=~"digits-canary-.+"}[5m]) and on (Hostname) '
        f'label_replace({REQ}, "Hostname", "$1", "hostname", "(.*)")) or vector(0))'
        f" / sum(rate({REQ}[5m]) and on (hostname) {REQ})"
    )


def test_p99_query_uses_the_edge_histogram_buckets_of_answered_requests_on_live_hosts() -> None:
    assert latency_p99_ms_query(SEL, "1m") == (
        f"histogram_quantile(0.99, sum by (le) (rate({BUCKETS}[1m]) and on (Hostname) {BUCKETS})) * 1000"
    )


def test_requests_are_not_selected_by_version() -> None:
    # TorchServe labels requests that name no version model_version="default": a version filter would see none.
    assert "model_version" not in error_rate_query(SEL, "5m")


def test_queries_without_a_known_archive_version_select_by_pod_only() -> None:
    sel = CanarySelector(model_name="digits", pod_prefix="digits-canary-")
    assert "ModelVersion" not in latency_p99_ms_query(sel, "5m")
    buckets = (
        'flownexus_edge_request_duration_seconds_bucket{ModelName="digits",Hostname=~"digits-canary-.+",code="2xx"}'
    )
    assert latency_p99_ms_query(sel, "5m").count(buckets) == 2  # the rate and the live-host filter


def test_p99_no_longer_reads_the_handler_histogram() -> None:
    assert "flownexus_inference_latency_seconds" not in latency_p99_ms_query(SEL, "5m")


def test_label_values_are_escaped() -> None:
    sel = CanarySelector(model_name='a"b', pod_prefix="x-canary-", archive_version="1.0")
    assert 'model_name="a\\"b"' in error_rate_query(sel, "5m")
    assert 'ModelVersion="1.0"' in latency_p99_ms_query(sel, "5m")  # versions match exactly, not as a regex


def vector(*values: str) -> dict[str, Any]:
    return {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1700000000.0, v]} for v in values]},
    }


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (vector("0.0125"), 0.0125),
        (vector("0"), 0.0),  # a real zero is a value, not "no data"
        (vector("+Inf"), float("inf")),
        ({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "42"]}}, 42.0),
    ],
)
def test_parse_response_values(body: dict[str, Any], expected: float) -> None:
    assert parse_response(body) == expected


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (vector(), "no series"),
        (vector("NaN"), "NaN"),
        (vector("1", "2"), "2 series"),
        ({"status": "success", "data": {"resultType": "matrix", "result": []}}, "unexpected result type"),
    ],
)
def test_parse_response_no_data(body: dict[str, Any], why: str) -> None:
    result = parse_response(body)
    assert isinstance(result, NoData) and why in result.reason


class FakePrometheus(BaseHTTPRequestHandler):
    """Answers /api/v1/query with the canned response for the query text (or a 400 / 503)."""

    responses: dict[str, tuple[int, dict[str, Any]]] = {}
    seen: list[str] = []

    def do_GET(self) -> None:
        url = urllib.parse.urlparse(self.path)
        query = urllib.parse.parse_qs(url.query).get("query", [""])[0]
        FakePrometheus.seen.append(query)
        code, body = (404, {}) if url.path != "/api/v1/query" else self.responses.get(query, (200, vector()))
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_prometheus() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakePrometheus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakePrometheus.responses, FakePrometheus.seen = {}, []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_http_client_against_fake_prometheus(fake_prometheus: str) -> None:
    """The client's HTTP path against canned JSON; a real Prometheus scraping TorchServe is exercised in e2e."""
    err, p99 = error_rate_query(SEL, "1m"), latency_p99_ms_query(SEL, "1m")
    FakePrometheus.responses = {
        err: (200, vector("0.02")),
        p99: (200, vector("NaN")),
        "broken(": (400, {"status": "error", "errorType": "bad_data", "error": "parse error"}),
        "overloaded": (503, {"status": "error", "errorType": "unavailable", "error": "too many queries"}),
    }
    client = HttpPrometheus(fake_prometheus)
    assert client.query(err) == 0.02
    assert FakePrometheus.seen[-1] == err  # the PromQL arrives intact, URL-encoded
    nan = client.query(p99)
    assert isinstance(nan, NoData) and "NaN" in nan.reason
    empty = client.query("up")
    assert isinstance(empty, NoData) and "no series" in empty.reason
    busy = client.query("overloaded")
    assert isinstance(busy, NoData) and "503" in busy.reason
    with pytest.raises(PrometheusError, match="parse error"):
        client.query("broken(")


def test_http_client_fake_prometheus_unreachable_is_no_data() -> None:
    """Nothing listens on the port: the canary must wait, not read it as zero errors."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakePrometheus)
    port = server.server_address[1]
    server.server_close()
    result = HttpPrometheus(f"http://127.0.0.1:{port}", timeout=2).query("up")
    assert isinstance(result, NoData) and "unreachable" in result.reason
