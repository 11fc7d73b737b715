"""How the operator copes with many TrainingJobs: N jobs on KWOK fake nodes, event-driven reconciles.

Creates a namespace with a NeuralCluster whose training pods go to the KWOK nodes of the local cluster,
applies N one-worker TrainingJobs at once, and measures the time until every job's Job exists (Created)
and until every job reached a final phase (KWOK pods complete at once),
the operator's reconcile count (from its /metrics) and its CPU time.

Needs: `dev/cluster up` (with KWOK nodes) and the operator running with `--metrics-port`:
    python bench/trainingjob_scale.py --jobs 100 --operator-pid $(pgrep ...) --metrics-port 8080
(or let it start the operator: the default).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STARTED = {"Created", "Running", "Validating", "Succeeded", "Failed"}
KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}


@functools.cache
def kubectl_path() -> str:
    """The kubectl the local cluster built (dev/cluster knows the pinned version and the cache)."""
    which = subprocess.run([str(REPO / "dev" / "cluster"), "which", "kubectl"], capture_output=True, text=True,
                           check=True)  # fmt: skip
    return which.stdout.strip()


KUBECONFIG = str(REPO / ".local" / "kubeconfig")


def kubectl(*args: str, stdin: str | None = None) -> str:
    out = subprocess.run(
        [kubectl_path(), "--kubeconfig", KUBECONFIG, *args], input=stdin, capture_output=True, text=True, check=True
    )
    return out.stdout


def apply(items: list[dict[str, Any]]) -> None:
    kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def phases(namespace: str) -> list[str]:
    data = json.loads(kubectl("-n", namespace, "get", "trainingjobs", "-o", "json"))
    return [(i.get("status") or {}).get("phase", "") for i in data["items"]]


def reconciles(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(m) for m in re.findall(r'flownexus_reconcile_total\{kind="TrainingJob",[^}]*\} ([0-9.e+]+)', text))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_all(namespace: str, ok: set[str], n: int, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        done = sum(p in ok for p in phases(namespace))
        if done >= n:
            return time.monotonic() - start
        time.sleep(1)
    raise SystemExit(f"timed out: {sum(p in ok for p in phases(namespace))}/{n} reached {ok}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--metrics-port", type=int, default=18090)
    parser.add_argument("--operator-pid", type=int, help="an already running operator (default: start one)")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    namespace = f"bench-{int(time.time())}"
    kubectl("create", "namespace", namespace)
    proc = None
    pid = args.operator_pid
    if pid is None:
        env = {**os.environ, "KUBECONFIG": KUBECONFIG, "PYTHONPATH": str(REPO / "operator")}
        log = open(REPO / ".local" / "logs" / "operator-bench.log", "ab")  # noqa: SIM115 - lives as long as proc
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flownexus",
                "--namespace",
                namespace,  # only this benchmark's namespace, whatever else runs on the cluster
                "--metrics-port",
                str(args.metrics_port),
                "--health-port",
                "0",
                "--log-level",
                "WARNING",
            ],
            env=env,
            stdout=log,
            stderr=log,
        )
        pid = proc.pid
        time.sleep(5)
    try:
        apply(
            [
                {
                    "apiVersion": "flownexus.io/v1alpha1",
                    "kind": "NeuralCluster",
                    "metadata": {"name": "bench", "namespace": namespace},
                    "spec": {
                        "artifactStore": {"size": "1Gi"},
                        "training": {"nodeSelector": {"type": "kwok"}, "tolerations": [KWOK_TOLERATION]},
                        "limits": {"maxConcurrentTrainingJobs": args.jobs, "maxWorkersPerJob": 4},
                    },
                }
            ]
        )
        time.sleep(3)
        before_reconciles, before_cpu = reconciles(args.metrics_port), cpu_seconds(pid)
        jobs = [
            {
                "apiVersion": "flownexus.io/v1alpha1",
                "kind": "TrainingJob",
                "metadata": {"name": f"tj-{i:04d}", "namespace": namespace},
                "spec": {
                    "clusterRef": {"name": "bench"},
                    "model": {"architecture": "mlp"},
                    "dataset": {"source": "builtin", "name": "iris"},
                    "distributed": {"workers": 1},
                },
            }
            for i in range(args.jobs)
        ]
        started = time.monotonic()
        apply(jobs)
        applied = time.monotonic() - started
        # KWOK runs each pod to completion at once, so every job goes Created -> Running -> Validating -> final
        # in a few events; the verdict-less fake validator makes them end Failed (ValidatorError).
        created = wait_all(namespace, STARTED, args.jobs, args.timeout)
        finished = wait_all(namespace, {"Succeeded", "Failed"}, args.jobs, args.timeout)
        time.sleep(5)  # let trailing events settle before reading the counters
        count = reconciles(args.metrics_port) - before_reconciles
        cpu = cpu_seconds(pid) - before_cpu
        print(f"jobs: {args.jobs}")
        print(f"kubectl apply of all jobs: {applied:.1f} s")
        print(f"all gangs created (Job + Service + RBAC + ConfigMap exist): {created:.1f} s after apply")
        print(f"all through training and validation to a final phase: {finished:.1f} s after apply")
        print(f"TrainingJob reconcile passes: {count:.0f} ({count / args.jobs:.1f} per job)")
        print(f"operator CPU time: {cpu:.1f} s ({1000 * cpu / args.jobs:.0f} ms per job)")
    finally:
        subprocess.run([kubectl_path(), "--kubeconfig", KUBECONFIG, "delete", "namespace", namespace, "--wait=false"],
                       capture_output=True)  # fmt: skip
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
