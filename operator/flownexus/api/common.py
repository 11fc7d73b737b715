"""Shared building blocks of the Flow Nexus API types.

Every model is camelCase on the wire, forbids unknown fields in specs, and carries a description
on every field: the CRD generator turns these into the OpenAPI schema, and the operator parses
every object through the same models.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

# CEL rules the API server enforces; the generator copies them into the schema node of the model.
CelRule = dict[str, str]

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
Name = Annotated[str, Field(min_length=1, max_length=63, pattern=NAME_PATTERN)]
# A Kubernetes quantity ("500m", "2Gi", 4): the generator renders it as int-or-string.
Quantity = Annotated[str | int, Field(json_schema_extra={"x-kubernetes-int-or-string": True})]


class ApiModel(BaseModel):
    """Base of every spec type: camelCase aliases, unknown fields rejected, values validated on assignment."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )
    # Cross-field rules, as CEL for the API server; each model mirrors them in a pydantic validator.
    cel_rules: ClassVar[list[CelRule]] = []

    def to_wire(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase, no nulls."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class StatusModel(ApiModel):
    """Base of status types: tolerant of fields written by newer operator versions."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", validate_assignment=True)


class ObjectRef(ApiModel):
    """A reference to an object in the same namespace."""

    name: Name = Field(description="Name of the referenced object in the same namespace.")


class ResourceRequirements(ApiModel):
    """CPU, memory and accelerator requests and limits, as in a container spec."""

    requests: dict[str, Quantity] | None = Field(
        default=None,
        max_length=8,
        description="Minimum resources, e.g. {cpu: 500m, memory: 1Gi}.",
    )
    limits: dict[str, Quantity] | None = Field(
        default=None,
        max_length=8,
        description="Maximum resources, e.g. {cpu: '2', memory: 2Gi, nvidia.com/gpu: 1}.",
    )


class Toleration(ApiModel):
    """A pod toleration, as in a pod spec."""

    key: str | None = Field(default=None, max_length=253, description="Taint key the toleration applies to.")
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists matches any value; Equal matches `value`."
    )
    value: str | None = Field(default=None, max_length=63, description="Taint value to match with Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )


class Placement(ApiModel):
    """Where pods of one kind (training or serving) run."""

    node_selector: dict[str, str] | None = Field(
        default=None, max_length=16, description="Node labels the pods require."
    )
    tolerations: list[Toleration] | None = Field(default=None, max_length=16, description="Taints the pods tolerate.")
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu",
        max_length=253,
        description="Extended resource name that counts GPUs on the nodes.",
    )


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(StatusModel):
    """A kstatus-style condition that `kubectl wait --for=condition=<type>` can use."""

    type: str = Field(description="Condition type, e.g. Ready, Succeeded, Validated.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="One CamelCase word for machines.")
    message: str = Field(default="", description="A sentence for people.")
    last_transition_time: str | None = Field(default=None, description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation the condition was computed for."
    )


def format_validation_error(exc: ValidationError, prefix: str = "spec") -> list[str]:
    """Turn a pydantic error into lines like ``spec.distributed.workers: must be >= 1, got 0``."""
    lines = []
    for err in exc.errors():
        path = ".".join([prefix, *(str(p) for p in err["loc"])]) if err["loc"] else prefix
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f", got {value!r}"
        lines.append(f"{path}: {err['msg']}{shown}")
    return lines
