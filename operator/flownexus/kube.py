"""The one place that talks to the Kubernetes API: idempotent create-or-patch, get, list, delete.

Every write goes through :func:`ensure`, which treats 409 Conflict on create as "already there"
and converges the existing object with a merge patch, so handlers can be re-run at any time.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from kubernetes import client, config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError

log = logging.getLogger(__name__)
Manifest = dict[str, Any]


@functools.cache
def dynamic() -> DynamicClient:
    """A dynamic client for the current kubeconfig, or the in-cluster service account."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return DynamicClient(client.ApiClient())


def _resource(api_version: str, kind: str) -> Any:
    return dynamic().resources.get(api_version=api_version, kind=kind)


def get(api_version: str, kind: str, namespace: str, name: str) -> Manifest | None:
    """The object as a dict, or None when it does not exist."""
    try:
        obj = _resource(api_version, kind).get(name=name, namespace=namespace)
    except NotFoundError:
        return None
    result: Manifest = obj.to_dict()
    return result


def list_objects(api_version: str, kind: str, namespace: str, label_selector: str = "") -> list[Manifest]:
    """Objects of a kind in a namespace, optionally filtered by labels."""
    items = _resource(api_version, kind).get(namespace=namespace, label_selector=label_selector).items
    return [item.to_dict() for item in items]


def ensure(manifest: Manifest, *, patch_existing: bool = True) -> Manifest:
    """Create the object; if it exists (409), merge-patch it to the desired state (or leave it)."""
    meta = manifest["metadata"]
    resource = _resource(manifest["apiVersion"], manifest["kind"])
    try:
        created: Manifest = resource.create(body=manifest, namespace=meta.get("namespace")).to_dict()
        log.info("created %s %s/%s", manifest["kind"], meta.get("namespace"), meta["name"])
        return created
    except ConflictError:
        current = get(manifest["apiVersion"], manifest["kind"], meta.get("namespace", ""), meta["name"])
        if current is not None:
            _check_controller(manifest, current)
        if not patch_existing:
            return current or manifest
        patched: Manifest = resource.patch(
            body=manifest,
            name=meta["name"],
            namespace=meta.get("namespace"),
            content_type="application/merge-patch+json",
        ).to_dict()
        return patched


class OwnershipConflict(RuntimeError):
    """A child's name is taken by an object that another controller owns (or nobody does)."""


def _controller_uid(obj: Manifest) -> str | None:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((r.get("uid") for r in refs if r.get("controller")), None)


def _check_controller(desired: Manifest, current: Manifest) -> None:
    """Never adopt or overwrite an object that is not ours: say whose it is instead."""
    want = _controller_uid(desired)
    have = _controller_uid(current)
    if want is None or want == have:
        return
    meta = current["metadata"]
    owner = next((f"{r['kind']} {r['name']}" for r in meta.get("ownerReferences") or [] if r.get("controller")),
                 "no controller")  # fmt: skip
    raise OwnershipConflict(
        f"{desired['kind']} {meta.get('namespace')}/{meta['name']} already exists and belongs to {owner}; "
        "rename one of them"
    )


def patch(api_version: str, kind: str, namespace: str, name: str, body: Manifest) -> Manifest:
    """Merge-patch part of an existing object (``None`` values remove keys, e.g. from a selector)."""
    patched: Manifest = (
        _resource(api_version, kind)
        .patch(body=body, name=name, namespace=namespace, content_type="application/merge-patch+json")
        .to_dict()
    )
    return patched


def delete(api_version: str, kind: str, namespace: str, name: str, *, propagation: str = "Background") -> bool:
    """Delete the object; False when it was already gone."""
    try:
        _resource(api_version, kind).delete(name=name, namespace=namespace, body={"propagationPolicy": propagation})
    except NotFoundError:
        return False
    return True


def patch_status(api_version: str, kind: str, namespace: str, name: str, status: Manifest) -> None:
    """Merge-patch the status subresource of an object the handler does not own the patch of."""
    _resource(api_version, kind).status.patch(
        body={"status": status}, name=name, namespace=namespace, content_type="application/merge-patch+json"
    )
