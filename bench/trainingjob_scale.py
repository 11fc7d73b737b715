"""Flow Nexus against Kubeflow's training operator (v1.8.1) on the same local control plane and KWOK nodes.

For each operator, in one run, one after the other: N one-worker jobs (PyTorchJobs for Kubeflow, TrainingJobs
for Flow Nexus) created at once in a fresh namespace, their pods placed on the KWOK fake nodes, which run
every pod and complete it at once (kwok's stage for Job pods, ours in dev/kwok/ for PyTorchJob pods). It
measures, from the first create:

- seconds until every job has its pod, until every job runs, and until every job reached a final phase;
- the operator's API requests per job, counted by the API server's audit log (not by the operators);
- the operator's CPU seconds per job and its peak RSS (VmHWM).

Kubeflow's operator is built here from the Go module proxy (`go install …/training-operator.v1@v1.8.1`),
packaged FROM scratch with buildah, and runs in the cluster at its defaults from its module's
`manifests/overlays/standalone` (CRDs, RBAC, Service, the validating webhook with certificates it makes
itself). Flow Nexus runs as a host process at its defaults, watching the benchmark's namespace.

Needs `dev/cluster up` (root). `python bench/trainingjob_scale.py --jobs 500`
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from dev.localcluster import procs  # noqa: E402
from dev.localcluster.config import Layout  # noqa: E402

KUBEFLOW = "github.com/kubeflow/training-operator"
KUBEFLOW_VERSION = "v1.8.1"
KUBEFLOW_IMAGE = f"kubeflow/training-operator:{KUBEFLOW_VERSION}-local"
KUBEFLOW_USER = "system:serviceaccount:kubeflow:training-operator"
KWOK_PLACEMENT = {
    "nodeSelector": {"type": "kwok"},
    "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
}
LAYOUT = Layout()
KUBECONFIG = str(LAYOUT.kubeconfig)
AUDIT_LOG = LAYOUT.logs / "audit.log"


@functools.cache
def kubectl_path() -> str:
    return str(LAYOUT.k8s("kubectl"))


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> str:
    out = subprocess.run([kubectl_path(), "--kubeconfig", KUBECONFIG, *args], input=stdin, capture_output=True,
                         text=True, check=False)  # fmt: skip
    if check and out.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)}: {out.stderr}")
    return out.stdout


def get_json(*args: str) -> Any:
    return json.loads(kubectl("get", *args, "-o", "json"))


# ---- Kubeflow's operator ------------------------------------------------------------------------------


def kubeflow_binary() -> Path:
    out = LAYOUT.cache / "bin" / f"kubeflow-training-operator-{KUBEFLOW_VERSION}"
    binary = out / "training-operator.v1"
    if not binary.exists():
        print(f"[kubeflow] go install {KUBEFLOW}/cmd/training-operator.v1@{KUBEFLOW_VERSION} (minutes, once)")
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CGO_ENABLED": "0", "GOBIN": str(out)}
        subprocess.run(["go", "install", f"{KUBEFLOW}/cmd/training-operator.v1@{KUBEFLOW_VERSION}"], env=env,
                       check=True, cwd=tempfile.gettempdir())  # fmt: skip
    return binary


def kubeflow_manifests() -> Path:
    modcache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True).stdout.strip()
    return Path(modcache) / f"{KUBEFLOW}@{KUBEFLOW_VERSION}" / "manifests" / "overlays" / "standalone"


def install_kubeflow() -> None:
    binary = kubeflow_binary()
    with tempfile.TemporaryDirectory() as ctx:
        shutil.copy(binary, Path(ctx) / "manager")
        (Path(ctx) / "Containerfile").write_text('FROM scratch\nCOPY manager /manager\nENTRYPOINT ["/manager"]\n')
        subprocess.run([str(REPO / "dev" / "cluster"), "build-image", ctx, "--name", "kubeflow-training-operator",
                        "--tag", KUBEFLOW_IMAGE], check=True, capture_output=True)  # fmt: skip
    rendered = kubectl("kustomize", str(kubeflow_manifests()))
    rendered = re.sub(r"image: kubeflow/training-operator:\S+", f"image: {KUBEFLOW_IMAGE}", rendered)
    kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=rendered)
    kubectl("-n", "kubeflow", "rollout", "status", "deployment/training-operator", "--timeout=300s")


def kubeflow_pid() -> int:
    pids = [
        p for p in procs.pids_with_arg("/manager") if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"/manager")
    ]
    if len(pids) != 1:
        raise SystemExit(f"expected one Kubeflow training operator process, found {pids}")
    return pids[0]


def pytorchjob(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {"pytorchReplicaSpecs": {"Master": {
            "replicas": 1, "restartPolicy": "OnFailure",
            "template": {"spec": {**KWOK_PLACEMENT, "containers": [
                {"name": "pytorch", "image": "flownexus/trainer:0.1.0", "command": ["python", "-c", "pass"]}]}},
        }}},
    }  # fmt: skip


# ---- Flow Nexus ---------------------------------------------------------------------------------------


def trainingjob(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "flownexus.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {"clusterRef": {"name": "bench"}, "model": {"architecture": "mlp"},
                 "dataset": {"source": "builtin", "name": "iris"}, "distributed": {"workers": 1}},
    }  # fmt: skip


def start_flownexus(namespace: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KUBECONFIG": KUBECONFIG, "PYTHONPATH": str(REPO / "operator")}
    log = (LAYOUT.logs / "operator-bench.log").open("ab")
    argv = [sys.executable, "-m", "flownexus", "--namespace", namespace, "--metrics-port", "0", "--health-port", "0",
            "--log-level", "WARNING"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
    time.sleep(4)
    return proc


# ---- measuring ----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def audit_offset() -> tuple[int, int]:
    """Where the audit log is now: (inode, size). The API server rotates it at --audit-log-maxsize."""
    st = AUDIT_LOG.stat()
    return st.st_ino, st.st_size


def _audit_lines_since(mark: tuple[int, int]) -> list[str]:
    inode, offset = mark
    files: list[tuple[Path, int]] = []
    if AUDIT_LOG.stat().st_ino != inode:  # rotated meanwhile: the old file is the newest audit-*.log backup
        rotated = [p for p in AUDIT_LOG.parent.glob("audit-*.log") if p.stat().st_ino == inode]
        files += [(p, offset) for p in rotated]
        offset = 0
    files.append((AUDIT_LOG, offset))
    lines: list[str] = []
    for path, start in files:
        with path.open() as f:
            f.seek(start)
            lines += f.readlines()
    return lines


def requests_since(mark: tuple[int, int], is_operator: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    out = []
    for line in _audit_lines_since(mark):
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("stage") == "ResponseComplete" and event.get("verb") != "watch" and is_operator(event):
            out.append(event)
    return out


def wait(what: str, check: Callable[[], bool], start: float, timeout: float) -> float:
    while not check():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)
    return time.monotonic() - start


def create_all(namespace: str, objects: list[dict[str, Any]]) -> None:
    """`kubectl create` of a List: one POST per object, no reads (apply would GET each first)."""
    kubectl(
        "-n", namespace, "create", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )


def run(label: str, namespace: str, jobs: list[dict[str, Any]], pid: int, is_operator: Callable[[dict[str, Any]], bool],
        has_pods: Callable[[], int], running: Callable[[], int], finished: Callable[[], int],
        timeout: float) -> dict[str, float]:  # fmt: skip
    n = len(jobs)
    cpu0, offset = cpu_seconds(pid), audit_offset()
    start = time.monotonic()
    create_all(namespace, jobs)
    created = time.monotonic() - start
    pods = wait("every job's pod", lambda: has_pods() >= n, start, timeout)
    runs = wait("every job running", lambda: running() >= n, start, timeout)
    done = wait("every job finished", lambda: finished() >= n, start, timeout)
    time.sleep(5)
    requests = requests_since(offset, is_operator)
    cpu = cpu_seconds(pid) - cpu0
    figures = {"created": created, "pods": pods, "running": runs, "finished": done, "requests": len(requests) / n,
               "cpu_ms": 1000 * cpu / n, "rss": peak_rss_mib(pid)}  # fmt: skip
    print(f"[{label}] {n} jobs: created {created:.1f}s, pods {pods:.1f}s, running {runs:.1f}s, "
          f"finished {done:.1f}s, {len(requests) / n:.1f} requests/job, {1000 * cpu / n:.0f} ms CPU/job, "
          f"peak RSS {figures['rss']:.0f} MiB")  # fmt: skip
    return figures


def _stamp(obj: dict[str, Any]) -> float:
    return time.mktime(time.strptime(obj["metadata"]["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ"))


def report_latencies(ns: str) -> None:
    """Where the time goes, per job (1 s resolution: creation timestamps): TrainingJob -> Job -> pod."""
    tjs = {t["metadata"]["name"]: _stamp(t) for t in get_json("-n", ns, "trainingjobs")["items"]}
    jobs = {j["metadata"]["name"].removesuffix("-a1"): _stamp(j) for j in get_json("-n", ns, "jobs")["items"]
            if j["metadata"]["name"].endswith("-a1")}  # fmt: skip
    pods = {p["metadata"]["labels"]["flownexus.io/trainingjob"]: _stamp(p)
            for p in get_json("-n", ns, "pods", "-l", "flownexus.io/role=worker")["items"]}  # fmt: skip

    def pct(values: list[float]) -> str:
        values = sorted(values)
        return f"p50 {values[len(values) // 2]:.0f} s, p99 {values[int(len(values) * 0.99) - 1]:.0f} s"

    print(f"  TrainingJob -> its Job: {pct([jobs[n] - t for n, t in tjs.items() if n in jobs])}; "
          f"Job -> its pod: {pct([pods[n] - jobs[n] for n in jobs if n in pods])}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--only", choices=["kubeflow", "flownexus"], help="run one side only")
    args = parser.parse_args()
    if not AUDIT_LOG.exists():
        raise SystemExit(f"{AUDIT_LOG} missing: the local cluster's API server writes it (dev/cluster up)")
    stamp = int(time.time())
    results: dict[str, dict[str, float]] = {}

    if args.only in (None, "kubeflow"):
        install_kubeflow()
        ns = f"bench-kf-{stamp}"
        kubectl("create", "namespace", ns)
        pid = kubeflow_pid()

        def kf_conditions() -> list[set[str]]:
            items = get_json("-n", ns, "pytorchjobs")["items"]
            return [{c["type"] for c in (i.get("status") or {}).get("conditions") or [] if c["status"] == "True"}
                    for i in items]  # fmt: skip

        try:
            results["Kubeflow training operator v1.8.1"] = run(
                "kubeflow", ns, [pytorchjob(f"pj-{i:04d}") for i in range(args.jobs)], pid,
                lambda e: (e.get("user") or {}).get("username") == KUBEFLOW_USER,
                lambda: len(get_json("-n", ns, "pods")["items"]),
                lambda: sum(bool(c & {"Running", "Succeeded"}) for c in kf_conditions()),
                lambda: sum("Succeeded" in c or "Failed" in c for c in kf_conditions()),
                args.timeout,
            )  # fmt: skip
        finally:
            kubectl("delete", "namespace", ns, "--wait=false", check=False)

    if args.only in (None, "flownexus"):
        ns = f"bench-fnx-{stamp}"
        kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        kubectl("create", "namespace", ns)
        proc = start_flownexus(ns)
        try:
            limits = {"maxConcurrentTrainingJobs": min(args.jobs, 1000), "maxWorkersPerJob": 4}
            cluster = {
                "apiVersion": "flownexus.io/v1alpha1",
                "kind": "NeuralCluster",
                "metadata": {"name": "bench"},
                "spec": {"artifactStore": {"size": "1Gi"}, "training": KWOK_PLACEMENT, "limits": limits},
            }
            create_all(ns, [cluster])
            time.sleep(3)

            def tj_phases() -> list[str]:
                return [(i.get("status") or {}).get("phase", "") for i in get_json("-n", ns, "trainingjobs")["items"]]

            def worker_pods() -> int:
                return len(get_json("-n", ns, "pods", "-l", "flownexus.io/role=worker")["items"])

            results["Flow Nexus"] = run(
                "flownexus", ns, [trainingjob(f"tj-{i:04d}") for i in range(args.jobs)], proc.pid,
                lambda e: str(e.get("userAgent", "")).startswith("flownexus-operator/"),
                worker_pods,
                lambda: sum(p in {"Running", "Validating", "Succeeded", "Failed"} for p in tj_phases()),
                lambda: sum(p in {"Succeeded", "Failed"} for p in tj_phases()),
                args.timeout,
            )  # fmt: skip
            report_latencies(ns)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            kubectl("delete", "namespace", ns, "--wait=false", check=False)

    if len(results) == 2:
        kf, fnx = results["Kubeflow training operator v1.8.1"], results["Flow Nexus"]
        print(f"\n| {args.jobs} one-worker jobs | Kubeflow v1.8.1 | Flow Nexus | ratio |")
        print("|---|---|---|---|")
        for key, label in (("pods", "s until every job has its pod"), ("running", "s until every job runs"),
                           ("finished", "s until every job finished"), ("requests", "API requests per job"),
                           ("cpu_ms", "operator CPU ms per job"), ("rss", "operator peak RSS, MiB")):  # fmt: skip
            print(f"| {label} | {kf[key]:.1f} | {fnx[key]:.1f} | {kf[key] / fnx[key]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
