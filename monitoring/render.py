"""The Grafana dashboards and Prometheus alerts of Flow Nexus, from one list of queries.

Every dashboard panel's PromQL is in ``DASHBOARDS`` below; ``all_queries()`` flattens it for the tests (parse
check against a real Prometheus, "returns data" check in e2e: tests/e2e/monitoring_check.py). A query whose
empty result is legitimate (canary-only, no error ever answered, tabular models only) carries the reason in
``empty_reason`` and the e2e check skips it with that reason.

``python monitoring/render.py`` writes:

- monitoring/dashboards/operator.json, monitoring/dashboards/modeldeployment.json (Grafana dashboards)
- monitoring/rules/flownexus.rules.yaml (a plain Prometheus rule file)
- helm/flownexus/files/... (the same files, for the chart's ConfigMaps and PrometheusRule)

``--check`` writes nothing and fails when a file differs from what would be written (``make verify``).

Labels the queries rely on: TorchServe's own (``ts_inference_requests_total{model_name,model_version,hostname}``,
``Requests5XX{Level,Hostname}``, the handler's ``flownexus_inference_latency_seconds{ModelName,ModelVersion}``),
the serving pod's edge proxy's ``flownexus_edge_request_duration_seconds{ModelName,ModelVersion,Hostname,code}``
(the latency a client sees: TorchServe's queue, batching delay and handler, and the proxy; scraped on the same
metrics port as TorchServe's), and two target labels that the scrape job must set, ``namespace`` and ``pod``
(docs/MONITORING.md). Serving pods are named ``<modeldeployment>-<stable|canary>-<replicaset hash>-<id>``, which
gives the track.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "monitoring"
CHART_FILES = ROOT / "helm" / "flownexus" / "files"

WINDOW = "5m"
# Alert thresholds (the rule unit tests in monitoring/rules/tests/ are written against these).
ERROR_RATIO_MAX = 0.05  # share of a stable track's inference requests answered 5xx
LATENCY_P99_MAX_S = 1.0  # p99 of the edge latency (what clients see) of the stable track's answered requests
RECONCILE_ERRORS_MAX = 2  # failed reconcile passes of one kind within 10 minutes
RECONCILE_P99_MAX_S = 5.0
TRAINING_QUEUE_STUCK_FOR = "30m"  # a NeuralCluster's queue of TrainingJobs never empty for this long

# ---- building blocks -----------------------------------------------------------------------------------

# Dashboard variables: $namespace and $modeldeployment.
MD_PODS = 'namespace="$namespace",pod=~"$modeldeployment-(stable|canary)-.+"'
CANARY_PODS = 'namespace="$namespace",pod=~"$modeldeployment-canary-.+"'
TRACK_RE = "$modeldeployment-(stable|canary)-.+"
# For alerts (every ModelDeployment at once): the ModelDeployment and the track from the pod name.
SERVING_PODS = 'pod=~".+-(stable|canary)-[a-z0-9]+-[a-z0-9]+"'
STABLE_PODS = 'pod=~".+-stable-[a-z0-9]+-[a-z0-9]+"'
POD_RE = "(.+)-(?:stable|canary)-[a-z0-9]+-[a-z0-9]+"


def by_track(expr: str) -> str:
    """``expr`` with a ``track`` label taken from the pod name (dashboard scope: one ModelDeployment)."""
    return f'label_replace({expr}, "track", "$1", "pod", "{TRACK_RE}")'


def by_deployment(expr: str) -> str:
    """``expr`` with a ``modeldeployment`` label taken from the pod name (alert scope)."""
    return f'label_replace({expr}, "modeldeployment", "$1", "pod", "{POD_RE}")'


def rate(series: str, selector: str, window: str = WINDOW) -> str:
    return f"rate({series}{{{selector}}}[{window}])"


def zero_if_absent(expr: str, like: str) -> str:
    """``expr``, or 0 for every series of ``like`` that ``expr`` lacks: a counter that never moved (no 5xx
    answered yet, no failed pass yet) has no series at all, which must read as 0, not as no data."""
    return f"({expr} or ({like}) * 0)"


# ---- the model ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    # When set, an empty result is legitimate and the e2e "returns data" check skips the query for this reason.
    empty_reason: str | None = None


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""
    kind: Literal["timeseries", "stat"] = "timeseries"


@dataclass(frozen=True)
class Variable:
    """A Grafana query variable: the values of ``label`` on ``selector``, optionally narrowed by ``regex``
    (its first group is the value)."""

    name: str
    selector: str
    label: str
    regex: str = ""


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    variables: tuple[Variable, ...] = ()
    tags: tuple[str, ...] = field(default=("flownexus",))


REQUESTS = "ts_inference_requests_total"
ERRORS = "Requests5XX"
# The canary's p99 (flownexus/prometheus.py): the edge proxy's histogram, answered (2xx) requests only.
LATENCY = "flownexus_edge_request_duration_seconds"
ANSWERED = 'code="2xx"'
HANDLER_LATENCY = "flownexus_inference_latency_seconds"  # the time inside the handler only, for comparison

_requests_by_track = f"sum by (track) ({by_track(rate(REQUESTS, MD_PODS))})"
_errors_by_track = f"sum by (track) ({by_track(rate(ERRORS, MD_PODS))})"


def _latency_quantile(q: float, labels: str, selector: str = MD_PODS, histogram: str = LATENCY) -> str:
    if histogram == LATENCY:
        selector = f"{selector},{ANSWERED}"
    return f"histogram_quantile({q}, sum by ({labels}, le) ({by_track(rate(histogram + '_bucket', selector))}))"


NO_CANARY = "no canary is running (only during a rollout)"

MODELDEPLOYMENT = Dashboard(
    uid="flownexus-modeldeployment",
    title="Flow Nexus / ModelDeployment",
    description="One ModelDeployment's TorchServe pods: traffic, errors and latency, stable against canary.",
    variables=(
        Variable("namespace", REQUESTS, "namespace"),
        Variable(
            "modeldeployment",
            f'{REQUESTS}{{namespace="$namespace",{SERVING_PODS}}}',
            "pod",
            regex=f"/^{POD_RE}$/",
        ),
    ),
    panels=(
        Panel(
            "Requests/s by track",
            "reqps",
            (Query(_requests_by_track, "{{track}}"),),
            "Inference requests per second (TorchServe's ts_inference_requests_total) per track.",
        ),
        Panel(
            "Error ratio (5xx) by track",
            "percentunit",
            (Query(f"{zero_if_absent(_errors_by_track, _requests_by_track)} / {_requests_by_track}", "{{track}}"),),
            "Share of requests answered 5xx (Requests5XX per pod; a pod that never answered 5xx counts 0). "
            f"The stable track alerts above {ERROR_RATIO_MAX:.0%}.",
        ),
        Panel(
            "Latency p50 / p99 (edge) by track",
            "s",
            (
                Query(_latency_quantile(0.5, "track"), "p50 {{track}}"),
                Query(_latency_quantile(0.99, "track"), "p99 {{track}}"),
                Query(_latency_quantile(0.99, "track", histogram=HANDLER_LATENCY), "p99 handler {{track}}"),
            ),
            "What clients see, the canary gate's latency: answered requests from the end of their headers to the "
            "last byte of the response at the pod's edge (flownexus_edge_request_duration_seconds: TorchServe's "
            "queue, batching delay and handler, and the proxy). For comparison, p99 inside the handler alone "
            "(flownexus_inference_latency_seconds).",
        ),
        Panel(
            "Canary traffic share (observed)",
            "percentunit",
            (
                Query(
                    f"(sum({rate(REQUESTS, CANARY_PODS)}) or vector(0)) / sum({rate(REQUESTS, MD_PODS)})",
                    "canary",
                ),
            ),
            "Canary requests over all requests (the achieved weight; 0 without a canary). The weight the operator "
            "set is in the ModelDeployment's status (kubectl flownexus status).",
            kind="stat",
        ),
        Panel(
            "Serving pods by track",
            "short",
            (
                Query(f"count by (track) ({by_track(f'up{{{MD_PODS}}}')})", "scraped {{track}}"),
                Query(f"sum by (track) ({by_track(f'up{{{MD_PODS}}}')})", "up {{track}}"),
            ),
            "Pods Prometheus scrapes per track, and how many of them answer the scrape.",
        ),
        Panel(
            "Queue time per request by track",
            "ms",
            (
                Query(
                    f"sum by (track) ({by_track(rate('ts_queue_latency_microseconds', MD_PODS))}) / 1000"
                    f" / {_requests_by_track}",
                    "{{track}}",
                ),
            ),
            "Mean time a request waited for a worker (ts_queue_latency_microseconds over requests).",
        ),
        Panel(
            "Latency p99 by model version",
            "s",
            (Query(_latency_quantile(0.99, "ModelVersion"), "{{ModelVersion}}"),),
            "The edge p99 (what clients see) per version of the model archive.",
        ),
        Panel(
            "HTTP responses/s by class",
            "reqps",
            tuple(
                Query(
                    f"sum by (track) ({by_track(rate(f'Requests{c}XX', MD_PODS))})",
                    f"{c}xx {{{{track}}}}",
                    None if c == 2 else f"no {c}xx answered in the window",
                )
                for c in (2, 4, 5)
            ),
            "TorchServe's per-pod response counters (all endpoints of the inference port).",
        ),
        Panel(
            "Unseen categories/s by column",
            "short",
            (
                Query(
                    f"sum by (Column) ({rate('flownexus_unseen_categories_total', MD_PODS)})",
                    "{{Column}}",
                    "tabular models with categorical columns only, and only when a request sends an unseen category",
                ),
            ),
            "Categorical values the model never saw in training (the handler maps them to 'unknown').",
        ),
    ),
)

_reconciles = "flownexus_reconcile_total"
_reconcile_rate_by_kind = f"sum by (kind) (rate({_reconciles}[{WINDOW}]))"
_operator = "group by (instance) (flownexus_api_requests_total)"
NO_CANARY_DECISION = "no canary analysis ran in the window"
_finished = "flownexus_trainingjob_finished_total"
_api_responses = "flownexus_api_responses_total"

OPERATOR = Dashboard(
    uid="flownexus-operator",
    title="Flow Nexus / Operator",
    description="The operator's reconcile loop and API traffic (operator/flownexus/metrics.py).",
    panels=(
        Panel(
            "Reconcile passes/s by kind and result",
            "ops",
            (Query(f"sum by (kind, result) (rate({_reconciles}[{WINDOW}]))", "{{kind}} {{result}}"),),
            "result: ok, conflict (decided on a stale object, retried), gone, error.",
        ),
        Panel(
            "Failed reconcile passes/s by kind",
            "ops",
            (
                Query(
                    zero_if_absent(
                        f'sum by (kind) (rate({_reconciles}{{result="error"}}[{WINDOW}]))', _reconcile_rate_by_kind
                    ),
                    "{{kind}}",
                ),
            ),
            "Passes that raised (retried with backoff); 0 for a kind that never failed.",
        ),
        Panel(
            "Reconcile duration p50 / p99 by kind",
            "s",
            tuple(
                Query(
                    f"histogram_quantile({q}, sum by (kind, le) "
                    f"(rate(flownexus_reconcile_duration_seconds_bucket[{WINDOW}])))",
                    f"p{round(q * 100)} {{{{kind}}}}",
                )
                for q in (0.5, 0.99)
            ),
        ),
        Panel(
            "API requests/s by verb and kind",
            "reqps",
            (Query(f"sum by (verb, kind) (rate(flownexus_api_requests_total[{WINDOW}]))", "{{verb}} {{kind}}"),),
            "Requests the operator sent to the Kubernetes API server.",
        ),
        Panel(
            "API responses/s by code",
            "reqps",
            (Query(f"sum by (code) (rate({_api_responses}[{WINDOW}]))", "{{code}}"),),
            "Answers of the Kubernetes API server by HTTP status code, each try of a retried request counted; "
            '"error": no answer (connection refused or reset, timeout).',
        ),
        Panel(
            "TrainingJobs by phase",
            "short",
            (Query("sum by (phase) (flownexus_trainingjobs)", "{{phase}}"),),
            "TrainingJobs in the operator's cache by status.phase, all namespaces (a job without status yet counts "
            "as Pending).",
        ),
        Panel(
            "TrainingJob queue depth by NeuralCluster",
            "short",
            (Query("sum by (namespace, cluster) (flownexus_trainingjob_queue_depth)", "{{namespace}}/{{cluster}}"),),
            "TrainingJobs waiting for a slot of their NeuralCluster's limits.maxConcurrentTrainingJobs (0 for a "
            f"cluster with none waiting); FlowNexusTrainingQueueStuck fires when it stays above 0 for "
            f"{TRAINING_QUEUE_STUCK_FOR}.",
        ),
        Panel(
            "TrainingJobs finished (1h) by result and reason",
            "short",
            (
                Query(
                    f"sum by (namespace, result, reason) (increase({_finished}[1h]))",
                    "{{namespace}} {{result}} {{reason}}",
                    "no TrainingJob reached Succeeded or Failed since the operator started",
                ),
            ),
            "Jobs that reached a final phase, by status.reason (e.g. Validated, ValidationFailed, InputError, "
            "DeadlineExceeded); counted once, when the operator writes the final phase.",
        ),
        Panel(
            "Canary decisions (1h)",
            "short",
            (
                Query(
                    "sum by (decision) (increase(flownexus_canary_decisions_total[1h]))",
                    "{{decision}}",
                    "no ModelDeployment has had a rollout since the operator started",
                ),
            ),
            "deploy, start, passed, failed, nodata, promote, promoted, rollback, abort, manual_*.",
        ),
        Panel(
            "Operator up",
            "short",
            (Query(f"up and on (instance) {_operator}", "{{instance}}"),),
            "1 while Prometheus scrapes the operator's metrics port.",
            kind="stat",
        ),
        Panel(
            "Operator memory (RSS)",
            "bytes",
            (Query(f"process_resident_memory_bytes and on (instance) {_operator}", "{{instance}}"),),
        ),
    ),
)

DASHBOARDS: dict[str, Dashboard] = {"operator": OPERATOR, "modeldeployment": MODELDEPLOYMENT}


# ---- alerts ----------------------------------------------------------------------------------------------


def _alert(
    name: str, expr: str, for_: str, severity: str, summary: str, description: str, runbook: str = ""
) -> dict[str, Any]:
    annotations = {"summary": summary, "description": description}
    if runbook:
        annotations["runbook"] = runbook
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity},
        "annotations": annotations,
    }


# The alerts watch the stable track: a failing canary is the operator's to roll back (FlowNexusCanaryRolledBack).
_dep = "namespace, modeldeployment"
_md_requests = f"sum by ({_dep}) ({by_deployment(rate(REQUESTS, STABLE_PODS))})"
_md_errors = f"sum by ({_dep}) ({by_deployment(rate(ERRORS, STABLE_PODS))})"
_md_p99 = (
    f"histogram_quantile(0.99, sum by ({_dep}, le) "
    f"({by_deployment(rate(LATENCY + '_bucket', f'{STABLE_PODS},{ANSWERED}'))}))"
)
_md = "ModelDeployment {{ $labels.namespace }}/{{ $labels.modeldeployment }}"
_rollbacks = 'flownexus_canary_decisions_total{decision="rollback"}'
_failed = f'{_finished}{{result="Failed"}}'

RULE_GROUPS: list[dict[str, Any]] = [
    {
        "name": "flownexus-operator",
        "rules": [
            _alert(
                "FlowNexusOperatorDown",
                "absent(flownexus_api_requests_total)",
                "5m",
                "critical",
                "The Flow Nexus operator is down or not scraped",
                "No scraped target has exported flownexus_api_requests_total for 5 minutes: the operator is not "
                "running, or Prometheus does not scrape its metrics port. TrainingJobs and ModelDeployments are not "
                "reconciled (canaries are neither promoted nor rolled back).",
            ),
            _alert(
                "FlowNexusReconcileErrors",
                f'sum by (kind) (increase({_reconciles}{{result="error"}}[10m])) > {RECONCILE_ERRORS_MAX}',
                "10m",
                "warning",
                "Flow Nexus {{ $labels.kind }} reconciles keep failing",
                f"More than {RECONCILE_ERRORS_MAX} {{{{ $labels.kind }}}} reconcile passes failed in 10 minutes "
                "({{ $value | humanize }}), for 10 minutes. The operator log names the object "
                '("<kind> <namespace>/<name>: pass failed").',
            ),
            _alert(
                "FlowNexusReconcileSlow",
                f"histogram_quantile(0.99, sum by (kind, le) (rate(flownexus_reconcile_duration_seconds_bucket[10m])))"
                f" > {RECONCILE_P99_MAX_S:g}",
                "15m",
                "warning",
                "Flow Nexus {{ $labels.kind }} reconcile passes are slow",
                f"p99 of {{{{ $labels.kind }}}} reconcile passes is {{{{ $value | humanizeDuration }}}} "
                f"(above {RECONCILE_P99_MAX_S:g}s) for 15 minutes: the API server or Prometheus answers slowly.",
            ),
            _alert(
                "FlowNexusCanaryRolledBack",
                # The operator creates a decision's series on its first increment, so the first rollback since it
                # started appears as a new series at 1, which increase() cannot see: a new series counts too.
                f"sum(increase({_rollbacks}[15m])) > 0 or count({_rollbacks} > 0 unless {_rollbacks} offset 15m) > 0",
                "0m",
                "warning",
                "A Flow Nexus canary was rolled back",
                "{{ $value | humanize }} canary rollback(s) in the last 15 minutes: the canary failed its analysis. "
                "`kubectl get modeldeployments -A` shows which (phase RolledBack), `kubectl flownexus status` why.",
            ),
            _alert(
                "FlowNexusTrainingJobFailed",
                # As for rollbacks: the first failure of a (namespace, reason) since the operator started is a new
                # series at 1, which increase() cannot see.
                f"sum by (namespace, reason) (increase({_failed}[15m])) > 0"
                f" or sum by (namespace, reason) ({_failed} unless {_failed} offset 15m) > 0",
                "0m",
                "warning",
                "A TrainingJob in {{ $labels.namespace }} failed ({{ $labels.reason }})",
                "At least one TrainingJob in namespace {{ $labels.namespace }} reached phase Failed with reason "
                "{{ $labels.reason }} in the last 15 minutes. `kubectl get trainingjobs -n {{ $labels.namespace }}` "
                "shows which, `kubectl describe` (status.message, Events) why.",
            ),
            _alert(
                "FlowNexusTrainingQueueStuck",
                "max by (namespace, cluster) (flownexus_trainingjob_queue_depth) > 0",
                TRAINING_QUEUE_STUCK_FOR,
                "warning",
                "TrainingJobs wait for NeuralCluster {{ $labels.namespace }}/{{ $labels.cluster }}",
                "{{ $value | humanize }} TrainingJob(s) wait for a slot of NeuralCluster {{ $labels.namespace }}/"
                "{{ $labels.cluster }} (limits.maxConcurrentTrainingJobs), and its queue has not been empty for "
                f"{TRAINING_QUEUE_STUCK_FOR}: the running jobs hold every slot. Check them "
                "(`kubectl get trainingjobs -n {{ $labels.namespace }}`), or raise the limit.",
            ),
            _alert(
                "FlowNexusApiServerErrors",
                f'sum by (kind, code) (rate({_api_responses}{{code=~"5..|error"}}[{WINDOW}])) > 0',
                "10m",
                "warning",
                "The Kubernetes API server fails the operator's {{ $labels.kind }} requests ({{ $labels.code }})",
                "{{ $value | humanize }} answers/s with code {{ $labels.code }} (5xx, or error: no answer at all) to "
                f"the operator's {{{{ $labels.kind }}}} requests over {WINDOW}, for 10 minutes: the API server, etcd "
                "or a webhook is failing or unreachable. Passes are retried with backoff; the operator log names the "
                "failing requests.",
            ),
        ],
    },
    {
        "name": "flownexus-modeldeployment",
        "rules": [
            _alert(
                "FlowNexusModelDeploymentHighErrorRate",
                f"{_md_errors} / {_md_requests} > {ERROR_RATIO_MAX:g}",
                "5m",
                "critical",
                f"{_md} answers errors",
                f"{{{{ $value | humanizePercentage }}}} of the stable track's inference requests of {_md} were "
                f"answered 5xx over {WINDOW} (above {ERROR_RATIO_MAX:.0%}) for 5 minutes.",
            ),
            _alert(
                "FlowNexusModelDeploymentHighLatency",
                f"{_md_p99} > {LATENCY_P99_MAX_S:g}",
                "10m",
                "warning",
                f"{_md} is slow",
                f"p99 latency clients see (at the pods' edge) on the stable track of {_md} is "
                f"{{{{ $value | humanizeDuration }}}} "
                f"(above {LATENCY_P99_MAX_S:g}s) for 10 minutes.",
            ),
        ],
    },
]


# ---- the queries, flat -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedQuery:
    """One PromQL query of a dashboard (a panel's target or a variable's values), as the tests see it."""

    dashboard: str
    where: str  # "panel <title> / <legend>" or "variable <name>"
    expr: str
    empty_reason: str | None


def variable_query(var: Variable) -> str:
    """The PromQL behind a ``label_values(selector, label)`` variable."""
    return f"group by ({var.label}) ({var.selector})"


def all_queries(dashboards: Mapping[str, Dashboard] = DASHBOARDS) -> Iterator[CheckedQuery]:
    for key, dash in dashboards.items():
        for var in dash.variables:
            yield CheckedQuery(key, f"variable {var.name}", variable_query(var), None)
        for panel in dash.panels:
            for q in panel.queries:
                yield CheckedQuery(key, f"panel {panel.title!r} / {q.legend!r}", q.expr, q.empty_reason)


def alert_rules() -> Iterator[dict[str, Any]]:
    for group in RULE_GROUPS:
        yield from group["rules"]


_VAR = re.compile(r"\$\{(\w+)\}|\$([A-Za-z_]\w*)")


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """``expr`` with Grafana's ``$name`` / ``${name}`` replaced from ``values`` (``$1`` of label_replace stays).

    A variable that ``values`` does not name raises KeyError naming it, so no query reaches Prometheus with
    a ``$`` left in a matcher."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"dashboard variable ${name} has no value (given: {sorted(values)}) in: {expr}")
        return values[name]

    return _VAR.sub(one, expr)


# ---- rendering ------------------------------------------------------------------------------------------------

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend}
            for i, q in enumerate(panel.queries)
        ],
    }
    if panel.kind == "timeseries":
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    return out


def _variable_json(var: Variable) -> dict[str, Any]:
    query = f"label_values({var.selector}, {var.label})"
    return {
        "name": var.name,
        "label": var.name,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{var.name}-values"},
        "regex": var.regex,
        "refresh": 2,  # on time range change
        "sort": 1,
        "includeAll": False,
        "multi": False,
    }


def dashboard_json(dash: Dashboard) -> dict[str, Any]:
    panels = [_panel_json(p, i + 1, 12 * (i % 2), 8 * (i // 2)) for i, p in enumerate(dash.panels)]
    datasource = {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "refresh": 1,
        "regex": "",
    }
    return {
        "uid": dash.uid,
        "title": dash.title,
        "description": dash.description,
        "tags": list(dash.tags),
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "templating": {"list": [datasource] + [_variable_json(v) for v in dash.variables]},
        "annotations": {"list": []},
        "panels": panels,
    }


def rules_yaml() -> str:
    header = "# Generated by monitoring/render.py from its RULE_GROUPS: edit that, then run it.\n"
    return header + yaml.safe_dump({"groups": RULE_GROUPS}, sort_keys=False, width=1000, allow_unicode=True)


def outputs() -> dict[Path, str]:
    """Every generated file and its content."""
    files: dict[Path, str] = {}
    for key, dash in DASHBOARDS.items():
        text = json.dumps(dashboard_json(dash), indent=2) + "\n"
        files[HERE / "dashboards" / f"{key}.json"] = text
        files[CHART_FILES / "dashboards" / f"{key}.json"] = text
    files[HERE / "rules" / "flownexus.rules.yaml"] = rules_yaml()
    files[CHART_FILES / "flownexus.rules.yaml"] = rules_yaml()
    return files


def stale(files: Mapping[Path, str]) -> list[Path]:
    """The files that are missing or differ from ``files``."""
    return [p for p, text in files.items() if not p.exists() or p.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is out of date")
    args = parser.parse_args(argv)
    files = outputs()
    if args.check:
        bad = stale(files)
        for path in bad:
            print(f"{path.relative_to(ROOT)} is out of date: run 'python monitoring/render.py'", file=sys.stderr)
        return 1 if bad else 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
