"""The Flow Nexus API (flownexus.io/v1alpha1): pydantic models, the single source of the CRDs."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel

from . import modeldeployment, neuralcluster, trainingjob
from .common import NAME_PATTERN, CelRule, cel, cel_string
from .modeldeployment import ModelDeploymentSpec, ModelDeploymentStatus
from .neuralcluster import NeuralClusterSpec, NeuralClusterStatus
from .trainingjob import TrainingJobSpec, TrainingJobStatus

DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_1035_WHAT = (
    "a DNS-1035 label (lowercase letters, digits and '-', starting with a letter and ending with a letter or digit)"
)
DNS_1123_WHAT = "a DNS-1123 label (lowercase letters, digits and '-', starting and ending with a letter or digit)"


@dataclass(frozen=True)
class NameRules:
    """What a kind's metadata.name must be so that every name derived from it is valid.

    The API server checks it with CEL on the root of the schema (metadata.name is visible there); the
    operator never sees a violating object, but ``problems`` says the same for tests and tools.
    """

    max_length: int
    length_why: str
    pattern: str
    pattern_what: str
    pattern_why: str

    def cel_rules(self, kind: str) -> list[CelRule]:
        name = "self.metadata.name"
        length = f" is longer than {self.max_length} characters: {self.length_why}"
        pattern = f" is not {self.pattern_what}: {self.pattern_why}"
        return [
            cel(
                f"{name}.size() <= {self.max_length}",
                expression=f"{cel_string(kind + ' name ')} + {name} + {cel_string(length)}",
                field_path=".metadata.name",
            ),
            cel(
                f"{name}.matches(r'{self.pattern}')",
                expression=f"{cel_string(kind + ' name ')} + {name} + {cel_string(pattern)}",
                field_path=".metadata.name",
            ),
        ]

    def problems(self, kind: str, name: str) -> list[str]:
        """The CEL messages for ``name``, as the API server words them."""
        out = []
        if len(name) > self.max_length:
            out.append(f"{kind} name {name} is longer than {self.max_length} characters: {self.length_why}")
        if not re.fullmatch(self.pattern, name):
            out.append(f"{kind} name {name} is not {self.pattern_what}: {self.pattern_why}")
        return out


TRAINING_JOB_NAMES = NameRules(
    max_length=trainingjob.MAX_NAME_LENGTH,
    length_why=f"the Indexed Job of attempt N, <name>-aN, names its pods <name>-aN-<index>-<random> (up to "
    f"<name>{trainingjob.POD_PREFIX}<random>), of which Kubernetes keeps {trainingjob.POD_NAME_KEPT} characters "
    "before the random part, and only rank 0's pod (index 0) may report progress",
    pattern=DNS_1035_LABEL,
    pattern_what=DNS_1035_WHAT,
    pattern_why="it names the headless Service <name>-workers",
)
MODEL_DEPLOYMENT_NAMES = NameRules(
    max_length=modeldeployment.MAX_NAME_LENGTH,
    length_why="the pods of its Deployments <name>-stable and <name>-canary are named "
    f"<name>-<track>-<hash>-<suffix>, of which Kubernetes keeps {modeldeployment.GENERATED_NAME_KEPT} characters "
    "before the random suffix, and the operator finds each track's pods by the prefix <name>-<track>-",
    pattern=DNS_1035_LABEL,
    pattern_what=DNS_1035_WHAT,
    pattern_why="it names the Service <name>",
)
NEURAL_CLUSTER_NAMES = NameRules(
    max_length=neuralcluster.MAX_NAME_LENGTH,
    length_why="it is the value of the flownexus.io/neuralcluster label on the cluster's PVC, and clusterRef.name "
    "refers to it",
    pattern=NAME_PATTERN,
    pattern_what=DNS_1123_WHAT,
    pattern_why="clusterRef.name, a DNS label, refers to it",
)


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
    names: NameRules


AGE = PrinterColumn("Age", "date", ".metadata.creationTimestamp", "Time since creation.")

NEURAL_CLUSTER = Kind(
    kind="NeuralCluster",
    plural="neuralclusters",
    singular="neuralcluster",
    short_names=("nc",),
    spec=NeuralClusterSpec,
    status=NeuralClusterStatus,
    description="Capacity, images, artifact storage and defaults for TrainingJobs and ModelDeployments.",
    names=NEURAL_CLUSTER_NAMES,
    columns=(
        PrinterColumn("Phase", "string", ".status.phase", "Pending, Ready or Failed."),
        PrinterColumn(
            "Storage", "string", ".status.artifactStore", "The artifact store: pvc/<claim> or s3://bucket/prefix."
        ),
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
    names=TRAINING_JOB_NAMES,
    columns=(
        PrinterColumn("Phase", "string", ".status.phase", "Where the job is in its life."),
        PrinterColumn("Attempt", "integer", ".status.attempt", "Current whole-gang attempt."),
        PrinterColumn("Epoch", "integer", ".status.progress.epoch", "Epochs completed."),
        PrinterColumn("Epochs", "integer", ".spec.training.epochs", "Planned epochs.", priority=1),
        PrinterColumn("Val-Acc", "number", ".status.progress.valAccuracy", "Validation accuracy, live."),
        PrinterColumn("Test-Acc", "number", ".status.validation.accuracy", "Test accuracy from the validator."),
        PrinterColumn("Bal-Acc", "number", ".status.validation.balancedAccuracy", "Test balanced accuracy."),
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
    names=MODEL_DEPLOYMENT_NAMES,
    columns=(
        PrinterColumn("Stable", "string", ".status.stable.version", "Version taking most traffic."),
        PrinterColumn("Canary", "string", ".status.canary.revision", "Version@template digest under analysis."),
        PrinterColumn("Weight", "integer", ".status.canary.weight", "Canary traffic weight (%)."),
        PrinterColumn("Phase", "string", ".status.phase", "Where the rollout is."),
        PrinterColumn("Paused", "boolean", ".spec.rollout.paused", "spec.rollout.paused holds it.", priority=1),
        PrinterColumn("Endpoint", "string", ".status.endpoint", "In-cluster prediction URL.", priority=1),
        AGE,
    ),
)

KINDS: tuple[Kind, ...] = (NEURAL_CLUSTER, TRAINING_JOB, MODEL_DEPLOYMENT)
