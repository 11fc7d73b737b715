"""Kopf registrations only: every watch event updates the cache and queues the objects it concerns.

Kopf is the watch layer (and the health endpoint, signals); the passes themselves run in the
shared loop of :mod:`flownexus.runtime.controller`. No handler here changes an object, so Kopf keeps no
bookkeeping annotations or finalizers on ours: a TrainingJob copied with `kubectl get -o yaml` is an
ordinary new object.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from dataclasses import dataclass
from typing import Any

import kopf

from .meta import Manifest
from .modeldeployment.keda import ApiScaledObjects
from .modeldeployment.reconciler import ModelDeploymentReconciler
from .neuralcluster.reconciler import NeuralClusterReconciler
from .runtime.cache import Cache, controller_uid
from .runtime.client import PLURALS, Client
from .runtime.controller import Controller
from .settings import Settings
from .trainingjob.decide import FINISHED, cluster_of, uses_capacity
from .trainingjob.reconciler import POD_OWNED_STATUS, Admission, TrainingJobReconciler

log = logging.getLogger(__name__)
PRIMARY = ("NeuralCluster", "TrainingJob", "ModelDeployment")
# Children read from the cache (with the label every child carries, except adopted PVCs).
CHILDREN = ("Job", "Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy", "PersistentVolumeClaim")  # fmt: skip
PART_OF = {"app.kubernetes.io/part-of": "flownexus"}
COUNT_REFRESH_S = 2.0  # a NeuralCluster's job and deployment counts lag by at most this
RESYNC_S = 300.0  # how often every kind is re-listed
_SETTINGS: Settings | None = None


def configure(settings: Settings) -> None:
    """Remember the process settings for the startup handler."""
    global _SETTINGS
    _SETTINGS = settings


@dataclass
class Runtime:
    client: Client
    cache: Cache
    controller: Controller
    admission: Admission
    resync: asyncio.Task[None]


RUNTIME: Runtime | None = None


def _namespaces() -> list[str]:
    return list(_SETTINGS.namespaces) if _SETTINGS is not None else []


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[!")


def _in_scope(namespace: str) -> bool:
    patterns = _namespaces()
    return not patterns or any(fnmatch.fnmatch(namespace, p) for p in patterns)


def _prime(client: Client, cache: Cache) -> list[tuple[str, str, str]]:
    """LIST every kind: at start, before any pass runs, so that no pass mistakes an unseen child for a missing
    one; then every RESYNC_S, so that a deletion the watch missed (across a reconnect) does not linger.
    Returns what disappeared."""
    plain = [p for p in _namespaces() if not _is_glob(p)]
    per_namespace = bool(plain) and len(plain) == len(_namespaces())
    gone = []
    for kind in (*PRIMARY, *CHILDREN):
        selector = "" if kind in (*PRIMARY, "PersistentVolumeClaim") else "app.kubernetes.io/part-of=flownexus"
        if per_namespace:
            lists = [client.list_at(kind, ns, selector) for ns in plain]
        else:
            items, at = client.list_at(kind, None, selector)
            lists = [([o for o in items if _in_scope(o["metadata"].get("namespace", ""))], at)]
        items = [o for batch, _ in lists for o in batch]
        gone += cache.replace_kind(kind, items, min(at for _, at in lists))
    return gone


async def _resync(client: Client, cache: Cache, controller: Controller) -> None:
    """Periodically re-list; the objects whose children vanished unseen get a pass."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(RESYNC_S)
        try:
            gone = await loop.run_in_executor(None, _prime, client, cache)
        except Exception:
            log.exception("resync failed; next try in %.0fs", RESYNC_S)
            continue
        for kind, namespace, name in gone:
            if kind in PRIMARY:
                _SEEN.pop((kind, namespace, name), None)
                continue
            for owner_kind in ("TrainingJob", "ModelDeployment", "NeuralCluster"):
                for owner in cache.list(owner_kind, namespace):
                    controller.enqueue(owner_kind, namespace, owner["metadata"]["name"])


class _NoDiffBase(kopf.DiffBaseStorage):
    """Kopf keeps an "essence" of every object to detect changes for on.create/on.update handlers; there are
    none here, so building it (a deep copy per watch event) is skipped and nothing is ever stored."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global RUNTIME
    settings.posting.enabled = False  # our Events come from the passes, after the status write
    settings.persistence.diffbase_storage = _NoDiffBase()
    # Every watch event is a "handler succeeded" line at INFO otherwise; the passes log what matters.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings.watching.server_timeout = 300
    # An API server that restarts (an upgrade, a crash) is retried every 5 s for 10 minutes instead of
    # Kopf's default of 8 tries over 54 s: the watches come back within seconds of it, never give up early.
    settings.networking.error_backoffs = [1, 1, 2, 3, *([5] * 120)]
    # Named namespaces need no cluster-wide reads: the resources are found once through discovery and the
    # namespaces are taken as given, so the chart grants only Roles there (no CRD or namespace watches).
    settings.scanning.disabled = bool(_namespaces()) and not any(_is_glob(p) for p in _namespaces())
    client = Client.from_environment()
    cache = Cache()
    admission = Admission(cache)
    controller = Controller(
        client,
        cache,
        [
            NeuralClusterReconciler(cache),
            TrainingJobReconciler(client, cache, admission),
            ModelDeploymentReconciler(cache, scaled_objects=ApiScaledObjects(client)),
        ],
    )
    await asyncio.get_running_loop().run_in_executor(None, _prime, client, cache)
    await controller.start()
    RUNTIME = Runtime(client, cache, controller, admission, asyncio.create_task(_resync(client, cache, controller)))
    for kind in PRIMARY:
        for obj in cache.list(kind):
            controller.enqueue(kind, obj["metadata"]["namespace"], obj["metadata"]["name"])
    scope = "cluster-wide" if not _namespaces() else ", ".join(_namespaces())
    log.info("flownexus operator started (%s); %d objects cached", scope, sum(len(cache.list(k)) for k in PRIMARY))


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if RUNTIME is not None:
        RUNTIME.resync.cancel()
        await RUNTIME.controller.stop()


# ---- which passes an event concerns ------------------------------------------------------------------


def _unchanged(old: Manifest | None, new: Manifest) -> bool:
    """Our own write coming back through the watch (the cache already holds that version)."""
    return old is not None and old["metadata"].get("resourceVersion") == new["metadata"].get("resourceVersion")


def _only_progress(old: Manifest | None, new: Manifest) -> bool:
    """Only the fields rank 0 patches (live metrics) changed: nothing for the operator to decide."""
    if (
        old is None
        or old.get("spec") != new.get("spec")
        or old["metadata"].get("deletionTimestamp") != new["metadata"].get("deletionTimestamp")
    ):
        return False
    return _decided_status(old) == _decided_status(new)


def _decided_status(obj: Manifest) -> Manifest:
    return {k: v for k, v in (obj.get("status") or {}).items() if k not in POD_OWNED_STATUS}


# What dependents of a primary object care about, as last seen through its watch (our own writes included:
# the write-through cache would hide their transitions).
_SEEN: dict[tuple[str, str, str], tuple[Any, ...]] = {}


def _signature(kind: str, obj: Manifest) -> tuple[Any, ...]:
    status = obj.get("status") or {}
    if kind == "TrainingJob":
        return uses_capacity(obj), status.get("phase")
    if kind == "NeuralCluster":
        return obj.get("spec"), status.get("phase")
    return (True,)  # a ModelDeployment: only its coming and going matters to its NeuralCluster


def _observe(event: kopf.RawEvent) -> None:
    rt = RUNTIME
    if rt is None:
        return
    obj: Manifest = dict(event["object"])
    kind, meta = obj.get("kind", ""), obj.get("metadata") or {}
    namespace, name = meta.get("namespace", ""), meta.get("name", "")
    if not namespace or not _in_scope(namespace):
        return
    deleted = event.get("type") == "DELETED"
    cached = rt.cache.get(kind, namespace, name)
    own_write = not deleted and _unchanged(cached, obj)
    if deleted:
        rt.cache.remove(kind, namespace, name)
    else:
        rt.cache.upsert(obj)
    enqueue = rt.controller.enqueue
    if kind not in PRIMARY:
        owner = next((r for r in meta.get("ownerReferences") or [] if r.get("controller")), None)
        if not own_write and owner is not None and owner.get("kind") in PRIMARY and controller_uid(obj):
            enqueue(owner["kind"], namespace, owner["name"])
        return

    key = (kind, namespace, name)
    before = _SEEN.pop(key, None) if deleted else _SEEN.get(key)
    after = None if deleted else _signature(kind, obj)
    if after is not None:
        _SEEN[key] = after
    if not own_write and not (kind == "TrainingJob" and _only_progress(cached, obj)):
        enqueue(kind, namespace, name)
    if before == after:
        return
    cluster = cluster_of(obj)
    if kind == "TrainingJob":
        was_active, old_phase = before if before is not None else (False, None)
        now_active, phase = after if after is not None else (False, None)
        if was_active != now_active or before is None or after is None:
            # Its count of active jobs: a burst of jobs starting or ending becomes one pass, not one each.
            enqueue("NeuralCluster", namespace, cluster, after=COUNT_REFRESH_S)
        if after is None or (was_active and not now_active) or (phase in FINISHED and old_phase not in FINISHED):
            for waiting in rt.admission.waiting_jobs(namespace, cluster):  # a slot may be free
                enqueue(kind, namespace, waiting)
        if phase != old_phase:
            for md in rt.cache.list("ModelDeployment", namespace):
                ref = ((md.get("spec") or {}).get("model") or {}).get("trainingJobRef") or {}
                if ref.get("name") == name:
                    enqueue("ModelDeployment", namespace, md["metadata"]["name"])
    elif kind == "NeuralCluster":
        for other in ("TrainingJob", "ModelDeployment"):
            for o in rt.cache.list(other, namespace, where=lambda o: cluster_of(o) == name):
                enqueue(other, namespace, o["metadata"]["name"])
    elif before is None or after is None:
        enqueue("NeuralCluster", namespace, cluster, after=COUNT_REFRESH_S)  # its count of deployments


def _register() -> None:
    for kind in (*PRIMARY, *CHILDREN):
        api_version, plural = PLURALS[kind]
        group, _, version = api_version.rpartition("/")
        labels = None if kind in (*PRIMARY, "PersistentVolumeClaim") else PART_OF

        async def on_event(event: kopf.RawEvent, _kind: str = kind, _api: str = api_version, **_: Any) -> None:
            obj = dict(event["object"])
            obj.setdefault("kind", _kind)
            obj.setdefault("apiVersion", _api)
            _observe({"type": event.get("type"), "object": obj})  # type: ignore[typeddict-item]

        register = kopf.on.event(group, version, plural, labels=labels, id=f"watch-{kind.lower()}")
        register(on_event)


_register()
