"""The ModelDeployment life cycle as a pure state machine: status + what was observed in, a Plan out.

One transition per tick; every bit of state (phase, step, failed checks, when the step began, the last
analysis) lives in status, so a restarted operator takes the same decision from the same status. Read it
top to bottom: :func:`decide` dispatches on the phase, one small function per phase. Manual control comes
from the spec too: ``spec.rollout.paused`` holds a canary (and the start of one), and a one-shot
``spec.rollout.action`` is applied once per id, its id recorded in ``status.actions`` in the same write.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

from ..api.modeldeployment import (
    AnalysisResult,
    CanaryState,
    HandledAction,
    HistoryEntry,
    MetricValue,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    RolloutAction,
    RolloutMetric,
    ServedVersion,
    ServingTemplate,
)
from ..meta import TIME_FORMAT, parse_time, set_condition
from ..prometheus import NoData, QueryResult, Rejected
from .children import achieved_weight, canary_replicas, max_replicas, revision, template_hash

HISTORY_LIMIT = 50  # entries kept in status.history
ACTION_LIMIT = 20  # handled spec.rollout.action ids kept in status.actions
PAUSED = "Paused"  # the reason (and condition type) while spec.rollout.paused holds a rollout


class Phase(StrEnum):
    """Where a ModelDeployment is; the value is what status.phase holds."""

    PENDING = "Pending"  # nothing served yet: waiting for a Validated TrainingJob or a Ready NeuralCluster
    PROGRESSING = "Progressing"  # the stable Deployment is rolling out and not ready yet
    AVAILABLE = "Available"  # the stable version serves all traffic and is ready
    CANARY = "Canary"  # a new version takes a step's share of the traffic and is analysed every interval
    PROMOTING = "Promoting"  # every step passed: stable switches to the new version, then the canary goes
    ROLLED_BACK = "RolledBack"  # the canary failed its checks; stable serves all traffic, canary at zero
    FAILED = "Failed"  # nothing served and the spec cannot work as it is (e.g. its TrainingJob failed)


ACTIVE_PHASES = {Phase.PROGRESSING.value, Phase.CANARY.value, Phase.PROMOTING.value}


def wants_tick(spec: ModelDeploymentSpec, status: ModelDeploymentStatus) -> bool:
    """Whether the periodic timer has anything to do: a rollout under way, or something to wait for.

    Idle deployments (Available at the wanted version, RolledBack at the failed one, Failed) cost nothing, and
    so does a rollout held by spec.rollout.paused: unsetting it is a spec change, which the watch brings.
    """
    phase = status.phase
    if spec.rollout.paused and status.reason == PAUSED:
        return False
    if phase in ACTIVE_PHASES or phase in (None, Phase.PENDING.value):
        return True
    if status.stable is None or spec.model.version == status.stable.version:
        return False
    if phase == Phase.ROLLED_BACK.value:
        failed = next((h.version for h in reversed(status.history) if h.outcome == "RolledBack"), None)
        return spec.model.version != failed
    return phase != Phase.FAILED.value


@dataclass(frozen=True)
class Source:
    """What spec.model resolves to: a servable archive of the requested version."""

    version: str
    archive: str  # relative to the artifact store root
    training_job: str | None = None
    archive_version: str | None = None  # the version in the archive's manifest, when known
    metrics: dict[str, float] | None = None  # at validation


@dataclass(frozen=True)
class DeploymentView:
    """What one of our Deployments looks like now."""

    replicas: int  # spec.replicas (the HPA's choice for stable)
    ready: int
    version: str | None  # the flownexus.io/version label of its pod template
    rolled_out: bool  # the controller has finished rolling out the current template
    failure: str | None = None  # ProgressDeadlineExceeded and the like
    template_hash: str | None = None  # the serving template's digest the Deployment was last given


@dataclass(frozen=True)
class MetricReading:
    """One spec.rollout.metrics query as Prometheus answered it, for the canary (and stable when relative)."""

    name: str
    canary: QueryResult | Rejected
    stable: QueryResult | Rejected | None = None


@dataclass(frozen=True)
class Measurement:
    """One analysis of the canary, as Prometheus answered."""

    error_rate: QueryResult | Rejected
    latency_p99_ms: QueryResult | Rejected
    metrics: tuple[MetricReading, ...] = ()


@dataclass(frozen=True)
class Observed:
    """What the reconciler saw this pass."""

    now: datetime
    cluster_problem: str = ""  # non-empty: the NeuralCluster cannot be used
    source: Source | None = None
    source_problem: str = ""  # why spec.model is not servable (yet)
    source_final: bool = False  # it never will be as the spec stands (the TrainingJob failed)
    stable: DeploymentView | None = None
    canary: DeploymentView | None = None
    measurement: Measurement | None = None  # present only when analysis_due() said so
    template: ServingTemplate | None = None  # the serving template the spec asks for (None: not known now)


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


CanaryAction = Literal["none", "ensure", "scale_to_zero", "delete"]


@dataclass
class Plan:
    """What to do this pass. The executor applies it in a fixed order that doubles as the rollback runbook:
    stable Deployment, canary Deployment (ensure), Service routing, Events, canary to zero / delete, status."""

    status: ModelDeploymentStatus
    route: Literal["stable", "both"] = "stable"
    canary_action: CanaryAction = "none"
    events: list[Event] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)  # for the CANARY_DECISIONS metric
    wanted_hash: str | None = None  # the digest of Observed.template
    # spec.rollout.smokeTraffic: the canary step whose smoke Job should run now (None: no smoke Job at all; the
    # reconciler creates this step's Job when missing and deletes every other one)
    smoke_step: int | None = None


def now_str(now: datetime) -> str:
    return now.astimezone(UTC).strftime(TIME_FORMAT)


def parse_duration(value: str) -> float:
    """Seconds in ``30s`` / ``1m`` / ``2h`` (the API pattern allows nothing else)."""
    return float(value[:-1]) * {"s": 1, "m": 60, "h": 3600}[value[-1]]


# ---- analysis ---------------------------------------------------------------------------------------


def seconds_to_next_analysis(spec: ModelDeploymentSpec, status: ModelDeploymentStatus, now: datetime) -> float | None:
    """Seconds until the canary's next analysis (<= 0: due now); None when no canary is under analysis.

    Analyses fall in slots anchored at the step's start (start + k x interval), so a tick that runs late does
    not push every later analysis back: N failed checks take at most N x interval + one tick.
    """
    canary = status.canary
    if status.phase != Phase.CANARY.value or canary is None:
        return None
    if spec.rollout.paused or canary.paused_at is not None:
        return None  # held: no analysis; resuming restarts the step's clock first
    started = parse_time(canary.step_started_at)
    if started is None:
        return 0.0
    interval = parse_duration(spec.rollout.interval)
    analysed = parse_time(status.last_analysis.time) if status.last_analysis else None
    done_slots = 0
    if analysed is not None and analysed >= started:
        done_slots = math.floor((analysed - started).total_seconds() / interval)
    due = started + timedelta(seconds=(done_slots + 1) * interval)
    return (due - now).total_seconds()


def analysis_due(spec: ModelDeploymentSpec, status: ModelDeploymentStatus, now: datetime) -> bool:
    """Whether the reconciler must query Prometheus before deciding (one analysis per interval)."""
    left = seconds_to_next_analysis(spec, status, now)
    return left is not None and left <= 0


def evaluate(spec: ModelDeploymentSpec, m: Measurement, now: datetime) -> AnalysisResult:
    """Passed, Failed (naming every threshold that failed, with its value) or NoData (with why)."""
    limits = spec.rollout.thresholds
    failed: list[str] = []
    missing: list[str] = []
    error_rate = m.error_rate if isinstance(m.error_rate, float | int) else None
    p99 = m.latency_p99_ms if isinstance(m.latency_p99_ms, float | int) else None
    if isinstance(m.error_rate, Rejected):
        failed.append(f"error rate: {m.error_rate.reason}")
    elif isinstance(m.error_rate, NoData):
        missing.append(f"error rate: {m.error_rate.reason}")
    elif m.error_rate > limits.max_error_rate:
        failed.append(f"error rate {m.error_rate:.4f} > {limits.max_error_rate}")
    if isinstance(m.latency_p99_ms, Rejected):
        failed.append(f"p99 latency: {m.latency_p99_ms.reason}")
    elif isinstance(m.latency_p99_ms, NoData):
        missing.append(f"p99 latency: {m.latency_p99_ms.reason}")
    elif not math.isfinite(m.latency_p99_ms) or m.latency_p99_ms > limits.max_latency_p99_ms:
        failed.append(f"p99 latency {m.latency_p99_ms:.1f} ms > {limits.max_latency_p99_ms} ms")
    readings = {r.name: r for r in m.metrics}
    values: list[MetricValue] = []
    passed: list[str] = []
    for metric in spec.rollout.metrics:
        reading = readings.get(metric.name) or MetricReading(metric.name, NoData("not measured"))
        value, line, kind = evaluate_metric(metric, reading)
        values.append(value)
        {"failed": failed, "missing": missing, "passed": passed}[kind].append(line)
    if failed:  # a measured failure counts even when the other query had no data
        outcome, message = "Failed", "; ".join(failed)
    elif missing:
        outcome, message = "NoData", "; ".join(missing)
    else:
        outcome = "Passed"
        message = ", ".join(
            [
                f"error rate {error_rate:.4f} <= {limits.max_error_rate}",
                f"p99 {p99:.1f} ms <= {limits.max_latency_p99_ms} ms",
                *passed,
            ]
        )
    return AnalysisResult(
        time=now_str(now),
        outcome=outcome,
        error_rate=_finite(error_rate),
        latency_p99_ms=_finite(p99),
        metrics=values,
        message=message,
    )


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def _bounds(metric: RolloutMetric) -> str:
    low = "-inf" if metric.min is None else f"{metric.min:g}"
    high = "+inf" if metric.max is None else f"{metric.max:g}"
    return f"[{low}, {high}]"


def evaluate_metric(
    metric: RolloutMetric, reading: MetricReading
) -> tuple[MetricValue, str, Literal["passed", "failed", "missing"]]:
    """One custom check: its status value, the line for the message, and whether it passed, failed or had no
    data. Relative to stable, the bounds apply to canary - stable over the same window."""
    name = metric.name
    answers: list[tuple[str, QueryResult | Rejected]] = [("canary", reading.canary)]
    if metric.relative_to_stable:
        answers.append(("stable", reading.stable if reading.stable is not None else NoData("not measured")))
    numbers = {track: a for track, a in answers if isinstance(a, float | int)}
    value = MetricValue(name=name, canary=_finite(numbers.get("canary")), stable=_finite(numbers.get("stable")))
    for track, answer in answers:
        if isinstance(answer, Rejected):
            return value, f"metric {name} ({track}): {answer.reason}", "failed"
    gaps = [f"{track}: {a.reason}" for track, a in answers if isinstance(a, NoData)]
    if gaps:
        return value, f"metric {name}: " + "; ".join(gaps), "missing"
    number = numbers["canary"] - numbers["stable"] if metric.relative_to_stable else numbers["canary"]
    value.value = _finite(number)
    what = f"metric {name} {number:.4g}"
    if metric.relative_to_stable:
        both = f"canary {numbers['canary']:.4g}, stable {numbers['stable']:.4g}"
        what = f"metric {name} canary - stable = {number:.4g} ({both})"
    if math.isnan(number):
        return value, f"{what}: not a number", "missing"
    if metric.min is not None and number < metric.min:
        return value, f"{what} < min {metric.min:g}", "failed"
    if metric.max is not None and number > metric.max:
        return value, f"{what} > max {metric.max:g}", "failed"
    return value, f"{what} in {_bounds(metric)}", "passed"


# ---- the decision -----------------------------------------------------------------------------------


def decide(spec: ModelDeploymentSpec, status: ModelDeploymentStatus, obs: Observed, generation: int | None) -> Plan:
    """One tick of the ModelDeployment life cycle; see docs/MODELDEPLOYMENT.md for the diagram."""
    plan = Plan(status=status.model_copy(deep=True))
    st = plan.status
    st.observed_generation = generation
    plan.wanted_hash = template_hash(obs.template) if obs.template is not None else None
    _adopt_template(plan, obs)
    _record_replicas(plan, obs)

    if obs.cluster_problem:
        _phase(plan, spec, st.phase or Phase.PENDING.value, "ClusterNotReady", obs.cluster_problem, generation)
        plan.route = "both" if st.canary is not None else "stable"
        plan.smoke_step = smoke_step(spec, st)
        return plan  # a pending action waits for the cluster too
    _dispatch(spec, plan, obs, generation)
    _paused_condition(spec, plan, generation)
    plan.smoke_step = smoke_step(spec, st)
    return plan


def smoke_step(spec: ModelDeploymentSpec, status: ModelDeploymentStatus) -> int | None:
    """The step whose smoke traffic runs: the canary's current step while it is analysed (spec.rollout.smokeTraffic
    set, phase Canary, not paused); None otherwise, so that promotion, rollback, an abort or a pause end it."""
    canary = status.canary
    if spec.rollout.smoke_traffic is None or status.phase != Phase.CANARY.value or canary is None:
        return None
    if spec.rollout.paused or canary.paused_at is not None:
        return None
    return canary.step


def pending_action(spec: ModelDeploymentSpec, status: ModelDeploymentStatus) -> RolloutAction | None:
    """spec.rollout.action when its id has not been handled yet (status.actions keeps the handled ids)."""
    action = spec.rollout.action
    if action is None or any(done.id == action.id for done in status.actions):
        return None
    return action


def _dispatch(spec: ModelDeploymentSpec, plan: Plan, obs: Observed, generation: int | None) -> Plan:
    st = plan.status
    action = pending_action(spec, st)
    if action is not None:
        acted = _manual(spec, plan, obs, action, generation)
        if acted is not None:
            return acted
    if st.stable is None:
        return _first_version(spec, plan, obs, generation)
    phase = st.phase or Phase.AVAILABLE.value
    if phase == Phase.CANARY.value:
        return _canary(spec, plan, obs, generation)
    if phase == Phase.PROMOTING.value:
        return _promoting(spec, plan, obs, generation)
    if phase == Phase.ROLLED_BACK.value:
        return _rolled_back(spec, plan, obs, generation)
    return _serving(spec, plan, obs, generation)  # Available, Progressing (and Pending/Failed with a stable)


def _first_version(spec: ModelDeploymentSpec, plan: Plan, obs: Observed, generation: int | None) -> Plan:
    """Pending -> Progressing: the first servable version simply becomes stable (nothing to compare with)."""
    st = plan.status
    src = obs.source
    if src is None:
        phase = Phase.FAILED if obs.source_final else Phase.PENDING
        reason = "ModelNotServable" if obs.source_final else "WaitingForModel"
        _phase(plan, spec, phase.value, reason, obs.source_problem, generation)
        return plan
    st.stable = ServedVersion(**_served(src, obs, plan))
    _history(st, src.version, src.training_job, src.metrics, "Deployed", obs.now, "first version", plan.wanted_hash)
    plan.decisions.append("deploy")
    _phase(plan, spec, Phase.PROGRESSING.value, "Deploying", f"deploying version {src.version} as stable", generation)
    return plan


def _serving(spec: ModelDeploymentSpec, plan: Plan, obs: Observed, generation: int | None) -> Plan:
    """Available / Progressing: one version takes all traffic; a new spec.model.version starts a canary."""
    st = plan.status
    assert st.stable is not None
    if obs.canary is not None:
        plan.canary_action = "delete"  # a canary left from a rollback or an abort has no reason to stay
    ready = _stable_ready(obs)
    wanted = spec.model.version
    if _wants(st.stable, spec, plan, obs):
        if ready or _still_serving(st, obs):
            _phase(plan, spec, Phase.AVAILABLE.value, "Available", f"version {wanted} serves all traffic", generation)
        else:
            _phase(plan, spec, Phase.PROGRESSING.value, "RollingOut", _rollout_message(obs, wanted), generation)
        return plan
    src = obs.source
    if src is None and wanted == st.stable.version and st.stable.archive is not None:
        # Only the serving template changed: the canary serves stable's own archive with the new template.
        src = Source(version=wanted, archive=st.stable.archive, training_job=st.stable.training_job)
    if src is None:
        problem = f"version {st.stable.version} keeps serving; version {wanted} is not servable: {obs.source_problem}"
        phase = Phase.AVAILABLE if ready else Phase.PROGRESSING
        _phase(plan, spec, phase.value, "WaitingForModel", problem, generation)
        return plan
    if wanted == st.stable.version:
        wanted = f"{revision(wanted, plan.wanted_hash)} (a new serving template)"
    if not ready:
        _phase(plan, spec, Phase.PROGRESSING.value, "RollingOut", _rollout_message(obs, st.stable.version), generation)
        return plan
    if obs.canary is not None:
        # A canary Deployment is left (a rollback, an abort, a crash between recording a promotion and deleting
        # it). The new version never takes over its pods: it is deleted (foreground: with its pods) and the new
        # canary starts on the pass its deletion brings.
        message = f"version {wanted} starts as a canary once the previous canary Deployment and its pods are gone"
        _phase(plan, spec, Phase.AVAILABLE.value, "RetiringCanary", message, generation)
        return plan
    if spec.rollout.paused:
        message = (
            f"version {wanted} waits to start its canary: spec.rollout.paused is set; "
            f"stable {st.stable.version} serves all traffic"
        )
        _phase(plan, spec, Phase.AVAILABLE.value, PAUSED, message, generation)
        return plan
    return _start_canary(spec, plan, obs, src, generation)


def _served(src: Source, obs: Observed, plan: Plan) -> dict[str, Any]:
    """What a track records of the version it serves: the model, and the pod template it runs with."""
    return {
        "version": src.version,
        "training_job": src.training_job,
        "archive": src.archive,
        "template": obs.template.model_copy(deep=True) if obs.template is not None else None,
        "template_hash": plan.wanted_hash,
        "revision": revision(src.version, plan.wanted_hash),
    }


def _start_canary(spec: ModelDeploymentSpec, plan: Plan, obs: Observed, src: Source, generation: int | None) -> Plan:
    st = plan.status
    assert st.stable is not None
    weight = spec.rollout.steps[0]
    st.canary = CanaryState(
        **_served(src, obs, plan),
        weight=weight,
        step=0,
        failed_checks=0,
        step_started_at=now_str(obs.now),
    )
    st.last_analysis = None
    _size_canary(spec, plan, obs)
    plan.canary_action = "ensure"
    plan.route = "both"
    plan.decisions.append("start")
    message = f"canary {_rev(st.canary)} started at {weight}% next to stable {_rev(st.stable)}"
    _phase(plan, spec, Phase.CANARY.value, "CanaryStarted", message, generation)
    return plan


def _canary(spec: ModelDeploymentSpec, plan: Plan, obs: Observed, generation: int | None) -> Plan:
    """Canary: every interval one analysis; NoData waits, a failure counts, a pass steps up the weight."""
    st = plan.status
    canary, stable = st.canary, st.stable
    if canary is None or stable is None:  # status edited by hand: fall back to plain serving
        return _serving(spec, plan, obs, generation)
    if not _wants(canary, spec, plan, obs):
        return _abort(spec, plan, obs, generation)
    if obs.canary is not None and obs.canary.failure:
        why = f"the canary Deployment did not become ready: {obs.canary.failure}"
        return _rollback(spec, plan, obs, why, generation)

    plan.canary_action = "ensure"
    plan.route = "both"
    _size_canary(spec, plan, obs)
    steps = len(spec.rollout.steps)
    where = f"step {canary.step + 1}/{steps} at {canary.weight}%"
    if spec.rollout.paused:
        # Held: same step, same weight, no analysis (a measurement taken anyway is not used).
        canary.paused_at = canary.paused_at or now_str(obs.now)
        message = f"canary {canary.version} holds {where}: spec.rollout.paused is set"
        _phase(plan, spec, Phase.CANARY.value, PAUSED, message, generation)
        return plan
    if canary.paused_at is not None:
        # Resumed: the step starts over (its clock and the no-data clock); failed checks so far are kept.
        canary.paused_at = None
        canary.step_started_at = now_str(obs.now)
        canary.no_data_since = None
        message = f"canary {canary.version} resumed at {where}; next analysis in {spec.rollout.interval}"
        _phase(plan, spec, Phase.CANARY.value, "Resumed", message, generation)
        return plan
    if obs.measurement is None:  # not due yet
        return plan

    result = evaluate(spec, obs.measurement, obs.now)
    st.last_analysis = result
    plan.decisions.append(result.outcome.lower())
    failure = result.message
    if result.outcome == "NoData":
        canary.no_data_since = canary.no_data_since or now_str(obs.now)
        since = parse_time(canary.no_data_since) or obs.now
        timeout = spec.rollout.no_data_timeout
        if (obs.now - since).total_seconds() < parse_duration(timeout):
            plan.events.append(
                Event("Normal", "AnalysisNoData", f"canary {canary.version}: no data ({result.message})")
            )
            _phase(plan, spec, Phase.CANARY.value, "AnalysisNoData", f"waiting for data: {result.message}", generation)
            return plan
        # Past the deadline, a slot without data is a failed check (as Flagger counts it).
        failure = f"no data since {canary.no_data_since} (rollout.noDataTimeout {timeout}): {result.message}"
    else:
        canary.no_data_since = None
    if result.outcome != "Passed":
        canary.failed_checks += 1
        limit = spec.rollout.failed_checks_before_rollback
        if canary.failed_checks >= limit:
            why = f"{canary.failed_checks} of {limit} checks failed; last: {failure}"
            return _rollback(spec, plan, obs, why, generation)
        message = f"check failed ({canary.failed_checks}/{limit}): {failure}"
        plan.events.append(Event("Warning", "AnalysisFailed", f"canary {canary.version}: {message}"))
        _phase(plan, spec, Phase.CANARY.value, "AnalysisFailed", message, generation)
        return plan
    if canary.step + 1 < len(spec.rollout.steps):
        canary.step += 1
        canary.weight = spec.rollout.steps[canary.step]
        canary.step_started_at = now_str(obs.now)
        _size_canary(spec, plan, obs)
        steps = len(spec.rollout.steps)
        message = f"check passed ({result.message}); step {canary.step + 1}/{steps}: {canary.weight}%"
        plan.events.append(Event("Normal", "CanaryStepAdvanced", f"canary {canary.version}: {message}"))
        _phase(plan, spec, Phase.CANARY.value, "CanaryStepAdvanced", message, generation)
        return plan
    why = f"passed all {len(spec.rollout.steps)} steps; last check: {result.message or ''}"
    return _promote(spec, plan, obs, why, generation)


def _promote(
    spec: ModelDeploymentSpec,
    plan: Plan,
    obs: Observed,
    why: str,
    generation: int | None,
    summary: str = "passed every step",
) -> Plan:
    """Canary -> Promoting: stable switches to the new version (history: Promoted with ``why``, old Retired)."""
    st = plan.status
    canary, old = st.canary, st.stable
    assert canary is not None and old is not None
    canary.step_started_at = now_str(obs.now)
    st.stable = ServedVersion(
        version=canary.version,
        training_job=canary.training_job,
        archive=canary.archive,
        template=canary.template,
        template_hash=canary.template_hash,
        revision=canary.revision,
    )
    _history(
        st,
        old.version,
        old.training_job,
        _metrics_of(st, old.version),
        "Retired",
        obs.now,
        f"replaced by {_rev(canary)}",
        old.template_hash,
    )
    metrics = obs.source.metrics if obs.source and obs.source.version == canary.version else None
    _history(st, canary.version, canary.training_job, metrics, "Promoted", obs.now, why, canary.template_hash)
    canary.paused_at = None
    plan.canary_action = "ensure"
    plan.route = "both"
    plan.decisions.append("promote")
    message = f"canary {_rev(canary)} {summary}; stable switches from {_rev(old)} to {_rev(canary)}"
    _phase(plan, spec, Phase.PROMOTING.value, "Promoting", message, generation)
    return plan


def _promoting(spec: ModelDeploymentSpec, plan: Plan, obs: Observed, generation: int | None) -> Plan:
    """Promoting -> Available once the stable Deployment runs the new version; then the canary goes."""
    st = plan.status
    assert st.stable is not None
    version = st.stable.version
    # The stable Deployment must run the promoted version and have been given the promoted template (the
    # digest on the Deployment comes with the spec change, so a cache that shows it also shows the rollout).
    given = st.stable.template_hash is None or (
        obs.stable is not None and obs.stable.template_hash == st.stable.template_hash
    )
    if not (_stable_ready(obs) and obs.stable is not None and obs.stable.version == version and given):
        plan.canary_action = "ensure" if st.canary is not None else "none"
        plan.route = "both" if st.canary is not None else "stable"
        _phase(plan, spec, Phase.PROMOTING.value, "Promoting", _rollout_message(obs, version), generation)
        return plan
    st.canary = None
    plan.canary_action = "delete"
    plan.route = "stable"
    plan.decisions.append("promoted")
    _phase(
        plan, spec, Phase.AVAILABLE.value, "Promoted", f"version {version} promoted; it serves all traffic", generation
    )
    return plan


def _rollback(spec: ModelDeploymentSpec, plan: Plan, obs: Observed, why: str, generation: int | None) -> Plan:
    """The runbook: all traffic to stable, an Event, canary to zero, status RolledBack with the failing values."""
    st = plan.status
    canary, stable = st.canary, st.stable
    assert canary is not None and stable is not None
    plan.route = "stable"
    message = f"canary {_rev(canary)} rolled back, stable {_rev(stable)} serves all traffic: {why}"
    plan.events.append(Event("Warning", "RolledBack", message))
    plan.canary_action = "scale_to_zero"
    metrics = obs.source.metrics if obs.source and obs.source.version == canary.version else None
    _history(st, canary.version, canary.training_job, metrics, "RolledBack", obs.now, why, canary.template_hash)
    st.canary = None
    plan.decisions.append("rollback")
    _phase(plan, spec, Phase.ROLLED_BACK.value, "RolledBack", message, generation)
    return plan


def _abort(spec: ModelDeploymentSpec, plan: Plan, obs: Observed, generation: int | None) -> Plan:
    """spec.model.version moved away from the canary: drop it (the next tick starts the new one, if any)."""
    st = plan.status
    canary, stable = st.canary, st.stable
    assert canary is not None and stable is not None
    wanted = spec.model.version
    if wanted != canary.version:
        why = f"spec.model.version changed to {wanted} during the analysis"
    elif plan.wanted_hash is not None and canary.template_hash not in (None, plan.wanted_hash):
        why = f"the serving template changed to {plan.wanted_hash} during the analysis"
    else:
        why = "the model archive changed during the analysis"
    _history(st, canary.version, canary.training_job, None, "RolledBack", obs.now, why, canary.template_hash)
    st.canary = None
    plan.route = "stable"
    plan.canary_action = "delete"
    plan.decisions.append("abort")
    message = f"canary {_rev(canary)} withdrawn: {why}; stable {_rev(stable)} serves all traffic"
    _phase(plan, spec, Phase.AVAILABLE.value, "CanaryAborted", message, generation)
    return plan


def _rolled_back(spec: ModelDeploymentSpec, plan: Plan, obs: Observed, generation: int | None) -> Plan:
    """RolledBack stays until spec.model.version names another version (stable's, or a new canary)."""
    st = plan.status
    failed = _rolled_back_version(st)
    if _is_rolled_back(st, spec, plan):
        plan.canary_action = "scale_to_zero" if obs.canary is not None and obs.canary.replicas else "none"
        plan.route = "stable"
        _phase(
            plan,
            spec,
            Phase.ROLLED_BACK.value,
            "RolledBack",
            st.message or f"version {failed} was rolled back",
            generation,
        )
        return plan
    return _serving(spec, plan, obs, generation)


# ---- manual control ---------------------------------------------------------------------------------


def _manual(
    spec: ModelDeploymentSpec, plan: Plan, obs: Observed, action: RolloutAction, generation: int | None
) -> Plan | None:
    """Handle spec.rollout.action once: the plan of the transition it makes, or None (it was Ignored, the
    reason recorded) to go on with the phase's own decision. Either way its id lands in status.actions."""
    st = plan.status
    canary, stable = st.canary, st.stable
    phase = st.phase or (Phase.AVAILABLE.value if stable is not None else Phase.PENDING.value)
    by = f"spec.rollout.action {action.name} (id {action.id})"
    running = phase == Phase.CANARY.value and canary is not None and stable is not None
    why_not = ""
    if action.name in ("promote", "abort") and not running:
        why_not = f"no canary under analysis (phase {phase})"
    elif action.name in ("promote", "abort") and canary is not None and spec.model.version != canary.version:
        why_not = f"spec.model.version {spec.model.version} is not the canary's {canary.version}"
    elif action.name in ("promote", "abort") and canary is not None and not _wants(canary, spec, plan, obs):
        why_not = f"the spec's serving template {plan.wanted_hash} is not the canary's {canary.template_hash}"
    elif action.name == "retry":
        failed = _rolled_back_version(st)
        if phase != Phase.ROLLED_BACK.value or stable is None:
            why_not = f"retry applies to a RolledBack deployment (phase {phase})"
        elif spec.model.version != failed:
            why_not = f"spec.model.version {spec.model.version} is not the rolled-back {failed}: it rolls out anyway"
        elif not _is_rolled_back(st, spec, plan):
            why_not = f"the spec's serving template {plan.wanted_hash} is not the rolled-back one: it rolls out anyway"
    if why_not:
        _record_action(st, action, obs.now, "Ignored", why_not)
        plan.events.append(Event("Warning", "ActionIgnored", f"{by} ignored: {why_not}"))
        return None
    plan.decisions.append(f"manual_{action.name}")
    if action.name == "promote":
        assert canary is not None
        steps = len(spec.rollout.steps)
        why = f"promoted by {by} at step {canary.step + 1}/{steps} ({canary.weight}%)"
        _record_action(st, action, obs.now, "Applied", why)
        return _promote(spec, plan, obs, why, generation, summary=why)
    if action.name == "abort":
        why = f"aborted by {by}"
        _record_action(st, action, obs.now, "Applied", why)
        return _rollback(spec, plan, obs, why, generation)
    # retry: back to serving, where the rolled-back version starts its canary again from the first step
    message = f"version {spec.model.version} is tried again as a canary ({by})"
    _record_action(st, action, obs.now, "Applied", message)
    plan.events.append(Event("Normal", "RetryRequested", message))
    st.phase = Phase.AVAILABLE.value
    return _serving(spec, plan, obs, generation)


def _record_action(
    st: ModelDeploymentStatus,
    action: RolloutAction,
    now: datetime,
    result: Literal["Applied", "Ignored"],
    message: str,
) -> None:
    done = HandledAction(name=action.name, id=action.id, handled_at=now_str(now), result=result, message=message)
    st.actions = [*st.actions, done][-ACTION_LIMIT:]


def _rolled_back_version(st: ModelDeploymentStatus) -> str | None:
    return next((h.version for h in reversed(st.history) if h.outcome == "RolledBack"), None)


def _is_rolled_back(st: ModelDeploymentStatus, spec: ModelDeploymentSpec, plan: Plan) -> bool:
    """Whether the spec asks for what was rolled back last: its version, and its template when both are known
    (a rollback recorded before templates were, matches on the version alone)."""
    entry = next((h for h in reversed(st.history) if h.outcome == "RolledBack"), None)
    if entry is None or entry.version != spec.model.version:
        return False
    return entry.template_hash is None or plan.wanted_hash is None or entry.template_hash == plan.wanted_hash


# ---- the serving template ---------------------------------------------------------------------------


def _adopt_template(plan: Plan, obs: Observed) -> None:
    """A status written before templates were recorded (an operator upgrade): stable and canary adopt the
    spec's current template, which their Deployments were built from, so the upgrade starts no canary."""
    st = plan.status
    if obs.template is None:
        return
    for served in (st.stable, st.canary):
        if served is not None and served.template_hash is None:
            served.template = obs.template.model_copy(deep=True)
            served.template_hash = plan.wanted_hash
            served.revision = revision(served.version, plan.wanted_hash)


def _wants(served: ServedVersion, spec: ModelDeploymentSpec, plan: Plan, obs: Observed) -> bool:
    """Whether the spec asks for ``served``: its version, its archive (when the spec's resolves) and its
    serving template (when both digests are known). Any difference is a new canary."""
    if served.version != spec.model.version:
        return False
    src = obs.source
    if src is not None and src.version == served.version and served.archive not in (None, src.archive):
        return False
    return plan.wanted_hash is None or served.template_hash in (None, plan.wanted_hash)


def _rev(served: ServedVersion) -> str:
    return served.revision or served.version


def _paused_condition(spec: ModelDeploymentSpec, plan: Plan, generation: int | None) -> None:
    """Paused=True while spec.rollout.paused is set (its message says what it holds); False once unset."""
    st = plan.status
    had = any(c.type == PAUSED for c in st.conditions)
    if not spec.rollout.paused and not had:
        return
    if not spec.rollout.paused:
        st.conditions = set_condition(
            st.conditions, PAUSED, False, "Resumed", "spec.rollout.paused is not set", generation
        )
        return
    if st.reason == PAUSED:
        message = st.message or "spec.rollout.paused is set"
    else:
        message = f"spec.rollout.paused is set; nothing to hold now (phase {st.phase}): a new version will wait"
    st.conditions = set_condition(st.conditions, PAUSED, True, PAUSED, message, generation)


# ---- helpers ----------------------------------------------------------------------------------------


def _stable_ready(obs: Observed) -> bool:
    # Scaled to zero on purpose (autoscaling off, replicas 0) counts as rolled out: nothing to load.
    return obs.stable is not None and obs.stable.rolled_out and (obs.stable.ready >= 1 or obs.stable.replicas == 0)


def _still_serving(st: ModelDeploymentStatus, obs: Observed) -> bool:
    """An Available deployment stays Available while its stable Deployment scales (the HPA) or rolls a new
    config: pods of its version keep the model loaded and serve, so Ready must not flap."""
    return (
        st.phase == Phase.AVAILABLE.value
        and obs.stable is not None
        and obs.stable.version == (st.stable.version if st.stable else None)
        and obs.stable.ready >= 1
        and obs.stable.failure is None
    )


def _rollout_message(obs: Observed, version: str) -> str:
    if obs.stable is None:
        return f"creating the stable Deployment of version {version}"
    if obs.stable.failure:
        return f"the stable Deployment of version {version} is stuck: {obs.stable.failure}"
    return f"stable version {version}: {obs.stable.ready}/{obs.stable.replicas} pods have the model loaded"


def _size_canary(spec: ModelDeploymentSpec, plan: Plan, obs: Observed) -> None:
    """The canary's replicas follow the weight of the stable's current replicas (the HPA's choice)."""
    canary = plan.status.canary
    if canary is None:
        return
    stable_now = obs.stable.replicas if obs.stable is not None else 0
    canary.replicas = canary_replicas(stable_now, canary.weight, max_replicas(spec))
    # Traffic follows ready endpoints: report the share the ready pods give, not the one we asked for.
    if obs.stable is not None and obs.canary is not None:
        canary.achieved_weight = achieved_weight(obs.canary.ready, obs.stable.ready)
    else:
        canary.achieved_weight = achieved_weight(canary.replicas, stable_now)


def _record_replicas(plan: Plan, obs: Observed) -> None:
    st = plan.status
    if st.stable is not None and obs.stable is not None:
        st.stable.replicas, st.stable.ready_replicas = obs.stable.replicas, obs.stable.ready
    if st.canary is not None and obs.canary is not None:
        st.canary.ready_replicas = obs.canary.ready


def _metrics_of(st: ModelDeploymentStatus, version: str) -> dict[str, float] | None:
    return next((h.metrics for h in reversed(st.history) if h.version == version and h.metrics), None)


def _history(
    st: ModelDeploymentStatus,
    version: str,
    training_job: str | None,
    metrics: dict[str, float] | None,
    outcome: Literal["Deployed", "Promoted", "RolledBack", "Retired"],
    now: datetime,
    reason: str,
    template_digest: str | None = None,
) -> None:
    entry = HistoryEntry(
        version=version,
        training_job=training_job,
        metrics=metrics,
        template_hash=template_digest,
        outcome=outcome,
        at=now_str(now),
        reason=reason,
    )
    st.history = [*st.history, entry][-HISTORY_LIMIT:]


def _phase(
    plan: Plan, spec: ModelDeploymentSpec, phase: str, reason: str, message: str, generation: int | None
) -> None:
    """Set phase, reason, message and the kstatus-style conditions; an Event when the phase or reason changes."""
    st = plan.status
    if (st.phase, st.reason) != (phase, reason) and not any(e.reason == reason for e in plan.events):
        kind: Literal["Normal", "Warning"] = "Warning" if phase in ("Failed", "RolledBack") else "Normal"
        plan.events.append(Event(kind, reason, message))
    st.phase = phase  # type: ignore[assignment]
    st.reason, st.message = reason, message
    serving_wanted = (
        st.stable is not None
        and st.stable.version == spec.model.version
        and (plan.wanted_hash is None or st.stable.template_hash in (None, plan.wanted_hash))
        and st.canary is None
    )
    ready = phase == Phase.AVAILABLE.value and serving_wanted
    progressing = phase in ACTIVE_PHASES or (phase == Phase.AVAILABLE.value and not serving_wanted)
    degraded = phase in (Phase.ROLLED_BACK.value, Phase.FAILED.value)
    conds = st.conditions
    conds = set_condition(conds, "Ready", ready, reason, message, generation)
    conds = set_condition(conds, "Progressing", progressing, reason, message, generation)
    conds = set_condition(conds, "Degraded", degraded, reason, message, generation)
    st.conditions = conds
