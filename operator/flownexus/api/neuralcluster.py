"""NeuralCluster: the capacity, images and defaults that TrainingJobs and ModelDeployments use."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from .common import (
    ApiModel,
    CelRule,
    Condition,
    ImageRef,
    Name,
    ObjectRef,
    Placement,
    PositiveQuantity,
    ResourceRequirements,
    StatusModel,
    cel,
)

DEFAULT_TRAINER_IMAGE = "flownexus/trainer:0.1.0"
DEFAULT_SERVER_IMAGE = "flownexus/server:0.1.0"
# The name is the value of the flownexus.io/neuralcluster label on the cluster's PVC, and clusterRef.name
# (a DNS label) refers to it: a DNS label of at most 63 characters.
MAX_NAME_LENGTH = 63
# A transition rule: the API server checks it on every update, the operator cannot (it sees one version).
ARTIFACT_STORE_IMMUTABLE: Any = cel(
    "self == oldSelf",
    "is immutable: the checkpoints, reports and model archives of this cluster's TrainingJobs and "
    "ModelDeployments live in this store; create another NeuralCluster to use another store",
)


class Images(ApiModel):
    """Container images for the pods the operator creates."""

    trainer: ImageRef = Field(
        default=DEFAULT_TRAINER_IMAGE,
        description="Image of the training and validator pods, e.g. registry.example.com/flownexus/trainer:0.1.0.",
    )
    server: ImageRef = Field(
        default=DEFAULT_SERVER_IMAGE,
        description="Image of the TorchServe pods, e.g. registry.example.com/flownexus/server:0.1.0.",
    )
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="imagePullPolicy of every container the operator creates."
    )


S3_BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
S3_PREFIX_PATTERN = r"^[A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*$"


class S3Store(ApiModel):
    """An S3-compatible bucket (AWS S3, SeaweedFS, Ceph RGW, ...). Pods work on a local emptyDir that an init step
    fills from the bucket and a sync step writes back: the storage-initializer pattern, so no volume has to follow
    pods across nodes. The operator never reads the Secret: the pods get its keys as environment variables."""

    cel_rules: ClassVar[list[CelRule]] = [
        {
            "rule": "!has(self.prefix) || !self.prefix.split('/').exists(s, s == '..' || s == '.')",
            "message": "prefix may not contain a '.' or '..' segment: every object stays under it",
        },
    ]

    endpoint: str = Field(
        max_length=2048,
        pattern=r"^https?://[^/?#@\s]+$",
        description="Base URL of the S3 API, scheme and host[:port] only, e.g. https://s3.eu-west-1.amazonaws.com "
        "or http://seaweedfs.storage.svc:8333.",
    )
    bucket: str = Field(pattern=S3_BUCKET_PATTERN, description="The bucket; it must exist.")
    prefix: str | None = Field(
        default=None,
        max_length=512,
        pattern=S3_PREFIX_PATTERN,
        description="Key prefix of every object this cluster writes (no leading or trailing '/'), e.g. team-a.",
    )
    region: str | None = Field(default=None, max_length=64, pattern=r"^[a-z0-9-]+$", description="e.g. eu-west-1.")
    secret_ref: ObjectRef = Field(
        description="Secret in the NeuralCluster's namespace with the keys AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY; pods read it, the operator never does."
    )
    insecure_skip_tls_verify: bool = Field(
        default=False, description="Do not verify the endpoint's TLS certificate (test setups only)."
    )
    ca_config_map: Name | None = Field(
        default=None,
        description="ConfigMap whose key ca.crt holds the CA bundle that signed the endpoint's certificate.",
    )

    @model_validator(mode="after")
    def _prefix_stays(self) -> S3Store:
        if self.prefix is not None and any(s in (".", "..") for s in self.prefix.split("/")):
            raise ValueError(self.cel_rules[0]["message"])
        return self

    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


class ArtifactStore(ApiModel):
    """Where checkpoints, reports and model archives live: a PersistentVolumeClaim, or an S3-compatible bucket."""

    cel_rules: ClassVar[list[CelRule]] = [
        {
            "rule": "has(self.s3) != (has(self.existingClaim) || has(self.size))",
            "message": "set exactly one kind of store: s3, or a PVC (existingClaim to adopt one, size to have one "
            "created)",
        },
    ]

    existing_claim: Name | None = Field(default=None, description="Adopt this existing PVC instead of creating one.")
    size: PositiveQuantity | None = Field(default=None, description="Size of the PVC the operator creates, e.g. 5Gi.")
    storage_class_name: str | None = Field(
        default=None, max_length=253, description="StorageClass of the created PVC; empty uses the default."
    )
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] = Field(
        default="ReadWriteMany",
        description="Access mode of the created PVC; training workers and servers mount it together "
        "(ReadWriteOnce works on a single node only).",
    )
    s3: S3Store | None = Field(default=None, description="An S3-compatible bucket instead of a PVC.")

    @model_validator(mode="after")
    def _one_kind(self) -> ArtifactStore:
        if (self.s3 is not None) == (self.existing_claim is not None or self.size is not None):
            raise ValueError(self.cel_rules[0]["message"])
        return self

    def describe(self, cluster_name: str) -> str:
        """One string that names the store: ``s3://bucket/prefix`` or ``pvc/<claim>``."""
        if self.s3 is not None:
            return self.s3.uri()
        return f"pvc/{self.existing_claim or f'{cluster_name}-artifacts'}"


class Limits(ApiModel):
    """Capacity limits enforced by waiting, never by failing."""

    max_concurrent_training_jobs: int = Field(
        default=4, ge=1, le=1000, description="TrainingJobs running at once; more wait in Pending."
    )
    max_workers_per_job: int = Field(default=8, ge=1, le=512, description="Largest distributed.workers allowed.")


class NeuralClusterSpec(ApiModel):
    """Desired state of a NeuralCluster."""

    images: Images = Field(default_factory=Images, description="Images of trainer, validator and server pods.")
    artifact_store: ArtifactStore = Field(
        description="The PVC or bucket holding checkpoints, reports and archives; fixed once the NeuralCluster exists.",
        json_schema_extra={"x-kubernetes-validations": [ARTIFACT_STORE_IMMUTABLE]},
    )
    training: Placement = Field(default_factory=Placement, description="Placement of training pods.")
    serving: Placement = Field(default_factory=Placement, description="Placement of serving pods.")
    default_training_resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(
            requests={"cpu": "500m", "memory": "1Gi"}, limits={"cpu": "2", "memory": "4Gi"}
        ),
        description="Resources of a training worker when the TrainingJob sets none.",
    )
    default_serving_resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(
            requests={"cpu": "250m", "memory": "1Gi"}, limits={"cpu": "1", "memory": "2Gi"}
        ),
        description="Resources of a TorchServe pod when the ModelDeployment sets none.",
    )
    limits: Limits = Field(default_factory=Limits, description="Capacity limits.")
    prometheus_url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://",
        description="Prometheus base URL for canary analysis, e.g. http://prometheus.monitoring.svc:9090.",
    )


NeuralClusterPhase = Literal["Pending", "Ready", "Failed"]


class NeuralClusterStatus(StatusModel):
    """Observed state of a NeuralCluster."""

    observed_generation: int | None = Field(default=None, description="Generation this status reflects.")
    phase: NeuralClusterPhase | None = Field(default=None, description="Pending, Ready or Failed.")
    artifact_claim: str | None = Field(default=None, description="Name of the PVC in use (PVC stores).")
    artifact_store: str | None = Field(default=None, description="The store: s3://bucket/prefix or pvc/<claim>.")
    active_training_jobs: int = Field(default=0, description="TrainingJobs now running on this cluster.")
    model_deployments: int = Field(default=0, description="ModelDeployments using this cluster.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready.")
