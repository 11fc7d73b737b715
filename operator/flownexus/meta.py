"""Helpers shared by the builders: names, labels, owner references, conditions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .api.common import Condition, Placement

Manifest = dict[str, Any]
PART_OF = "flownexus"


@dataclass(frozen=True)
class OwnedContext:
    """Base of the builders' contexts: the object whose children they build."""

    owner: Manifest  # the owning object (apiVersion, kind, metadata with uid)

    @property
    def name(self) -> str:
        return str(self.owner["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.owner["metadata"]["namespace"])


def labels(kind: str, name: str, component: str, **extra: str) -> dict[str, str]:
    """Labels on every child: who owns it and what it is."""
    return {
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": "flownexus-operator",
        "app.kubernetes.io/component": component,
        f"flownexus.io/{kind.lower()}": name,
        **extra,
    }


def owner_reference(owner: Manifest) -> Manifest:
    """An owner reference that makes the garbage collector delete the child with its owner."""
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def pod_placement(placement: Placement) -> Manifest:
    """A pod spec's nodeSelector and tolerations from a NeuralCluster's training or serving placement."""
    out: Manifest = {}
    if placement.node_selector:
        out["nodeSelector"] = dict(placement.node_selector)
    if placement.tolerations:
        out["tolerations"] = [t.to_wire() for t in placement.tolerations]
    return out


def child_metadata(owner: Manifest, name: str, component: str, **extra_labels: str) -> Manifest:
    meta = owner["metadata"]
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": labels(owner["kind"], meta["name"], component, **extra_labels),
        "ownerReferences": [owner_reference(owner)],
    }


TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # how status fields hold times (RFC 3339, UTC, seconds)


def now() -> str:
    return datetime.now(UTC).strftime(TIME_FORMAT)


def parse_time(value: str | None) -> datetime | None:
    return datetime.strptime(value, TIME_FORMAT).replace(tzinfo=UTC) if value else None


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    generation: int | None,
) -> list[Condition]:
    """Conditions with ``type_`` set; its lastTransitionTime changes only when its status does."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    out = [c for c in conditions if c.type != type_]
    previous = next((c for c in conditions if c.type == type_), None)
    since = previous.last_transition_time if previous and previous.status == value else now()
    out.append(
        Condition(
            type=type_,
            status=value,
            reason=reason,
            message=message,
            last_transition_time=since,
            observed_generation=generation,
        )
    )
    return sorted(out, key=lambda c: c.type)
