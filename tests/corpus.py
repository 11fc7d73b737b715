"""Valid and invalid manifests, shared by the unit tests (pydantic) and the e2e tests (the API server).

Each invalid case names the field path that both must put in their error message, and where it
applies the bad value that must appear too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.factories import DELETE, Manifest, model_deployment, neural_cluster, training_job


@dataclass(frozen=True)
class InvalidCase:
    """A manifest that must be rejected, and what the rejection must say."""

    name: str
    manifest: Manifest
    path: str
    value: Any = None


VALID_MANIFESTS: list[Manifest] = [
    neural_cluster(),
    neural_cluster(
        "adopting",
        **{
            "spec.artifactStore": {"existingClaim": "my-pvc"},
            "spec.prometheusUrl": "http://prometheus.monitoring.svc:9090",
        },
    ),
    training_job(),
    training_job("transformer", **{"spec.model": {"architecture": "transformer", "dModel": 64, "numHeads": 8}}),
    training_job("diabetes", **{"spec.dataset": {"source": "builtin", "name": "diabetes", "task": "regression"}}),
    training_job(
        "regression",
        **{
            "spec.dataset": {"source": "synthetic", "task": "regression", "split": "temporal"},
            "spec.validation": {"maxRmse": 0.5, "minR2": 0.8},
        },
    ),
    training_job(
        "gpu",
        **{"spec.distributed": {"workers": 2, "procsPerWorker": 2, "gpusPerWorker": 2, "backend": "nccl"}},
    ),
    training_job("csv", **{"spec.dataset": {"source": "file", "path": "data/sales.csv", "task": "regression"}}),
    training_job("suspended", **{"spec.runPolicy": {"suspend": True, "maxRestarts": 0}}),
    model_deployment(),
    model_deployment("by-path", **{"spec.model": {"archivePath": "models/digits.mar", "version": "2"}}),
    model_deployment(
        "custom-rollout",
        **{
            "spec.rollout": {"steps": [10, 50, 100], "interval": "30s"},
            "spec.autoscaling": {"minReplicas": 1, "maxReplicas": 1},
        },
    ),
    model_deployment(
        "network-peers",
        **{
            "spec.serving.allowedFrom": [
                {"podSelector": {}},
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "web"}},
                    "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["api", "ui"]}]},
                },
            ],
            "spec.serving.metricsFrom": [
                {"namespaceSelector": {"matchExpressions": [{"key": "monitoring", "operator": "Exists"}]}}
            ],
        },
    ),
]

INVALID_CASES: list[InvalidCase] = [
    # wrong types
    InvalidCase(
        "workers as a string",
        training_job(**{"spec.distributed.workers": "two"}),
        "spec.distributed.workers",
        "two",
    ),
    InvalidCase("epochs as a float", training_job(**{"spec.training.epochs": 2.5}), "spec.training.epochs", 2.5),
    # out of range
    InvalidCase("zero workers", training_job(**{"spec.distributed.workers": 0}), "spec.distributed.workers", 0),
    InvalidCase("dropout of one", training_job(**{"spec.model.dropout": 1.0}), "spec.model.dropout", 1),
    InvalidCase(
        "accuracy above one",
        training_job(**{"spec.validation.minAccuracy": 1.5}),
        "spec.validation.minAccuracy",
        1.5,
    ),
    InvalidCase(
        "maxReplicas of zero",
        model_deployment(**{"spec.autoscaling.maxReplicas": 0}),
        "spec.autoscaling.maxReplicas",
        0,
    ),
    InvalidCase(
        "canary step above 100",
        model_deployment(**{"spec.rollout.steps": [50, 150]}),
        "spec.rollout.steps",
        150,
    ),
    InvalidCase(
        "bad prometheus url",
        neural_cluster(**{"spec.prometheusUrl": "prometheus:9090"}),
        "spec.prometheusUrl",
        "prometheus:9090",
    ),
    # enums
    InvalidCase(
        "unknown architecture",
        training_job(**{"spec.model.architecture": "cnn"}),
        "spec.model.architecture",
        "cnn",
    ),
    InvalidCase("unknown dataset", training_job(**{"spec.dataset.name": "mnist"}), "spec.dataset.name", "mnist"),
    # missing required
    InvalidCase("no model", training_job(**{"spec.model": DELETE}), "spec.model"),
    InvalidCase("no cluster", model_deployment(**{"spec.clusterRef": DELETE}), "spec.clusterRef"),
    InvalidCase("no version", model_deployment(**{"spec.model.version": DELETE}), "spec.model.version"),
    # unknown fields
    InvalidCase("misspelled field", training_job(**{"spec.training.epochz": 3}), "spec.training.epochz"),
    # cross-field rules (CEL on the server, model validators in the operator)
    InvalidCase(
        "min above max replicas",
        model_deployment(**{"spec.autoscaling": {"minReplicas": 5, "maxReplicas": 3}}),
        "spec.autoscaling",
    ),
    InvalidCase("two model sources", model_deployment(**{"spec.model.archivePath": "models/x.mar"}), "spec.model"),
    InvalidCase("no model source", model_deployment(**{"spec.model.trainingJobRef": DELETE}), "spec.model"),
    InvalidCase("steps not increasing", model_deployment(**{"spec.rollout.steps": [25, 15, 35]}), "spec.rollout"),
    InvalidCase("repeated step", model_deployment(**{"spec.rollout.steps": [5, 5, 10]}), "spec.rollout"),
    InvalidCase("builtin without name", training_job(**{"spec.dataset": {"source": "builtin"}}), "spec.dataset"),
    InvalidCase(
        "file without path",
        training_job(**{"spec.dataset": {"source": "file", "task": "regression"}}),
        "spec.dataset",
    ),
    InvalidCase("builtin regression", training_job(**{"spec.dataset.task": "regression"}), "spec.dataset"),
    InvalidCase(
        "diabetes as classification",
        training_job(**{"spec.dataset": {"source": "builtin", "name": "diabetes"}}),
        "spec.dataset",
    ),
    InvalidCase(
        "nothing left to train on",
        training_job(**{"spec.dataset.validationFraction": 0.5, "spec.dataset.testFraction": 0.45}),
        "spec.dataset",
    ),
    InvalidCase(
        "warmup as long as training",
        training_job(**{"spec.training": {"epochs": 3, "scheduler": {"warmupEpochs": 3}}}),
        "spec.training",
    ),
    InvalidCase("nccl without gpus", training_job(**{"spec.distributed.backend": "nccl"}), "spec.distributed"),
    InvalidCase(
        "heads do not divide width",
        training_job(**{"spec.model": {"architecture": "transformer", "dModel": 30, "numHeads": 4}}),
        "spec.model",
    ),
    InvalidCase(
        "reserved env",
        training_job(**{"spec.distributed.env": [{"name": "MASTER_ADDR", "value": "x"}]}),
        "spec.distributed",
    ),
    InvalidCase("no artifact store source", neural_cluster(**{"spec.artifactStore": {}}), "spec.artifactStore"),
    InvalidCase(
        "peer without a selector", model_deployment(**{"spec.serving.allowedFrom": [{}]}), "spec.serving.allowedFrom"
    ),
    InvalidCase(
        "In without values",
        model_deployment(
            **{"spec.serving.allowedFrom": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}}]}
        ),
        "spec.serving.allowedFrom",
    ),
    InvalidCase(
        "Exists with values",
        model_deployment(
            **{
                "spec.serving.metricsFrom": [
                    {"namespaceSelector": {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]}}
                ]
            }
        ),
        "spec.serving.metricsFrom",
    ),
    InvalidCase(
        "label key that is no qualified name",
        model_deployment(**{"spec.serving.allowedFrom": [{"podSelector": {"matchLabels": {"bad key": "x"}}}]}),
        "spec.serving.allowedFrom",
    ),
]

# The contract used by the e2e tests: (manifest, substring the API server's error must contain).
INVALID_MANIFESTS: list[tuple[Manifest, str]] = [(case.manifest, case.path) for case in INVALID_CASES]
