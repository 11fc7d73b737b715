"""The generated CRDs: structural, complete, and identical to what is committed in crds/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from flownexus.api import KINDS, Kind
from flownexus.api.common import TYPE_RULES_KEY
from flownexus.crdgen import build_crd, render

REPO = Path(__file__).resolve().parents[2]
# Keywords allowed in a structural schema node (apiextensions.k8s.io/v1 JSONSchemaProps we use).
ALLOWED = {
    "type",
    "description",
    "properties",
    "items",
    "required",
    "enum",
    "default",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "maxProperties",
    "additionalProperties",
    "x-kubernetes-validations",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields",
    "format",
}


def walk(node: dict[str, Any], path: str) -> list[str]:
    """Every problem that would make the API server reject the schema as non-structural."""
    problems = [f"{path}: keyword {k!r} not allowed" for k in node if k not in ALLOWED]
    if "type" not in node and not node.get("x-kubernetes-int-or-string") and path != "metadata":
        problems.append(f"{path}: no type")
    if "description" not in node and path.count(".") > 1 and not path.endswith(("[]", "{}")):
        problems.append(f"{path}: no description")
    for name, sub in node.get("properties", {}).items():
        problems += walk(sub, f"{path}.{name}")
    if "items" in node:
        problems += walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += walk(node["additionalProperties"], f"{path}{{}}")
    for rule in node.get("x-kubernetes-validations", []):
        problems += rule_problems(rule, path)
    return problems


RULE_KEYS = {"rule", "message", "messageExpression", "fieldPath", "reason"}


def rule_problems(rule: dict[str, str], path: str) -> list[str]:
    """A CEL rule has a rule, exactly one of message and messageExpression, and nothing unknown."""
    problems = []
    if set(rule) - RULE_KEYS or not rule.get("rule"):
        problems.append(f"{path}: unknown keys in CEL rule {rule}")
    if ("message" in rule) == ("messageExpression" in rule):
        problems.append(f"{path}: CEL rule needs a message or a messageExpression: {rule}")
    return problems


def schema_of(kind: Kind) -> dict[str, Any]:
    schema: dict[str, Any] = build_crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def node_at(kind: Kind, dotted: str) -> dict[str, Any]:
    """The schema node of a field path like ``spec.distributed.env[].name``."""
    node = schema_of(kind)
    for part in dotted.split("."):
        name, items = part.removesuffix("[]"), part.endswith("[]")
        node = node["properties"][name]
        if items:
            node = node["items"]
    return node


def rules_at(kind: Kind, dotted: str) -> list[dict[str, str]]:
    return list(node_at(kind, dotted).get("x-kubernetes-validations", []))


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_schema_is_structural_and_described(kind: Kind) -> None:
    schema = build_crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    problems = []
    for part in ("spec", "status"):
        problems += walk(schema["properties"][part], part)
    assert problems == []


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_committed_crd_matches_the_types(kind: Kind) -> None:
    committed = (REPO / "crds" / f"{kind.plural}.yaml").read_text()
    assert committed == render(kind), "crds/ is stale: run `make crds`"


def test_crd_names_columns_and_category() -> None:
    crds = {k.kind: build_crd(k) for k in KINDS}
    tj = crds["TrainingJob"]["spec"]
    assert tj["names"]["shortNames"] == ["tj"] and tj["names"]["categories"] == ["flownexus"]
    columns = [c["name"] for c in tj["versions"][0]["additionalPrinterColumns"]]
    assert columns[:3] == ["Phase", "Attempt", "Epoch"] and "Age" in columns
    mdep = crds["ModelDeployment"]["spec"]
    assert [c["name"] for c in mdep["versions"][0]["additionalPrinterColumns"]][:4] == [
        "Stable",
        "Canary",
        "Weight",
        "Phase",
    ]
    assert crds["NeuralCluster"]["spec"]["names"]["shortNames"] == ["nc"]
    for crd in crds.values():
        assert crd["spec"]["versions"][0]["subresources"] == {"status": {}}


def test_defaults_land_in_the_schema() -> None:
    (tj,) = [build_crd(k) for k in KINDS if k.kind == "TrainingJob"]
    spec = tj["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["training"]["default"]["checkpointEvery"] == 5
    assert spec["training"]["properties"]["checkpointEvery"]["default"] == 5
    assert spec["dataset"]["properties"]["seed"]["default"] == 42
    assert spec["validation"]["properties"]["minAccuracy"]["default"] == 0.85
    assert "default" not in spec["model"]


def test_no_generator_bookkeeping_reaches_the_crds() -> None:
    for kind in KINDS:
        assert TYPE_RULES_KEY not in render(kind)


KIND = {k.kind: k for k in KINDS}


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_root_rules_bound_the_name_with_a_message_that_names_it(kind: Kind) -> None:
    schema = schema_of(kind)
    assert schema["properties"]["metadata"] == {"type": "object", "properties": {"name": {"type": "string"}}}
    rules = schema["x-kubernetes-validations"]
    assert [r["rule"] for r in rules] == [
        f"self.metadata.name.size() <= {kind.names.max_length}",
        f"self.metadata.name.matches(r'{kind.names.pattern}')",
    ]
    for rule in rules:
        assert rule_problems(rule, "root") == []
        assert rule["fieldPath"] == ".metadata.name"
        assert "self.metadata.name" in rule["messageExpression"]
    assert f"longer than {kind.names.max_length} characters" in rules[0]["messageExpression"]


def test_name_limits_per_kind() -> None:
    assert {k.kind: k.names.max_length for k in KINDS} == {
        "NeuralCluster": 63,
        "TrainingJob": 48,
        "ModelDeployment": 50,
    }


def test_type_rules_and_field_rules_land_on_the_same_node() -> None:
    tj, md, nc = KIND["TrainingJob"], KIND["ModelDeployment"], KIND["NeuralCluster"]
    # A reusable type's rules (Rules in Annotated) wherever it is used, also under Optional, dict and list.
    for kind, path in (
        (tj, "spec.dataset.path"),
        (md, "spec.model.archivePath"),
    ):
        rules = [r["rule"] for r in rules_at(kind, path)]
        assert "!self.split('/').exists(s, s == '..')" in rules and "!self.startsWith('/')" in rules
    quantity = node_at(tj, "spec.distributed.resources.requests")["additionalProperties"]
    assert quantity["x-kubernetes-int-or-string"] and "type" not in quantity
    assert "isQuantity(self)" in quantity["x-kubernetes-validations"][0]["rule"]
    assert "quantity(self).isGreaterThan(quantity('0'))" in rules_at(nc, "spec.artifactStore.size")[0]["rule"]
    for path in ("spec.rollout.interval", "spec.rollout.thresholds.window"):
        assert rules_at(md, path)[0]["rule"] == "duration(self) > duration('0s')"
    for image in ("trainer", "server"):
        assert rules_at(nc, f"spec.images.{image}")[0]["rule"].startswith("self.matches(r'^")
    # A field's own rule next to its model's rules (the artifact store is immutable and needs one kind of source).
    store = [r["rule"] for r in rules_at(nc, "spec.artifactStore")]
    assert store == ["self == oldSelf", "has(self.s3) != (has(self.existingClaim) || has(self.size))"]


def test_reserved_env_rules_name_the_variable() -> None:
    rules = rules_at(KIND["TrainingJob"], "spec.distributed.env[].name")
    assert len(rules) == 4
    for rule in rules:
        assert rule["messageExpression"].startswith("self + ' is reserved: ")
    text = " ".join(r["rule"] for r in rules)
    for name in ("JOB_COMPLETION_INDEX", "MASTER_ADDR", "RANK", "'FLOWNEXUS_'", "'KUBERNETES_'", "'PET_'"):
        assert name in text


def test_requests_above_limits_rule_names_the_resource() -> None:
    (rule,) = rules_at(KIND["TrainingJob"], "spec.distributed.resources")
    assert rule["fieldPath"] == ".requests"
    assert "compareTo" in rule["rule"] and "'requests.' + k" in rule["messageExpression"]


def test_bounds_on_lists_and_ints_that_feed_resource_use() -> None:
    tj = KIND["TrainingJob"]
    hidden = node_at(tj, "spec.model.hiddenSizes")
    assert (hidden["minItems"], hidden["maxItems"]) == (1, 16)
    assert (hidden["items"]["minimum"], hidden["items"]["maximum"]) == (1, 8192)
    assert "self.samples * self.features <= 100000000" in [r["rule"] for r in rules_at(tj, "spec.dataset.synthetic")]
    for path in ("spec.runPolicy.activeDeadlineSeconds", "spec.runPolicy.ttlSecondsAfterFinished"):
        assert node_at(tj, path)["maximum"] == 2**31 - 1


def test_cel_rules_present_for_cross_field_constraints() -> None:
    text = "\n".join(yaml.safe_dump(build_crd(k)) for k in KINDS)
    for needle in (
        "self.minReplicas <= self.maxReplicas",
        "has(self.trainingJobRef) != has(self.archivePath)",
        "self.isSorted()",
        "self == oldSelf",
    ):
        assert needle in text
