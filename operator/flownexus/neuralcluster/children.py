"""Children of a NeuralCluster: the artifact-store PersistentVolumeClaim (none for an S3 store)."""

from __future__ import annotations

from ..api.neuralcluster import NeuralClusterSpec
from ..meta import Manifest, child_metadata


def artifact_claim_name(cluster_name: str, spec: NeuralClusterSpec) -> str | None:
    """The PVC the cluster uses: the adopted one, or ``<cluster>-artifacts``; None for an S3 store."""
    if spec.artifact_store.s3 is not None:
        return None
    return spec.artifact_store.existing_claim or f"{cluster_name}-artifacts"


def build_artifact_pvc(owner: Manifest, spec: NeuralClusterSpec) -> Manifest | None:
    """The PVC to create, or None when an existing claim is adopted (we never own what we adopt)."""
    store = spec.artifact_store
    claim = artifact_claim_name(owner["metadata"]["name"], spec)
    if store.existing_claim is not None or claim is None:
        return None
    pvc_spec: Manifest = {
        "accessModes": [store.access_mode],
        "resources": {"requests": {"storage": str(store.size)}},
    }
    if store.storage_class_name:
        pvc_spec["storageClassName"] = store.storage_class_name
    meta = child_metadata(owner, claim, "artifact-store")
    # The artifacts outlive a deleted NeuralCluster only if the user adopts the PVC; created ones go with it.
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": pvc_spec}
