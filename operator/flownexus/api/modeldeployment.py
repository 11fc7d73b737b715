"""ModelDeployment: a TorchServe-served model, autoscaled, with Prometheus-gated canary rollouts."""

from __future__ import annotations

import json
import re
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from .common import (
    RESOURCE_NAME_PATTERN,
    VERSION_PATTERN,
    ApiModel,
    ArchivePath,
    CelRule,
    Condition,
    Interval,
    LabelValue,
    Name,
    NoDataTimeout,
    ObjectRef,
    ResourceRequirements,
    StabilizationWindow,
    StatusModel,
    Version,
    Window,
    cel,
)

DEFAULT_CANARY_STEPS = [5, 15, 25, 35, 45, 55, 65, 75, 85, 95]
# The operator finds a track's pods (and TorchServe's Hostname label of their metrics) by the prefix
# <name>-<track>- of their names. Deployment pods are named <name>-<track>-<hash>-<suffix>, and Kubernetes
# keeps only the first 58 characters of a generated name before the 5-character random suffix, so the prefix
# must fit in 58. The name is also that of the Service, a DNS-1035 label.
GENERATED_NAME_KEPT = 58
TRACKS = ("stable", "canary")
MAX_NAME_LENGTH = GENERATED_NAME_KEPT - max(len(f"-{track}-") for track in TRACKS)


class ModelSource(ApiModel):
    """Which model to serve: a Validated TrainingJob's archive, or an archive path."""

    cel_rules: ClassVar[list[CelRule]] = [
        {
            "rule": "has(self.trainingJobRef) != has(self.archivePath)",
            "message": "set exactly one of trainingJobRef and archivePath",
        },
    ]

    training_job_ref: ObjectRef | None = Field(
        default=None, description="Serve this TrainingJob's archive; only once it is Validated."
    )
    archive_path: ArchivePath | None = Field(
        default=None,
        description="A .mar archive, relative to the artifact store root (no '..' segments).",
    )
    version: Version = Field(
        description="Version of the model (the flownexus.io/version label of its pods: letters, digits, '.', '_' "
        "and '-', at most 63 characters); changing it starts a canary rollout.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        if (self.training_job_ref is None) == (self.archive_path is None):
            raise ValueError("set exactly one of trainingJobRef and archivePath")
        return self


LABEL_KEY_MAX_LENGTH = 317  # a DNS subdomain prefix (253), '/', a name (63)
LABEL_KEY_MESSAGE = (
    "label keys are qualified names: a name, optionally after a DNS subdomain and '/' (app.kubernetes.io/name)"
)
MONITORING_NAMESPACE = "monitoring"


def _label_key_ok(key: str) -> bool:
    return len(key) <= LABEL_KEY_MAX_LENGTH and re.fullmatch(RESOURCE_NAME_PATTERN, key) is not None


class LabelSelectorRequirement(ApiModel):
    """One matchExpressions entry of a label selector."""

    cel_rules: ClassVar[list[CelRule]] = [
        {
            "rule": "self.operator in ['In', 'NotIn'] ? has(self.values) && size(self.values) > 0 : !has(self.values)",
            "message": "In and NotIn need values; Exists and DoesNotExist take none",
        },
    ]

    key: str = Field(
        max_length=LABEL_KEY_MAX_LENGTH, pattern=RESOURCE_NAME_PATTERN, description="The label key, e.g. team."
    )
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(description="In, NotIn, Exists or DoesNotExist.")
    values: list[LabelValue] | None = Field(
        default=None, max_length=64, description="The label values for In and NotIn; none for the others."
    )

    @model_validator(mode="after")
    def _values_match_operator(self) -> LabelSelectorRequirement:
        ok = bool(self.values) if self.operator in ("In", "NotIn") else self.values is None
        if not ok:
            raise ValueError("In and NotIn need values; Exists and DoesNotExist take none")
        return self


class LabelSelector(ApiModel):
    """A Kubernetes label selector; empty (`{}`) selects everything."""

    match_labels: dict[str, LabelValue] | None = Field(
        default=None,
        max_length=16,
        description="Labels that must all be present with these values.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"self.all(k, size(k) <= {LABEL_KEY_MAX_LENGTH} && k.matches(r'{RESOURCE_NAME_PATTERN}'))",
                    "message": LABEL_KEY_MESSAGE,
                }
            ]
        },
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        default=None, max_length=16, description="Requirements that must all hold."
    )

    @model_validator(mode="after")
    def _keys(self) -> LabelSelector:
        if not all(_label_key_ok(k) for k in self.match_labels or {}):
            raise ValueError(LABEL_KEY_MESSAGE)
        return self


class NetworkPeer(ApiModel):
    """Pods allowed to connect, as a NetworkPolicy peer (namespaceSelector, podSelector or both)."""

    cel_rules: ClassVar[list[CelRule]] = [
        {
            "rule": "has(self.namespaceSelector) || has(self.podSelector)",
            "message": "set namespaceSelector, podSelector or both",
        },
    ]

    namespace_selector: LabelSelector | None = Field(
        default=None,
        description="Namespaces by label, e.g. {matchLabels: {kubernetes.io/metadata.name: web}}; {} is every "
        "namespace. Alone: every pod of those namespaces.",
    )
    pod_selector: LabelSelector | None = Field(
        default=None,
        description="Pods by label; {} is every pod. Alone: pods of the ModelDeployment's own namespace; with "
        "namespaceSelector: pods of the selected namespaces.",
    )

    @model_validator(mode="after")
    def _one_selector(self) -> NetworkPeer:
        if self.namespace_selector is None and self.pod_selector is None:
            raise ValueError("set namespaceSelector, podSelector or both")
        return self


def namespace_peer(namespace: str) -> NetworkPeer:
    """Every pod of the namespace called `namespace` (its kubernetes.io/metadata.name label)."""
    return NetworkPeer(namespace_selector=LabelSelector(match_labels={"kubernetes.io/metadata.name": namespace}))


class ServingSpec(ApiModel):
    """TorchServe settings."""

    batch_size: int = Field(default=32, ge=1, le=1024, description="TorchServe batchSize.")
    max_batch_delay_ms: int = Field(
        default=5,
        ge=0,
        le=60_000,
        description="TorchServe maxBatchDelay (ms): how long a batch waits to fill. Every request that does not "
        "fill a batch waits this long, so it adds to the latency of interactive (low-concurrency) traffic.",
    )
    workers_per_model: int = Field(default=1, ge=1, le=64, description="Python workers per model per pod.")
    replicas: int = Field(
        default=2,
        ge=0,
        le=1000,
        description="Replicas when autoscaling is disabled; the HPA owns the count when it is enabled.",
    )
    resources: ResourceRequirements | None = Field(
        default=None, description="Resources per pod; the NeuralCluster default when unset."
    )
    inference_token_secret: Name | None = Field(
        default=None,
        description="Require this Secret's `key` as a bearer token on the inference API; unset leaves it open "
        "to the in-cluster clients the NetworkPolicy admits.",
    )
    allowed_from: list[NetworkPeer] | None = Field(
        default=None,
        max_length=16,
        description="Pods that may call the inference port, as NetworkPolicy peers. Unset or empty: only the "
        "pods of the ModelDeployment's own namespace. A list replaces that default (add {podSelector: {}} to "
        "keep the own namespace).",
    )
    metrics_from: list[NetworkPeer] | None = Field(
        default=None,
        max_length=16,
        description=f"Pods that may scrape the metrics port, as NetworkPolicy peers. Unset or empty: every pod "
        f"of the namespace named {MONITORING_NAMESPACE!r}.",
    )


class AutoscalingSpec(ApiModel):
    """The stable version's autoscaler: a HorizontalPodAutoscaler, or a KEDA ScaledObject with
    targetRequestsPerSecond."""

    cel_rules: ClassVar[list[CelRule]] = [
        {"rule": "self.minReplicas <= self.maxReplicas", "message": "minReplicas must be <= maxReplicas"},
    ]

    enabled: bool = Field(default=True, description="Create an HPA.")
    min_replicas: int = Field(default=2, ge=1, le=1000, description="HPA minReplicas.")
    max_replicas: int = Field(default=10, ge=1, le=1000, description="HPA maxReplicas.")
    target_cpu_utilization: int = Field(default=70, ge=1, le=100, description="Average CPU utilization target (%).")
    target_memory_utilization: int | None = Field(
        default=None,
        ge=1,
        le=200,
        description="Also scale on average memory utilization (% of the memory request). Off by default: "
        "TorchServe's JVM and worker keep their memory under any load, so a memory target below the idle "
        "use pins the HPA at maxReplicas (docs/MODELDEPLOYMENT.md).",
    )
    scale_up_stabilization: StabilizationWindow = Field(
        default="3m", description="Scale up only to the lowest recommendation of this window (0s: at once)."
    )
    scale_down_stabilization: StabilizationWindow = Field(
        default="5m", description="Scale down only to the highest recommendation of this window."
    )
    target_requests_per_second: float | None = Field(
        default=None,
        gt=0.0,
        le=1_000_000.0,
        description="Also scale on the requests per second the stable pods receive, as an average per pod. Needs "
        "KEDA (keda.sh/v1alpha1 ScaledObject) and the NeuralCluster's prometheusUrl: the operator then makes a "
        "ScaledObject (CPU, memory and this rate) instead of its HPA; without them the HPA scales on CPU and "
        "memory only and the RequestRateAutoscaling condition says why.",
    )

    @model_validator(mode="after")
    def _min_le_max(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must be <= maxReplicas")
        return self


class AnalysisThresholds(ApiModel):
    """What a healthy canary looks like, measured by Prometheus over the window."""

    max_error_rate: float = Field(default=0.01, ge=0.0, le=1.0, description="Highest share of 5xx responses.")
    max_latency_p99_ms: float = Field(default=100.0, gt=0.0, description="Highest p99 latency in milliseconds.")
    window: Window = Field(default="5m", description="PromQL range of each query, e.g. 1m, 5m; longer than 0s.")


# ---- custom analysis metrics --------------------------------------------------------------------------

# spec.rollout.metrics[].query is a PromQL template: these {{variables}} are replaced before each query.
METRIC_VARIABLES = {
    "namespace": "the ModelDeployment's namespace",
    "name": "the ModelDeployment's name (also the model name TorchServe serves)",
    "track": "canary or stable: which track the query is for",
    "pods": "an RE2 regex matching the track's pod names (TorchServe's Hostname/hostname label, the pod label)",
    "window": "rollout.thresholds.window, e.g. 5m",
}
METRIC_VARIABLE_PATTERN = r"\{\{[^{}]*\}\}"
METRIC_QUERY_MAX_LENGTH = 2000
MAX_METRICS = 10
# CEL: the query with every known variable removed must hold no {{...}} (cheap enough for the cost budget,
# which findAll over a 2000-character string is not); the message names the first unknown one.
_WITHOUT_KNOWN = "self.query" + "".join(f".replace('{{{{{v}}}}}', '')" for v in METRIC_VARIABLES)
_KNOWN_TEXT = ", ".join(f"{{{{{v}}}}}" for v in METRIC_VARIABLES)


def unknown_metric_variables(query: str) -> list[str]:
    """The ``{{...}}`` placeholders of a metric query that are not template variables, in order, once each."""
    rest = query
    for v in METRIC_VARIABLES:  # as the API server's rule does: remove the known ones, then look for others
        rest = rest.replace(f"{{{{{v}}}}}", "")
    return list(dict.fromkeys(re.findall(METRIC_VARIABLE_PATTERN, rest)))


class RolloutMetric(ApiModel):
    """A custom analysis check: a PromQL template evaluated for the canary at every analysis, like the presets."""

    cel_rules: ClassVar[list[CelRule]] = [
        cel("has(self.min) || has(self.max)", "set min, max or both"),
        cel("!has(self.min) || !has(self.max) || self.min <= self.max", "min must be <= max"),
        cel(
            f"!{_WITHOUT_KNOWN}.matches(r'{METRIC_VARIABLE_PATTERN}')",
            expression=f"'query: unknown template variables ' + {_WITHOUT_KNOWN}.find(r'{METRIC_VARIABLE_PATTERN}')"
            f" + ' (known: {_KNOWN_TEXT})'",
            field_path=".query",
        ),
    ]

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-zA-Z_][a-zA-Z0-9_-]*$",
        description="Names the check in status and messages; unique in the list.",
    )
    query: str = Field(
        min_length=1,
        max_length=METRIC_QUERY_MAX_LENGTH,
        description="PromQL returning one number, with template variables {{namespace}}, {{name}}, {{track}}, "
        "{{pods}} (a regex of the track's pod names) and {{window}}, e.g. "
        'sum(rate(ts_inference_requests_total{model_name="{{name}}",hostname=~"{{pods}}"}[{{window}}])).',
    )
    min: float | None = Field(default=None, description="Lowest value that passes.")
    max: float | None = Field(default=None, description="Highest value that passes.")
    relative_to_stable: bool = Field(
        default=False,
        description="Query canary and stable over the same window and bound canary - stable (the difference).",
    )

    @model_validator(mode="after")
    def _check(self) -> RolloutMetric:
        where = f"metric {self.name}"
        if self.min is None and self.max is None:
            raise ValueError(f"{where}: set min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"{where}: min {self.min} must be <= max {self.max}")
        unknown = unknown_metric_variables(self.query)
        if unknown:
            raise ValueError(f"{where}: query: unknown template variables {', '.join(unknown)} (known: {_KNOWN_TEXT})")
        return self


ROLLOUT_ACTIONS = ("promote", "abort", "retry")
ActionId = Annotated[str, Field(min_length=1, max_length=63, pattern=VERSION_PATTERN)]


class RolloutAction(ApiModel):
    """A one-shot request to the operator, applied once per id (status.actions records each handled id)."""

    name: Literal["promote", "abort", "retry"] = Field(
        description="promote: skip the canary's remaining steps and promote it now. abort: roll the canary back "
        "now (stable keeps serving; phase RolledBack). retry: after a RolledBack, try the rolled-back version "
        "again from the first step."
    )
    id: ActionId = Field(
        description="Identifies this request: a new id is a new request; an id found in status.actions was "
        "handled and is never applied again (re-applying the same manifest repeats nothing). Letters, digits, "
        "'.', '_' and '-', at most 63 characters, e.g. a timestamp."
    )


SMOKE_REQUEST_MAX_LENGTH = 16 * 1024


class SmokeTraffic(ApiModel):
    """Synthetic requests to the canary during each step, so that a quiet service still gives the analysis
    data. It is traffic the operator makes up, not user traffic: the analysis then measures the canary
    answering it (docs/MODELDEPLOYMENT.md, "Smoke traffic")."""

    requests_per_second: int = Field(
        default=2, ge=1, le=50, description="Requests per second sent to the canary's pods during each step."
    )
    request: str = Field(
        min_length=1,
        max_length=SMOKE_REQUEST_MAX_LENGTH,
        description="The JSON body POSTed to /predictions/<name> (a string holding a JSON document, at most 16 "
        "KiB), e.g. '{\"inputs\": [[0, 0, 5, 13, 9, 1, 0, 0]]}'.",
    )
    expect_status: int = Field(
        default=200,
        ge=100,
        le=599,
        description="The HTTP status a healthy answer has; the smoke Job counts the others in its log. It never "
        "judges the canary: the analysis does.",
    )

    @model_validator(mode="after")
    def _request_is_json(self) -> SmokeTraffic:
        # Not expressible in CEL (Kubernetes' CEL cannot parse JSON): the operator checks it (spec InvalidSpec).
        try:
            json.loads(self.request)
        except ValueError as exc:
            raise ValueError(f"request: must be a JSON document: {exc}") from None
        return self


class RolloutSpec(ApiModel):
    """How a new version rolls out."""

    steps: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        default_factory=lambda: list(DEFAULT_CANARY_STEPS),
        min_length=1,
        max_length=100,
        description="Canary traffic weights in percent, strictly increasing, each in 1..100.",
        json_schema_extra={
            "x-kubernetes-list-type": "set",
            "x-kubernetes-validations": [
                {"rule": "self.isSorted()", "message": "steps must be strictly increasing"},
            ],
        },
    )
    interval: Interval = Field(default="1m", description="Time between analysis checks, e.g. 30s, 1m; longer than 0s.")
    thresholds: AnalysisThresholds = Field(default_factory=AnalysisThresholds, description="Analysis thresholds.")
    failed_checks_before_rollback: int = Field(
        default=3, ge=1, le=100, description="Failed checks that trigger the rollback."
    )
    no_data_timeout: NoDataTimeout = Field(
        default="5m",
        description="How long the canary may go without data (no requests, no series, Prometheus unreachable) "
        "before every further analysis without data counts as a failed check.",
    )
    metrics: list[RolloutMetric] = Field(
        default_factory=list,
        max_length=MAX_METRICS,
        description="Custom checks next to the error-rate and p99 presets: PromQL templates with min/max bounds, "
        "optionally relative to stable (docs/MODELDEPLOYMENT.md).",
        # A map keyed by name: the API server refuses a repeated name itself ("Duplicate value").
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    paused: bool = Field(
        default=False,
        description="Hold the rollout until unset: a canary keeps its step and weight and is not analysed, and "
        "a new version does not start its canary. Resuming restarts the step's clock. Actions still apply.",
    )
    action: RolloutAction | None = Field(
        default=None,
        description="A one-shot manual action (promote, abort, retry) with an id; the operator applies each id "
        "once and records the result in status.actions. Leaving it set is harmless.",
    )
    smoke_traffic: SmokeTraffic | None = Field(
        default=None,
        description="Send synthetic requests to the canary during each step (a Job per step), so that a service "
        "without user traffic can still be analysed. Unset: the analysis measures user traffic only.",
    )

    @model_validator(mode="after")
    def _steps_increasing(self) -> RolloutSpec:
        for weight in self.steps:
            if not 1 <= weight <= 100:
                raise ValueError(f"steps: each weight must be in 1..100, got {weight}")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError(f"steps must be strictly increasing, got {self.steps}")
        names = [m.name for m in self.metrics]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"metrics: names must be unique, repeated: {', '.join(repeated)}")
        return self


class ModelDeploymentSpec(ApiModel):
    """Desired state of a ModelDeployment."""

    cluster_ref: ObjectRef = Field(
        description="The NeuralCluster that provides the server image, storage and Prometheus.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "is immutable once the ModelDeployment exists"}
            ]
        },
    )
    model: ModelSource = Field(description="The model and version to serve.")
    serving: ServingSpec = Field(default_factory=ServingSpec, description="TorchServe settings.")
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="Autoscaling.")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="Canary rollout of new versions.")


ModelDeploymentPhase = Literal["Pending", "Available", "Progressing", "Canary", "Promoting", "RolledBack", "Failed"]


class ServingTemplate(StatusModel):
    """What defines a serving pod besides the model: the track's Deployment is built from this record, so
    stable keeps its template until a canary with a new one is promoted."""

    server_image: str = Field(description="The NeuralCluster's server image.")
    pull_policy: str = Field(description="imagePullPolicy.")
    batch_size: int = Field(description="TorchServe batchSize.")
    max_batch_delay_ms: int = Field(description="TorchServe maxBatchDelay (ms).")
    workers_per_model: int = Field(description="Workers per model per pod.")
    resources: ResourceRequirements = Field(description="Resources per pod (spec.serving or the cluster default).")
    inference_token_secret: str | None = Field(default=None, description="Bearer-token Secret, if any.")


class ServedVersion(StatusModel):
    """One version being served."""

    version: str = Field(description="Model version.")
    training_job: str | None = Field(default=None, description="TrainingJob that produced it.")
    archive: str | None = Field(default=None, description="Archive path in the artifact store.")
    template: ServingTemplate | None = Field(default=None, description="The serving pod template it runs with.")
    template_hash: str | None = Field(default=None, description="Digest of the template (first 10 hex digits).")
    revision: str | None = Field(
        default=None, description="version@templateHash (7 digits): tells apart two templates of one version."
    )
    replicas: int | None = Field(default=None, description="Desired replicas.")
    ready_replicas: int | None = Field(default=None, description="Replicas with the model loaded.")


class CanaryState(ServedVersion):
    """The version under analysis."""

    weight: int = Field(default=0, description="Target traffic weight (%) of the current step.")
    achieved_weight: float | None = Field(
        default=None, description="Weight actually achieved by the replica ratio (%)."
    )
    step: int = Field(default=0, description="Index into spec.rollout.steps.")
    failed_checks: int = Field(default=0, description="Failed analysis checks so far.")
    step_started_at: str | None = Field(default=None, description="When the current step began (RFC 3339).")
    no_data_since: str | None = Field(
        default=None, description="First analysis of the current run without data (RFC 3339); none once data came."
    )
    paused_at: str | None = Field(
        default=None, description="When spec.rollout.paused began to hold this canary (RFC 3339); none when running."
    )


class MetricValue(StatusModel):
    """One custom metric of an analysis."""

    name: str = Field(description="spec.rollout.metrics[].name.")
    value: float | None = Field(default=None, description="What the bounds applied to (canary - stable if relative).")
    canary: float | None = Field(default=None, description="The canary's value.")
    stable: float | None = Field(default=None, description="The stable's value (relativeToStable only).")


class AnalysisResult(StatusModel):
    """The latest Prometheus analysis of the canary."""

    time: str = Field(description="When it ran (RFC 3339).")
    outcome: Literal["Passed", "Failed", "NoData"] = Field(description="Passed, Failed or NoData.")
    error_rate: float | None = Field(default=None, description="Canary error rate.")
    latency_p99_ms: float | None = Field(default=None, description="Canary p99 latency (ms).")
    metrics: list[MetricValue] = Field(
        default_factory=list, description="Each spec.rollout.metrics check's value (null: no data or rejected)."
    )
    message: str | None = Field(default=None, description="Which threshold failed, or why there was no data.")


class HistoryEntry(StatusModel):
    """A version's life in this ModelDeployment (lineage)."""

    version: str = Field(description="Model version.")
    training_job: str | None = Field(default=None, description="TrainingJob that produced it.")
    metrics: dict[str, float] | None = Field(default=None, description="Metrics at validation.")
    template_hash: str | None = Field(default=None, description="Its serving template's digest.")
    outcome: Literal["Deployed", "Promoted", "RolledBack", "Retired"] = Field(description="What happened.")
    at: str = Field(description="When (RFC 3339).")
    reason: str | None = Field(default=None, description="Why.")


class HandledAction(StatusModel):
    """A spec.rollout.action the operator has handled."""

    name: str = Field(description="promote, abort or retry.")
    id: str = Field(description="The request's id.")
    handled_at: str = Field(description="When the operator handled it (RFC 3339).")
    result: Literal["Applied", "Ignored"] = Field(
        description="Applied, or Ignored when it did not apply to the phase (the message says why)."
    )
    message: str | None = Field(default=None, description="What was done, or why nothing was.")


class ModelDeploymentStatus(StatusModel):
    """Observed state of a ModelDeployment."""

    observed_generation: int | None = Field(default=None, description="Generation this status reflects.")
    phase: ModelDeploymentPhase | None = Field(default=None, description="Where the rollout is.")
    reason: str | None = Field(default=None, description="Why the deployment is in this phase.")
    message: str | None = Field(default=None, description="Details for people.")
    stable: ServedVersion | None = Field(default=None, description="The version taking most traffic.")
    canary: CanaryState | None = Field(default=None, description="The version under analysis, if any.")
    last_analysis: AnalysisResult | None = Field(default=None, description="Latest canary analysis.")
    history: list[HistoryEntry] = Field(default_factory=list, description="Versions served, newest last.")
    endpoint: str | None = Field(default=None, description="In-cluster prediction URL.")
    actions: list[HandledAction] = Field(
        default_factory=list, description="spec.rollout.action requests handled, newest last (the last 20)."
    )
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready, Progressing, Degraded; Paused while spec.rollout.paused holds."
    )
