"""The generated CRDs: structural, complete, and identical to what is committed in crds/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from flownexus.api import KINDS, Kind
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
        if set(rule) - {"rule", "message"} or not rule.get("message"):
            problems.append(f"{path}: CEL rule needs a message: {rule}")
    return problems


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


def test_cel_rules_present_for_cross_field_constraints() -> None:
    text = "\n".join(yaml.safe_dump(build_crd(k)) for k in KINDS)
    for needle in (
        "self.minReplicas <= self.maxReplicas",
        "has(self.trainingJobRef) != has(self.archivePath)",
        "self.isSorted()",
        "self == oldSelf",
    ):
        assert needle in text
