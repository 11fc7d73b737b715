"""The ModelDeployment life cycle as a pure state machine: every phase and transition, NoData, rollback and
promotion timing, and restarts in every phase (the same status gives the same decision)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flownexus.api.modeldeployment import ModelDeploymentSpec, ModelDeploymentStatus
from flownexus.modeldeployment.decide import (
    DeploymentView,
    Measurement,
    Observed,
    Phase,
    Plan,
    Source,
    analysis_due,
    decide,
    evaluate,
    now_str,
    wants_tick,
)
from flownexus.modeldeployment.reconciler import status_wire
from flownexus.prometheus import NoData, Rejected
from tests.factories import model_deployment

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
V1 = Source(version="1.0.0", archive="default/digits/digits.mar", training_job="digits", metrics={"accuracy": 0.97})
V2 = Source(
    version="2.0.0", archive="default/digits-v2/digits.mar", training_job="digits-v2", metrics={"accuracy": 0.98}
)
READY2 = DeploymentView(replicas=2, ready=2, version="1.0.0", rolled_out=True)
GOOD = Measurement(error_rate=0.001, latency_p99_ms=20.0)
SLOW = Measurement(error_rate=0.0, latency_p99_ms=250.0)
ERRORS = Measurement(error_rate=0.2, latency_p99_ms=20.0)
EMPTY = Measurement(error_rate=NoData("the query returned no series"), latency_p99_ms=NoData("NaN"))


def spec(version: str = "2.0.0", **overrides: Any) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(
        model_deployment(**{"spec.model.version": version, "spec.rollout.interval": "1m", **overrides})["spec"]
    )


def status(**fields: Any) -> ModelDeploymentStatus:
    return ModelDeploymentStatus.model_validate(fields)


def available_v1() -> ModelDeploymentStatus:
    return status(
        phase="Available",
        stable={"version": "1.0.0", "trainingJob": "digits", "archive": V1.archive},
        history=[
            {
                "version": "1.0.0",
                "trainingJob": "digits",
                "metrics": {"accuracy": 0.97},
                "outcome": "Deployed",
                "at": now_str(T0),
            }
        ],
    )


def in_canary(step: int = 0, failed: int = 0, started: datetime = T0, **extra: Any) -> ModelDeploymentStatus:
    st = available_v1()
    st.phase = "Canary"
    st.canary = status(
        canary={
            "version": "2.0.0",
            "trainingJob": "digits-v2",
            "archive": V2.archive,
            "weight": spec().rollout.steps[step],
            "step": step,
            "failedChecks": failed,
            "stepStartedAt": now_str(started),
        }
    ).canary
    for key, value in extra.items():
        setattr(st, key, value)
    return st


def obs(now: datetime = T0, **fields: Any) -> Observed:
    base: dict[str, Any] = {"now": now, "source": V2, "stable": READY2}
    base.update(fields)
    return Observed(**base)


def cond(st: ModelDeploymentStatus, type_: str) -> str | None:
    return next((c.status for c in st.conditions if c.type == type_), None)


def reasons(plan: Plan) -> list[str]:
    return [e.reason for e in plan.events]


# ---- Pending -> Progressing -> Available -----------------------------------------------------------


def test_waits_in_pending_for_a_validated_model() -> None:
    plan = decide(
        spec("1.0.0"), status(), obs(source=None, source_problem="TrainingJob digits is not Validated yet"), 3
    )
    st = plan.status
    assert st.phase == "Pending" and st.reason == "WaitingForModel" and "not Validated" in (st.message or "")
    assert st.stable is None and st.observed_generation == 3
    assert cond(st, "Ready") == "False" and cond(st, "Progressing") == "False"


def test_a_failed_trainingjob_fails_a_deployment_that_serves_nothing() -> None:
    plan = decide(spec("1.0.0"), status(), obs(source=None, source_problem="failed", source_final=True), 1)
    assert plan.status.phase == "Failed" and cond(plan.status, "Degraded") == "True"


def test_cluster_not_ready_waits_without_touching_anything() -> None:
    plan = decide(spec("1.0.0"), status(), obs(cluster_problem="NeuralCluster demo does not exist"), 1)
    assert plan.status.phase == "Pending" and plan.status.reason == "ClusterNotReady"
    assert plan.status.stable is None and plan.canary_action == "none"


def test_the_first_version_simply_becomes_stable() -> None:
    plan = decide(spec("1.0.0"), status(), obs(source=V1, stable=None), 1)
    st = plan.status
    assert st.phase == "Progressing" and st.stable is not None and st.stable.version == "1.0.0"
    assert st.stable.archive == V1.archive and st.stable.training_job == "digits"
    assert st.canary is None and plan.route == "stable"
    assert [(h.version, h.outcome, h.metrics) for h in st.history] == [("1.0.0", "Deployed", {"accuracy": 0.97})]
    assert "deploy" in plan.decisions


def test_progressing_until_the_model_is_loaded_then_available() -> None:
    st = available_v1()
    st.phase = "Progressing"
    loading = DeploymentView(replicas=2, ready=0, version="1.0.0", rolled_out=False)
    plan = decide(spec("1.0.0"), st, obs(source=V1, stable=loading), 1)
    assert plan.status.phase == "Progressing" and "0/2 pods have the model loaded" in (plan.status.message or "")
    plan = decide(spec("1.0.0"), plan.status, obs(source=V1, stable=READY2), 1)
    assert plan.status.phase == "Available" and cond(plan.status, "Ready") == "True"
    assert cond(plan.status, "Progressing") == "False" and cond(plan.status, "Degraded") == "False"
    assert plan.status.stable is not None and plan.status.stable.ready_replicas == 2
    assert "Available" in reasons(plan)


def test_available_stays_available_while_the_hpa_scales_the_stable() -> None:
    scaling = DeploymentView(replicas=3, ready=2, version="1.0.0", rolled_out=False)  # generation not observed yet
    st = available_v1()
    st.reason = "Available"
    plan = decide(spec("1.0.0"), st, obs(source=V1, stable=scaling), 1)
    assert plan.status.phase == "Available" and cond(plan.status, "Ready") == "True"
    assert plan.status.stable is not None and (plan.status.stable.replicas, plan.status.stable.ready_replicas) == (3, 2)
    assert not reasons(plan)  # no Event: nothing changed but the counts


def test_stable_scaled_to_zero_by_spec_is_available() -> None:
    zero = DeploymentView(replicas=0, ready=0, version="1.0.0", rolled_out=True)
    st = available_v1()
    plan = decide(
        spec("1.0.0", **{"spec.autoscaling.enabled": False, "spec.serving.replicas": 0}),
        st,
        obs(source=V1, stable=zero),
        1,
    )
    assert plan.status.phase == "Available"  # nothing to load


def test_available_deletes_a_leftover_canary() -> None:
    leftover = DeploymentView(replicas=0, ready=0, version="2.0.0", rolled_out=True)
    plan = decide(spec("1.0.0"), available_v1(), obs(source=V1, canary=leftover), 1)
    assert plan.status.phase == "Available" and plan.canary_action == "delete"


# ---- Available -> Canary -------------------------------------------------------------------------


def test_a_new_version_starts_a_canary_at_the_first_step() -> None:
    plan = decide(spec(), available_v1(), obs(), 2)
    st = plan.status
    assert st.phase == "Canary" and st.canary is not None
    assert (st.canary.version, st.canary.training_job, st.canary.archive) == ("2.0.0", "digits-v2", V2.archive)
    assert (st.canary.step, st.canary.weight, st.canary.failed_checks) == (0, 5, 0)
    assert st.canary.step_started_at == now_str(T0)
    assert st.canary.replicas == 1 and st.canary.achieved_weight == 33.3  # 1 canary next to 2 stable
    assert plan.canary_action == "ensure" and plan.route == "both"
    assert st.stable is not None and st.stable.version == "1.0.0"
    assert cond(st, "Progressing") == "True" and cond(st, "Ready") == "False"
    assert "CanaryStarted" in reasons(plan) and "start" in plan.decisions


def test_a_new_version_that_is_not_servable_yet_keeps_stable_serving() -> None:
    plan = decide(spec(), available_v1(), obs(source=None, source_problem="TrainingJob digits-v2 is not Validated"), 2)
    st = plan.status
    assert st.phase == "Available" and st.reason == "WaitingForModel" and st.canary is None
    assert cond(st, "Ready") == "False" and cond(st, "Progressing") == "True"


def test_no_canary_before_the_stable_is_ready() -> None:
    rolling = DeploymentView(replicas=2, ready=1, version="1.0.0", rolled_out=False)
    plan = decide(spec(), available_v1(), obs(stable=rolling), 2)
    assert plan.status.phase == "Progressing" and plan.status.canary is None


# ---- Canary: analysis every interval -----------------------------------------------------------------


def test_no_analysis_before_the_interval() -> None:
    st = in_canary()
    assert not analysis_due(spec(), st, T0 + timedelta(seconds=59))
    assert analysis_due(spec(), st, T0 + timedelta(seconds=60))
    plan = decide(spec(), st, obs(T0 + timedelta(seconds=30)), 2)
    assert plan.status.phase == "Canary" and plan.status.last_analysis is None
    assert plan.canary_action == "ensure" and plan.route == "both" and not plan.events


def test_no_data_waits_without_a_step_or_a_failed_check() -> None:
    now = T0 + timedelta(minutes=1)
    plan = decide(spec(), in_canary(step=1, failed=1), obs(now, measurement=EMPTY), 2)
    st = plan.status
    assert st.phase == "Canary" and st.canary is not None
    assert (st.canary.step, st.canary.failed_checks) == (1, 1)
    assert st.last_analysis is not None and st.last_analysis.outcome == "NoData"
    assert st.last_analysis.error_rate is None and "no series" in (st.last_analysis.message or "")
    assert "AnalysisNoData" in reasons(plan)
    # the next check is one interval after this one, not every tick
    assert not analysis_due(spec(), st, now + timedelta(seconds=30))
    assert analysis_due(spec(), st, now + timedelta(minutes=1))


@pytest.mark.parametrize(
    ("measurement", "what"), [(ERRORS, "error rate 0.2000 > 0.01"), (SLOW, "p99 latency 250.0 ms")]
)
def test_a_failed_check_counts(measurement: Measurement, what: str) -> None:
    plan = decide(spec(), in_canary(step=2), obs(T0 + timedelta(minutes=1), measurement=measurement), 2)
    st = plan.status
    assert st.phase == "Canary" and st.canary is not None and st.canary.failed_checks == 1 and st.canary.step == 2
    assert st.last_analysis is not None and st.last_analysis.outcome == "Failed"
    assert what in (st.last_analysis.message or "")
    assert plan.events[-1].type == "Warning" and plan.events[-1].reason == "AnalysisFailed"


def test_a_measured_failure_counts_even_when_the_other_query_has_no_data() -> None:
    m = Measurement(error_rate=0.5, latency_p99_ms=NoData("NaN"))
    result = evaluate(spec(), m, T0)
    assert result.outcome == "Failed" and result.error_rate == 0.5 and result.latency_p99_ms is None


def test_infinite_p99_fails() -> None:
    assert evaluate(spec(), Measurement(error_rate=0.0, latency_p99_ms=float("inf")), T0).outcome == "Failed"


def test_a_passed_check_steps_up_the_weight() -> None:
    now = T0 + timedelta(minutes=1)
    plan = decide(spec(), in_canary(step=0), obs(now, measurement=GOOD), 2)
    st = plan.status
    assert st.phase == "Canary" and st.canary is not None
    assert (st.canary.step, st.canary.weight, st.canary.step_started_at) == (1, 15, now_str(now))
    assert st.last_analysis is not None and st.last_analysis.outcome == "Passed"
    assert st.last_analysis.error_rate == 0.001 and st.last_analysis.latency_p99_ms == 20.0
    assert "CanaryStepAdvanced" in reasons(plan) and "passed" in plan.decisions


def test_canary_replicas_follow_the_hpa_scaled_stable() -> None:
    scaled = DeploymentView(replicas=7, ready=7, version="1.0.0", rolled_out=True)
    canary = DeploymentView(replicas=1, ready=1, version="2.0.0", rolled_out=True)
    plan = decide(spec(), in_canary(step=2), obs(T0 + timedelta(seconds=10), stable=scaled, canary=canary), 2)
    assert plan.status.canary is not None
    assert plan.status.canary.replicas == 3  # ceil(7 * 25 / 75)
    assert plan.status.canary.achieved_weight == 12.5  # what the ready pods give now: 1 / (1 + 7)


# ---- Canary -> RolledBack --------------------------------------------------------------------------


def test_rollback_runbook_after_the_last_allowed_failed_check() -> None:
    now = T0 + timedelta(minutes=3)
    canary_pods = DeploymentView(replicas=1, ready=1, version="2.0.0", rolled_out=True)
    plan = decide(spec(), in_canary(step=1, failed=2), obs(now, measurement=ERRORS, canary=canary_pods), 2)
    st = plan.status
    assert st.phase == "RolledBack" and st.canary is None
    assert plan.route == "stable" and plan.canary_action == "scale_to_zero"
    assert st.last_analysis is not None and st.last_analysis.outcome == "Failed" and st.last_analysis.error_rate == 0.2
    assert "3 of 3 checks failed" in (st.message or "") and "error rate 0.2000" in (st.message or "")
    last = st.history[-1]
    assert (last.version, last.outcome, last.training_job) == ("2.0.0", "RolledBack", "digits-v2")
    assert "error rate 0.2000" in (last.reason or "")
    assert st.stable is not None and st.stable.version == "1.0.0"
    assert cond(st, "Degraded") == "True" and cond(st, "Ready") == "False" and cond(st, "Progressing") == "False"
    assert plan.events[-1].type == "Warning" and plan.events[-1].reason == "RolledBack"
    assert "rollback" in plan.decisions


def test_a_canary_that_never_becomes_ready_is_rolled_back() -> None:
    stuck = DeploymentView(replicas=1, ready=0, version="2.0.0", rolled_out=False, failure="ProgressDeadlineExceeded")
    plan = decide(spec(), in_canary(), obs(T0 + timedelta(seconds=10), canary=stuck), 2)
    assert plan.status.phase == "RolledBack" and "did not become ready" in (plan.status.message or "")


def test_rolled_back_stays_until_the_version_changes() -> None:
    rolled = decide(spec(), in_canary(failed=2), obs(T0 + timedelta(minutes=1), measurement=ERRORS), 2).status
    zero = DeploymentView(replicas=0, ready=0, version="2.0.0", rolled_out=True)
    again = decide(spec(), rolled, obs(T0 + timedelta(minutes=5), canary=zero), 2)
    assert again.status.phase == "RolledBack" and again.canary_action == "none" and again.route == "stable"
    assert not again.events  # nothing new happened
    assert not wants_tick(spec(), rolled)
    back = decide(spec("1.0.0"), rolled, obs(T0 + timedelta(minutes=6), source=V1, canary=zero), 3)
    assert back.status.phase == "Available" and back.canary_action == "delete"
    v3 = Source(version="3.0.0", archive="default/digits-v3/digits.mar", training_job="digits-v3")
    retry = decide(spec("3.0.0"), rolled, obs(T0 + timedelta(minutes=6), source=v3), 3)
    assert retry.status.phase == "Canary" and retry.status.canary is not None
    assert retry.status.canary.version == "3.0.0" and retry.canary_action == "ensure"


@pytest.mark.parametrize("left", ["rolled back (scaled to zero)", "promoted (a crash before its delete)"])
def test_a_new_canary_never_takes_over_a_left_canary_deployment_it_waits_until_it_is_gone(left: str) -> None:
    """The canary Deployment of an earlier version is deleted first (with its pods): otherwise the new version's
    template would roll it in place while the old version's ready pods keep serving, and be measured, as it."""
    old_canary = (
        DeploymentView(replicas=0, ready=0, version="2.0.0", rolled_out=True)
        if left.startswith("rolled")
        else DeploymentView(replicas=1, ready=1, version="2.0.0", rolled_out=True)
    )
    serving = available_v1()
    v3 = Source(version="3.0.0", archive="default/digits-v3/digits.mar", training_job="digits-v3")
    wait = decide(spec("3.0.0"), serving, obs(T0 + timedelta(minutes=1), source=v3, canary=old_canary), 3)
    assert wait.canary_action == "delete" and wait.status.canary is None
    assert wait.status.phase == "Available" and wait.status.reason == "RetiringCanary"
    gone = decide(spec("3.0.0"), wait.status, obs(T0 + timedelta(minutes=1, seconds=5), source=v3), 3)
    assert gone.status.phase == "Canary" and gone.canary_action == "ensure"
    assert gone.status.canary is not None and gone.status.canary.version == "3.0.0"


def test_a_version_change_during_the_canary_withdraws_it() -> None:
    plan = decide(spec("1.0.0"), in_canary(step=3), obs(T0 + timedelta(seconds=10), source=V1), 3)
    st = plan.status
    assert st.phase == "Available" and st.reason == "CanaryAborted" and st.canary is None
    assert plan.route == "stable" and plan.canary_action == "delete"
    assert st.history[-1].outcome == "RolledBack" and "changed to 1.0.0" in (st.history[-1].reason or "")


# ---- Canary -> Promoting -> Available ----------------------------------------------------------------


def test_after_the_last_step_the_canary_is_promoted() -> None:
    last = len(spec().rollout.steps) - 1
    plan = decide(spec(), in_canary(step=last), obs(T0 + timedelta(minutes=1), measurement=GOOD), 2)
    st = plan.status
    assert st.phase == "Promoting" and st.stable is not None and st.stable.version == "2.0.0"
    assert st.stable.archive == V2.archive and st.stable.training_job == "digits-v2"
    assert [(h.version, h.outcome) for h in st.history[-2:]] == [("1.0.0", "Retired"), ("2.0.0", "Promoted")]
    assert st.history[-2].metrics == {"accuracy": 0.97}  # the old version keeps its lineage
    assert st.history[-1].metrics == {"accuracy": 0.98}
    assert plan.route == "both" and plan.canary_action == "ensure"  # the canary serves until stable is rolled


def test_promoting_waits_for_the_stable_rollout_then_removes_the_canary() -> None:
    last = len(spec().rollout.steps) - 1
    promoting = decide(spec(), in_canary(step=last), obs(T0 + timedelta(minutes=1), measurement=GOOD), 2).status
    rolling = DeploymentView(replicas=2, ready=2, version="2.0.0", rolled_out=False)
    wait = decide(spec(), promoting, obs(T0 + timedelta(minutes=1, seconds=10), stable=rolling), 2)
    assert wait.status.phase == "Promoting" and wait.canary_action == "ensure" and wait.route == "both"
    done_view = DeploymentView(replicas=2, ready=2, version="2.0.0", rolled_out=True)
    done = decide(spec(), wait.status, obs(T0 + timedelta(minutes=2), stable=done_view), 2)
    st = done.status
    assert st.phase == "Available" and st.canary is None and st.reason == "Promoted"
    assert done.canary_action == "delete" and done.route == "stable"
    assert cond(st, "Ready") == "True" and cond(st, "Progressing") == "False"
    assert not wants_tick(spec(), st)


# ---- timing, end to end through ticks -----------------------------------------------------------------


def simulate(
    sp: ModelDeploymentSpec, measurement: Measurement, tick_s: float, until: Phase, limit_s: float
) -> tuple[float, int, ModelDeploymentStatus]:
    """Tick like the operator's timer; returns (seconds from canary start to ``until``, analyses, status)."""
    st = decide(sp, available_v1(), obs(T0), 2).status
    assert st.phase == "Canary"
    analyses, t = 0, 0.0
    canary_view = DeploymentView(replicas=1, ready=1, version="2.0.0", rolled_out=True)
    while t <= limit_s:
        t += tick_s
        now = T0 + timedelta(seconds=t)
        m = None
        if analysis_due(sp, st, now):
            m, analyses = measurement, analyses + 1
        stable_view = READY2 if st.phase != "Promoting" else replace(READY2, version="2.0.0")
        st = decide(sp, st, obs(now, measurement=m, canary=canary_view, stable=stable_view), 2).status
        if st.phase == until.value:
            return t, analyses, st
    raise AssertionError(f"not {until.value} after {limit_s}s: {st.phase} {st.message}")


@pytest.mark.parametrize(
    ("interval", "failed_checks", "tick"),
    [("1m", 3, 10.0), ("30s", 2, 10.0), ("20s", 5, 7.0), ("10s", 6, 9.0)],  # the last: a tick just under the interval
)
def test_a_bad_canary_is_rolled_back_within_interval_times_n_plus_one_interval(
    interval: str, failed_checks: int, tick: float
) -> None:
    sp = spec(**{"spec.rollout.interval": interval, "spec.rollout.failedChecksBeforeRollback": failed_checks})
    seconds = {"1m": 60, "30s": 30, "20s": 20, "10s": 10}[interval]
    elapsed, analyses, st = simulate(sp, SLOW, tick, Phase.ROLLED_BACK, limit_s=10 * seconds * failed_checks)
    assert analyses == failed_checks
    assert elapsed <= seconds * failed_checks + tick  # analyses are anchored at the step start: no drift
    assert elapsed <= seconds * failed_checks + seconds
    assert st.last_analysis is not None and st.last_analysis.latency_p99_ms == 250.0


def test_no_data_waits_until_the_no_data_timeout_and_never_promotes() -> None:
    sp = spec(**{"spec.rollout.interval": "30s", "spec.rollout.noDataTimeout": "1h"})
    with pytest.raises(AssertionError, match="not RolledBack"):
        simulate(sp, EMPTY, 10.0, Phase.ROLLED_BACK, limit_s=600)
    with pytest.raises(AssertionError, match="not Promoting"):
        simulate(sp, EMPTY, 10.0, Phase.PROMOTING, limit_s=600)


def test_past_the_no_data_timeout_every_slot_without_data_is_a_failed_check() -> None:
    sp = spec(**{"spec.rollout.interval": "30s", "spec.rollout.failedChecksBeforeRollback": 3})
    assert sp.rollout.no_data_timeout == "5m"  # the default
    elapsed, _, st = simulate(sp, EMPTY, 10.0, Phase.ROLLED_BACK, limit_s=1200)
    # The first slot without data starts the clock (30 s); slots from 5 min after it fail; three of them roll back.
    assert 30 + 300 + 2 * 30 <= elapsed <= 30 + 300 + 3 * 30 + 10, elapsed
    last = st.history[-1]
    assert last.outcome == "RolledBack" and "rollout.noDataTimeout 5m" in (last.reason or "")


def test_data_resets_the_no_data_clock() -> None:
    st = decide(spec(), in_canary(), obs(T0 + timedelta(minutes=1), measurement=EMPTY), 2).status
    assert st.canary is not None and st.canary.no_data_since == now_str(T0 + timedelta(minutes=1))
    st = decide(spec(), st, obs(T0 + timedelta(minutes=2), measurement=GOOD), 2).status
    assert st.canary is not None and st.canary.no_data_since is None


def test_a_query_prometheus_rejects_is_a_failed_check_with_its_words() -> None:
    rejected = Measurement(
        error_rate=Rejected('Prometheus rejected the query: bad_data: parse error: unexpected "}"'),
        latency_p99_ms=20.0,
    )
    plan = decide(spec(), in_canary(), obs(T0 + timedelta(minutes=1), measurement=rejected), 2)
    st = plan.status
    assert st.last_analysis is not None and st.last_analysis.outcome == "Failed"
    assert st.canary is not None and st.canary.failed_checks == 1
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "AnalysisFailed")]
    assert "parse error" in plan.events[0].message


def test_a_good_canary_is_promoted_after_every_step() -> None:
    sp = spec(**{"spec.rollout.steps": [10, 50, 90], "spec.rollout.interval": "30s"})
    elapsed, analyses, st = simulate(sp, GOOD, 10.0, Phase.AVAILABLE, limit_s=600)
    assert analyses == 3 and elapsed <= 3 * 30 + 30
    assert st.stable is not None and st.stable.version == "2.0.0" and st.canary is None
    assert [h.outcome for h in st.history] == ["Deployed", "Retired", "Promoted"]


# ---- restarts: the same status gives the same decision ---------------------------------------------


def _through_the_wire(st: ModelDeploymentStatus) -> ModelDeploymentStatus:
    """What a restarted operator reads back: the status as written (replaced) and parsed again."""
    return ModelDeploymentStatus.model_validate(status_wire(st))


def _phases() -> list[tuple[str, ModelDeploymentSpec, ModelDeploymentStatus, Observed]]:
    last = len(spec().rollout.steps) - 1
    promoting = decide(spec(), in_canary(step=last), obs(T0 + timedelta(minutes=1), measurement=GOOD), 2).status
    rolled = decide(spec(), in_canary(failed=2), obs(T0 + timedelta(minutes=1), measurement=ERRORS), 2).status
    progressing = available_v1()
    progressing.phase = "Progressing"
    later = T0 + timedelta(minutes=2)
    return [
        ("Pending", spec("1.0.0"), status(), obs(later, source=None, source_problem="not Validated")),
        (
            "Failed",
            spec("1.0.0"),
            status(phase="Failed"),
            obs(later, source=None, source_problem="x", source_final=True),
        ),
        ("Progressing", spec("1.0.0"), progressing, obs(later, source=V1)),
        ("Available", spec(), available_v1(), obs(later)),
        ("Canary-due", spec(), in_canary(step=1), obs(later, measurement=GOOD)),
        ("Canary-failing", spec(), in_canary(step=1, failed=1), obs(later, measurement=ERRORS)),
        ("Canary-nodata", spec(), in_canary(step=1), obs(later, measurement=EMPTY)),
        ("Promoting", spec(), promoting, obs(later, stable=replace(READY2, version="2.0.0"))),
        ("RolledBack", spec(), rolled, obs(later)),
    ]


@pytest.mark.parametrize("case", _phases(), ids=lambda c: c[0])
def test_restart_in_every_phase_takes_the_same_decision(case: tuple[str, Any, ModelDeploymentStatus, Observed]) -> None:
    _, sp, st, observed = case
    before = decide(sp, st, observed, 2)
    after = decide(sp, _through_the_wire(st), observed, 2)
    assert status_wire(after.status) == status_wire(before.status)
    assert (after.route, after.canary_action, after.events, after.decisions) == (
        before.route,
        before.canary_action,
        before.events,
        before.decisions,
    )


@pytest.mark.parametrize(
    ("st", "version", "ticks"),
    [
        (status(), "1.0.0", True),
        (available_v1(), "1.0.0", False),
        (available_v1(), "2.0.0", True),  # a new version waits for its model or starts a canary
        (in_canary(), "2.0.0", True),
        (status(phase="Failed"), "1.0.0", False),
    ],
)
def test_the_timer_is_idle_unless_something_is_under_way(st: ModelDeploymentStatus, version: str, ticks: bool) -> None:
    assert wants_tick(spec(version), st) is ticks
