"""Reconcile a NeuralCluster: make sure its artifact PVC exists, then report Ready."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydantic import ValidationError

from .. import API_VERSION, kube
from ..api.common import format_validation_error
from ..api.neuralcluster import NeuralClusterSpec, NeuralClusterStatus
from ..builders.common import Manifest, set_condition
from ..builders.neuralcluster import artifact_claim_name, build_artifact_pvc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """The status to write and, when not ready, why (for an Event and a retry)."""

    status: NeuralClusterStatus
    waiting_for: str | None


def reconcile(
    body: Manifest, spec: NeuralClusterSpec, status: NeuralClusterStatus, active_jobs: int, deployments: int
) -> Outcome:
    meta = body["metadata"]
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    claim = artifact_claim_name(name, spec)
    pvc = build_artifact_pvc(body, spec)
    if pvc is not None:
        kube.ensure(pvc, patch_existing=False)  # a bound PVC's spec is immutable; never fight it
    current = kube.get("v1", "PersistentVolumeClaim", namespace, claim)
    waiting_for: str | None = None
    if current is None:
        waiting_for = f"PersistentVolumeClaim {claim} (spec.artifactStore.existingClaim) does not exist"
    elif current.get("status", {}).get("phase") == "Lost":
        waiting_for = f"PersistentVolumeClaim {claim} is Lost"
    new = status.model_copy(deep=True)
    new.observed_generation = generation
    new.artifact_claim = claim
    new.active_training_jobs = active_jobs
    new.model_deployments = deployments
    new.phase = "Pending" if waiting_for else "Ready"
    new.conditions = set_condition(
        new.conditions,
        "Ready",
        waiting_for is None,
        "Waiting" if waiting_for else "ArtifactStoreReady",
        waiting_for or f"artifact store {claim} is available",
        generation,
    )
    log.debug("neuralcluster %s/%s: %s", namespace, name, new.phase)
    return Outcome(new, waiting_for)


def cluster_for(namespace: str, cluster_name: str) -> tuple[NeuralClusterSpec | None, str | None, str]:
    """The NeuralCluster's spec and artifact claim, or why it cannot be used yet."""
    nc = kube.get(API_VERSION, "NeuralCluster", namespace, cluster_name)
    if nc is None:
        return None, None, f"spec.clusterRef: NeuralCluster {cluster_name} does not exist"
    try:
        spec = NeuralClusterSpec.model_validate(nc["spec"])
    except ValidationError as exc:
        return None, None, f"NeuralCluster {cluster_name} is invalid: " + "; ".join(format_validation_error(exc))
    if (nc.get("status") or {}).get("phase") != "Ready":
        return None, None, f"NeuralCluster {cluster_name} is not Ready yet"
    return spec, artifact_claim_name(cluster_name, spec), ""
