"""The reconcile loop all three kinds share.

One pass of one object: read it from the watch-fed cache -> parse -> observe (children from the same
cache) -> decide (the kind's pure function) -> write status, only when it changed and with the
resourceVersion that was read (a Conflict re-runs the pass on a freshly read object) -> act on the
children -> post Events. Writing status before acting is deliberate: a crash between the two leaves a
status that says what was being done, and the next pass converges the children to it. Every trigger of
an object (its own watch, a child's, a timer) goes through one work queue per kind, so an object has one
pass at a time; each kind has its own threads, so a slow dependency of one kind (Prometheus) never holds
up another's passes.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import urllib3
from pydantic import BaseModel, ValidationError

from ..api.common import Condition, format_validation_error
from ..meta import set_condition
from ..metrics import RECONCILE_SECONDS, RECONCILES, count_finished
from .cache import Cache, controller_name, controller_uid
from .client import ApiError, Client, Conflict, Manifest, Ref
from .workqueue import WorkQueue

log = logging.getLogger(__name__)
APPLIED_HASH = "flownexus.io/applied-hash"
INIT_FIELD_MANAGER = "flownexus-operator-init"
CONFLICT_RETRY_S = 0.5
# Passes wait on the API server far more than they compute: threads per kind, not cores, bound the rate.
WORKERS = 16
UNREACHABLE_RETRY_S = 3.0
REJECTED = "ChildRejected"  # Stalled reason: the API server refused a write to a child
ERROR_RETRY_S = (1.0, 60.0)  # first and longest delay of the per-object backoff


# ---- what a pass decides to do ---------------------------------------------------------------------


@dataclass(frozen=True)
class Apply:
    """Server-side apply of a child. ``create_only``: apply only when it does not exist (immutable specs);
    ``initial``: fields set once at creation under another field manager, so that later applies never
    reset them (the stable Deployment's replicas, which the HPA owns from then on)."""

    manifest: Manifest
    create_only: bool = False
    initial: Manifest | None = None


@dataclass(frozen=True)
class Patch:
    """A merge patch of one field of a child we control (a Job's spec.suspend)."""

    kind: str
    name: str
    body: Manifest


@dataclass(frozen=True)
class Delete:
    kind: str
    name: str
    propagation: str = "Background"


@dataclass(frozen=True)
class Emit:
    """A Kubernetes Event on the reconciled object."""

    type: str
    reason: str
    message: str


Action = Apply | Patch | Delete | Emit


@dataclass
class Outcome:
    """The result of deciding: the whole status to hold (None: leave it), actions in order, a wake-up."""

    status: Manifest | None
    actions: list[Action] = field(default_factory=list)
    requeue_after: float | None = None


class InvalidSpec(Exception):
    """The spec can never work as written; ``lines`` name each field and value."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


def parse_spec(model: type[BaseModel], obj: Manifest) -> Any:
    try:
        return model.model_validate(obj.get("spec") or {})
    except ValidationError as exc:
        raise InvalidSpec(format_validation_error(exc)) from exc


class Reconciler(Protocol):
    kind: str
    # Status fields that pods write themselves: never compared, never overwritten.
    pod_owned_status: frozenset[str]

    def reconcile(self, obj: Manifest) -> Outcome: ...


# ---- status helpers on wire dicts --------------------------------------------------------------------


def with_condition(status: Manifest, type_: str, value: str, reason: str, message: str, generation: Any) -> Manifest:
    """``status`` (wire form) with one condition set, by the same rule as :func:`flownexus.meta.set_condition`."""
    out = copy.deepcopy(status)
    conditions = [Condition.model_validate(c) for c in out.get("conditions") or []]
    conditions = set_condition(conditions, type_, value, reason, message, generation)
    out["conditions"] = [c.model_dump(by_alias=True, exclude_none=True, mode="json") for c in conditions]
    return out


def without_condition(status: Manifest, type_: str) -> Manifest:
    """``status`` without the condition ``type_``: a copy when it had one, else ``status`` itself."""
    if _condition(status, type_) is None:
        return status
    out = copy.deepcopy(status)
    out["conditions"] = [c for c in out["conditions"] if c.get("type") != type_]
    return out


def manifest_hash(manifest: Manifest) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


# ---- the loop ----------------------------------------------------------------------------------------


class Controller:
    """Work queues, worker threads and the pass itself, for every registered kind."""

    def __init__(self, client: Client, cache: Cache, reconcilers: list[Reconciler], workers: int = WORKERS) -> None:
        self.client = client
        self.cache = cache
        self.reconcilers = {r.kind: r for r in reconcilers}
        self.workers = workers
        self.queues: dict[str, WorkQueue] = {}
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._failures: dict[tuple[str, str, str], int] = {}
        self._stale: set[tuple[str, str, str]] = set()

    async def start(self) -> None:
        for kind in self.reconcilers:
            self.queues[kind] = WorkQueue(kind)
            self._pools[kind] = ThreadPoolExecutor(self.workers, thread_name_prefix=f"fnx-{kind.lower()}")
            self._tasks += [asyncio.create_task(self._worker(kind)) for _ in range(self.workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    def enqueue(self, kind: str, namespace: str, name: str, after: float = 0) -> None:
        queue = self.queues.get(kind)
        if queue is not None:
            queue.add_after((namespace, name), after)

    async def _worker(self, kind: str) -> None:
        queue, loop = self.queues[kind], asyncio.get_running_loop()
        while True:
            key = await queue.get()
            namespace, name = str(key[0]), str(key[1])  # type: ignore[index]
            try:
                requeue = await loop.run_in_executor(self._pools[kind], self.run_pass, kind, namespace, name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures = self._failures.get((kind, namespace, name), 0) + 1
                self._failures[(kind, namespace, name)] = failures
                requeue = min(ERROR_RETRY_S[0] * 2 ** (failures - 1), ERROR_RETRY_S[1])
                if _unreachable(exc):
                    # The API server is away (restarting): look again soon, not after a minute of backoff.
                    requeue = min(requeue, UNREACHABLE_RETRY_S)
                log.exception("%s %s/%s: pass failed (retry in %.0fs)", kind, namespace, name, requeue)
            finally:
                queue.done(key)
            if requeue is not None:
                queue.add_after(key, requeue)

    def run_pass(self, kind: str, namespace: str, name: str) -> float | None:
        """One pass; returns when to look again (None: when something changes)."""
        started, result = time.perf_counter(), "error"
        try:
            requeue, result = self._pass(self.reconcilers[kind], namespace, name)
            self._failures.pop((kind, namespace, name), None)
            return requeue
        finally:
            RECONCILES.labels(kind, result).inc()
            RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)

    def _pass(self, rec: Reconciler, namespace: str, name: str) -> tuple[float | None, str]:
        """The pass and its result for the metrics: ok, gone, or conflict (decided on a stale object)."""
        key = (rec.kind, namespace, name)
        if key in self._stale:
            # The last write conflicted: the cache is behind the API server for this object; read it once.
            self._stale.discard(key)
            fresh = self.client.get(rec.kind, namespace, name)
            if fresh is None:
                self.cache.remove(rec.kind, namespace, name)
            else:
                self.cache.upsert(fresh)
        obj = self.cache.get(rec.kind, namespace, name)
        if obj is None:
            return None, "gone"
        if obj["metadata"].get("deletionTimestamp"):
            return None, "gone"
        try:
            outcome = rec.reconcile(obj)
        except InvalidSpec as exc:
            outcome = _invalid(obj, exc.lines)
        outcome = self._check_ownership(obj, outcome)

        if outcome.status is not None:
            desired = {k: v for k, v in outcome.status.items() if k not in rec.pod_owned_status}
            if desired != _own_status(obj, rec):
                pods = {k: v for k, v in (obj.get("status") or {}).items() if k in rec.pod_owned_status}
                try:
                    written = self.client.replace_status(obj, {**desired, **pods})
                except Conflict:
                    log.debug("%s %s/%s: status conflict, deciding again", rec.kind, namespace, name)
                    self._stale.add(key)
                    return CONFLICT_RETRY_S, "conflict"
                self.cache.upsert(written)
                count_finished(obj, written)  # a TrainingJob that this write finished, once
                obj = written
        for action in outcome.actions:
            try:
                self._act(obj, action)
            except Conflict:
                raise
            except ApiError as exc:
                # The API server refused a child (admission, quota, RBAC, a schema): say so in status, then
                # retry with backoff. Nothing else of this pass is done: later actions depend on earlier ones.
                self._report_rejected(rec, obj, action, exc)
                raise
        stalled = _condition(obj.get("status"), "Stalled")
        if stalled is not None and stalled.get("reason") == REJECTED and stalled.get("status") == "True":
            status = without_condition(obj["status"], "Stalled")
            try:
                self.cache.upsert(self.client.replace_status(obj, status))
            except Conflict:
                self._stale.add(key)
                return CONFLICT_RETRY_S, "conflict"
        return outcome.requeue_after, "ok"

    def _report_rejected(self, rec: Reconciler, obj: Manifest, action: Action, exc: ApiError) -> None:
        """``Stalled=True, reason ChildRejected`` naming the child and the API server's answer, and one
        Warning Event per new answer; cleared by the next pass whose actions all land."""
        if isinstance(action, Apply):
            what = f"{action.manifest['kind']} {action.manifest['metadata']['name']}"
        elif isinstance(action, Patch | Delete):
            what = f"{action.kind} {action.name}"
        else:
            what = "the Event"
        verb = {Apply: "creating or updating", Patch: "patching", Delete: "deleting"}.get(type(action), "posting")
        message = f"{verb} {what} was refused ({exc.status} {exc.reason}): {exc}"[:1000]
        previous = _condition(obj.get("status"), "Stalled")
        if previous is not None and previous.get("message") == message:
            return
        generation = obj["metadata"].get("generation")
        status = with_condition(obj.get("status") or {}, "Stalled", "True", REJECTED, message, generation)
        try:
            self.cache.upsert(self.client.replace_status(obj, status))
            self.client.post_event(obj, "Warning", REJECTED, message)
        except ApiError as again:
            log.warning("%s %s: could not report %r: %s", rec.kind, obj["metadata"]["name"], message, again)

    # ---- acting on children ----------------------------------------------------------------------

    def _check_ownership(self, obj: Manifest, outcome: Outcome) -> Outcome:
        """A child name taken by an object we do not control stops the pass with a condition naming the
        owner; nothing is written to the foreign object."""
        uid, ns = obj["metadata"]["uid"], obj["metadata"]["namespace"]
        taken = []
        for action in outcome.actions:
            if isinstance(action, Apply):
                kind, name = action.manifest["kind"], action.manifest["metadata"]["name"]
            elif isinstance(action, Patch | Delete):
                kind, name = action.kind, action.name
            else:
                continue
            if (kind, name) == (obj["kind"], obj["metadata"]["name"]):
                continue  # the object itself (a TrainingJob past its TTL)
            child = self.cache.get(kind, ns, name)
            if child is not None and controller_uid(child) != uid:
                taken.append(f"{kind} {ns}/{name} already exists and belongs to {controller_name(child)}")
        status = outcome.status if outcome.status is not None else _own_status(obj, self.reconcilers[obj["kind"]])
        generation = obj["metadata"].get("generation")
        if not taken:
            stalled = _condition(status, "Stalled")
            if stalled is not None and stalled.get("reason") == "OwnershipConflict":
                outcome.status = without_condition(status, "Stalled")
            return outcome
        message = "; ".join(taken) + "; rename one of them"
        stalled = with_condition(status, "Stalled", "True", "OwnershipConflict", message, generation)
        actions: list[Action] = []
        if _condition(obj.get("status"), "Stalled") is None:
            actions.append(Emit("Warning", "OwnershipConflict", message))
        return Outcome(status=stalled, actions=actions, requeue_after=60)

    def _act(self, obj: Manifest, action: Action) -> None:
        ns = obj["metadata"]["namespace"]
        if isinstance(action, Emit):
            self.client.post_event(obj, action.type, action.reason, action.message)
        elif isinstance(action, Apply):
            self._apply(ns, action)
        elif isinstance(action, Patch):
            self.cache.upsert(self.client.merge_patch(action.kind, ns, action.name, action.body))
        else:
            child = self.cache.get(action.kind, ns, action.name)
            if child is None:
                return
            meta = child["metadata"]
            if meta.get("deletionTimestamp"):
                return  # already on its way out
            self.client.delete(Ref(action.kind, ns, action.name, meta.get("uid")), action.propagation)

    def _apply(self, ns: str, action: Apply) -> None:
        manifest = action.manifest
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        cached = self.cache.get(kind, ns, name)
        if cached is not None and action.create_only:
            return
        digest = manifest_hash(manifest)
        if cached is not None and (cached["metadata"].get("annotations") or {}).get(APPLIED_HASH) == digest:
            return
        body = copy.deepcopy(manifest)
        body["metadata"].setdefault("annotations", {})[APPLIED_HASH] = digest
        try:
            applied = self.client.apply(body)
        except ApiError as exc:
            raise ApiError(exc.status, f"{kind} {ns}/{name}: {exc}", exc.reason) from None
        if cached is None and action.initial is not None:
            initial = {"apiVersion": manifest["apiVersion"], "kind": kind,
                       "metadata": {"name": name, "namespace": ns}, **action.initial}  # fmt: skip
            applied = self.client.apply(initial, INIT_FIELD_MANAGER)
        self.cache.upsert(applied)


def _unreachable(exc: BaseException | None) -> bool:
    """A connection that failed (refused, reset, timed out), as opposed to an answer from the API server."""
    return isinstance(exc, OSError | urllib3.exceptions.HTTPError) and not isinstance(exc, ApiError)


def _condition(status: Manifest | None, type_: str) -> Manifest | None:
    """The condition ``type_`` of a status (wire form), if it has one."""
    return next((c for c in (status or {}).get("conditions") or [] if c.get("type") == type_), None)


def _own_status(obj: Manifest, rec: Reconciler) -> Manifest:
    return {k: v for k, v in (obj.get("status") or {}).items() if k not in rec.pod_owned_status}


def _invalid(obj: Manifest, lines: list[str]) -> Outcome:
    """Every kind reports a spec that can never work the same way: phase Failed, reason InvalidSpec, Stalled."""
    status = copy.deepcopy(obj.get("status") or {})
    generation = obj["metadata"].get("generation")
    message = "; ".join(lines)
    status.update(phase="Failed", reason="InvalidSpec", message=message, observedGeneration=generation)
    status = with_condition(status, "Stalled", "True", "InvalidSpec", message, generation)
    seen = (obj.get("status") or {}).get("reason") == "InvalidSpec" and (obj.get("status") or {}).get(
        "message"
    ) == message
    return Outcome(status=status, actions=[] if seen else [Emit("Warning", "InvalidSpec", message)])
