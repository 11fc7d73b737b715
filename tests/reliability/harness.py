"""What the reliability tests share: the operator as a process they can SIGKILL and start again, the API
server's audit log (every create and delete anyone sent), a poller that checks invariants on every snapshot it
takes, a restart of the dev cluster's kube-apiserver, and the operator's own loop run pass by pass in this process
(to crash it at an exact point: after a pass recorded its status, before it acted).

The dev cluster (dev/cluster) writes an audit log of every request (metadata only) to
``<checkout>/.local/logs/audit.log``; the tests read it from a mark taken before they start, so "no object was
ever created twice" is checked against what the API server really answered, not against what a poller happened
to see.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from dev.localcluster import procs
from dev.localcluster.config import Layout

from flownexus.handlers import CHILDREN, PRIMARY
from flownexus.modeldeployment.reconciler import ModelDeploymentReconciler
from flownexus.neuralcluster.reconciler import NeuralClusterReconciler
from flownexus.prometheus import HttpPrometheus
from flownexus.runtime.cache import Cache
from flownexus.runtime.client import Client, Manifest
from flownexus.runtime.controller import Action, Controller
from flownexus.trainingjob.reconciler import Admission, TrainingJobReconciler
from tests.e2e.conftest import REPO, Cluster, _free_port, create_namespace

OPERATOR_AGENT = "flownexus-operator/"
TEST_AGENT = "flownexus-reliability-tests"
FINAL = {"Succeeded", "Failed"}


def log(message: str) -> None:
    """A line in the test's output (`pytest -s` shows them as they happen; the report keeps them otherwise)."""
    print(f"[reliability {time.strftime('%H:%M:%S')}] {message}", flush=True)


def layout_of(cluster: Cluster) -> Layout:
    """The Layout of the checkout whose cluster runs (possibly another checkout's): `<repo>/.local/kubeconfig`."""
    return Layout(repo=cluster.kubeconfig.resolve().parent.parent)


def api_client(cluster: Cluster) -> Client:
    """A client for the test's own reads and writes, told apart from the operator by its user agent."""
    return Client.from_kubeconfig(str(cluster.kubeconfig), user_agent=TEST_AGENT)


# ---- the operator as a process -----------------------------------------------------------------------------


class OperatorProcess:
    """`python -m flownexus --namespace <ns>` against the cluster, started again after every SIGKILL.

    Every start appends to one log file, after a marker line naming the start and its pid.
    """

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_path = REPO / ".local" / "logs" / f"operator-reliability-{namespace}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.health_port = 0
        self.metrics_port = 0
        self.starts = 0
        self.started_at = 0.0
        self.pids: list[int] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "the operator still runs"
        self.metrics_port, self.health_port = _free_port(), _free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), os.environ.get("PYTHONPATH", "")]),
        }
        self.starts += 1
        with open(self.log_path, "ab") as out:
            out.write(f"===== reliability: operator start {self.starts} at {time.strftime('%T')} =====\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flownexus", "--namespace", self.namespace,
                 "--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port)],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.started_at = time.monotonic()
        self.pids.append(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        if not self.alive():
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if not self.alive():
                pytest.fail(f"the operator exited ({self.proc and self.proc.returncode}); log: {self.log_path}")
            if time.monotonic() > deadline:
                pytest.fail(f"the operator's /healthz did not answer in {timeout:.0f}s; log: {self.log_path}")
            time.sleep(0.2)

    def sigkill(self) -> None:
        """SIGKILL, by pid: no cleanup handler runs, in-flight requests are cut off."""
        assert self.proc is not None and self.proc.poll() is None, "the operator is not running"
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_lines(self, *needles: str) -> list[str]:
        """Lines of the operator's log that contain any of ``needles``."""
        if not self.log_path.exists():
            return []
        text = self.log_path.read_text(errors="replace").splitlines()
        return [line for line in text if any(n in line for n in needles)]

    def tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class OperatorCrash(Exception):
    """Raised in place of the first action of a pass: the process died after recording, before acting."""


class PassByPass:
    """The operator's own loop (client, cache, reconcilers, Controller.run_pass) in this process, one pass at a
    time, as tests/realapi's Harness drives it, but against the dev cluster (its Deployment controller and KWOK
    are real). ``crash_after_record`` runs a pass that writes its status and dies before its first action."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        self.namespace = namespace
        self.client = Client.from_kubeconfig(str(kubeconfig))  # the operator's user agent: audited as the operator
        self.cache = Cache()
        self.controller = Controller(
            self.client,
            self.cache,
            [
                NeuralClusterReconciler(self.cache),
                TrainingJobReconciler(self.client, self.cache, Admission(self.cache)),
                ModelDeploymentReconciler(self.cache, HttpPrometheus),
            ],
        )

    def sync(self) -> None:
        """What a synced informer holds: every kind the operator caches, listed now."""
        for kind in (*PRIMARY, *CHILDREN):
            self.cache.replace_kind(kind, *self.client.list_at(kind, self.namespace))

    def run_pass(self, kind: str, name: str) -> None:
        self.sync()
        self.controller.run_pass(kind, self.namespace, name)

    def crash_after_record(self, kind: str, name: str) -> None:
        def crash(obj: Manifest, action: Action) -> None:
            raise OperatorCrash(f"killed before {action}")

        self.controller._act = crash  # type: ignore[method-assign]
        try:
            self.run_pass(kind, name)
        except OperatorCrash:
            pass
        finally:
            del self.controller._act


# ---- the API server's audit log ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditMark:
    inode: int
    offset: int


class AuditLog:
    """Reads the dev cluster's audit log (JSON lines, metadata level) from a mark on, across one rotation."""

    def __init__(self, layout: Layout) -> None:
        self.path = layout.logs / "audit.log"
        if not self.path.exists():
            pytest.fail(f"{self.path} is missing: the dev cluster's API server writes it (dev/cluster up)")

    def mark(self) -> AuditMark:
        st = self.path.stat()
        return AuditMark(st.st_ino, st.st_size)

    def events(self, since: AuditMark, namespace: str) -> list[dict[str, Any]]:
        """Every completed request on objects in ``namespace`` since the mark (watches and reads included)."""
        files: list[tuple[Path, int]] = []
        offset = since.offset
        if self.path.stat().st_ino != since.inode:  # rotated since the mark: the old file is a backup now
            files += [(p, offset) for p in self.path.parent.glob("audit-*.log") if p.stat().st_ino == since.inode]
            offset = 0
        files.append((self.path, offset))
        needle = f'"namespace":"{namespace}"'
        out = []
        for path, start in files:
            with path.open(errors="replace") as f:
                f.seek(start)
                for line in f:
                    if needle not in line:
                        continue
                    try:
                        event = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # the line being written at the mark
                    if (
                        event.get("stage") == "ResponseComplete"
                        and (event.get("objectRef") or {}).get("namespace") == namespace
                    ):
                        out.append(event)
        return out


def code(event: dict[str, Any]) -> int:
    return int((event.get("responseStatus") or {}).get("code") or 0)


def is_operator(event: dict[str, Any]) -> bool:
    return str(event.get("userAgent", "")).startswith(OPERATOR_AGENT)


def creations(events: list[dict[str, Any]], *, cut_off: bool = False) -> Counter[tuple[str, str]]:
    """(resource, name) -> how many times the API server answered 201 Created for it (a create, or an apply that
    created). Events are left out: each has a generated name.

    With ``cut_off``, also the creating requests whose client went away before the answer (504, "context
    canceled": a SIGKILL in the middle of a request): the object may or may not have been stored.
    """
    out: Counter[tuple[str, str]] = Counter()
    codes = (201, 504) if cut_off else (201,)
    for e in events:
        ref = e.get("objectRef") or {}
        created = e.get("verb") in ("create", "patch", "update") and code(e) in codes and not ref.get("subresource")
        if created and ref.get("resource") != "events":
            out[(ref.get("resource", ""), ref.get("name", ""))] += 1
    return out


def deletions(events: list[dict[str, Any]], resource: str) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e.get("verb") == "delete" and (e.get("objectRef") or {}).get("resource") == resource and code(e) < 300
    ]


def audit_time(event: dict[str, Any]) -> float:
    """When the API server received the request, as a Unix time."""
    return datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()


def first_operator_write_after(
    events: list[dict[str, Any]], after: float, where: Callable[[dict[str, Any]], bool] = lambda e: True
) -> dict[str, Any] | None:
    """The first write of the operator that the API server accepted at or after ``after`` (and ``where`` holds)."""
    writes = [
        e
        for e in events
        if is_operator(e)
        and e.get("verb") in ("create", "update", "patch", "delete")
        and 200 <= code(e) < 300
        and audit_time(e) >= after
        and where(e)
    ]
    return min(writes, key=audit_time) if writes else None


def status_write_of(names: set[str]) -> Callable[[dict[str, Any]], bool]:
    """An audit event that writes the status of one of the TrainingJobs ``names``."""

    def check(e: dict[str, Any]) -> bool:
        ref = e.get("objectRef") or {}
        return ref.get("resource") == "trainingjobs" and ref.get("subresource") == "status" and ref.get("name") in names

    return check


# ---- a poller that checks invariants on every snapshot -----------------------------------------------------


@dataclass
class Snapshot:
    at: float  # time.time()
    objects: dict[str, list[Manifest]]  # kind -> items


@dataclass
class Poller:
    """Lists some kinds in one namespace every ``interval`` seconds in a thread and hands every snapshot to
    ``checks`` (each list is one consistent read). API errors (the API server restarting) are counted, not
    raised. ``uids`` keeps every uid ever seen per (kind, name)."""

    client: Client
    namespace: str
    kinds: tuple[str, ...]
    interval: float = 0.25
    checks: list[Callable[[Snapshot], None]] = field(default_factory=list)
    uids: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    latest: Snapshot | None = None
    snapshots: int = 0
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    # The thread and a test's own poll_once() take turns: snapshots reach the checks in the order they were read.
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def poll_once(self) -> Snapshot | None:
        with self._lock:
            try:
                objects = {kind: self.client.list(kind, self.namespace) for kind in self.kinds}
            except Exception:  # an unreachable or restarting API server: try again next round
                self.errors += 1
                return None
            snap = Snapshot(time.time(), objects)
            for kind, items in objects.items():
                for obj in items:
                    self.uids.setdefault((kind, obj["metadata"]["name"]), set()).add(obj["metadata"]["uid"])
            for check in self.checks:
                check(snap)
            self.latest = snap
            self.snapshots += 1
            return snap

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval)

    def __enter__(self) -> Poller:
        self._thread = threading.Thread(target=self._run, name=f"poller-{self.namespace}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


# ---- TrainingJob invariants --------------------------------------------------------------------------------

# The order a TrainingJob's phase may only move forward in (no worker fails on KWOK, so no Restarting).
PHASE_RANK = {"": 0, "Pending": 1, "Created": 2, "Running": 3, "Validating": 4, "Succeeded": 5, "Failed": 5}


@dataclass
class TrainingJobInvariants:
    """Checked on every snapshot: at most ``limit`` admitted, unfinished jobs at once; a phase never moves
    back; a final phase never changes; no attempt beyond ``max_attempt``. Violations are collected (the poller
    thread must not raise), and asserted by the test."""

    limit: int
    max_attempt: int = 1
    history: dict[str, list[str]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    max_active: int = 0

    def __call__(self, snap: Snapshot) -> None:
        active = 0
        for tj in snap.objects.get("TrainingJob", []):
            name, status = tj["metadata"]["name"], tj.get("status") or {}
            phase, attempt = str(status.get("phase") or ""), int(status.get("attempt") or 0)
            seen = self.history.setdefault(name, [])
            if not seen or seen[-1] != phase:
                if seen and seen[-1] in FINAL:
                    self.violations.append(f"{name}: final phase {seen[-1]} changed to {phase!r}")
                elif seen and PHASE_RANK.get(phase, -1) < PHASE_RANK.get(seen[-1], -1):
                    self.violations.append(f"{name}: phase moved back {seen[-1]} -> {phase!r}")
                seen.append(phase)
            if attempt > self.max_attempt:
                self.violations.append(f"{name}: attempt {attempt} (no worker ever fails on KWOK)")
            if attempt >= 1 and phase not in FINAL:
                active += 1
        self.max_active = max(self.max_active, active)
        if active > self.limit:
            self.violations.append(f"{active} admitted unfinished jobs at once, limit {self.limit}")


def phase_counts(snap: Snapshot | None) -> dict[str, int]:
    if snap is None:
        return {}
    counts = Counter(str((tj.get("status") or {}).get("phase") or "(none)") for tj in snap.objects["TrainingJob"])
    return dict(sorted(counts.items()))


# ---- objects -----------------------------------------------------------------------------------------------

KWOK_PLACEMENT = {
    "nodeSelector": {"type": "kwok"},
    "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
}


def neural_cluster(name: str, max_concurrent: int, **extra: Any) -> Manifest:
    """A NeuralCluster whose training (and serving) pods land on the KWOK fake nodes, as in
    bench/trainingjob_scale.py: KWOK runs every pod and completes Job pods at once."""
    return {
        "apiVersion": "flownexus.io/v1alpha1",
        "kind": "NeuralCluster",
        "metadata": {"name": name},
        "spec": {
            "artifactStore": {"size": "1Gi"},
            "training": KWOK_PLACEMENT,
            "serving": KWOK_PLACEMENT,
            "limits": {"maxConcurrentTrainingJobs": max_concurrent, "maxWorkersPerJob": 4},
            **extra,
        },
    }


def training_job(name: str, cluster: str) -> Manifest:
    """The smallest TrainingJob (bench/trainingjob_scale.py's): one worker, iris, an MLP."""
    return {
        "apiVersion": "flownexus.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {"clusterRef": {"name": cluster}, "model": {"architecture": "mlp"},
                 "dataset": {"source": "builtin", "name": "iris"}, "distributed": {"workers": 1}},
    }  # fmt: skip


def create(cluster: Cluster, namespace: str, *objects: Manifest) -> None:
    """`kubectl create` of a List: one POST per object."""
    cluster.kubectl(
        "-n", namespace, "create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.25) -> float:
    """Poll until ``check`` holds; the seconds it took. Fails the test after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


# ---- restarting the dev cluster's kube-apiserver -----------------------------------------------------------


# kube-apiserver v1.36 stops listening within a few ms of SIGTERM but then did not exit for 20 s here; what the
# clients see is the same either way, so do not keep the cluster down for it.
STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class Restart:
    stop_began: float  # time.time() at SIGTERM
    stopped: float  # the old process is gone
    ready: float  # the new one answers /readyz with ok
    old_pid: int
    new_pid: int


def apiserver_ready(cluster: Cluster) -> bool:
    try:
        done = cluster.kubectl("get", "--raw", "/readyz", check=False, timeout=5)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and done.stdout.strip() == "ok"


def restart_apiserver(cluster: Cluster, timeout: float = 120) -> Restart:
    """Stop the cluster's kube-apiserver (SIGTERM; SIGKILL after STOP_GRACE_S) and start it again with the command
    line it ran with (read from /proc), through dev/localcluster's own process bookkeeping: the pid file names the
    new process, so `dev/cluster status` and `down` keep working. etcd keeps running: no state is lost."""
    layout = layout_of(cluster)
    pid = procs.running_pid(layout, "kube-apiserver")
    if pid is None:
        pytest.fail(f"no kube-apiserver pid in {layout.run}: is the dev cluster running?")
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    stop_began = time.time()
    procs.stop_pid(pid, grace=STOP_GRACE_S)
    stopped = time.time()
    new_pid = procs.start(layout, "kube-apiserver", list(argv))
    deadline = time.monotonic() + timeout
    while not apiserver_ready(cluster):
        if time.monotonic() > deadline:
            pytest.fail(f"kube-apiserver not ready {timeout:.0f}s after its restart; see {layout.logs}")
        time.sleep(0.1)
    return Restart(stop_began, stopped, time.time(), pid, new_pid)


def namespaced(cluster: Cluster, prefix: str = "rel") -> Iterator[str]:
    """A fresh namespace ``rel-<random>`` that enforces Pod Security ``restricted`` like the e2e suite's (every
    pod the operator creates must pass it); deleted (without waiting) afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    create_namespace(cluster, name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def seeded_rng(ns: str) -> tuple[int, random.Random]:
    """The kill schedule's seed and random source; FLOWNEXUS_RELIABILITY_SEED replays a logged run."""
    seed = int(os.environ.get("FLOWNEXUS_RELIABILITY_SEED") or random.SystemRandom().randrange(2**32))
    log(f"namespace {ns}, seed {seed} (FLOWNEXUS_RELIABILITY_SEED={seed} reproduces the kill schedule)")
    return seed, random.Random(seed)


def apply_ready_cluster(cluster: Cluster, ns: str, max_concurrent: int, **extra: Any) -> None:
    """The KWOK NeuralCluster ``rel``, applied and Ready."""
    cluster.apply(neural_cluster("rel", max_concurrent, **extra), namespace=ns)
    wait_for(
        "NeuralCluster Ready",
        lambda: (cluster.get("-n", ns, "nc", "rel").get("status") or {}).get("phase") == "Ready",
        60,
    )
