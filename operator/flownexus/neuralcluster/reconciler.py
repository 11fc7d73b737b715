"""One NeuralCluster pass: its artifact PVC exists, then Ready; and what TrainingJobs and ModelDeployments
read of it (from the cache, never a GET per pass)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydantic import ValidationError

from ..api.common import format_validation_error
from ..api.neuralcluster import NeuralClusterSpec, NeuralClusterStatus
from ..meta import Manifest, set_condition
from ..runtime.cache import Cache
from ..runtime.controller import Action, Apply, Emit, Outcome, parse_spec
from ..trainingjob.decide import cluster_of, uses_capacity
from .children import artifact_claim_name, build_artifact_pvc

log = logging.getLogger(__name__)
KIND = "NeuralCluster"


@dataclass(frozen=True)
class ClusterView:
    """What a TrainingJob or ModelDeployment needs of its NeuralCluster."""

    spec: NeuralClusterSpec | None
    claim: str | None  # the PVC of a PVC store; None for S3
    ready: bool
    problem: str  # why it is not ready ("" when ready)
    store: str | None = None  # which store: s3://bucket/prefix or pvc/<claim> (ArtifactStore.describe)


def cluster_view(cache: Cache, namespace: str, name: str) -> ClusterView:
    nc = cache.get(KIND, namespace, name)
    if nc is None:
        return ClusterView(None, None, False, f"spec.clusterRef: NeuralCluster {name} does not exist")
    try:
        spec = NeuralClusterSpec.model_validate(nc.get("spec") or {})
    except ValidationError as exc:
        problem = f"NeuralCluster {name} is invalid: " + "; ".join(format_validation_error(exc))
        return ClusterView(None, None, False, problem)
    claim = artifact_claim_name(name, spec)
    store = spec.artifact_store.describe(name)
    if (nc.get("status") or {}).get("phase") != "Ready":
        return ClusterView(spec, claim, False, f"NeuralCluster {name} is not Ready yet", store)
    return ClusterView(spec, claim, True, "", store)


class NeuralClusterReconciler:
    kind = KIND
    pod_owned_status: frozenset[str] = frozenset()

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def reconcile(self, obj: Manifest) -> Outcome:
        spec: NeuralClusterSpec = parse_spec(NeuralClusterSpec, obj)
        status = NeuralClusterStatus.model_validate(obj.get("status") or {})
        meta = obj["metadata"]
        namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
        claim = artifact_claim_name(name, spec)
        actions: list[Action] = []
        pvc = build_artifact_pvc(obj, spec)
        if pvc is not None:
            actions.append(Apply(pvc, create_only=True))  # a bound PVC's spec is immutable; never fight it
        current = self.cache.get("PersistentVolumeClaim", namespace, claim) if claim else None
        waiting_for = None
        if claim is not None and pvc is None and current is None:
            waiting_for = f"PersistentVolumeClaim {claim} (spec.artifactStore.existingClaim) does not exist"
        elif current is not None and (current.get("status") or {}).get("phase") == "Lost":
            waiting_for = f"PersistentVolumeClaim {claim} is Lost"

        def on_cluster(o: Manifest) -> bool:
            return cluster_of(o) == str(name)

        new = status.model_copy(deep=True)
        new.observed_generation = generation
        new.artifact_claim = claim
        new.artifact_store = spec.artifact_store.describe(name)
        new.active_training_jobs = len(
            self.cache.list("TrainingJob", namespace, where=lambda o: on_cluster(o) and uses_capacity(o))
        )
        new.model_deployments = len(self.cache.list("ModelDeployment", namespace, where=on_cluster))
        new.phase = "Pending" if waiting_for else "Ready"
        # An S3 store is not probed: the operator never reads its Secret; the pods report a refused key or a
        # missing bucket, naming the URI, in the TrainingJob's condition.
        message = waiting_for or f"artifact store {new.artifact_store} is available"
        new.conditions = set_condition(
            new.conditions, "Ready", waiting_for is None, "Waiting" if waiting_for else "ArtifactStoreReady", message,
            generation,
        )  # fmt: skip
        if new.phase != status.phase:
            actions.append(Emit("Normal" if waiting_for is None else "Warning", new.phase, message))
        wire = new.model_dump(by_alias=True, exclude_none=True, mode="json")
        return Outcome(status=wire, actions=actions, requeue_after=15 if waiting_for else None)
