"""One ModelDeployment pass: observe (children and the TrainingJob from the cache, Prometheus when an
analysis is due), decide (:mod:`.decide`), and turn the plan into actions.

The shared loop records the status first, then applies the actions in a fixed order that is also the
rollback runbook: stable Deployment, canary Deployment, Service routing (all traffic to stable), Events,
canary to zero. A crash anywhere leaves a status from which the next pass converges the children.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Literal

from pydantic import ValidationError

from ..api.modeldeployment import ModelDeploymentSpec, ModelDeploymentStatus
from ..api.trainingjob import TrainingJobStatus
from ..meta import Manifest, set_condition
from ..metrics import CANARY_DECISIONS
from ..neuralcluster.reconciler import cluster_view
from ..prometheus import (
    CanarySelector,
    HttpPrometheus,
    MetricsProvider,
    NoData,
    PrometheusError,
    QueryResult,
    Rejected,
    error_rate_query,
    latency_p99_ms_query,
    pods_regex,
    render_metric_query,
)
from ..runtime.cache import Cache, controller_uid
from ..runtime.controller import Action, Apply, Delete, Emit, Outcome, Patch, parse_spec
from ..store import ARTIFACT_ROOT
from .children import (
    SMOKE_COMPONENT,
    SMOKE_REVISION_ANNOTATION,
    TEMPLATE_HASH_ANNOTATION,
    VERSION_LABEL,
    ServedModel,
    ServingContext,
    build_canary_service,
    build_config_map,
    build_deployment,
    build_hpa,
    build_network_policy,
    build_pdb,
    build_scaled_object,
    build_service,
    build_smoke_job,
    config_hash,
    deployment_name,
    endpoint,
    pod_prefix,
    scaled_object_name,
    serving_template,
    smoke_duration_s,
    smoke_job_name,
    smoke_url,
    with_template,
)
from .decide import (
    DeploymentView,
    Event,
    Measurement,
    MetricReading,
    Observed,
    Plan,
    Source,
    analysis_due,
    decide,
    seconds_to_next_analysis,
    wants_tick,
)
from .keda import CONDITION as REQUEST_RATE_CONDITION
from .keda import KIND as SCALED_OBJECT
from .keda import Autoscaler, NoKeda, ScaledObjects, choose

log = logging.getLogger(__name__)
KIND = "ModelDeployment"
RESYNC_S = 60.0  # while waiting for something no watch reports (a model that is not servable yet)


# ---- observing (pure parts first) --------------------------------------------------------------------


def deployment_view(dep: Manifest | None) -> DeploymentView | None:
    """What the decision needs to know about one of our Deployments."""
    if dep is None:
        return None
    spec, status = dep.get("spec") or {}, dep.get("status") or {}
    replicas = int(spec.get("replicas", 1))
    ready = int(status.get("readyReplicas") or 0)
    observed = int(status.get("observedGeneration") or 0)
    generation = int(dep["metadata"].get("generation") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    # Rolled out = every pod runs the current template (old pods go only once new ones are available, as
    # maxUnavailable is 0). Not "every pod available": an HPA scale-up is no rollout, and an Available
    # deployment stays Available (Ready) while its new pods load the model.
    rolled_out = observed >= generation and updated >= replicas and total <= updated
    failure = None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            failure = cond.get("message") or "ProgressDeadlineExceeded"
    labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    return DeploymentView(
        replicas=replicas,
        ready=ready,
        version=labels.get(VERSION_LABEL),
        rolled_out=rolled_out,
        failure=failure,
        template_hash=(dep["metadata"].get("annotations") or {}).get(TEMPLATE_HASH_ANNOTATION),
    )


def source_from_training_job(version: str, name: str, tj: Manifest | None) -> tuple[Source | None, str, bool]:
    """The servable archive of a TrainingJob: only once it Succeeded with Validated=True.

    Returns (source, problem, final): ``final`` means it will never be servable as the spec stands.
    """
    where = "spec.model.trainingJobRef"
    if tj is None:
        return None, f"{where}: TrainingJob {name} does not exist", False
    try:
        status = TrainingJobStatus.model_validate(tj.get("status") or {})
    except ValidationError as exc:
        return None, f"{where}: TrainingJob {name} has an unreadable status: {exc.errors()[0]['msg']}", False
    if status.phase == "Failed":
        return None, f"{where}: TrainingJob {name} failed ({status.reason}: {status.message})", True
    validated = any(c.type == "Validated" and c.status == "True" for c in status.conditions)
    if status.phase != "Succeeded" or not validated:
        return None, f"{where}: TrainingJob {name} is not Validated yet (phase {status.phase or 'Pending'})", False
    archive = status.artifacts.model_archive if status.artifacts else None
    if not archive:
        return None, f"{where}: TrainingJob {name} has no status.artifacts.modelArchive", True
    relative = _relative_archive(archive)
    if relative is None:
        return None, f"{where}: TrainingJob {name}'s archive {archive} is not under {ARTIFACT_ROOT}", True
    output = ((tj.get("spec") or {}).get("output") or {}).get("version")
    metrics: dict[str, float] = {}
    if status.validation is not None:
        for key, value in status.validation.model_dump(by_alias=True).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[key] = float(value)
    return (
        Source(
            version=version,
            archive=relative,
            training_job=name,
            archive_version=str(output) if output else None,
            metrics=metrics or None,
        ),
        "",
        False,
    )


def _relative_archive(path: str) -> str | None:
    p = PurePosixPath(path)
    if p.is_absolute():
        try:
            p = p.relative_to(ARTIFACT_ROOT)
        except ValueError:
            return None
    if ".." in p.parts or not p.parts:
        return None
    return str(p)


def resolve_source(spec: ModelDeploymentSpec, cache: Cache, namespace: str) -> tuple[Source | None, str, bool]:
    """What spec.model points at, if it can be served now."""
    model = spec.model
    if model.archive_path is not None:
        relative = _relative_archive(model.archive_path)
        if relative is None:
            problem = f"spec.model.archivePath: must stay inside the artifact store, got {model.archive_path!r}"
            return None, problem, True
        return Source(version=model.version, archive=relative), "", False
    assert model.training_job_ref is not None
    name = model.training_job_ref.name
    return source_from_training_job(model.version, name, cache.get("TrainingJob", namespace, name))


def canary_selector(ctx: ServingContext, source: Source | None, canary_version: str) -> CanarySelector:
    archive_version = source.archive_version if source is not None and source.version == canary_version else None
    return CanarySelector(
        model_name=ctx.model_name, pod_prefix=pod_prefix(ctx.name, "canary"), archive_version=archive_version
    )


def metric_variables(ctx: ServingContext, track: Literal["stable", "canary"]) -> dict[str, str]:
    """The values of a spec.rollout.metrics query's template variables for one track."""
    return {
        "namespace": ctx.namespace,
        "name": ctx.name,
        "track": track,
        "pods": pods_regex(pod_prefix(ctx.name, track)),
        "window": ctx.spec.rollout.thresholds.window,
    }


def measure(provider: MetricsProvider | None, ctx: ServingContext, sel: CanarySelector) -> Measurement:
    """Error rate and p99 of the canary over the window, and each spec.rollout.metrics query (for stable too
    when relative); every failure to measure is NoData with why, a query Prometheus refuses is Rejected."""
    metrics = ctx.spec.rollout.metrics
    if provider is None:
        missing = NoData("the NeuralCluster sets no prometheusUrl")
        readings = tuple(MetricReading(m.name, missing, missing if m.relative_to_stable else None) for m in metrics)
        return Measurement(error_rate=missing, latency_p99_ms=missing, metrics=readings)
    window = ctx.spec.rollout.thresholds.window

    def run(promql: str) -> QueryResult | Rejected:
        try:
            return provider.query(promql)
        except PrometheusError as exc:
            return Rejected(f"{exc} (query: {promql})")

    canary_vars, stable_vars = metric_variables(ctx, "canary"), metric_variables(ctx, "stable")
    readings = tuple(
        MetricReading(
            m.name,
            run(render_metric_query(m.query, canary_vars)),
            run(render_metric_query(m.query, stable_vars)) if m.relative_to_stable else None,
        )
        for m in metrics
    )
    return Measurement(
        error_rate=run(error_rate_query(sel, window)),
        latency_p99_ms=run(latency_p99_ms_query(sel, window)),
        metrics=readings,
    )


# ---- acting ------------------------------------------------------------------------------------------


def actions(
    ctx: ServingContext,
    plan: Plan,
    obs: Observed,
    smoke_jobs: Mapping[str, str | None] | None = None,
    autoscaler: Autoscaler | None = None,
) -> list[Action]:
    """The plan as actions, in runbook order (the loop has already recorded the status); ``smoke_jobs``: the
    smoke Jobs of this deployment that exist, by name, with the canary revision each was made for;
    ``autoscaler``: our HPA (the default) or a KEDA ScaledObject."""
    st, name = plan.status, ctx.name
    autoscaler = autoscaler or Autoscaler()
    out: list[Action] = []
    canary_name = deployment_name(name, "canary")
    if st.stable is not None and st.stable.archive is not None:
        # Nothing to scale, guard or expose before there is a model to serve. Each track's pods are built
        # from the template recorded in its status (stable keeps its own until a canary is promoted).
        stable_ctx = with_template(ctx, st.stable.template) if st.stable.template is not None else ctx
        config_map = build_config_map(stable_ctx)
        digest = config_hash(config_map)
        out.append(Apply(config_map))
        hpa = build_hpa(ctx) if not autoscaler.scaled_object else None
        if autoscaler.remove_scaled_object:
            # Before our HPA comes back: the HPA KEDA made from it goes with it (owner reference).
            out.append(Delete(SCALED_OBJECT, scaled_object_name(name)))
        # With KEDA our HPA goes first: KEDA refuses a ScaledObject for a Deployment another HPA scales.
        out.append(
            Apply(hpa) if hpa is not None else Delete("HorizontalPodAutoscaler", deployment_name(name, "stable"))
        )
        out += [Apply(build_pdb(ctx)), Apply(build_network_policy(ctx))]
        model = ServedModel(st.stable.version, st.stable.archive, st.stable.training_job)
        auto = ctx.spec.autoscaling
        stable_hash = st.stable.template_hash
        if auto.enabled:
            # Never fight the HPA: replicas are set once, at creation, by another field manager.
            stable = build_deployment(stable_ctx, "stable", model, None, digest, stable_hash)
            out.append(Apply(stable, initial={"spec": {"replicas": auto.min_replicas}}))
        else:
            replicas = ctx.spec.serving.replicas
            out.append(Apply(build_deployment(stable_ctx, "stable", model, replicas, digest, stable_hash)))
        scaled_object = build_scaled_object(ctx, autoscaler.prometheus_url) if autoscaler.scaled_object else None
        if scaled_object is not None:
            # After the Deployment: KEDA's webhook reads it (its containers' requests) before admitting this.
            out.append(Apply(scaled_object))
        if plan.canary_action == "ensure" and st.canary is not None and st.canary.archive is not None:
            canary = ServedModel(st.canary.version, st.canary.archive, st.canary.training_job)
            canary_ctx = with_template(ctx, st.canary.template) if st.canary.template is not None else ctx
            canary_config = build_config_map(canary_ctx, "canary")
            out.append(Apply(canary_config))
            replicas = st.canary.replicas or 0
            canary_dep = build_deployment(
                canary_ctx, "canary", canary, replicas, config_hash(canary_config), st.canary.template_hash
            )
            out.append(Apply(canary_dep))
        out.append(Apply(build_service(ctx, plan.route == "both")))
    out += [Emit(e.type, e.reason, e.message) for e in plan.events]
    if plan.canary_action == "scale_to_zero" and obs.canary is not None and obs.canary.replicas:
        out.append(Patch("Deployment", canary_name, {"spec": {"replicas": 0}}))
    elif plan.canary_action == "delete" and obs.canary is not None:
        # Foreground: the Deployment stays (and the next canary waits) until its pods are gone.
        out.append(Delete("Deployment", canary_name, "Foreground"))
    out += smoke_actions(ctx, plan, smoke_jobs or {})
    return out


def smoke_actions(ctx: ServingContext, plan: Plan, existing: Mapping[str, str | None]) -> list[Action]:
    """spec.rollout.smokeTraffic: every smoke Job but the current step's goes (an earlier step's, a previous
    canary's of the same name, all of them once the canary is promoted, rolled back, aborted or paused); the
    current step's is created when missing (create_only: a Job's template is immutable), with the canary
    Service it sends to and an Event, once per step."""
    st, smoke = plan.status, ctx.spec.rollout.smoke_traffic
    wanted: str | None = None
    rev = ""
    if plan.smoke_step is not None and smoke is not None and st.canary is not None:
        wanted, rev = smoke_job_name(ctx.name, plan.smoke_step), st.canary.revision or st.canary.version
    out: list[Action] = [
        Delete("Job", name) for name, made_for in sorted(existing.items()) if name != wanted or made_for != rev
    ]
    if wanted is None or smoke is None or st.canary is None or plan.smoke_step is None:
        return out
    out.append(Apply(build_canary_service(ctx)))
    if wanted in existing:
        return out  # running (or one of another revision on its way out: the pass its deletion brings creates it)
    canary_ctx = with_template(ctx, st.canary.template) if st.canary.template is not None else ctx
    duration = smoke_duration_s(ctx.spec)
    out.append(Apply(build_smoke_job(canary_ctx, rev, plan.smoke_step, duration), create_only=True))
    steps = len(ctx.spec.rollout.steps)
    message = (
        f"canary {rev} step {plan.smoke_step + 1}/{steps}: Job {wanted} sends synthetic traffic "
        f"({smoke.requests_per_second} requests/s, for at most {duration}s) to {smoke_url(ctx)}"
    )
    out.append(Emit("Normal", "SmokeTraffic", message))
    return out


# ---- one pass ----------------------------------------------------------------------------------------


ProviderFactory = Callable[[str], MetricsProvider]


class ModelDeploymentReconciler:
    kind = KIND
    pod_owned_status: frozenset[str] = frozenset()

    def __init__(
        self,
        cache: Cache,
        provider_factory: ProviderFactory = HttpPrometheus,
        clock: Callable[[], datetime] | None = None,
        scaled_objects: ScaledObjects | None = None,
    ) -> None:
        self.cache = cache
        self.provider_factory = provider_factory
        self.clock = clock or (lambda: datetime.now(UTC))
        self.scaled_objects: ScaledObjects = scaled_objects or NoKeda()
        # ModelDeployments (uids) whose ScaledObject was read and found missing: not read again until one is
        # wanted (or the cache holds one, written through by an apply).
        self._without_scaled_object: set[str] = set()

    def _deployment(self, obj: Manifest, track: Literal["stable", "canary"]) -> DeploymentView | None:
        dep = self.cache.get(
            "Deployment", obj["metadata"]["namespace"], deployment_name(obj["metadata"]["name"], track)
        )
        if dep is None or controller_uid(dep) != obj["metadata"]["uid"]:
            return None  # a foreign Deployment of that name is reported by the loop, never read as ours
        return deployment_view(dep)

    def _smoke_jobs(self, obj: Manifest) -> dict[str, str | None]:
        """This deployment's smoke Jobs in the cache, by name, with the canary revision each was made for."""
        uid = obj["metadata"]["uid"]

        def ours(job: Manifest) -> bool:
            labels = job["metadata"].get("labels") or {}
            return labels.get("app.kubernetes.io/component") == SMOKE_COMPONENT and controller_uid(job) == uid

        return {
            job["metadata"]["name"]: (job["metadata"].get("annotations") or {}).get(SMOKE_REVISION_ANNOTATION)
            for job in self.cache.list("Job", obj["metadata"]["namespace"], where=ours)
        }

    def _autoscaler(self, ctx: ServingContext) -> Autoscaler:
        """Our HPA or KEDA's ScaledObject. Where ScaledObjects are served, this ModelDeployment's is read (into
        the cache, for the controller's ownership check and apply skip) while one is wanted, while the cache
        holds one, and once after the operator starts."""
        meta = ctx.owner["metadata"]
        ns, uid, name = meta["namespace"], meta["uid"], scaled_object_name(meta["name"])
        auto = ctx.spec.autoscaling
        wanted = auto.enabled and auto.target_requests_per_second is not None
        served, exists = self.scaled_objects.served(), False
        if served and (wanted or uid not in self._without_scaled_object or self.cache.get(SCALED_OBJECT, ns, name)):
            found = self.scaled_objects.get(ns, name)
            if found is None:
                self.cache.remove(SCALED_OBJECT, ns, name)
                self._without_scaled_object.add(uid)
            else:
                self.cache.upsert(found)
                self._without_scaled_object.discard(uid)
            exists = found is not None and controller_uid(found) == uid
        return choose(ctx.spec, ctx.cluster.prometheus_url, served, exists)

    def reconcile(self, obj: Manifest) -> Outcome:
        spec: ModelDeploymentSpec = parse_spec(ModelDeploymentSpec, obj)
        meta = obj["metadata"]
        ns, name, generation = meta["namespace"], meta["name"], meta.get("generation")
        status = ModelDeploymentStatus.model_validate(obj.get("status") or {})
        now = self.clock()
        cluster = cluster_view(self.cache, ns, spec.cluster_ref.name)
        ctx = (
            ServingContext(owner=obj, spec=spec, cluster=cluster.spec, artifact_claim=cluster.claim)
            if cluster.ready and cluster.spec is not None and (cluster.claim is not None or cluster.store is not None)
            else None
        )
        source, source_problem, final = resolve_source(spec, self.cache, ns)
        measurement = None
        if ctx is not None and status.canary is not None and analysis_due(spec, status, now):
            url = ctx.cluster.prometheus_url
            provider = self.provider_factory(url) if url else None
            measurement = measure(provider, ctx, canary_selector(ctx, source, status.canary.version))
        observed = Observed(
            now=now,
            cluster_problem=cluster.problem,
            source=source,
            source_problem=source_problem,
            source_final=final,
            stable=self._deployment(obj, "stable"),
            canary=self._deployment(obj, "canary"),
            measurement=measurement,
            template=serving_template(spec, ctx.cluster) if ctx is not None else None,
        )
        plan = decide(spec, status, observed, generation)
        if ctx is not None and plan.status.stable is not None:
            plan.status.endpoint = endpoint(ctx)
        if (status.phase, status.reason) != (plan.status.phase, plan.status.reason):
            log.info("%s/%s: %s -> %s (%s)", ns, name, status.phase, plan.status.phase, plan.status.message)
        for decision in plan.decisions:
            CANARY_DECISIONS.labels(decision).inc()
        autoscaler = self._autoscaler(ctx) if ctx is not None else None
        if autoscaler is not None:
            request_rate_condition(name, spec, plan, status, autoscaler, generation)
        todo: list[Action] = [Emit(e.type, e.reason, e.message) for e in plan.events]
        if ctx is not None:
            todo = actions(ctx, plan, observed, self._smoke_jobs(obj), autoscaler)
        requeue = next_look(spec, plan, now)
        if autoscaler is not None and autoscaler.reason == "KEDANotServed":
            requeue = min(requeue or RESYNC_S, RESYNC_S)  # KEDA may be installed: no watch says so
        return Outcome(status=status_wire(plan.status), actions=todo, requeue_after=requeue)


def request_rate_condition(
    name: str,
    spec: ModelDeploymentSpec,
    plan: Plan,
    before: ModelDeploymentStatus,
    autoscaler: Autoscaler,
    generation: int | None,
) -> None:
    """The RequestRateAutoscaling condition, present while spec.autoscaling.targetRequestsPerSecond is set (and
    autoscaling on): True while KEDA's ScaledObject scales the stable Deployment, False with why not (our HPA
    on CPU and memory stands in meanwhile). An Event when it turns or its reason changes: Warning when False."""
    st, auto = plan.status, spec.autoscaling
    rate = auto.target_requests_per_second
    if not auto.enabled or rate is None:
        st.conditions = [c for c in st.conditions if c.type != REQUEST_RATE_CONDITION]
        return
    if autoscaler.scaled_object:
        on = "CPU" + (", memory" if auto.target_memory_utilization is not None else "")
        message = (
            f"KEDA ScaledObject {scaled_object_name(name)} scales the stable Deployment on {on} "
            f"and {rate:g} requests per second per pod"
        )
    else:
        message = autoscaler.problem
    value = "True" if autoscaler.scaled_object else "False"
    previous = next((c for c in before.conditions if c.type == REQUEST_RATE_CONDITION), None)
    st.conditions = set_condition(st.conditions, REQUEST_RATE_CONDITION, value, autoscaler.reason, message, generation)
    if previous is None or (previous.status, previous.reason) != (value, autoscaler.reason):
        plan.events.append(Event("Normal" if value == "True" else "Warning", autoscaler.reason, message))


def next_look(spec: ModelDeploymentSpec, plan: Plan, now: datetime) -> float | None:
    """When to look again without a watch event: the next analysis slot, or a slow resync while waiting."""
    left = seconds_to_next_analysis(spec, plan.status, now)
    if left is not None:
        return max(1.0, left)
    return RESYNC_S if wants_tick(spec, plan.status) else None


def status_wire(status: ModelDeploymentStatus) -> Manifest:
    wire: Manifest = status.model_dump(by_alias=True, exclude_none=True, mode="json")
    return wire
