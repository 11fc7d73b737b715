"""The Flow Nexus API (flownexus.io/v1alpha1): pydantic models, the single source of the CRDs."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from .modeldeployment import ModelDeploymentSpec, ModelDeploymentStatus
from .neuralcluster import NeuralClusterSpec, NeuralClusterStatus
from .trainingjob import TrainingJobSpec, TrainingJobStatus


@dataclass(frozen=True)
class PrinterColumn:
    """One `kubectl get` column."""

    name: str
    type: str
    json_path: str
    description: str
    priority: int = 0


@dataclass(frozen=True)
class Kind:
    """Everything the CRD generator needs to know about one kind."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    spec: type[BaseModel]
    status: type[BaseModel]
    columns: tuple[PrinterColumn, ...]
    description: str


AGE = PrinterColumn("Age", "date", ".metadata.creationTimestamp", "Time since creation.")

NEURAL_CLUSTER = Kind(
    kind="NeuralCluster",
    plural="neuralclusters",
    singular="neuralcluster",
    short_names=("nc",),
    spec=NeuralClusterSpec,
    status=NeuralClusterStatus,
    description="Capacity, images, artifact storage and defaults for TrainingJobs and ModelDeployments.",
    columns=(
        PrinterColumn("Phase", "string", ".status.phase", "Pending, Ready or Failed."),
        PrinterColumn("Storage", "string", ".status.artifactClaim", "PVC of the artifact store."),
        PrinterColumn("Jobs", "integer", ".status.activeTrainingJobs", "Active TrainingJobs."),
        PrinterColumn("Deployments", "integer", ".status.modelDeployments", "ModelDeployments."),
        AGE,
    ),
)
TRAINING_JOB = Kind(
    kind="TrainingJob",
    plural="trainingjobs",
    singular="trainingjob",
    short_names=("tj",),
    spec=TrainingJobSpec,
    status=TrainingJobStatus,
    description="A distributed PyTorch training run followed by a validation gate.",
    columns=(
        PrinterColumn("Phase", "string", ".status.phase", "Where the job is in its life."),
        PrinterColumn("Attempt", "integer", ".status.attempt", "Current whole-gang attempt."),
        PrinterColumn("Epoch", "integer", ".status.progress.epoch", "Epochs completed."),
        PrinterColumn("Epochs", "integer", ".spec.training.epochs", "Planned epochs.", priority=1),
        PrinterColumn("Val-Acc", "number", ".status.progress.valAccuracy", "Validation accuracy, live."),
        PrinterColumn("Test-Acc", "number", ".status.validation.accuracy", "Test accuracy from the validator."),
        PrinterColumn("Reason", "string", ".status.reason", "Why it is in this phase.", priority=1),
        AGE,
    ),
)
MODEL_DEPLOYMENT = Kind(
    kind="ModelDeployment",
    plural="modeldeployments",
    singular="modeldeployment",
    short_names=("mdep",),
    spec=ModelDeploymentSpec,
    status=ModelDeploymentStatus,
    description="A TorchServe-served model with autoscaling and Prometheus-gated canary rollouts.",
    columns=(
        PrinterColumn("Stable", "string", ".status.stable.version", "Version taking most traffic."),
        PrinterColumn("Canary", "string", ".status.canary.version", "Version under analysis."),
        PrinterColumn("Weight", "integer", ".status.canary.weight", "Canary traffic weight (%)."),
        PrinterColumn("Phase", "string", ".status.phase", "Where the rollout is."),
        PrinterColumn("Endpoint", "string", ".status.endpoint", "In-cluster prediction URL.", priority=1),
        AGE,
    ),
)

KINDS: tuple[Kind, ...] = (NEURAL_CLUSTER, TRAINING_JOB, MODEL_DEPLOYMENT)
