"""Reconcile a ModelDeployment: observe (children, TrainingJob, Prometheus), decide (``canary.decide``), execute.

The executor applies a plan in a fixed order, which is also the rollback runbook: stable Deployment,
canary Deployment, Service routing (all traffic to stable), Events, canary to zero, and the caller then
writes status once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from pydantic import ValidationError

from .. import API_VERSION, kube
from ..api.modeldeployment import ModelDeploymentSpec, ModelDeploymentStatus
from ..api.trainingjob import TrainingJobStatus
from ..builders.common import Manifest
from ..builders.modeldeployment import (
    ARTIFACT_ROOT,
    VERSION_LABEL,
    ServedModel,
    ServingContext,
    build_config_map,
    build_deployment,
    build_hpa,
    build_network_policy,
    build_pdb,
    build_service,
    config_hash,
    deployment_name,
    endpoint,
    pod_prefix,
    service_name,
)
from ..canary import DeploymentView, Event, Measurement, Observed, Plan, Source, analysis_due, decide
from ..metrics import CANARY_DECISIONS
from ..prometheus import (
    CanarySelector,
    HttpPrometheus,
    MetricsProvider,
    NoData,
    PrometheusError,
    QueryResult,
    error_rate_query,
    latency_p99_ms_query,
)
from .neuralcluster import cluster_for

log = logging.getLogger(__name__)
KIND = "ModelDeployment"
Emit = Callable[[Event], None]


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
        replicas=replicas, ready=ready, version=labels.get(VERSION_LABEL), rolled_out=rolled_out, failure=failure
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


def resolve_source(spec: ModelDeploymentSpec, namespace: str) -> tuple[Source | None, str, bool]:
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
    return source_from_training_job(model.version, name, kube.get(API_VERSION, "TrainingJob", namespace, name))


def canary_selector(ctx: ServingContext, source: Source | None, canary_version: str) -> CanarySelector:
    archive_version = source.archive_version if source is not None and source.version == canary_version else None
    return CanarySelector(
        model_name=ctx.model_name, pod_prefix=pod_prefix(ctx.name, "canary"), archive_version=archive_version
    )


def measure(provider: MetricsProvider | None, ctx: ServingContext, sel: CanarySelector) -> Measurement:
    """Error rate and p99 of the canary over the window; every failure to measure is NoData with why."""
    if provider is None:
        missing = NoData("the NeuralCluster sets no prometheusUrl")
        return Measurement(error_rate=missing, latency_p99_ms=missing)
    window = ctx.spec.rollout.thresholds.window

    def run(promql: str) -> QueryResult:
        try:
            return provider.query(promql)
        except PrometheusError as exc:
            return NoData(str(exc))

    return Measurement(
        error_rate=run(error_rate_query(sel, window)), latency_p99_ms=run(latency_p99_ms_query(sel, window))
    )


# ---- executing -------------------------------------------------------------------------------------


def _route(ctx: ServingContext, route_canary: bool, current: Manifest | None) -> None:
    desired = build_service(ctx, route_canary)
    if current is None:
        kube.ensure(desired)
        return
    want = desired["spec"]["selector"]
    have = (current.get("spec") or {}).get("selector") or {}
    if have == want:
        return
    # A merge patch removes a selector key only when it is sent as null.
    selector: dict[str, Any] = {key: None for key in have if key not in want}
    selector.update(want)
    kube.patch("v1", "Service", ctx.namespace, service_name(ctx.name), {"spec": {"selector": selector}})


def execute(ctx: ServingContext, plan: Plan, obs: Observed, service: Manifest | None, emit: Emit) -> None:
    """Make the children match the plan, in runbook order; every write is idempotent."""
    st, ns = plan.status, ctx.namespace
    config_map = build_config_map(ctx)
    digest = config_hash(config_map)
    kube.ensure(config_map)
    hpa = build_hpa(ctx)
    if hpa is not None:
        kube.ensure(hpa)
    else:
        kube.delete("autoscaling/v2", "HorizontalPodAutoscaler", ns, deployment_name(ctx.name, "stable"))
    kube.ensure(build_pdb(ctx))
    kube.ensure(build_network_policy(ctx))
    if st.stable is not None and st.stable.archive is not None:
        auto = ctx.spec.autoscaling
        # Never fight the HPA: replicas only on the first create, or when autoscaling is off.
        replicas = auto.min_replicas if obs.stable is None else None
        if not auto.enabled:
            replicas = ctx.spec.serving.replicas
        model = ServedModel(st.stable.version, st.stable.archive, st.stable.training_job)
        kube.ensure(build_deployment(ctx, "stable", model, replicas, digest))
    if plan.canary_action == "ensure" and st.canary is not None and st.canary.archive is not None:
        model = ServedModel(st.canary.version, st.canary.archive, st.canary.training_job)
        kube.ensure(build_deployment(ctx, "canary", model, st.canary.replicas or 0, digest))
    if st.stable is not None:
        _route(ctx, plan.route == "both", service)
    for event in plan.events:
        emit(event)
    canary_name = deployment_name(ctx.name, "canary")
    if plan.canary_action == "scale_to_zero" and obs.canary is not None and obs.canary.replicas:
        kube.patch("apps/v1", "Deployment", ns, canary_name, {"spec": {"replicas": 0}})
    elif plan.canary_action == "delete" and obs.canary is not None:
        kube.delete("apps/v1", "Deployment", ns, canary_name)


def status_patch(status: ModelDeploymentStatus) -> Manifest:
    """The status as a merge patch: cleared fields are sent as null so that they really disappear."""
    patch: Manifest = _strip_nulls_in_lists(status.model_dump(by_alias=True, mode="json"))
    return patch


def _strip_nulls_in_lists(value: Any, in_list: bool = False) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls_in_lists(v, in_list) for k, v in value.items() if not (in_list and v is None)}
    if isinstance(value, list):
        return [_strip_nulls_in_lists(v, True) for v in value]
    return value


# ---- one pass ----------------------------------------------------------------------------------------


ProviderFactory = Callable[[str], MetricsProvider]


def run_pass(
    body: Manifest,
    spec: ModelDeploymentSpec,
    emit: Emit,
    provider_factory: ProviderFactory = HttpPrometheus,
    now: datetime | None = None,
) -> Plan:
    """Observe, decide, act, write status once; returns the plan that was applied."""
    meta = body["metadata"]
    ns, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    status = ModelDeploymentStatus.model_validate(body.get("status") or {})
    now = now or datetime.now(UTC)
    cluster, claim, cluster_problem = cluster_for(ns, spec.cluster_ref.name)
    ctx = (
        ServingContext(owner=body, spec=spec, cluster=cluster, artifact_claim=claim)
        if cluster is not None and claim is not None
        else None
    )
    source, source_problem, final = resolve_source(spec, ns)
    stable = deployment_view(kube.get("apps/v1", "Deployment", ns, deployment_name(name, "stable")))
    canary = deployment_view(kube.get("apps/v1", "Deployment", ns, deployment_name(name, "canary")))
    measurement = None
    if ctx is not None and status.canary is not None and analysis_due(spec, status, now):
        url = ctx.cluster.prometheus_url
        provider = provider_factory(url) if url else None
        measurement = measure(provider, ctx, canary_selector(ctx, source, status.canary.version))
    observed = Observed(
        now=now,
        cluster_problem=cluster_problem,
        source=source,
        source_problem=source_problem,
        source_final=final,
        stable=stable,
        canary=canary,
        measurement=measurement,
    )
    plan = decide(spec, status, observed, generation)
    if ctx is not None:
        service = kube.get("v1", "Service", ns, service_name(name))
        execute(ctx, plan, observed, service, emit)
        if plan.status.stable is not None:
            plan.status.endpoint = endpoint(ctx)
    else:
        for event in plan.events:
            emit(event)
    kube.patch_status(API_VERSION, KIND, ns, name, status_patch(plan.status))
    if (status.phase, status.reason) != (plan.status.phase, plan.status.reason):
        log.info("%s/%s: %s -> %s (%s)", ns, name, status.phase, plan.status.phase, plan.status.message)
    for decision in plan.decisions:
        CANARY_DECISIONS.labels(decision).inc()
    return plan
