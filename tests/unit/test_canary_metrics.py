"""spec.rollout.metrics: custom PromQL checks of the canary next to the error-rate and p99 presets; the API's
validation, the query templates, and each check's outcome in the analysis (pass, fail, NoData, rejected,
relative to stable)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from flownexus.api.modeldeployment import ModelDeploymentSpec, ModelDeploymentStatus, RolloutMetric
from flownexus.api.neuralcluster import NeuralClusterSpec
from flownexus.modeldeployment import reconciler as rec
from flownexus.modeldeployment.children import ServingContext
from flownexus.modeldeployment.decide import (
    DeploymentView,
    Measurement,
    MetricReading,
    Observed,
    Source,
    decide,
    evaluate,
    now_str,
)
from flownexus.prometheus import CanarySelector, NoData, PrometheusError, QueryResult, Rejected, render_metric_query
from tests.factories import model_deployment, neural_cluster

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
QUEUE = 'sum(rate(ts_queue_latency_microseconds{Hostname=~"{{pods}}"}[{{window}}]))'


def spec(metrics: list[dict[str, Any]], **overrides: Any) -> ModelDeploymentSpec:
    obj = model_deployment(
        **{"spec.model.version": "2.0.0", "spec.rollout.interval": "1m", "spec.rollout.metrics": metrics, **overrides}
    )
    return ModelDeploymentSpec.model_validate(obj["spec"])


def metric(name: str = "queue", /, **fields: Any) -> dict[str, Any]:
    return {"name": name, "query": QUEUE, **fields}


def measured(*readings: MetricReading) -> Measurement:
    return Measurement(error_rate=0.0, latency_p99_ms=10.0, metrics=readings)


# ---- the API ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ([metric(query='rate(x{pod=~"{{pod}}"}[{{win}}])', max=1)], "unknown template variables {{pod}}, {{win}}"),
        ([metric()], "metric queue: set min, max or both"),
        ([metric(min=2, max=1)], "min 2.0 must be <= max 1.0"),
        ([metric(max=1), metric(max=2), metric("b", max=1)], "metrics: names must be unique, repeated: queue"),
        ([metric(max=1)] * 11, "at most 10 items"),
    ],
)
def test_bad_metrics_are_refused_naming_what_is_wrong(metrics: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("{", r"\{").replace("}", r"\}")):
        spec(metrics)


def test_every_template_variable_is_accepted() -> None:
    q = 'x{namespace="{{namespace}}",md="{{name}}",track="{{track}}",pod=~"{{pods}}"}[{{window}}]'
    assert spec([metric(query=q, min=0)]).rollout.metrics[0].query == q


def test_the_crd_carries_the_same_rules_for_the_api_server() -> None:
    rules = [r["rule"] for r in RolloutMetric.cel_rules]
    assert "has(self.min) || has(self.max)" in rules
    assert any(".replace('{{pods}}', '')" in r for r in rules)


def test_render_replaces_every_variable() -> None:
    variables = {"pods": "digits-canary-.+", "window": "5m"}
    assert render_metric_query(QUEUE, variables) == (
        'sum(rate(ts_queue_latency_microseconds{Hostname=~"digits-canary-.+"}[5m]))'
    )


# ---- measuring ----------------------------------------------------------------------------------------


class Prom:
    def __init__(self, answers: dict[str, QueryResult]) -> None:
        self.answers = answers
        self.queries: list[str] = []

    def query(self, promql: str) -> QueryResult:
        self.queries.append(promql)
        if "bad(" in promql:
            raise PrometheusError("Prometheus rejected the query: unknown function bad")
        return next((v for k, v in self.answers.items() if k in promql), 0.0)


def ctx_for(s: ModelDeploymentSpec) -> ServingContext:
    obj = model_deployment()
    obj["metadata"].update(uid="uid-1", generation=1)
    return ServingContext(obj, s, NeuralClusterSpec.model_validate(neural_cluster()["spec"]), "demo-artifacts")


def test_measure_queries_each_metric_for_the_canary_and_for_stable_when_relative() -> None:
    s = spec(
        [metric(max=100), metric("rel", relativeToStable=True, max=5), metric("broken", query="bad(1)", max=1)],
        **{"spec.rollout.thresholds.window": "2m"},
    )
    prom = Prom({"digits-canary-": 120.0, "digits-stable-": 100.0})
    m = rec.measure(prom, ctx_for(s), CanarySelector("digits", "digits-canary-"))
    by_name = {r.name: r for r in m.metrics}
    assert by_name["queue"] == MetricReading("queue", 120.0, None)
    assert by_name["rel"] == MetricReading("rel", 120.0, 100.0)
    broken = by_name["broken"].canary
    assert isinstance(broken, Rejected) and "unknown function bad" in broken.reason and "query: bad(1)" in broken.reason
    assert 'Hostname=~"digits-stable-.+"}[2m]' in " ".join(prom.queries)


def test_measure_without_prometheus_is_no_data_for_every_metric() -> None:
    s = spec([metric(max=1), metric("rel", relativeToStable=True, max=1)])
    m = rec.measure(None, ctx_for(s), CanarySelector("digits", "digits-canary-"))
    assert [type(r.canary) for r in m.metrics] == [NoData, NoData] and isinstance(m.metrics[1].stable, NoData)


# ---- evaluating ---------------------------------------------------------------------------------------


def test_a_metric_inside_its_bounds_passes_and_its_value_is_in_status() -> None:
    r = evaluate(spec([metric(min=1, max=100)]), measured(MetricReading("queue", 42.0)), T0)
    assert r.outcome == "Passed" and "metric queue 42 in [1, 100]" in (r.message or "")
    assert [(v.name, v.value, v.canary) for v in r.metrics] == [("queue", 42.0, 42.0)]
    wire = ModelDeploymentStatus(last_analysis=r).to_wire()
    assert wire["lastAnalysis"]["metrics"] == [{"name": "queue", "value": 42.0, "canary": 42.0}]


@pytest.mark.parametrize(
    ("bounds", "value", "message"),
    [
        ({"max": 100}, 250.0, "metric queue 250 > max 100"),
        ({"min": 0.9}, 0.5, "metric queue 0.5 < min 0.9"),
        ({"min": 0, "max": 1}, float("inf"), "metric queue inf > max 1"),
    ],
)
def test_a_metric_outside_its_bounds_fails_naming_metric_value_and_bound(
    bounds: dict[str, float], value: float, message: str
) -> None:
    r = evaluate(spec([metric(**bounds)]), measured(MetricReading("queue", value)), T0)
    assert r.outcome == "Failed" and message in (r.message or "")


def test_a_metric_without_data_is_no_data_and_a_rejected_one_fails() -> None:
    s = spec([metric(max=1)])
    empty = evaluate(s, measured(MetricReading("queue", NoData("the query returned no series"))), T0)
    assert empty.outcome == "NoData" and "metric queue: canary: the query returned no series" in (empty.message or "")
    assert empty.metrics[0].value is None
    rejected = evaluate(s, measured(MetricReading("queue", Rejected("parse error (query: x)"))), T0)
    assert rejected.outcome == "Failed" and "metric queue (canary): parse error" in (rejected.message or "")
    missing = evaluate(s, measured(), T0)
    assert missing.outcome == "NoData" and "not measured" in (missing.message or "")


def test_a_failed_metric_counts_even_when_a_preset_had_no_data() -> None:
    m = Measurement(error_rate=NoData("no series"), latency_p99_ms=10.0, metrics=(MetricReading("queue", 5.0),))
    assert evaluate(spec([metric(max=1)]), m, T0).outcome == "Failed"


@pytest.mark.parametrize(
    ("canary", "stable", "outcome", "text"),
    [
        (120.0, 100.0, "Failed", "metric rel canary - stable = 20 (canary 120, stable 100) > max 5"),
        (103.0, 100.0, "Passed", "metric rel canary - stable = 3"),
        (90.0, 100.0, "Passed", "canary - stable = -10"),
        (120.0, NoData("no series"), "NoData", "metric rel: stable: no series"),
        (120.0, Rejected("bad"), "Failed", "metric rel (stable): bad"),
    ],
)
def test_a_relative_metric_bounds_canary_minus_stable(
    canary: QueryResult, stable: QueryResult | Rejected, outcome: str, text: str
) -> None:
    r = evaluate(
        spec([metric("rel", relativeToStable=True, max=5)]), measured(MetricReading("rel", canary, stable)), T0
    )
    assert r.outcome == outcome and text in (r.message or "")
    if outcome == "Passed":
        assert r.metrics[0].value == canary - stable and r.metrics[0].stable == stable  # type: ignore[operator]


# ---- in the decision ----------------------------------------------------------------------------------


def in_canary(s: ModelDeploymentSpec, **canary: Any) -> ModelDeploymentStatus:
    return ModelDeploymentStatus.model_validate(
        {
            "phase": "Canary",
            "stable": {"version": "1.0.0", "archive": "a/1.mar"},
            "canary": {"version": "2.0.0", "archive": "a/2.mar", "weight": 5, "stepStartedAt": now_str(T0), **canary},
        }
    )


def observe(now: datetime, m: Measurement) -> Observed:
    return Observed(
        now=now,
        source=Source(version="2.0.0", archive="a/2.mar"),
        stable=DeploymentView(replicas=2, ready=2, version="1.0.0", rolled_out=True),
        canary=DeploymentView(replicas=1, ready=1, version="2.0.0", rolled_out=True),
        measurement=m,
    )


def test_a_failing_metric_is_a_failed_check_and_rolls_back_at_the_limit() -> None:
    s = spec([metric(max=100)], **{"spec.rollout.failedChecksBeforeRollback": 2})
    bad = measured(MetricReading("queue", 250.0))
    first = decide(s, in_canary(s), observe(T0 + timedelta(minutes=1, seconds=1), bad), 1)
    assert first.status.reason == "AnalysisFailed" and "metric queue 250 > max 100" in (first.status.message or "")
    second = decide(s, first.status, observe(T0 + timedelta(minutes=2, seconds=1), bad), 1)
    assert second.status.phase == "RolledBack" and "metric queue 250 > max 100" in (second.status.message or "")
    assert second.status.last_analysis is not None and second.status.last_analysis.metrics[0].value == 250.0


def test_a_metric_without_data_waits_then_fails_after_no_data_timeout() -> None:
    s = spec([metric(max=100)], **{"spec.rollout.noDataTimeout": "2m"})
    empty = measured(MetricReading("queue", NoData("the query returned no series")))
    waits = decide(s, in_canary(s), observe(T0 + timedelta(minutes=1, seconds=1), empty), 1)
    assert waits.status.reason == "AnalysisNoData" and waits.status.canary is not None
    assert waits.status.canary.failed_checks == 0
    late = decide(s, waits.status, observe(T0 + timedelta(minutes=3, seconds=2), empty), 1)
    assert late.status.canary is not None and late.status.canary.failed_checks == 1
    assert "rollout.noDataTimeout 2m" in (late.status.message or "") and "metric queue" in (late.status.message or "")


def test_passing_metrics_advance_the_step() -> None:
    s = spec([metric(max=100), metric("rel", relativeToStable=True, min=-5, max=5)])
    ok = measured(MetricReading("queue", 50.0), MetricReading("rel", 10.0, 9.0))
    plan = decide(s, in_canary(s), observe(T0 + timedelta(minutes=1, seconds=1), ok), 1)
    assert plan.status.reason == "CanaryStepAdvanced" and plan.status.canary is not None
    assert plan.status.canary.step == 1
