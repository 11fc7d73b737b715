"""Invalid specs against a real API server: each is refused with 422 and a message naming the field.

Hypothesis mutates the valid examples in ``examples/`` along the cases the CRDs guard (names too long for their
children, paths out of the artifact store, unbounded lists, non-quantities, requests above limits, 0s durations,
non-images, reserved env) and along the generated schema itself (wrong types, missing required fields, values out
of range, enums, patterns). Each spec is POSTed as a user would. A spec the API server accepts must be refused by
the operator's own parse (``parse_spec``, then phase Failed / InvalidSpec), naming the field; the test counts
those apart. The table tests pin the exact words of each rule, on the server and in the operator.

Figures: docs/RELIABILITY.md ("Invalid specs"); reproduce with
``python -m pytest tests/realapi/test_invalid_specs.py -q -s``.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.realapi.conftest import Harness

from flownexus.api import KINDS, Kind
from flownexus.api.common import IMAGE_PATTERN, parse_quantity
from flownexus.api.trainingjob import RESERVED_ENV, RESERVED_ENV_PREFIXES
from flownexus.runtime.client import ApiError, Manifest, path
from flownexus.runtime.controller import InvalidSpec, parse_spec

pytestmark = pytest.mark.realapi

REPO = Path(__file__).resolve().parents[2]
KIND = {k.kind: k for k in KINDS}
EXAMPLES: dict[str, Manifest] = {
    doc["kind"]: doc
    for doc in (yaml.safe_load(p.read_text()) for p in sorted((REPO / "examples").glob("*.yaml")))
    if doc and doc.get("kind") in KIND
}
SCHEMAS: dict[str, dict[str, Any]] = {}
for _crd_file in sorted((REPO / "crds").glob("*.yaml")):
    _crd = yaml.safe_load(_crd_file.read_text())
    SCHEMAS[_crd["spec"]["names"]["kind"]] = _crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
EXAMPLES_WANTED = 500


@dataclass(frozen=True)
class Key:
    """A map key in a field path: ``requests[cpu]`` to the API server (``requests.cpu`` in type errors)."""

    name: str


Step = str | int | Key


@dataclass
class Bad:
    """An invalid object and the field its rejection must name."""

    case: str
    manifest: Manifest
    where: tuple[Step, ...]
    # Where pydantic reports it when that differs (a model validator reports the model, not a field under it).
    parse_where: tuple[Step, ...] | None = None
    words: str = ""  # must also appear in the server's message (e.g. the reserved variable's name)


def server_paths(where: tuple[Step, ...]) -> list[str]:
    """How the API server may write a field path: ``a.b[0].c``; map keys as ``[k]`` (CEL) or ``.k`` (schema)."""
    out = [""]
    for step in where:
        if isinstance(step, int):
            out = [f"{p}[{step}]" for p in out]
        elif isinstance(step, Key):
            out = [v for p in out for v in (f"{p}[{step.name}]", f"{p}.{step.name}")]
        else:
            out = [f"{p}.{step}" if p else step for p in out]
    return out


def parse_path(where: tuple[Step, ...]) -> str:
    """How ``format_validation_error`` writes it: ``spec.a.0.c``."""
    return ".".join(s.name if isinstance(s, Key) else str(s) for s in where)


# ---- editing manifests ---------------------------------------------------------------------------------


def base(kind: str, name: str | None = None) -> Manifest:
    obj = copy.deepcopy(EXAMPLES[kind])
    if name is not None:
        obj["metadata"]["name"] = name
    return obj


def _child(parent: Any, step: Step) -> Any:
    key = step.name if isinstance(step, Key) else step
    if isinstance(parent, list):
        assert isinstance(key, int)
        return parent[key] if key < len(parent) else None
    return parent.get(key)


def put(obj: Manifest, where: tuple[Step, ...], value: Any) -> Manifest:
    """``obj`` with ``value`` at ``where``, creating what is missing on the way (``{}``, or ``[...]`` for an index)."""
    node: Any = obj
    for step, nxt in itertools.pairwise(where):
        child = _child(node, step)
        if not isinstance(child, dict | list):
            child = [] if isinstance(nxt, int) else {}
            _assign(node, step, child)
        node = child
    _assign(node, where[-1], value)
    return obj


def _assign(parent: Any, step: Step, value: Any) -> None:
    key = step.name if isinstance(step, Key) else step
    if isinstance(parent, list):
        assert isinstance(key, int)
        while len(parent) <= key:
            parent.append({})
        parent[key] = value
    else:
        parent[key] = value


def delete(obj: Manifest, where: tuple[Step, ...]) -> Manifest:
    parent: Any = obj
    for step in where[:-1]:
        parent = _child(parent, step)
    parent.pop(where[-1])
    return obj


# ---- the schema, walked ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    kind: str
    where: tuple[Step, ...]
    node: dict[str, Any]


def _walk(kind: str, node: dict[str, Any], where: tuple[Step, ...]) -> list[Field]:
    out = [Field(kind, where, node)]
    for name, sub in (node.get("properties") or {}).items():
        out += _walk(kind, sub, (*where, name))
    items = node.get("items")
    if isinstance(items, dict):
        out += _walk(kind, items, (*where, 0))
    return out


FIELDS: list[Field] = [
    f for kind, schema in SCHEMAS.items() for f in _walk(kind, schema["properties"]["spec"], ("spec",))
]


def _type(node: dict[str, Any]) -> str:
    return "int-or-string" if node.get("x-kubernetes-int-or-string") else str(node.get("type"))


WRONG_TYPE: dict[str, list[Any]] = {
    "integer": ["7", 1.5, True, [1], {"a": 1}],
    "number": ["0.5", True, [0.5], {"a": 1}],
    "string": [5, 0.5, True, ["x"], {"a": "b"}],
    "boolean": ["true", 1, [True], {"a": True}],
    "object": ["x", 5, [1], True],
    "array": ["x", 5, {"a": 1}, True],
    "int-or-string": [True, 1.5, [1], {"a": 1}],
}


def _valid_item(items: dict[str, Any], i: int) -> Any:
    """A valid element of a list, the i-th (distinct, for sets)."""
    if items.get("type") == "integer":
        low = int(items.get("minimum", 0))
        return min(low + i, int(items.get("maximum", low + i)))
    if items.get("type") == "object" and "name" in (items.get("required") or []):
        return {"name": f"V{i}"}
    return {}


def _bounds(node: dict[str, Any]) -> list[str]:
    """The bounds of a node that a value of the right type can break."""
    kind = _type(node)
    options: list[str] = []
    if kind in ("integer", "number"):
        options += [b for b in ("minimum", "maximum") if b in node]
    if kind == "string":
        options += [b for b in ("maxLength", "minLength", "enum", "pattern") if b in node]
    if kind == "array":
        options += [b for b in ("maxItems", "minItems") if b in node]
    if kind == "object" and "maxProperties" in node:
        options.append("maxProperties")
    return options


def _out_of_range(draw: st.DrawFn, node: dict[str, Any]) -> tuple[Any, str]:
    """A value of the right type that the node's bounds refuse, and which bound."""
    kind = _type(node)
    bound = draw(st.sampled_from(_bounds(node)))
    if bound in ("minimum", "maximum"):
        limit = node[bound]
        exclusive = bool(node.get("exclusiveMinimum" if bound == "minimum" else "exclusiveMaximum"))
        step = draw(st.integers(0 if exclusive else 1, 10**6))
        if kind == "integer":
            return (limit - step if bound == "minimum" else limit + step), bound
        frac = draw(st.sampled_from([0.0, 0.25, 0.5])) if step else 0.0
        return (limit - step - frac if bound == "minimum" else limit + step + frac), bound
    if bound == "maxLength":
        return "a" * (node["maxLength"] + draw(st.integers(1, 20))), bound
    if bound == "minLength":
        return "", bound
    if bound == "enum":
        return draw(st.sampled_from(["NotOneOfThem", "none", "MLP", ""])), bound
    if bound == "pattern":
        return draw(st.sampled_from(["Bad Value!", "UPPER CASE", "-dash-", "a b", "1 d"])), bound
    if bound == "maxItems":
        n = node["maxItems"] + draw(st.integers(1, 5))
        return [_valid_item(node["items"], i) for i in range(n)], bound
    if bound == "minItems":
        return [], bound
    n = node["maxProperties"] + draw(st.integers(1, 4))
    return {f"example.com/r{i}": "1" for i in range(n)}, bound


# ---- the strategies -------------------------------------------------------------------------------------

KIND_NAMES = sorted(EXAMPLES)
_counter = iter(range(10**9))


def fresh_name(kind: str) -> str:
    return f"{kind.lower()[:2]}-{next(_counter)}"


@st.composite
def long_names(draw: st.DrawFn) -> Bad:
    kind = draw(st.sampled_from(KIND_NAMES))
    limit = KIND[kind].names.max_length
    length = draw(st.integers(limit + 1, 253))
    inner = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=length - 2, max_size=length - 2))
    name = f"x{inner}z"
    return Bad("name too long for its children", base(kind, name), ("metadata", "name"), words=name)


@st.composite
def malformed_names(draw: st.DrawFn) -> Bad:
    kind = draw(st.sampled_from(KIND_NAMES))
    word = draw(st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True))
    if kind == "NeuralCluster":
        name = f"{word}.{draw(st.from_regex(r'[a-z][a-z0-9]{0,8}', fullmatch=True))}"
    else:
        name = draw(st.sampled_from([f"{draw(st.integers(0, 9))}{word}", f"{word}.v{draw(st.integers(1, 9))}"]))
    return Bad("name not a label", base(kind, name), ("metadata", "name"), words=name)


SEGMENT = st.from_regex(r"[a-z0-9_][a-z0-9_.-]{0,11}", fullmatch=True).filter(lambda s: s not in (".", ".."))


@st.composite
def escaping_paths(draw: st.DrawFn) -> Bad:
    kind = draw(st.sampled_from(["TrainingJob", "ModelDeployment"]))
    segments = draw(st.lists(SEGMENT, min_size=1, max_size=5))
    escape = draw(st.sampled_from(["dotdot", "absolute"]))
    if escape == "dotdot":
        for _ in range(draw(st.integers(1, 3))):
            segments.insert(draw(st.integers(0, len(segments) - 1)), "..")
    suffix = draw(st.sampled_from([".csv", ".npz"])) if kind == "TrainingJob" else ".mar"
    text = ("/" if escape == "absolute" else "") + "/".join(segments) + suffix
    obj = base(kind, fresh_name(kind))
    if kind == "TrainingJob":
        obj["spec"]["dataset"] = {"source": "file", "path": text, "task": "classification"}
        return Bad(f"dataset path {escape}", obj, ("spec", "dataset", "path"))
    obj["spec"]["model"] = {"archivePath": text, "version": "1.0.0"}
    return Bad(f"archive path {escape}", obj, ("spec", "model", "archivePath"))


@st.composite
def unbounded_hidden_sizes(draw: st.DrawFn) -> Bad:
    obj = base("TrainingJob", fresh_name("TrainingJob"))
    widths = st.integers(1, 8192)
    if draw(st.booleans()):
        sizes = draw(st.lists(widths, min_size=17, max_size=64))
        obj["spec"]["model"]["hiddenSizes"] = sizes
        return Bad("hiddenSizes too many", obj, ("spec", "model", "hiddenSizes"))
    sizes = draw(st.lists(widths, min_size=1, max_size=16))
    i = draw(st.integers(0, len(sizes) - 1))
    sizes[i] = draw(st.one_of(st.integers(8193, 2**40), st.integers(-(2**31), 0)))
    obj["spec"]["model"]["hiddenSizes"] = sizes
    return Bad("hiddenSizes width", obj, ("spec", "model", "hiddenSizes", i))


# Where resource requirements live, per kind.
RESOURCES: list[tuple[str, tuple[Step, ...]]] = [
    ("TrainingJob", ("spec", "distributed", "resources")),
    ("ModelDeployment", ("spec", "serving", "resources")),
    ("NeuralCluster", ("spec", "defaultTrainingResources")),
    ("NeuralCluster", ("spec", "defaultServingResources")),
]


def _not_a_size(value: object) -> bool:
    parsed = parse_quantity(value)
    return parsed is None or parsed < 0


NOT_QUANTITIES = st.one_of(
    st.sampled_from(["lots", "1.5.5", "2 Gi", "1Gb", "1e", "1ki", "--1", "0x10", "one", "1Gi ", "Gi", "-1", "-500m"]),
    st.text(alphabet="0123456789.eEkKMGTPiumn+- x", min_size=1, max_size=12),
    st.integers(-(2**40), -1),
).filter(_not_a_size)


@st.composite
def bad_quantities(draw: st.DrawFn) -> Bad:
    kind, where = draw(st.sampled_from(RESOURCES))
    obj = base(kind, fresh_name(kind))
    if kind == "NeuralCluster" and draw(st.integers(0, 4)) == 0:
        value = draw(st.one_of(NOT_QUANTITIES, st.sampled_from(["0", 0, "0Gi", "0.0"])))
        obj["spec"]["artifactStore"] = {"size": value}
        return Bad("artifact store size", obj, ("spec", "artifactStore", "size"))
    side = draw(st.sampled_from(["requests", "limits"]))
    resource = draw(st.sampled_from(["cpu", "memory", "ephemeral-storage", "example.com/widget"]))
    value = draw(NOT_QUANTITIES)
    put(obj, (*where, side, Key(resource)), value)
    return Bad("not a quantity", obj, (*where, side, Key(resource)))


UNITS = ["", "m", "k", "Mi", "Gi", "M", "G"]


@st.composite
def requests_over_limits(draw: st.DrawFn) -> Bad:
    kind, where = draw(st.sampled_from(RESOURCES))
    obj = base(kind, fresh_name(kind))
    resource = draw(st.sampled_from(["cpu", "memory", "nvidia.com/gpu"]))
    unit = draw(st.sampled_from(UNITS))
    limit = draw(st.integers(0, 10_000))
    request = limit + draw(st.integers(1, 10_000))
    as_int = unit == "" and draw(st.booleans())
    requirements = {
        "requests": {resource: request if as_int else f"{request}{unit}"},
        "limits": {resource: limit if as_int else f"{limit}{unit}"},
    }
    put(obj, where, requirements)
    return Bad("requests above limits", obj, (*where, "requests"), parse_where=where, words=f"requests.{resource} ")


@st.composite
def zero_or_malformed_durations(draw: st.DrawFn) -> Bad:
    obj = base("ModelDeployment", fresh_name("ModelDeployment"))
    where = draw(st.sampled_from([("spec", "rollout", "interval"), ("spec", "rollout", "thresholds", "window")]))
    if draw(st.integers(0, 3)):
        value = "0" * draw(st.integers(1, 6)) + draw(st.sampled_from("smh"))
        case = "0s duration"
    else:
        value = draw(st.sampled_from(["1d", "1.5m", "-1m", "m", "", "5", "1 m", "1M", "10ms", "9999999h"]))
        case = "malformed duration"
    put(obj, where, value)
    return Bad(case, obj, where)


NOT_IMAGE_EXAMPLES = [
    "Flownexus/Trainer:1", "trainer:", "registry:5000/", "a b", "trainer@sha256:abc", "https://registry/trainer",
    "trainer::1", "/trainer", "trainer/", "-trainer", "tr..ainer", "trainer:" + "t" * 129, "",
]  # fmt: skip
IMAGE_TEXT = st.one_of(
    st.sampled_from(NOT_IMAGE_EXAMPLES),
    st.text(alphabet="abcAB/:@.-_ 01", min_size=1, max_size=20),
).filter(lambda v: re.fullmatch(IMAGE_PATTERN, v) is None)


@st.composite
def not_images(draw: st.DrawFn) -> Bad:
    obj = base("NeuralCluster", fresh_name("NeuralCluster"))
    which = draw(st.sampled_from(["trainer", "server"]))
    obj["spec"]["images"][which] = draw(IMAGE_TEXT)
    return Bad("not an image reference", obj, ("spec", "images", which))


ENV_NAME = st.from_regex(r"[A-Z][A-Z0-9_]{0,15}", fullmatch=True)


def _reserved(name: str) -> bool:
    return name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES)


@st.composite
def reserved_env(draw: st.DrawFn) -> Bad:
    obj = base("TrainingJob", fresh_name("TrainingJob"))
    env = [{"name": n, "value": "1"} for n in draw(st.lists(ENV_NAME.filter(lambda n: not _reserved(n)), max_size=4))]
    name = draw(
        st.one_of(
            st.sampled_from(sorted(RESERVED_ENV)),
            st.tuples(st.sampled_from(RESERVED_ENV_PREFIXES), ENV_NAME).map("".join),
        )
    )
    i = draw(st.integers(0, len(env)))
    env.insert(i, {"name": name, "value": draw(st.sampled_from(["0", "1", "x"]))})
    obj["spec"]["distributed"]["env"] = env
    return Bad("reserved env", obj, ("spec", "distributed", "env", i, "name"), words=f"{name} is reserved")


@st.composite
def wrong_types(draw: st.DrawFn) -> Bad:
    f = draw(st.sampled_from([f for f in FIELDS if _type(f.node) in WRONG_TYPE and len(f.where) > 1]))
    obj = put(base(f.kind, fresh_name(f.kind)), f.where, draw(st.sampled_from(WRONG_TYPE[_type(f.node)])))
    return Bad("wrong type", obj, f.where)


REQUIRED: list[tuple[str, tuple[Step, ...]]] = [(kind, ("spec",)) for kind in SCHEMAS] + [
    (f.kind, (*f.where, key)) for f in FIELDS for key in f.node.get("required") or []
]


def get(obj: Manifest, where: tuple[Step, ...]) -> Any:
    node: Any = obj
    for step in where:
        node = None if node is None else _child(node, step)
    return node


@st.composite
def missing_required(draw: st.DrawFn) -> Bad:
    kind, where = draw(st.sampled_from(REQUIRED))
    obj = base(kind, fresh_name(kind))
    if len(where) > 1 and get(obj, where[:-1]) is None:
        put(obj, where[:-1], {})  # the parent without the field: an env var without a name
    parent = get(obj, where[:-1]) if len(where) > 1 else obj
    parent.pop(where[-1], None)
    return Bad("missing required", obj, where)


BOUNDED = [f for f in FIELDS if len(f.where) > 1 and _bounds(f.node)]


@st.composite
def out_of_range(draw: st.DrawFn) -> Bad:
    f = draw(st.sampled_from(BOUNDED))
    value, bound = _out_of_range(draw, f.node)
    obj = put(base(f.kind, fresh_name(f.kind)), f.where, value)
    return Bad(f"out of range ({bound})", obj, f.where)


# One family of mutations per draw, each as likely.
FAMILIES: list[st.SearchStrategy[Bad]] = [
    long_names(),
    malformed_names(),
    escaping_paths(),
    unbounded_hidden_sizes(),
    bad_quantities(),
    requests_over_limits(),
    zero_or_malformed_durations(),
    not_images(),
    reserved_env(),
    # The schema's own bounds cover far more fields: more draws.
    wrong_types(),
    wrong_types(),
    missing_required(),
    out_of_range(),
    out_of_range(),
    out_of_range(),
]
INVALID = st.sampled_from(FAMILIES).flatmap(lambda family: family)


# ---- the verdicts ---------------------------------------------------------------------------------------


def post(h: Harness, obj: Manifest) -> ApiError | None:
    """POST as a user; the API server's refusal, or None when it stored the object."""
    obj = {**obj, "metadata": {**obj["metadata"], "namespace": h.ns}}
    try:
        h.user.request("POST", path(obj["kind"], h.ns), body=obj, kind=obj["kind"])
    except ApiError as exc:
        return exc
    return None


def operator_refusal(bad: Bad) -> list[str]:
    """What the operator says of an object the API server stored: parse_spec's lines (status InvalidSpec)."""
    kind: Kind = KIND[bad.manifest["kind"]]
    if bad.where[0] == "metadata":
        return kind.names.problems(kind.kind, bad.manifest["metadata"]["name"])
    try:
        parse_spec(kind.spec, bad.manifest)
    except InvalidSpec as exc:
        return exc.lines
    return []


def check(h: Harness, bad: Bad, stats: Counter[str]) -> None:
    refused = post(h, bad.manifest)
    stats["specs"] += 1
    stats[f"case: {bad.case}"] += 1
    stats[f"kind: {bad.manifest['kind']}"] += 1
    if refused is not None:
        assert refused.status == 422, f"{bad.case}: {refused.status} {refused}"
        message = str(refused)
        assert any(f"{p}: " in message for p in server_paths(bad.where)), (
            f"{bad.case}: the API server's message does not name {server_paths(bad.where)}:\n{message}"
        )
        assert bad.words in message, f"{bad.case}: {bad.words!r} not in {message}"
        stats["rejected by schema"] += 1
        return
    # Stored: the operator must refuse it, naming the field, so that a status condition says why.
    lines = operator_refusal(bad)
    assert lines, f"{bad.case}: accepted by the API server and parsed by the operator: {json.dumps(bad.manifest)}"
    if bad.where[0] != "metadata":
        where = parse_path(bad.parse_where or bad.where)
        assert any(line.startswith(f"{where}: ") for line in lines), f"{bad.case}: {lines} do not name {where}"
    stats["rejected by parse"] += 1
    stats[f"accepted by the schema: {bad.case}"] += 1
    name = bad.manifest["metadata"]["name"]
    h.user.request("DELETE", path(bad.manifest["kind"], h.ns, name), kind=bad.manifest["kind"])


def test_generated_invalid_specs_are_refused_naming_the_field(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    stats: Counter[str] = Counter()
    seen: set[str] = set()

    @settings(
        max_examples=1000,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    @given(INVALID)
    def refused(bad: Bad) -> None:
        seen.add(json.dumps(bad.manifest, sort_keys=True))
        check(harness, bad, stats)

    started = time.monotonic()
    refused()
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(
            f"\ninvalid specs: {len(seen)} distinct ({stats['specs']} POSTs) in {elapsed:.1f} s; "
            f"rejected by the schema {stats['rejected by schema']}, by the operator's parse "
            f"{stats['rejected by parse']}"
        )
        for key, count in sorted(stats.items()):
            if key.startswith(("case: ", "kind: ", "accepted")):
                print(f"  {key}: {count}")
    assert len(seen) >= EXAMPLES_WANTED, f"only {len(seen)} distinct invalid specs were generated"


# ---- the exact words, one table row per rule -------------------------------------------------------------


def _tj(name: str = "digits", **edits: Any) -> Manifest:
    return _edited("TrainingJob", name, edits)


def _md(name: str = "digits", **edits: Any) -> Manifest:
    return _edited("ModelDeployment", name, edits)


def _nc(name: str = "demo", **edits: Any) -> Manifest:
    return _edited("NeuralCluster", name, edits)


def _edited(kind: str, name: str, edits: dict[str, Any]) -> Manifest:
    obj = base(kind, name)
    for dotted, value in edits.items():
        if value is _DROP:
            delete(obj, tuple(dotted.split(".")))
        else:
            put(obj, tuple(dotted.split(".")), value)
    return obj


_DROP = object()
LONG_TJ, LONG_MD, DOTTED_NC = "t" * 49, "m" * 51, "demo.cluster"

# (object, the API server's words, the operator's words or None when only the API server can check it)
TABLE: list[tuple[str, Manifest, str, str | None]] = [
    ("tj name too long", _tj(LONG_TJ),
     f"metadata.name: Invalid value: TrainingJob name {LONG_TJ} is longer than 48 characters: the Indexed Job of "
     "attempt N, <name>-aN, names its pods <name>-aN-<index>-<random> (up to <name>-a101-511-<random>), of which "
     "Kubernetes keeps 58 characters before the random part, and only rank 0's pod (index 0) may report progress",
     None),
    ("tj name not DNS-1035", _tj("2digits"),
     "metadata.name: Invalid value: TrainingJob name 2digits is not a DNS-1035 label (lowercase letters, digits and "
     "'-', starting with a letter and ending with a letter or digit): it names the headless Service <name>-workers",
     None),
    ("md name too long", _md(LONG_MD),
     f"metadata.name: Invalid value: ModelDeployment name {LONG_MD} is longer than 50 characters: the pods of its "
     "Deployments <name>-stable and <name>-canary are named <name>-<track>-<hash>-<suffix>, of which Kubernetes "
     "keeps 58 characters before the random suffix", None),
    ("nc name not a label", _nc(DOTTED_NC),
     f"metadata.name: Invalid value: NeuralCluster name {DOTTED_NC} is not a DNS-1123 label", None),
    ("dataset path ..", _tj(**{"spec.dataset": {"source": "file", "path": "data/../../etc/x.csv"}}),
     "spec.dataset.path: Invalid value: \"data/../../etc/x.csv\": may not contain a '..' segment: it must stay "
     "inside the artifact store", "may not contain a '..' segment"),
    ("dataset path absolute", _tj(**{"spec.dataset": {"source": "file", "path": "/etc/x.csv"}}),
     'spec.dataset.path: Invalid value: "/etc/x.csv": must be relative to the artifact store root, not an absolute '
     "path", "must be relative to the artifact store root"),
    ("archive path ..", _md(**{"spec.model": {"archivePath": "../other-ns/x.mar", "version": "1"}}),
     "spec.model.archivePath: Invalid value: \"../other-ns/x.mar\": may not contain a '..' segment", None),
    ("archive path absolute", _md(**{"spec.model": {"archivePath": "/artifacts/x.mar", "version": "1"}}),
     'spec.model.archivePath: Invalid value: "/artifacts/x.mar": must be relative to the artifact store root',
     "must be relative to the artifact store root"),
    ("hiddenSizes width", _tj(**{"spec.model.hiddenSizes": [64, 100000]}),
     "spec.model.hiddenSizes[1]: Invalid value: 100000: spec.model.hiddenSizes[1] in body should be less than or "
     "equal to 8192", "less than or equal to 8192"),
    ("hiddenSizes count", _tj(**{"spec.model.hiddenSizes": [8] * 17}),
     "spec.model.hiddenSizes: Too many: 17: must have at most 16 items", "at most 16 items"),
    ("synthetic table too big", _tj(**{"spec.dataset": {"source": "synthetic",
                                                         "synthetic": {"samples": 10_000_000, "features": 11}}}),
     "spec.dataset.synthetic: Invalid value: samples x features must be at most 100,000,000: every training process "
     "generates the whole table in memory", "samples x features must be at most 100,000,000"),
    ("not a quantity", _tj(**{"spec.distributed.resources": {"requests": {"cpu": "lots"}}}),
     'spec.distributed.resources.requests[cpu]: Invalid value: "lots": must be a non-negative quantity such as '
     "500m, 2Gi or 4", "must be a non-negative quantity such as 500m, 2Gi or 4"),
    ("negative quantity", _md(**{"spec.serving.resources": {"limits": {"memory": "-1Gi"}}}),
     'spec.serving.resources.limits[memory]: Invalid value: "-1Gi": must be a non-negative quantity',
     "must be a non-negative quantity"),
    ("requests above limits", _tj(**{"spec.distributed.resources": {"requests": {"cpu": "4"}, "limits": {"cpu": 2}}}),
     "spec.distributed.resources.requests: Invalid value: requests.cpu 4 is above limits.cpu 2: a container may not "
     "request more than its limit", "requests.cpu 4 is above limits.cpu 2: a container may not request more than "
     "its limit"),
    ("requests above limits, other units", _nc(**{"spec.defaultServingResources": {
        "requests": {"memory": "2Gi"}, "limits": {"memory": "2G"}}}),
     "spec.defaultServingResources.requests: Invalid value: requests.memory 2Gi is above limits.memory 2G",
     "requests.memory 2Gi is above limits.memory 2G"),
    ("store size zero", _nc(**{"spec.artifactStore": {"size": "0Gi"}}),
     'spec.artifactStore.size: Invalid value: "0Gi": must be a positive quantity such as 5Gi',
     "must be a positive quantity such as 5Gi"),
    ("interval 0s", _md(**{"spec.rollout.interval": "0s"}),
     'spec.rollout.interval: Invalid value: "0s": must be longer than 0s: the canary is analysed once per interval',
     "must be longer than 0s: the canary is analysed once per interval"),
    ("window 0m", _md(**{"spec.rollout.thresholds.window": "00m"}),
     'spec.rollout.thresholds.window: Invalid value: "00m": must be longer than 0s: Prometheus computes the '
     "canary's rates over this range", "must be longer than 0s: Prometheus computes"),
    ("not an image", _nc(**{"spec.images.trainer": "Flownexus/Trainer:latest"}),
     'spec.images.trainer: Invalid value: "Flownexus/Trainer:latest": must be an image reference such as '
     "registry.example.com/team/trainer:1.2 or trainer@sha256:<digest>", "must be an image reference"),
    ("digest too short", _nc(**{"spec.images.server": "flownexus/server@sha256:abc123"}),
     'spec.images.server: Invalid value: "flownexus/server@sha256:abc123": must be an image reference',
     "must be an image reference"),
    ("JOB_COMPLETION_INDEX", _tj(**{"spec.distributed.env": [{"name": "NCCL_DEBUG", "value": "INFO"},
                                                             {"name": "JOB_COMPLETION_INDEX", "value": "0"}]}),
     'spec.distributed.env[1].name: Invalid value: "JOB_COMPLETION_INDEX": JOB_COMPLETION_INDEX is reserved: the '
     "Job controller sets it to each worker pod's index, which is the pod's torchrun --node-rank",
     "JOB_COMPLETION_INDEX is reserved: the Job controller sets it"),
    ("MASTER_ADDR", _tj(**{"spec.distributed.env": [{"name": "MASTER_ADDR", "value": "evil"}]}),
     'spec.distributed.env[0].name: Invalid value: "MASTER_ADDR": MASTER_ADDR is reserved: torchrun sets it',
     "MASTER_ADDR is reserved: torchrun sets it"),
    ("FLOWNEXUS_CONFIG", _tj(**{"spec.distributed.env": [{"name": "FLOWNEXUS_CONFIG", "value": "/tmp/x"}]}),
     'spec.distributed.env[0].name: Invalid value: "FLOWNEXUS_CONFIG": FLOWNEXUS_CONFIG is reserved: the operator '
     "sets it in the training pods", "FLOWNEXUS_CONFIG is reserved: the operator sets it"),
    ("KUBERNETES_SERVICE_HOST", _tj(**{"spec.distributed.env": [{"name": "KUBERNETES_SERVICE_HOST", "value": "x"}]}),
     'spec.distributed.env[0].name: Invalid value: "KUBERNETES_SERVICE_HOST": KUBERNETES_SERVICE_HOST is reserved: '
     "the kubelet sets KUBERNETES_*", "KUBERNETES_SERVICE_HOST is reserved"),
    ("PET_RDZV_ENDPOINT", _tj(**{"spec.distributed.env": [{"name": "PET_RDZV_ENDPOINT", "value": "x:1"}]}),
     'spec.distributed.env[0].name: Invalid value: "PET_RDZV_ENDPOINT": PET_RDZV_ENDPOINT is reserved: torchrun',
     "PET_RDZV_ENDPOINT is reserved: torchrun"),
    ("version not a label value", _md(**{"spec.model.version": "1.0-"}),
     'spec.model.version: Invalid value: "1.0-": spec.model.version in body should match', "should match pattern"),
    ("missing model", _tj(**{"spec.model": _DROP}), "spec.model: Required value", "Field required"),
    ("dataset uri ..", _tj(**{"spec.dataset": {"source": "uri", "uri": "pvc://data/../../x.parquet"}}),
     'spec.dataset.uri: Invalid value: "pvc://data/../../x.parquet": pvc://data/../../x.parquet may not contain a '
     "'..' segment: the dataset must stay inside the artifact store",
     "pvc://data/../../x.parquet may not contain a '..' segment"),
    ("dataset uri scheme", _tj(**{"spec.dataset": {"source": "uri", "uri": "https://example.com/x.csv"}}),
     'spec.dataset.uri: Invalid value: "https://example.com/x.csv": https://example.com/x.csv is not '
     "s3://<bucket>/<key> or pvc://<path relative to the artifact store root>",
     "https://example.com/x.csv is not s3://<bucket>/<key> or pvc://"),
    ("dataset uri bucket", _tj(**{"spec.dataset": {"source": "uri", "uri": "s3://Bad_Bucket/x.csv"}}),
     'spec.dataset.uri: Invalid value: "s3://Bad_Bucket/x.csv": s3://Bad_Bucket/x.csv is not s3://<bucket>/<key>',
     "s3://Bad_Bucket/x.csv is not s3://<bucket>/<key>"),
    ("dataset uri required", _tj(**{"spec.dataset": {"source": "uri"}}),
     "uri is required when source is uri", "uri is required when source is uri"),
    ("dataset uri extension", _tj(**{"spec.dataset": {"source": "uri", "uri": "s3://flownexus/data/x.xlsx"}}),
     "uri has no known extension (.csv, .tsv, .txt, .parquet, .pq, .npz): set format to csv, parquet or npz",
     "uri has no known extension"),
    ("dataset format needs uri", _tj(**{"spec.dataset": {"source": "file", "path": "x.csv", "format": "csv"}}),
     "format needs source: uri (a file's path names its format by its extension)", "format needs source: uri"),
    ("dataset format enum", _tj(**{"spec.dataset": {"source": "uri", "uri": "pvc://x", "format": "xlsx"}}),
     'spec.dataset.format: Unsupported value: "xlsx": supported values: "csv", "parquet", "npz"', "format"),
    ("timestampColumn needs temporal", _tj(**{"spec.dataset": {"source": "uri", "uri": "pvc://x.parquet",
                                                                "timestampColumn": "at"}}),
     "timestampColumn needs split: temporal (it orders the rows a temporal split cuts; a random split does not use "
     "row order)", "timestampColumn needs split: temporal"),
    ("timestampColumn needs a table", _tj(**{"spec.dataset": {"source": "synthetic", "split": "temporal",
                                                               "timestampColumn": "at"}}),
     "timestampColumn needs source: file or uri (a table with named columns)", "timestampColumn needs source"),
    ("featureColumns hold the target", _tj(**{"spec.dataset": {"source": "uri", "uri": "pvc://x.parquet",
                                                                "featureColumns": ["a", "target"]}}),
     "targetColumn cannot be one of featureColumns", "targetColumn cannot be one of featureColumns"),
    ("featureColumns hold the timestamp", _tj(**{"spec.dataset": {
        "source": "uri", "uri": "pvc://x.parquet", "split": "temporal", "timestampColumn": "at",
        "featureColumns": ["a", "at"]}}),
     "timestampColumn cannot be one of featureColumns: it orders the rows and is not a feature",
     "timestampColumn cannot be one of featureColumns"),
    ("featureColumns need a table", _tj(**{"spec.dataset": {"source": "builtin", "name": "iris",
                                                             "featureColumns": ["a"]}}),
     "featureColumns needs source: file or uri (a table with named columns)", "featureColumns needs source"),
    ("categoricalColumns need a table", _tj(**{"spec.dataset": {"source": "synthetic", "categoricalColumns": ["a"]}}),
     "categoricalColumns needs source: file or uri (a table with named columns)", "categoricalColumns needs source"),
]  # fmt: skip


@pytest.mark.parametrize(("obj", "server", "operator"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_each_rule_says_what_and_why(harness: Harness, obj: Manifest, server: str, operator: str | None) -> None:
    refused = post(harness, obj)
    assert refused is not None, "accepted"
    assert refused.status == 422
    assert server in str(refused), str(refused)
    if operator is not None:
        kind = KIND[obj["kind"]]
        with pytest.raises(InvalidSpec) as caught:
            parse_spec(kind.spec, obj)
        assert any(operator in line for line in caught.value.lines), caught.value.lines


def test_the_artifact_store_is_immutable_once_set(harness: Harness) -> None:
    h = harness
    h.create(_nc())
    # Other fields stay editable.
    h.patch("NeuralCluster", "demo", {"spec": {"limits": {"maxConcurrentTrainingJobs": 3}}})
    for change in ({"size": "5Gi"}, {"size": None, "existingClaim": "other-pvc"}, {"accessMode": "ReadWriteOnce"}):
        with pytest.raises(ApiError) as refused:
            h.patch("NeuralCluster", "demo", {"spec": {"artifactStore": change}})
        assert refused.value.status == 422
        assert "spec.artifactStore: Invalid value: is immutable: the checkpoints, reports and model " in str(
            refused.value
        )
    assert h.get("NeuralCluster", "demo")["spec"]["artifactStore"]["size"] == "2Gi"


def test_the_examples_themselves_are_accepted(harness: Harness) -> None:
    for kind in KIND_NAMES:
        assert post(harness, base(kind)) is None, kind


@pytest.mark.parametrize(
    "dataset",
    [
        {"source": "uri", "uri": "s3://flownexus-data/sales/2024.PARQUET", "split": "temporal", "timestampColumn": "at",
         "featureColumns": ["region", "units"], "categoricalColumns": ["region"], "targetColumn": "label"},
        {"source": "uri", "uri": "pvc://exports/latest", "format": "parquet"},
        {"source": "uri", "uri": "pvc://data/x.tsv", "missingValues": "dropRows"},
        {"source": "file", "path": "data/x.csv", "split": "temporal", "timestampColumn": "at"},
    ],
    ids=["s3 parquet, every column field", "pvc without extension, format set", "pvc tsv", "file with timestamp"],
)  # fmt: skip
def test_datasets_by_uri_are_accepted_by_the_server_and_the_operator(harness: Harness, dataset: Manifest) -> None:
    obj = _tj(fresh_name("TrainingJob"), **{"spec.dataset": dataset})
    assert post(harness, obj) is None
    parse_spec(KIND["TrainingJob"].spec, obj)
