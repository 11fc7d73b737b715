"""Shared building blocks of the Flow Nexus API types.

Every model is camelCase on the wire, forbids unknown fields in specs, and carries a description
on every field: the CRD generator turns these into the OpenAPI schema, and the operator parses
every object through the same models.

Rules live twice, on purpose: as schema bounds and CEL for the API server (the first line, so that
``kubectl apply`` refuses a bad spec with the field path and value), and as pydantic validation with
the same messages for the operator, which parses every spec again (a spec that slipped past the
schema, e.g. stored before a rule existed, ends in phase Failed with reason InvalidSpec).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema as cs

# CEL rules the API server enforces; the generator copies them into the schema node of the model.
# Keys as in x-kubernetes-validations: rule, and message or messageExpression; optionally fieldPath, reason.
CelRule = dict[str, str]
# Where a type's own rules (``Rules``) wait in pydantic's JSON schema until the generator merges them with the
# field's: a field's json_schema_extra replaces keys of its type's schema, so the two cannot share a key.
TYPE_RULES_KEY = "x-flownexus-type-rules"


def cel(rule: str, message: str = "", *, expression: str = "", field_path: str = "") -> CelRule:
    """One x-kubernetes-validations entry. ``expression`` is a messageExpression (a CEL string that may name
    the bad value, e.g. ``self + ' is reserved'``); ``field_path`` moves the error to a field under the node."""
    if bool(message) == bool(expression):
        raise ValueError("a CEL rule needs exactly one of message and expression")
    out = {"rule": rule}
    if message:
        out["message"] = message
    else:
        out["messageExpression"] = expression
    if field_path:
        out["fieldPath"] = field_path
    return out


def cel_string(text: str) -> str:
    """``text`` as a CEL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Check:
    """One rule of a type, twice: ``rule`` in CEL for the API server, ``ok`` in Python for the operator.

    ``message`` is the same for both; a ``{value}`` in it becomes the bad value (a CEL messageExpression).
    ``ok=None``: only the API server checks it here, because the operator checks it where it uses the value.
    """

    rule: str
    ok: Callable[[Any], bool] | None
    message: str

    def cel(self) -> CelRule:
        if "{value}" not in self.message:
            return cel(self.rule, self.message)
        before, after = self.message.split("{value}", 1)
        parts = [cel_string(before)] if before else []
        parts.append("self")
        if after:
            parts.append(cel_string(after))
        return cel(self.rule, expression=" + ".join(parts))

    def text(self, value: Any) -> str:
        return self.message.replace("{value}", str(value))


@dataclass(frozen=True)
class Rules:
    """``Annotated`` metadata of a reusable type: checks pydantic runs after its own validation, and the same
    checks as CEL on the type's schema node wherever the type is used."""

    checks: tuple[Check, ...]

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> cs.CoreSchema:
        return cs.no_info_after_validator_function(self._validate, handler(source))

    def __get_pydantic_json_schema__(self, schema: cs.CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        out = handler(schema)
        out.setdefault(TYPE_RULES_KEY, []).extend(check.cel() for check in self.checks)
        return out

    def _validate(self, value: Any) -> Any:
        for check in self.checks:
            if check.ok is not None and not check.ok(value):
                raise ValueError(check.text(value))
        return value


NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
Name = Annotated[str, Field(min_length=1, max_length=63, pattern=NAME_PATTERN)]

# ---- quantities --------------------------------------------------------------------------------------

# A quantity as people write one: a decimal with a binary (Ki..Ei), decimal (n, u, m, k, M..E) or exponent
# (e3, E-2) suffix. resource.ParseQuantity (and CEL's isQuantity) also takes degenerate forms that mean 0,
# such as ".", "+" or "Gi"; the rules below refuse those, on both sides.
QUANTITY_PATTERN = r"^([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
_QUANTITY = re.compile(QUANTITY_PATTERN)
_CEL_QUANTITY = f"self.matches(r'{QUANTITY_PATTERN}') && isQuantity(self)"
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
QUANTITY_MAX_LENGTH = 64
_INT_OR_STRING = Field(json_schema_extra={"x-kubernetes-int-or-string": True, "maxLength": QUANTITY_MAX_LENGTH})


def parse_quantity(value: object) -> Decimal | None:
    """The exact value of a Kubernetes quantity (``"500m"``, ``"2Gi"``, ``4``), or None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if not isinstance(value, str) or len(value) > QUANTITY_MAX_LENGTH:
        return None
    match = _QUANTITY.fullmatch(value)
    if match is None:
        return None
    sign, number, suffix = match.group(1), Decimal(match.group(2)), match.group(3) or ""
    try:
        if suffix in _BINARY:
            number *= Decimal(1024) ** _BINARY[suffix]
        elif suffix in _DECIMAL:
            number = number.scaleb(_DECIMAL[suffix])
        else:
            number = number.scaleb(int(suffix[1:]))
    except ArithmeticError:  # an exponent beyond what any resource could mean (1e999999999)
        return None
    return -number if sign == "-" else number


def _at_least_zero(value: object) -> bool:
    parsed = parse_quantity(value)
    return parsed is not None and parsed >= 0


def _above_zero(value: object) -> bool:
    parsed = parse_quantity(value)
    return parsed is not None and parsed > 0


QUANTITY_CHECK = Check(
    f"type(self) == int ? self >= 0 : {_CEL_QUANTITY} && !quantity(self).isLessThan(quantity('0'))",
    _at_least_zero,
    "must be a non-negative quantity such as 500m, 2Gi or 4",
)
# A Kubernetes quantity ("500m", "2Gi", 4): the generator renders it as int-or-string.
Quantity = Annotated[str | int, _INT_OR_STRING, Rules((QUANTITY_CHECK,))]
PositiveQuantity = Annotated[
    str | int,
    _INT_OR_STRING,
    Rules(
        (
            Check(
                f"type(self) == int ? self > 0 : {_CEL_QUANTITY} && quantity(self).isGreaterThan(quantity('0'))",
                _above_zero,
                "must be a positive quantity such as 5Gi",
            ),
        )
    ),
]

# ---- paths in the artifact store -----------------------------------------------------------------------

RELATIVE_CHECK = Check(
    "!self.startsWith('/')",
    lambda p: not p.startswith("/"),
    "must be relative to the artifact store root, not an absolute path",
)
NO_DOTDOT_CHECK = Check(
    "!self.split('/').exists(s, s == '..')",
    lambda p: ".." not in p.split("/"),
    "may not contain a '..' segment: it must stay inside the artifact store",
)
PATH_MAX_LENGTH = 1024
DatasetPath = Annotated[
    str,
    Field(min_length=1, max_length=PATH_MAX_LENGTH),
    Rules(
        (
            RELATIVE_CHECK,
            NO_DOTDOT_CHECK,
            Check(
                "self.endsWith('.csv') || self.endsWith('.npz')",
                lambda p: p.endswith((".csv", ".npz")),
                "must name a .csv or .npz file",
            ),
        )
    ),
]
ArchivePath = Annotated[
    str,
    Field(min_length=1, max_length=PATH_MAX_LENGTH),
    Rules(
        (
            RELATIVE_CHECK,
            # The reconciler refuses an archive outside the store when it resolves the source (resolve_source:
            # "spec.model.archivePath: must stay inside the artifact store", a final problem): one check there.
            Check(NO_DOTDOT_CHECK.rule, None, NO_DOTDOT_CHECK.message),
            Check("self.endsWith('.mar')", lambda p: p.endswith(".mar"), "must name a .mar archive"),
        )
    ),
]

# ---- durations ---------------------------------------------------------------------------------------

DURATION_PATTERN = r"^[0-9]+(s|m|h)$"
# 7 characters keep CEL's duration() inside its range (999999h) and the value readable.
DURATION_MAX_LENGTH = 7


def duration_seconds(value: str) -> float:
    """Seconds in ``30s`` / ``1m`` / ``2h`` (the pattern allows nothing else)."""
    return float(value[:-1]) * {"s": 1, "m": 60, "h": 3600}[value[-1]]


def _positive_duration(why: str) -> Rules:
    return Rules(
        (Check("duration(self) > duration('0s')", lambda v: duration_seconds(v) > 0, f"must be longer than 0s: {why}"),)
    )


# The syntax every duration field shares (30s, 5m, 1h); each type adds its own bounds.
_DURATION = Field(pattern=DURATION_PATTERN, max_length=DURATION_MAX_LENGTH)

# The canary is analysed once per interval (slots of `interval` seconds: 0s divides by zero).
Interval = Annotated[
    str,
    _DURATION,
    _positive_duration("the canary is analysed once per interval"),
]
# PromQL rate() over an empty range has no samples: every analysis would be NoData.
Window = Annotated[
    str,
    _DURATION,
    _positive_duration("Prometheus computes the canary's rates over this range"),
]

# How long the canary may go without data before every NoData slot counts as a failed check.
NoDataTimeout = Annotated[
    str,
    _DURATION,
    _positive_duration("0s would count the first slot without data as a failed check; use 1s for that"),
]

# An HPA stabilization window: 0s (act on the newest recommendation) up to the HPA's limit of one hour.
StabilizationWindow = Annotated[
    str,
    _DURATION,
    Rules(
        (
            Check(
                "duration(self) <= duration('1h')",
                lambda v: duration_seconds(v) <= 3600,
                "must be at most 1h: the HorizontalPodAutoscaler's stabilization window is at most 3600 seconds",
            ),
        )
    ),
]

# ---- image references ----------------------------------------------------------------------------------

# The distribution/reference grammar: [host[:port]/]path[:tag][@algorithm:hex]; RE2 and Python alike.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_PATTERN = (
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?/)?"
    rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
    r"(?::[\w][\w.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
_IMAGE = re.compile(IMAGE_PATTERN)
ImageRef = Annotated[
    str,
    Field(min_length=1, max_length=512),
    Rules(
        (
            Check(
                f"self.matches(r'{IMAGE_PATTERN}')",
                lambda v: _IMAGE.fullmatch(v) is not None,
                "must be an image reference such as registry.example.com/team/trainer:1.2 or trainer@sha256:<digest>",
            ),
        )
    ),
]

# ---- label values --------------------------------------------------------------------------------------

# A version lands in the flownexus.io/version label of the serving pods: a label value.
VERSION_PATTERN = r"^[0-9A-Za-z]([0-9A-Za-z._-]*[0-9A-Za-z])?$"
Version = Annotated[str, Field(min_length=1, max_length=63, pattern=VERSION_PATTERN)]
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]
# An extended resource name such as nvidia.com/gpu: a qualified name.
RESOURCE_NAME_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)


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


OVER_LIMIT_MESSAGE = "a container may not request more than its limit"


def _over_limit(requests: dict[str, Any], limits: dict[str, Any]) -> list[str]:
    """Each resource whose request is above its limit (both quantities), worded as the CEL message."""
    over = []
    for key, asked in requests.items():
        request, limit = parse_quantity(asked), parse_quantity(limits.get(key))
        if request is not None and limit is not None and request > limit:
            over.append(f"requests.{key} {asked} is above limits.{key} {limits[key]}")
    return over


# CEL: a request above its limit. Values that are no quantities are left to the values' own rule.
_OVER_LIMIT = (
    "k in self.limits"
    " && (type(self.requests[k]) == int || isQuantity(self.requests[k]))"
    " && (type(self.limits[k]) == int || isQuantity(self.limits[k]))"
    " && quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) > 0"
)


class ResourceRequirements(ApiModel):
    """CPU, memory and accelerator requests and limits, as in a container spec."""

    cel_rules: ClassVar[list[CelRule]] = [
        cel(
            f"!has(self.requests) || !has(self.limits) || !self.requests.exists(k, {_OVER_LIMIT})",
            expression=f"self.requests.filter(k, {_OVER_LIMIT}).map(k, 'requests.' + k + ' ' + "
            f"string(self.requests[k]) + ' is above limits.' + k + ' ' + string(self.limits[k]) + "
            f"': {OVER_LIMIT_MESSAGE}')[0]",
            field_path=".requests",
        ),
    ]

    requests: dict[str, Quantity] | None = Field(
        default=None,
        max_length=8,
        description="Minimum resources, e.g. {cpu: 500m, memory: 1Gi}; each at most its limit.",
    )
    limits: dict[str, Quantity] | None = Field(
        default=None,
        max_length=8,
        description="Maximum resources, e.g. {cpu: '2', memory: 2Gi, nvidia.com/gpu: 1}.",
    )

    @model_validator(mode="after")
    def _requests_within_limits(self) -> ResourceRequirements:
        over = _over_limit(self.requests or {}, self.limits or {})
        if over:
            raise ValueError(f"{over[0]}: {OVER_LIMIT_MESSAGE}")
        return self


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

    node_selector: dict[str, LabelValue] | None = Field(
        default=None, max_length=16, description="Node labels the pods require."
    )
    tolerations: list[Toleration] | None = Field(default=None, max_length=16, description="Taints the pods tolerate.")
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu",
        max_length=253,
        pattern=RESOURCE_NAME_PATTERN,
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
