"""The e2e check of the dashboards: every query returns data from the real Prometheus.

``queries_without_data(prometheus_url, namespace, deployment)`` substitutes the dashboards' variables
(``$namespace``, ``$modeldeployment``) into every query of monitoring/render.py's list and returns those that
answer no series. Queries marked with an ``empty_reason`` (canary-only, no 4xx/5xx answered, tabular models
only, no rollout yet) are not checked; ``skipped_queries()`` lists them with the reason, for the test's log.

The operator dashboard's queries need Prometheus to scrape the operator's metrics port as well as the serving
pods (pass ``dashboards=("modeldeployment",)`` to check the serving side alone).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Any

from monitoring.render import DASHBOARDS, CheckedQuery, all_queries, substitute


class QueryRejected(Exception):
    """Prometheus refused the query (HTTP 400/422: a syntax error, a bad function): a bug in the query list."""


def query(prometheus_url: str, expr: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The series of an instant query (``GET /api/v1/query``); QueryRejected names the query and Prometheus'
    error when the query itself is refused."""
    url = f"{prometheus_url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        if exc.code in (400, 422):
            try:
                detail = json.loads(exc.read().decode("utf-8")).get("error", "")
            except (ValueError, OSError):
                detail = exc.reason
            raise QueryRejected(f"Prometheus rejected {expr!r}: {detail}") from exc
        raise
    data = body.get("data") or {}
    result = data.get("result")
    if data.get("resultType") == "scalar":
        return [{"value": result}]
    return list(result or [])


def variables(namespace: str, deployment: str) -> dict[str, str]:
    return {"namespace": namespace, "modeldeployment": deployment, "datasource": ""}


def checked(dashboards: Iterable[str]) -> list[CheckedQuery]:
    keys = list(dashboards)
    unknown = [k for k in keys if k not in DASHBOARDS]
    if unknown:
        raise ValueError(f"unknown dashboard(s) {unknown}; known: {sorted(DASHBOARDS)}")
    return list(all_queries({k: DASHBOARDS[k] for k in keys}))


def queries_without_data(
    prometheus_url: str,
    namespace: str,
    deployment: str,
    dashboards: Iterable[str] = ("operator", "modeldeployment"),
) -> list[str]:
    """The queries (variables substituted, each prefixed with its dashboard and panel) that return no series.

    Queries with an ``empty_reason`` are skipped; a query Prometheus refuses raises QueryRejected."""
    empty = []
    values = variables(namespace, deployment)
    for q in checked(dashboards):
        if q.empty_reason is not None:
            continue
        expr = substitute(q.expr, values)
        if not query(prometheus_url, expr):
            empty.append(f"{q.dashboard} {q.where}: {expr}")
    return empty


def skipped_queries(dashboards: Iterable[str] = ("operator", "modeldeployment")) -> list[tuple[str, str]]:
    """(where, reason) of each query the data check skips because it may legitimately be empty."""
    return [(f"{q.dashboard} {q.where}", q.empty_reason) for q in checked(dashboards) if q.empty_reason is not None]
