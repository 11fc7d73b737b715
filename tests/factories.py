"""Small builders of Flow Nexus manifests for tests; override any nested field with dotted keys."""

from __future__ import annotations

import copy
from typing import Any

API_VERSION = "flownexus.io/v1alpha1"
Manifest = dict[str, Any]


def _set(obj: Manifest, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        obj = obj.setdefault(key, {})
    if value is _DELETE:
        obj.pop(leaf, None)
    else:
        obj[leaf] = value


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


_DELETE = _Delete()
DELETE: Any = _DELETE


def _manifest(kind: str, name: str, spec: Manifest, overrides: dict[str, Any]) -> Manifest:
    manifest: Manifest = {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": name, "namespace": "default"},
        "spec": copy.deepcopy(spec),
    }
    for dotted, value in overrides.items():
        _set(manifest, dotted, value)
    return manifest


def neural_cluster(name: str = "demo", **overrides: Any) -> Manifest:
    """A NeuralCluster that creates a 1Gi artifact PVC. Keys like ``spec.limits.maxWorkersPerJob``."""
    return _manifest("NeuralCluster", name, {"artifactStore": {"size": "1Gi"}}, overrides)


def training_job(name: str = "digits", **overrides: Any) -> Manifest:
    """A 2-worker digits MLP TrainingJob."""
    spec = {
        "clusterRef": {"name": "demo"},
        "model": {"architecture": "mlp", "hiddenSizes": [128, 64]},
        "dataset": {"source": "builtin", "name": "digits"},
        "training": {"epochs": 20},
        "distributed": {"workers": 2},
    }
    return _manifest("TrainingJob", name, spec, overrides)


def model_deployment(name: str = "digits", **overrides: Any) -> Manifest:
    """A ModelDeployment of the digits TrainingJob's model."""
    spec = {
        "clusterRef": {"name": "demo"},
        "model": {"trainingJobRef": {"name": "digits"}, "version": "1.0.0"},
    }
    return _manifest("ModelDeployment", name, spec, overrides)
