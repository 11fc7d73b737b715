"""A change of the stable pod template (server image, resources, TorchServe settings), not only of the model
version, goes through the canary: the decision's transitions, and the Deployments and ConfigMaps the reconciler
builds from the template each track records in status."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from flownexus.api.modeldeployment import ModelDeploymentSpec, ModelDeploymentStatus, ServingTemplate
from flownexus.api.neuralcluster import NeuralClusterSpec
from flownexus.modeldeployment import reconciler as rec
from flownexus.modeldeployment.children import (
    CONFIG_HASH_ANNOTATION,
    TEMPLATE_HASH_ANNOTATION,
    ServingContext,
    serving_template,
    template_hash,
)
from flownexus.modeldeployment.decide import (
    DeploymentView,
    Measurement,
    Observed,
    Plan,
    Source,
    decide,
    now_str,
)
from flownexus.runtime.controller import Apply
from tests.factories import model_deployment, neural_cluster

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
V1 = Source(version="1.0.0", archive="default/digits/digits.mar", training_job="digits")
V2 = Source(version="2.0.0", archive="default/digits-v2/digits.mar", training_job="digits-v2")
CLUSTER = NeuralClusterSpec.model_validate(neural_cluster()["spec"])
READY = DeploymentView(replicas=2, ready=2, version="1.0.0", rolled_out=True)
GOOD = Measurement(error_rate=0.0, latency_p99_ms=10.0)
BAD = Measurement(error_rate=0.5, latency_p99_ms=10.0)


def md(version: str = "1.0.0", tj: str = "digits", /, **overrides: Any) -> dict[str, Any]:
    obj = model_deployment(
        **{
            "spec.model": {"trainingJobRef": {"name": tj}, "version": version},
            "spec.rollout.interval": "1m",
            "spec.rollout.steps": [50],
            "spec.rollout.failedChecksBeforeRollback": 1,
            **overrides,
        }
    )
    obj["metadata"].update(uid="uid-1", generation=1)
    return obj


def spec_of(obj: dict[str, Any]) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(obj["spec"])


BATCH32, BATCH8 = md(), md(**{"spec.serving.batchSize": 8})
T32, T8 = serving_template(spec_of(BATCH32), CLUSTER), serving_template(spec_of(BATCH8), CLUSTER)
H32, H8 = template_hash(T32), template_hash(T8)


def available(template: ServingTemplate | None = T32) -> ModelDeploymentStatus:
    stable: dict[str, Any] = {"version": "1.0.0", "trainingJob": "digits", "archive": V1.archive}
    if template is not None:
        stable.update(template=template.to_wire(), templateHash=template_hash(template))
    return ModelDeploymentStatus.model_validate({"phase": "Available", "stable": stable})


def observe(template: ServingTemplate | None, now: datetime = T0, **fields: Any) -> Observed:
    base: dict[str, Any] = {"now": now, "source": V1, "stable": READY, "template": template}
    base.update(fields)
    return Observed(**base)


def config_maps(plan: Plan, obj: dict[str, Any], obs: Observed) -> dict[str, dict[str, Any]]:
    ctx = ServingContext(obj, spec_of(obj), CLUSTER, "demo-artifacts")
    return {
        a.manifest["metadata"]["name"]: a.manifest
        for a in rec.actions(ctx, plan, obs)
        if isinstance(a, Apply) and a.manifest["kind"] in ("ConfigMap", "Deployment")
    }


def batch_size(config_map: dict[str, Any]) -> int:
    return int(json.loads(config_map["data"]["model-settings.json"])["batchSize"])


def test_the_template_digest_ignores_what_does_not_reach_the_pods() -> None:
    for field, value in [
        ("spec.serving.replicas", 5),
        ("spec.serving.allowedFrom", [{"podSelector": {}}]),
        ("spec.serving.metricsFrom", [{"podSelector": {}}]),
        ("spec.autoscaling.maxReplicas", 20),
    ]:
        assert template_hash(serving_template(spec_of(md(**{field: value})), CLUSTER)) == H32, field
    for field, value in [
        ("spec.serving.batchSize", 8),
        ("spec.serving.maxBatchDelayMs", 50),
        ("spec.serving.workersPerModel", 2),
        ("spec.serving.resources", {"requests": {"cpu": "2"}}),
        ("spec.serving.inferenceTokenSecret", "token"),
    ]:
        assert template_hash(serving_template(spec_of(md(**{field: value})), CLUSTER)) != H32, field
    new_image = CLUSTER.model_copy(update={"images": CLUSTER.images.model_copy(update={"server": "srv:0.2.0"})})
    assert template_hash(serving_template(spec_of(BATCH32), new_image)) != H32


def test_a_template_change_while_available_starts_a_canary_of_the_same_version() -> None:
    plan = decide(spec_of(BATCH8), available(), observe(T8), 1)
    st = plan.status
    assert st.phase == "Canary" and st.reason == "CanaryStarted"
    assert st.canary is not None and st.canary.version == "1.0.0" and st.canary.archive == V1.archive
    assert st.canary.template_hash == H8 and st.canary.revision == f"1.0.0@{H8[:7]}"
    assert st.stable is not None and st.stable.template_hash == H32
    assert plan.canary_action == "ensure" and plan.route == "both"
    assert f"1.0.0@{H8[:7]}" in (st.message or "")


def test_the_new_template_goes_to_the_canary_and_the_stable_deployment_keeps_its_own() -> None:
    obs = observe(T8)
    plan = decide(spec_of(BATCH8), available(), obs, 1)
    built = config_maps(plan, BATCH8, obs)
    assert batch_size(built["digits-serving"]) == 32 and batch_size(built["digits-serving-canary"]) == 8
    # The stable Deployment is exactly the one built for the old spec: its pods do not roll.
    before = config_maps(decide(spec_of(BATCH32), available(), observe(T32), 1), BATCH32, observe(T32))
    assert built["digits-stable"] == before["digits-stable"]
    canary = built["digits-canary"]
    volumes = {v["name"]: v for v in canary["spec"]["template"]["spec"]["volumes"]}
    assert volumes["templates"]["configMap"]["name"] == "digits-serving-canary"
    assert canary["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION] == H8
    assert built["digits-stable"]["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION] == H32
    pod_annotations = canary["spec"]["template"]["metadata"]["annotations"]
    assert (
        pod_annotations[CONFIG_HASH_ANNOTATION]
        != before["digits-stable"]["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    )


def test_a_template_change_without_a_resolvable_source_serves_stables_archive() -> None:
    plan = decide(spec_of(BATCH8), available(), observe(T8, source=None, source_problem="TrainingJob gone"), 1)
    assert plan.status.canary is not None and plan.status.canary.archive == V1.archive


def test_promotion_rolls_the_stable_template() -> None:
    started = decide(spec_of(BATCH8), available(), observe(T8), 1).status
    canary_dep = DeploymentView(replicas=2, ready=2, version="1.0.0", rolled_out=True, template_hash=H8)
    obs = observe(T8, now=T0 + timedelta(minutes=1, seconds=1), canary=canary_dep, measurement=GOOD)
    plan = decide(spec_of(BATCH8), started, obs, 1)
    st = plan.status
    assert st.phase == "Promoting" and st.stable is not None and st.stable.template_hash == H8
    assert st.stable.revision == f"1.0.0@{H8[:7]}"
    assert batch_size(config_maps(plan, BATCH8, obs)["digits-serving"]) == 8
    assert [(h.outcome, h.template_hash) for h in st.history[-2:]] == [("Retired", H32), ("Promoted", H8)]
    # The stable Deployment still carries the old template's digest: not promoted yet.
    old = DeploymentView(replicas=2, ready=2, version="1.0.0", rolled_out=True, template_hash=H32)
    waiting = decide(spec_of(BATCH8), st, observe(T8, stable=old, canary=canary_dep), 1)
    assert waiting.status.phase == "Promoting" and waiting.canary_action == "ensure"
    new = DeploymentView(replicas=2, ready=2, version="1.0.0", rolled_out=True, template_hash=H8)
    done = decide(spec_of(BATCH8), st, observe(T8, stable=new, canary=canary_dep), 1)
    assert done.status.phase == "Available" and done.canary_action == "delete"
    assert next(c.status for c in done.status.conditions if c.type == "Ready") == "True"


def test_a_rollback_keeps_the_old_template_until_the_spec_changes() -> None:
    started = decide(spec_of(BATCH8), available(), observe(T8), 1).status
    canary_dep = DeploymentView(replicas=2, ready=2, version="1.0.0", rolled_out=True, template_hash=H8)
    obs = observe(T8, now=T0 + timedelta(minutes=1, seconds=1), canary=canary_dep, measurement=BAD)
    plan = decide(spec_of(BATCH8), started, obs, 1)
    st = plan.status
    assert st.phase == "RolledBack" and st.stable is not None and st.stable.template_hash == H32
    assert st.history[-1].outcome == "RolledBack" and st.history[-1].template_hash == H8
    assert batch_size(config_maps(plan, BATCH8, obs)["digits-serving"]) == 32
    again = decide(spec_of(BATCH8), st, observe(T8, now=T0 + timedelta(minutes=5)), 1)
    assert again.status.phase == "RolledBack" and again.status.canary is None
    assert next(c.status for c in again.status.conditions if c.type == "Ready") == "False"
    # Back to the old settings: stable serves what the spec asks for.
    back = decide(spec_of(BATCH32), st, observe(T32, now=T0 + timedelta(minutes=6)), 1)
    assert back.status.phase == "Available" and back.status.canary is None
    # Yet another template: a new canary.
    other = md(**{"spec.serving.batchSize": 4})
    retried = decide(spec_of(other), st, observe(serving_template(spec_of(other), CLUSTER)), 1)
    assert retried.status.phase == "Canary"


def test_an_operator_upgrade_adopts_the_current_template_without_a_canary() -> None:
    """A status written before templates were recorded: the stable Deployment was built from the spec as it
    is, so that template is adopted, whatever it is."""
    plan = decide(spec_of(BATCH8), available(template=None), observe(T8), 1)
    st = plan.status
    assert st.phase == "Available" and st.canary is None and plan.canary_action == "none"
    assert st.stable is not None and st.stable.template_hash == H8 and st.stable.template == T8
    assert st.stable.revision == f"1.0.0@{H8[:7]}"


def test_an_upgrade_during_a_canary_adopts_for_both_tracks() -> None:
    st = available(template=None)
    st.phase = "Canary"
    st.canary = ModelDeploymentStatus.model_validate(
        {"canary": {"version": "2.0.0", "archive": V2.archive, "weight": 50, "stepStartedAt": now_str(T0)}}
    ).canary
    plan = decide(spec_of(md("2.0.0", "digits-v2")), st, observe(T32, source=V2), 1)
    assert plan.status.phase == "Canary" and plan.status.canary is not None
    assert plan.status.canary.template_hash == H32 and plan.status.stable is not None
    assert plan.status.stable.template_hash == H32


def test_a_template_change_during_the_analysis_withdraws_the_canary() -> None:
    started = decide(spec_of(BATCH8), available(), observe(T8), 1).status
    other = md(**{"spec.serving.batchSize": 4})
    plan = decide(spec_of(other), started, observe(serving_template(spec_of(other), CLUSTER)), 1)
    assert plan.status.phase == "Available" and plan.status.reason == "CanaryAborted"
    assert "serving template changed" in (plan.status.message or "") and plan.canary_action == "delete"


def test_a_version_change_records_the_template_it_starts_with() -> None:
    obj = md("2.0.0", "digits-v2", **{"spec.serving.batchSize": 8})
    plan = decide(spec_of(obj), available(), observe(T8, source=V2), 1)
    canary = plan.status.canary
    assert canary is not None and canary.version == "2.0.0" and canary.template_hash == H8


def test_the_first_version_records_its_template() -> None:
    plan = decide(spec_of(BATCH32), ModelDeploymentStatus(), observe(T32, stable=None), 1)
    assert plan.status.stable is not None and plan.status.stable.template_hash == H32
    assert plan.status.history[-1].template_hash == H32


def test_a_manual_promote_of_a_canary_the_spec_no_longer_asks_for_is_ignored() -> None:
    started = decide(spec_of(BATCH8), available(), observe(T8), 1).status
    other = md(**{"spec.serving.batchSize": 4, "spec.rollout.action": {"name": "promote", "id": "p1"}})
    plan = decide(spec_of(other), started, observe(serving_template(spec_of(other), CLUSTER)), 1)
    assert plan.status.actions[-1].result == "Ignored"
    assert "serving template" in (plan.status.actions[-1].message or "")
