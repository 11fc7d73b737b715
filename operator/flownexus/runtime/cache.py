"""A watch-fed store of the objects the operator reads: its own kinds and every child it owns.

Passes read children from here instead of a GET per child per pass. The store is filled by a LIST at
start (so a pass never mistakes a not-yet-seen child for a missing one) and then by watch events, and
the client writes through it after every apply so that the next pass sees its own writes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from .client import Manifest

Key = tuple[str, str, str]  # kind, namespace, name


def key_of(obj: Manifest) -> Key:
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace") or "", meta["name"]


def _rv(obj: Manifest) -> int:
    # resourceVersions are opaque to clients, but they are etcd revisions: the ordering only breaks
    # ties between a write-through and a late watch event of an older version.
    try:
        return int(obj["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def slim(obj: Manifest) -> Manifest:
    """What the operator keeps of an object: without managedFields, kubectl's copy of the last applied spec,
    and a Job's pod template, which no pass reads and which are most of the bytes of a stored object (the
    cache holds two Jobs per TrainingJob)."""
    meta = obj.get("metadata") or {}
    kept = {k: v for k, v in meta.items() if k != "managedFields"}
    if LAST_APPLIED in (meta.get("annotations") or {}):
        kept["annotations"] = {k: v for k, v in meta["annotations"].items() if k != LAST_APPLIED}
    out = {**obj, "metadata": kept}
    if obj.get("kind") == "Job" and "template" in (obj.get("spec") or {}):
        out["spec"] = {k: v for k, v in obj["spec"].items() if k != "template"}
    return out


def controller_uid(obj: Manifest) -> str | None:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((r.get("uid") for r in refs if r.get("controller")), None)


def controller_name(obj: Manifest) -> str:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((f"{r['kind']} {r['name']}" for r in refs if r.get("controller")), "no controller")


class Cache:
    """Objects by kind, namespace and name; thread-safe; never hands out its own dicts to mutate.

    Stored per (kind, namespace), so that listing one namespace's objects of a kind costs what it returns.
    """

    def __init__(self) -> None:
        self._objects: dict[tuple[str, str], dict[str, Manifest]] = {}
        self._lock = threading.Lock()

    def upsert(self, obj: Manifest) -> bool:
        """Store ``obj`` unless a newer version is already there; True when it changed the store."""
        obj = slim(obj)
        kind, namespace, name = key_of(obj)
        with self._lock:
            bucket = self._objects.setdefault((kind, namespace), {})
            current = bucket.get(name)
            if current is not None and _rv(current) > _rv(obj):
                return False
            bucket[name] = obj
            return True

    def remove(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self._objects.get((kind, namespace), {}).pop(name, None)

    def replace_kind(self, kind: str, objects: Iterable[Manifest], listed_at: int) -> list[Key]:
        """The result of a LIST served at resourceVersion ``listed_at``: the kind's whole content.

        Objects the list no longer has disappear (a deletion the watch missed, e.g. across a reconnect),
        unless the cache saw them after the list was served; a cached version newer than the listed one
        stays. Returns the keys that disappeared.
        """
        fresh: dict[tuple[str, str], dict[str, Manifest]] = {}
        for obj in objects:
            k, namespace, name = key_of(obj)
            fresh.setdefault((k, namespace), {})[name] = slim(obj)
        gone: list[Key] = []
        with self._lock:
            for bucket_key in [b for b in self._objects if b[0] == kind]:
                old, new = self._objects[bucket_key], fresh.setdefault(bucket_key, {})
                for name, cached in old.items():
                    listed = new.get(name)
                    if listed is None and _rv(cached) <= listed_at:
                        gone.append((kind, bucket_key[1], name))
                    elif listed is None or _rv(cached) > _rv(listed):
                        new[name] = cached
            self._objects.update(fresh)
        return gone

    def get(self, kind: str, namespace: str, name: str) -> Manifest | None:
        with self._lock:
            return self._objects.get((kind, namespace), {}).get(name)

    def list(
        self, kind: str, namespace: str | None = None, where: Callable[[Manifest], bool] | None = None
    ) -> list[Manifest]:
        with self._lock:
            if namespace is not None:
                objs = list(self._objects.get((kind, namespace), {}).values())
            else:
                objs = [o for (k, _), bucket in self._objects.items() if k == kind for o in bucket.values()]
        return [o for o in objs if where is None or where(o)]
