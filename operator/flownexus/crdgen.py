"""Generate the CustomResourceDefinitions in ``crds/`` from the pydantic API types.

Pydantic's JSON Schema is turned into a structural OpenAPI v3 schema: references inlined, ``null``
alternatives dropped, JSON Schema 2020 bounds converted to OpenAPI 3.0 ones, defaults that let the
API server fill nested objects, and CEL rules attached where they belong: a reusable type's (``Rules`` in
``Annotated``), a field's (``json_schema_extra``), a model's (``cel_rules``), and the kind's rules on
``metadata.name`` at the root, the one place CEL can see the name.

Run ``python -m flownexus.crdgen --out crds`` (``make crds``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from . import GROUP, VERSION
from .api import KINDS, Kind
from .api.common import TYPE_RULES_KEY, ApiModel

Schema = dict[str, Any]

# JSON Schema keywords that the API server either rejects or that carry no meaning for it.
_DROPPED_KEYS = {"title", "additionalProperties", "$defs", "discriminator", "const"}
_RULES = "x-kubernetes-validations"
_RULE_KEYS = ("rule", "message", "messageExpression", "fieldPath", "reason")


def _rules(node: Schema) -> list[dict[str, str]]:
    """A node's CEL rules: its type's first, then its field's; keys in one order (pydantic sorts some)."""
    return [
        {key: rule[key] for key in _RULE_KEYS if key in rule}
        for rule in (*node.get(TYPE_RULES_KEY, []), *node.get(_RULES, []))
    ]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation mentions (Optional[X], list[X], dict[str, X], X)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    origin = typing.get_origin(annotation)
    if origin is not None or isinstance(annotation, types.UnionType):
        for arg in typing.get_args(annotation):
            found.extend(_models_in(arg))
    return found


def _registry(model: type[BaseModel], seen: dict[str, type[BaseModel]] | None = None) -> dict[str, type[BaseModel]]:
    """Every model reachable from ``model``, by class name (the key pydantic uses in $defs)."""
    seen = {} if seen is None else seen
    if model.__name__ in seen:
        return seen
    seen[model.__name__] = model
    for field in model.model_fields.values():
        for sub in _models_in(field.annotation):
            _registry(sub, seen)
    return seen


def _field_default(field: FieldInfo) -> Any:
    """The default to publish in the CRD, or ``None`` when the field has none worth publishing."""
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, ApiModel):
            # The whole defaulted object, not {}: the API server checks defaults against CEL rules *before*
            # filling nested defaults, so a rule like `self.minReplicas <= self.maxReplicas` needs the keys.
            return value.to_wire()
        return value
    if field.is_required() or field.default is None:
        return None
    default = field.default
    return default.to_wire() if isinstance(default, ApiModel) else default


class _Converter:
    """Walks one pydantic JSON schema and returns its structural OpenAPI v3 form."""

    def __init__(self, root: type[BaseModel], *, with_defaults: bool) -> None:
        self.schema = root.model_json_schema(by_alias=True, mode="validation")
        self.defs: dict[str, Schema] = self.schema.get("$defs", {})
        self.models = _registry(root)
        self.with_defaults = with_defaults

    def convert(self) -> Schema:
        return self._node(self.schema, self.models[self.schema["title"]] if "title" in self.schema else None)

    def _node(self, node: Schema, model: type[BaseModel] | None = None) -> Schema:
        node = copy.deepcopy(node)
        if "$ref" in node:
            name = node.pop("$ref").rsplit("/", 1)[-1]
            siblings = node
            node = copy.deepcopy(self.defs[name])
            model = self.models.get(name)
            # Sibling keys (description, field-level CEL) win over the referenced definition's.
            rules = _rules(node) + _rules(siblings)
            node.update(siblings)
            node.pop(TYPE_RULES_KEY, None)
            if rules:
                node[_RULES] = rules
        if "anyOf" in node:
            node = self._any_of(node)
            if "$ref" in node:
                return self._node(node)
        if model is None and "title" in node and node.get("type") == "object" and node["title"] in self.models:
            model = self.models[node["title"]]
        out: Schema = {}
        for key, value in node.items():
            if key in _DROPPED_KEYS or key in ("default", TYPE_RULES_KEY, _RULES):
                continue
            if key == "properties":
                out["properties"] = {prop: self._property(prop, sub, model) for prop, sub in value.items()}
            elif key == "items":
                out["items"] = self._node(value)
            elif key == "exclusiveMinimum":
                out["minimum"], out["exclusiveMinimum"] = value, True
            elif key == "exclusiveMaximum":
                out["maximum"], out["exclusiveMaximum"] = value, True
            elif key == "maxLength" and node.get("type") == "array":
                out["maxItems"] = value
            else:
                out[key] = value
        if "const" in node:
            out["enum"] = [node["const"]]
        if isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = self._node(node["additionalProperties"])
        rules = _rules(node)
        if model is not None and issubclass(model, ApiModel):
            rules += model.cel_rules
        if rules:
            out[_RULES] = rules
        if out.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
        elif "type" not in out and "enum" in out:
            out["type"] = "string"
        return out

    @staticmethod
    def _any_of(node: Schema) -> Schema:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if node.get("x-kubernetes-int-or-string") or {o.get("type") for o in options} == {
            "string",
            "integer",
        }:
            node["x-kubernetes-int-or-string"] = True
            return node
        if len(options) != 1:
            raise ValueError(f"cannot express a union of {options} in a structural schema")
        merged = {**options[0], **node}
        # The type's rules and the field's both hold (Optional[ImageRef] with an immutability rule).
        for key in (TYPE_RULES_KEY, _RULES):
            rules = [*options[0].get(key, []), *node.get(key, [])]
            if rules:
                merged[key] = rules
        return _Converter._any_of(merged) if "anyOf" in merged else merged

    def _property(self, prop: str, node: Schema, model: type[BaseModel] | None) -> Schema:
        field = self._field(model, prop)
        out = self._node(node)
        if self.with_defaults and field is not None:
            default = _field_default(field)
            if default is not None:
                out["default"] = default
        return out

    @staticmethod
    def _field(model: type[BaseModel] | None, alias: str) -> FieldInfo | None:
        if model is None:
            return None
        for name, field in model.model_fields.items():
            if (field.alias or name) == alias:
                return field
        return None


def openapi_schema(kind: Kind) -> Schema:
    """The structural OpenAPI v3 schema of one kind: spec with defaults and CEL, typed status."""
    spec = _Converter(kind.spec, with_defaults=True).convert()
    status = _Converter(kind.status, with_defaults=False).convert()
    status.pop("required", None)
    return {
        "type": "object",
        "description": kind.description,
        "required": ["spec"],
        # Root-level rules are the only ones that see metadata.name.
        _RULES: kind.names.cel_rules(kind.kind),
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            # Declared so that the name rules' fieldPath (.metadata.name) resolves; no restriction of its own.
            "metadata": {"type": "object", "properties": {"name": {"type": "string"}}},
            "spec": spec,
            "status": status,
        },
    }


def build_crd(kind: Kind) -> Schema:
    """The CustomResourceDefinition manifest of one kind."""
    columns = [
        {
            "name": c.name,
            "type": c.type,
            "jsonPath": c.json_path,
            "description": c.description,
            **({"priority": c.priority} if c.priority else {}),
        }
        for c in kind.columns
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "flownexus"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": list(kind.short_names),
                "categories": ["flownexus"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema(kind)},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


HEADER = "# Generated by `make crds` (python -m flownexus.crdgen) from operator/flownexus/api. Do not edit.\n"


class _NoAliases(yaml.SafeDumper):
    """Writes a rule shared by two fields out twice instead of as a YAML anchor and alias (&id001/*id001),
    which reviewers, diff tools and some GitOps renderers read badly."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(kind: Kind) -> str:
    """The YAML text of one CRD file."""
    return HEADER + yaml.dump(build_crd(kind), Dumper=_NoAliases, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("crds"), help="directory to write <plural>.yaml into")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        path = args.out / f"{kind.plural}.yaml"
        path.write_text(render(kind))
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
