"""Prometheus behind a small interface: ``query(promql) -> float | NoData``, plus the canary's PromQL presets.

"No data" is its own outcome, never a silent zero: an empty result, NaN, or an unreachable Prometheus all
come back as :class:`NoData` with the reason, and the canary waits instead of reading them as healthy.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol

# The canary's p99: the serving pod's edge proxy (modeldeployment/pod/auth_proxy.py) times every inference
# request from the end of its headers to the last byte of its response, so the histogram holds what a client
# sees: TorchServe's queue and batching delay, the handler, and the proxy. Labels as TorchServe's backend
# metrics: ``ModelName``, ``ModelVersion`` (the archive's version), ``Hostname`` (the pod name), plus ``code``.
LATENCY_HISTOGRAM = "flownexus_edge_request_duration_seconds"
LATENCY_MODEL_LABEL = "ModelName"
LATENCY_VERSION_LABEL = "ModelVersion"
LATENCY_CODE_LABEL = "code"  # the status class: "2xx", "4xx", "5xx"
# The handler's own histogram (the time inside the handler only; seconds, TorchServe's fixed buckets
# 0.005 ... 10 s), no longer the canary's gate: the dashboards and bench/analysis_latency.py compare it.
HANDLER_LATENCY_HISTOGRAM = "flownexus_inference_latency_seconds"
# TorchServe frontend counters: requests per model (lowercase labels) and HTTP 5xx per host (no model label).
REQUESTS_TOTAL = "ts_inference_requests_total"
REQUESTS_5XX = "Requests5XX"


@dataclass(frozen=True)
class NoData:
    """The query answered nothing usable; ``reason`` says why (empty result, NaN, Prometheus unreachable)."""

    reason: str


@dataclass(frozen=True)
class Rejected:
    """Prometheus refused the query itself (a syntax error, an unknown function): no slot can ever get data,
    so the analysis counts it as a failed check and says Prometheus' words."""

    reason: str


QueryResult = float | NoData


class MetricsProvider(Protocol):
    """What the canary analysis needs from a metrics backend."""

    def query(self, promql: str) -> QueryResult:
        """The scalar value of an instant query, or NoData."""
        ...


@dataclass(frozen=True)
class CanarySelector:
    """Which series belong to the canary.

    Pods are selected by hostname, which TorchServe sets to the pod name (``<md>-canary-<hash>-<id>``), so
    the queries need no relabelling in the scrape config; every rate is then kept only for hosts that are
    scraped right now (``and on (hostname)`` with the instant vector), so a previous canary's pods that died
    inside the window do not count. ``archive_version`` (the version in the archive's manifest, when the
    operator knows it) narrows the latency histogram further. ``ts_inference_requests_total`` cannot be
    narrowed by version: its ``model_version`` label is "default" for requests that name no version.
    """

    model_name: str
    pod_prefix: str
    archive_version: str | None = None


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _regex_escape(value: str) -> str:
    # Pod names are DNS labels; only "." needs escaping in an RE2 regex.
    return value.replace(".", "\\\\.")


def _matchers(pairs: list[tuple[str, str, str]]) -> str:
    return "{" + ",".join(f'{label}{op}"{value}"' for label, op, value in pairs) + "}"


def _live_rate(series: str, window: str, host_label: str) -> str:
    """rate() of ``series`` over the window, only for hosts that are being scraped now."""
    return f"(rate({series}[{window}]) and on ({host_label}) {series})"


def error_rate_query(sel: CanarySelector, window: str) -> str:
    """Share of the canary's inference requests answered 5xx over ``window``, as ``rate()`` of counters.

    ``Requests5XX`` counts per host only (and no model label), so it is joined on ``Hostname`` with the hosts
    that serve this model right now. A host that never answered 5xx has no ``Requests5XX`` series at all,
    hence the ``or vector(0)`` on the numerator; the denominator is not defaulted, so no requests in the
    window means no data (0/0 is NaN, no series is an empty result).
    """
    hosts = _regex_escape(sel.pod_prefix) + ".+"
    requests = REQUESTS_TOTAL + _matchers([("model_name", "=", _escape(sel.model_name)), ("hostname", "=~", hosts)])
    errors = REQUESTS_5XX + _matchers([("Hostname", "=~", hosts)])
    serving_hosts = f'label_replace({requests}, "Hostname", "$1", "hostname", "(.*)")'
    return (
        f"(sum(rate({errors}[{window}]) and on (Hostname) {serving_hosts}) or vector(0))"
        f" / sum{_live_rate(requests, window, 'hostname')}"
    )


def latency_p99_ms_query(sel: CanarySelector, window: str) -> str:
    """p99 latency of the canary in milliseconds over ``window``, from the edge proxy's histogram buckets: the
    latency its clients see for answered predictions (queue + batching delay + handler + proxy).

    Only ``code="2xx"``: the proxy's own fast answers (401 to a scanner, 413, 503 at its in-flight cap) would
    otherwise pull the quantile down; failures are the error-rate check's part."""
    pairs = [
        (LATENCY_MODEL_LABEL, "=", _escape(sel.model_name)),
        ("Hostname", "=~", _regex_escape(sel.pod_prefix) + ".+"),
    ]
    if sel.archive_version:
        pairs.append((LATENCY_VERSION_LABEL, "=", _escape(sel.archive_version)))
    pairs.append((LATENCY_CODE_LABEL, "=", "2xx"))
    buckets = f"{LATENCY_HISTOGRAM}_bucket{_matchers(pairs)}"
    return f"histogram_quantile(0.99, sum by (le) {_live_rate(buckets, window, 'Hostname')}) * 1000"


def pods_regex(pod_prefix: str) -> str:
    """An RE2 regex (for a ``=~"..."`` matcher) of the pod names that start with ``pod_prefix``."""
    return _regex_escape(pod_prefix) + ".+"


def render_metric_query(template: str, variables: dict[str, str]) -> str:
    """A spec.rollout.metrics query with its ``{{variable}}`` placeholders replaced (the API has checked that
    every placeholder is known; an unknown one is left as it is and Prometheus rejects the query)."""
    out = template
    for key, value in variables.items():
        out = out.replace("{{" + key + "}}", value)
    return out


class PrometheusError(Exception):
    """Prometheus answered, but not with a usable result (bad query, server error)."""


class HttpPrometheus:
    """A MetricsProvider for Prometheus' HTTP API (``GET /api/v1/query``), with the standard library only."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def query(self, promql: str) -> QueryResult:
        """One instant query; a transport failure is NoData (the canary waits), a rejected query raises."""
        url = f"{self.base_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                body = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            if exc.code in (400, 422):
                raise PrometheusError(f"Prometheus rejected the query: {detail}") from exc
            return NoData(f"Prometheus answered HTTP {exc.code}: {detail}")
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            return NoData(f"Prometheus at {self.base_url} is unreachable: {exc}")
        except json.JSONDecodeError as exc:
            return NoData(f"Prometheus answered something that is not JSON: {exc.msg}")
        return parse_response(body)


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read().decode("utf-8"))
        return str(body.get("error") or body)
    except (ValueError, OSError):
        return str(exc.reason)


def parse_response(body: dict[str, Any]) -> QueryResult:
    """The single value of a Prometheus query response; anything else is NoData with the reason."""
    if body.get("status") != "success":
        raise PrometheusError(f"Prometheus query failed: {body.get('errorType')}: {body.get('error')}")
    data = body.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        raw = result[1] if isinstance(result, list) and len(result) == 2 else None
    elif kind == "vector":
        if not result:
            return NoData("the query returned no series")
        if len(result) > 1:
            return NoData(f"the query returned {len(result)} series, expected one")
        raw = result[0].get("value", [None, None])[1]
    else:
        return NoData(f"unexpected result type {kind!r}")
    try:
        value = float(raw)  # type: ignore[arg-type]  # Prometheus sends numbers as strings: "0.01", "NaN", "+Inf"
    except (TypeError, ValueError):
        return NoData(f"the query returned a non-number {raw!r}")
    if math.isnan(value):
        return NoData("the query returned NaN (no requests in the window)")
    return value


# The serving pod's edge proxy counts every request it answers, labelled ModelName, ModelVersion, Hostname (the
# pod name) and code: unlike TorchServe's own counters it also sees requests the proxy answers itself.
EDGE_REQUESTS_TOTAL = "flownexus_edge_requests_total"


def stable_requests_per_second_query(model_name: str, pod_prefix: str, window: str = "1m") -> str:
    """Requests per second the stable track's pods receive, summed over its pods (KEDA's prometheus trigger
    with metricType AverageValue divides it by the replica count). ``pod_prefix`` is ``<md>-stable-``."""
    matchers = _matchers([("ModelName", "=", _escape(model_name)), ("Hostname", "=~", pods_regex(pod_prefix))])
    return f"sum(rate({EDGE_REQUESTS_TOTAL}{matchers}[{window}]))"
