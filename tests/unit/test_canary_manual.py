"""Manual control of a ModelDeployment rollout through its spec: spec.rollout.paused holds a canary (and the start
of one) and resuming restarts the step; spec.rollout.action promotes, aborts or retries exactly once per id."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from flownexus.api.modeldeployment import ModelDeploymentSpec, ModelDeploymentStatus
from flownexus.modeldeployment.decide import (
    ACTION_LIMIT,
    DeploymentView,
    analysis_due,
    decide,
    now_str,
    pending_action,
    seconds_to_next_analysis,
    wants_tick,
)
from tests.unit.test_canary import (
    EMPTY,
    ERRORS,
    GOOD,
    T0,
    available_v1,
    cond,
    in_canary,
    obs,
    reasons,
    spec,
    status,
)

LEFT_CANARY = DeploymentView(replicas=0, ready=0, version="2.0.0", rolled_out=True)


def action(name: str, id_: str = "a1", **overrides: Any) -> ModelDeploymentSpec:
    return spec(**{"spec.rollout.action": {"name": name, "id": id_}, **overrides})


def paused(**overrides: Any) -> ModelDeploymentSpec:
    return spec(**{"spec.rollout.paused": True, **overrides})


def rolled_back_v2() -> ModelDeploymentStatus:
    plan = decide(action("abort", "first-abort"), in_canary(step=2), obs(), 3)
    assert plan.status.phase == "RolledBack"
    return plan.status


# ---- the API -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"name": "rollback", "id": "x"}, "name"),
        ({"name": "promote", "id": ""}, "id"),
        ({"name": "promote", "id": "has space"}, "id"),
        ({"name": "promote"}, "id"),
    ],
)
def test_an_invalid_action_is_refused_naming_the_field(value: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        overrides: dict[str, Any] = {"spec.rollout.action": value}
        spec(**overrides)
    assert any(e["loc"][-1] == field for e in err.value.errors())


def test_paused_and_action_default_to_nothing() -> None:
    rollout = spec().rollout
    assert rollout.paused is False and rollout.action is None


# ---- pause / resume ------------------------------------------------------------------------------


def test_a_paused_canary_holds_its_step_and_weight_without_analysis() -> None:
    st = in_canary(step=2)
    later = T0 + timedelta(minutes=5)
    assert not analysis_due(paused(), st, later) and seconds_to_next_analysis(paused(), st, later) is None
    plan = decide(paused(), st, obs(now=later, measurement=ERRORS), 4)  # a measurement, if any, is not used
    c = plan.status.canary
    assert c is not None and (c.step, c.weight, c.failed_checks) == (2, 25, 0)
    assert c.step_started_at == now_str(T0) and c.paused_at == now_str(later)
    assert plan.status.phase == "Canary" and plan.status.reason == "Paused"
    assert "holds step 3/10 at 25%" in (plan.status.message or "")
    assert plan.status.last_analysis is None and plan.canary_action == "ensure" and plan.route == "both"
    assert cond(plan.status, "Paused") == "True" and cond(plan.status, "Progressing") == "True"
    assert reasons(plan) == ["Paused"]
    assert not wants_tick(paused(), plan.status) and wants_tick(spec(), plan.status)


def test_a_paused_canary_posts_no_further_events_while_held() -> None:
    first = decide(paused(), in_canary(step=1), obs(), 4)
    again = decide(paused(), first.status, obs(now=T0 + timedelta(minutes=3)), 4)
    assert again.events == [] and again.status.canary is not None
    assert again.status.canary.paused_at == now_str(T0)  # when the hold began, not the latest pass


def test_resuming_restarts_the_step_clock_and_the_no_data_clock_keeping_failed_checks() -> None:
    held = decide(paused(), in_canary(step=1, failed=1), obs(measurement=EMPTY), 4).status
    assert held.canary is not None
    held.canary.no_data_since = now_str(T0)
    resumed_at = T0 + timedelta(hours=1)
    assert seconds_to_next_analysis(spec(), held, resumed_at) is None  # the clock restarts first
    plan = decide(spec(), held, obs(now=resumed_at), 5)
    c = plan.status.canary
    assert c is not None and c.paused_at is None and c.no_data_since is None
    assert c.step_started_at == now_str(resumed_at) and (c.step, c.failed_checks) == (1, 1)
    assert plan.status.reason == "Resumed" and cond(plan.status, "Paused") == "False"
    assert seconds_to_next_analysis(spec(), plan.status, resumed_at) == 60.0  # a whole interval of the step
    nxt = decide(spec(), plan.status, obs(now=resumed_at + timedelta(minutes=1), measurement=GOOD), 5)
    assert nxt.status.canary is not None and nxt.status.canary.step == 2  # analysis goes on


def test_paused_holds_the_start_of_a_new_canary() -> None:
    plan = decide(paused(), available_v1(), obs(), 2)
    st = plan.status
    assert st.phase == "Available" and st.reason == "Paused" and st.canary is None
    assert "version 2.0.0 waits to start its canary" in (st.message or "")
    assert plan.canary_action == "none" and cond(st, "Paused") == "True" and cond(st, "Ready") == "False"
    assert not wants_tick(paused(), st)  # nothing to do until the spec changes
    started = decide(spec(), st, obs(), 3)
    assert started.status.phase == "Canary" and cond(started.status, "Paused") == "False"


def test_paused_with_nothing_to_hold_says_so_and_stays_ready() -> None:
    plan = decide(paused(version="1.0.0"), available_v1(), obs(), 2)
    assert plan.status.phase == "Available" and cond(plan.status, "Ready") == "True"
    assert cond(plan.status, "Paused") == "True"
    message = next(c.message for c in plan.status.conditions if c.type == "Paused")
    assert "nothing to hold" in message


def test_no_paused_condition_on_a_deployment_never_paused() -> None:
    plan = decide(spec(), in_canary(), obs(), 2)
    assert cond(plan.status, "Paused") is None


def test_a_paused_canary_whose_deployment_fails_is_still_rolled_back() -> None:
    stuck = DeploymentView(replicas=1, ready=0, version="2.0.0", rolled_out=False, failure="deadline exceeded")
    plan = decide(paused(), in_canary(), obs(canary=stuck), 2)
    assert plan.status.phase == "RolledBack" and plan.route == "stable"


def test_a_paused_canary_is_withdrawn_when_the_version_changes() -> None:
    plan = decide(paused(version="3.0.0"), in_canary(), obs(), 2)
    assert plan.status.phase == "Available" and plan.status.reason == "CanaryAborted"


# ---- promote ------------------------------------------------------------------------------------


def test_promote_skips_the_remaining_steps() -> None:
    plan = decide(action("promote", "p-1"), in_canary(step=1), obs(), 6)
    st = plan.status
    assert st.phase == "Promoting" and st.stable is not None and st.stable.version == "2.0.0"
    assert [(h.version, h.outcome) for h in st.history][-2:] == [("1.0.0", "Retired"), ("2.0.0", "Promoted")]
    assert "promoted by spec.rollout.action promote (id p-1) at step 2/10 (15%)" in (st.history[-1].reason or "")
    assert st.message == (
        "canary 2.0.0 promoted by spec.rollout.action promote (id p-1) at step 2/10 (15%); "
        "stable switches from 1.0.0 to 2.0.0"
    )
    (done,) = st.actions
    assert (done.name, done.id, done.result, done.handled_at) == ("promote", "p-1", "Applied", now_str(T0))
    assert "manual_promote" in plan.decisions and "promote" in plan.decisions


def test_promote_applies_to_a_paused_canary() -> None:
    held = decide(paused(), in_canary(), obs(), 4).status
    plan = decide(action("promote", "p-2", **{"spec.rollout.paused": True}), held, obs(), 5)
    assert plan.status.phase == "Promoting"


def test_the_same_action_id_is_applied_once() -> None:
    once = decide(action("promote", "p-1"), in_canary(), obs(), 6)
    assert once.status.phase == "Promoting"
    assert pending_action(action("promote", "p-1"), once.status) is None
    # Promoted, a later rollout with the manifest still carrying the same action: it runs its steps.
    after = once.status.model_copy(deep=True)
    after.phase, after.canary = "Available", None
    nxt = decide(action("promote", "p-1", version="3.0.0"), after, obs(), 7)
    assert nxt.status.phase == "Canary" and len(nxt.status.actions) == 1


def test_a_handled_id_is_not_repeated_after_a_restart() -> None:
    wire = decide(action("abort", "a-9"), in_canary(), obs(), 6).status.model_dump(by_alias=True, exclude_none=True)
    restarted = ModelDeploymentStatus.model_validate(wire)
    assert restarted.actions[0].handled_at == now_str(T0)
    assert pending_action(action("abort", "a-9"), restarted) is None


@pytest.mark.parametrize(
    ("name", "st", "why"),
    [
        ("promote", available_v1(), "no canary under analysis (phase Available)"),
        ("abort", available_v1(), "no canary under analysis (phase Available)"),
        ("promote", status(phase="Pending"), "no canary under analysis (phase Pending)"),
        ("retry", available_v1(), "retry applies to a RolledBack deployment (phase Available)"),
        ("retry", in_canary(), "retry applies to a RolledBack deployment (phase Canary)"),
    ],
)
def test_an_action_that_does_not_apply_is_recorded_as_ignored(name: str, st: ModelDeploymentStatus, why: str) -> None:
    plan = decide(action(name, "x", version="1.0.0"), st, obs(), 3)
    (done,) = plan.status.actions
    assert (done.result, done.message) == ("Ignored", why)
    assert "ActionIgnored" in reasons(plan)


def test_an_ignored_action_lets_the_phase_decide_as_usual() -> None:
    plan = decide(action("retry", "r"), available_v1(), obs(), 3)
    assert plan.status.phase == "Canary" and plan.status.actions[0].result == "Ignored"


def test_promote_is_ignored_when_the_spec_moved_to_another_version() -> None:
    plan = decide(action("promote", "p", version="3.0.0"), in_canary(), obs(), 3)
    assert plan.status.actions[0].result == "Ignored" and "not the canary's 2.0.0" in (
        plan.status.actions[0].message or ""
    )
    assert plan.status.reason == "CanaryAborted"  # the version change withdraws the canary as before


def test_status_keeps_the_last_handled_actions() -> None:
    st = in_canary()
    st.actions = status(
        actions=[
            {"name": "promote", "id": f"old-{i}", "handledAt": now_str(T0), "result": "Ignored"}
            for i in range(ACTION_LIMIT)
        ]
    ).actions
    plan = decide(action("abort", "new"), st, obs(), 3)
    assert len(plan.status.actions) == ACTION_LIMIT
    assert plan.status.actions[-1].id == "new" and plan.status.actions[0].id == "old-1"


# ---- abort / retry -------------------------------------------------------------------------------


def test_abort_rolls_the_canary_back_now() -> None:
    plan = decide(action("abort", "stop"), in_canary(step=3), obs(), 3)
    st = plan.status
    assert st.phase == "RolledBack" and st.canary is None and plan.route == "stable"
    assert plan.canary_action == "scale_to_zero"
    assert st.history[-1].outcome == "RolledBack" and "aborted by spec.rollout.action abort (id stop)" in (
        st.history[-1].reason or ""
    )
    assert st.stable is not None and st.stable.version == "1.0.0" and cond(st, "Degraded") == "True"
    # Re-applied (same id), it stays RolledBack: nothing repeats, nothing restarts.
    again = decide(action("abort", "stop"), st, obs(canary=LEFT_CANARY), 3)
    assert again.status.phase == "RolledBack" and len(again.status.actions) == 1


def test_retry_starts_the_rolled_back_version_again_once_the_old_canary_is_gone() -> None:
    failed = rolled_back_v2()
    plan = decide(action("retry", "again"), failed, obs(canary=LEFT_CANARY), 4)
    st = plan.status
    assert st.actions[-1].result == "Applied" and st.phase == "Available" and st.reason == "RetiringCanary"
    assert plan.canary_action == "delete" and "RetryRequested" in reasons(plan)
    gone = decide(action("retry", "again"), st, obs(canary=None), 4)
    c = gone.status.canary
    assert gone.status.phase == "Canary" and c is not None and (c.version, c.step, c.failed_checks) == ("2.0.0", 0, 0)
    assert len(gone.status.actions) == 2  # the abort and the retry, each once


def test_retry_without_a_leftover_canary_starts_in_the_same_pass() -> None:
    plan = decide(action("retry", "again"), rolled_back_v2(), obs(canary=None), 4)
    assert plan.status.phase == "Canary" and plan.status.canary is not None


def test_without_retry_a_rolled_back_version_stays_rolled_back() -> None:
    plan = decide(spec(), rolled_back_v2(), obs(canary=LEFT_CANARY), 4)
    assert plan.status.phase == "RolledBack"


def test_retry_is_ignored_when_the_spec_names_another_version() -> None:
    plan = decide(action("retry", "r", version="3.0.0"), rolled_back_v2(), obs(canary=None), 4)
    assert plan.status.actions[-1].result == "Ignored"
    assert "is not the rolled-back 2.0.0" in (plan.status.actions[-1].message or "")


def test_an_action_waits_while_the_cluster_is_not_ready() -> None:
    plan = decide(action("abort", "a"), in_canary(), obs(cluster_problem="NeuralCluster demo is not Ready"), 3)
    assert plan.status.actions == [] and plan.status.phase == "Canary"
