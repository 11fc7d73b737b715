"""API requests the operator sends, counted by the API server itself (its audit log), not by the operator.

Runs a bare control plane (dev/localcluster/envtest: etcd + kube-apiserver, no kubelet) and the operator as
users run it (`python -m flownexus`). This script plays the Job controller: it marks worker Jobs running and
complete and gives each validator Job a pod whose termination message passes the gate. It prints:

- requests per quiet pass of each kind (a metadata-only change makes the watch deliver the object; nothing
  for the operator to do);
- requests per TrainingJob from apply to Succeeded, by verb and resource;
- requests while nothing changes (there is no polling: expected 0).

    python bench/api_requests.py --jobs 50
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "operator")]

from dev.localcluster import envtest  # noqa: E402

from flownexus.runtime.client import USER_AGENT, Client, path  # noqa: E402

NS = "bench"
VERDICT = {
    "passed": True,
    "testAccuracy": 0.97,
    "latencyP95Ms": 1.0,
    "overfittingGap": 0.01,
    "balancedAccuracy": 0.97,
    "baselines": {"trivial": 0.1, "linear": 0.96},
    "converged": True,
    "failed": [],
    "runDir": "/artifacts/bench/x",
    "modelArchive": "/artifacts/bench/x/model-store/m.mar",
}


def stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def finish(user: Client, job: dict[str, Any]) -> None:
    n = job["spec"].get("completions", 1)
    now = stamp()
    status: dict[str, Any] = {
        "conditions": [
            {
                "type": "SuccessCriteriaMet",
                "status": "True",
                "reason": "CompletionsReached",
                "lastTransitionTime": now,
                "lastProbeTime": now,
            },
            {
                "type": "Complete",
                "status": "True",
                "reason": "CompletionsReached",
                "lastTransitionTime": now,
                "lastProbeTime": now,
            },
        ],
        "startTime": now,
        "completionTime": now,
        "succeeded": n,
        "ready": 0,
        "active": 0,
        "terminating": 0,
        "uncountedTerminatedPods": {},
    }
    if job["spec"].get("completionMode") == "Indexed":
        status["completedIndexes"] = "0" if n == 1 else f"0-{n - 1}"
    name = job["metadata"]["name"]
    user.request(
        "PATCH", path("Job", NS, name, "status"), body={"status": status}, content_type="application/merge-patch+json"
    )


def verdict_pod(user: Client, job: dict[str, Any]) -> None:
    name, uid = job["metadata"]["name"], job["metadata"]["uid"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{name}-pod", "labels": {"batch.kubernetes.io/controller-uid": uid}},
        "spec": {"containers": [{"name": "validator", "image": "x"}]},
    }
    user.request("POST", path("Pod", NS), body=pod)
    state = {"terminated": {"exitCode": 0, "reason": "Completed", "message": json.dumps(VERDICT)}}
    cs = [{"name": "validator", "image": "x", "imageID": "", "ready": False, "restartCount": 0, "state": state}]
    user.request(
        "PATCH",
        path("Pod", NS, f"{name}-pod", "status"),
        body={"status": {"containerStatuses": cs}},
        content_type="application/merge-patch+json",
    )


def play_job_controller(user: Client, done: set[str]) -> int:
    """One sweep: every worker Job completes, every validator Job completes with a passing verdict."""
    acted = 0
    for job in user.list("Job", NS):
        name = job["metadata"]["name"]
        if name in done or job["metadata"].get("deletionTimestamp"):
            continue
        if name.endswith("-validate"):
            verdict_pod(user, job)
        finish(user, job)
        done.add(name)
        acted += 1
    return acted


def operator_requests(plane: envtest.ControlPlane, since: int) -> list[dict[str, Any]]:
    return plane.requests_by(USER_AGENT, since)


def summary(requests: list[dict[str, Any]]) -> dict[str, int]:
    out: collections.Counter[str] = collections.Counter()
    for r in requests:
        ref = r.get("objectRef") or {}
        what = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        out[f"{r['verb']} {what}"] += 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def wait(what: str, check: Any, timeout: float) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    args = parser.parse_args()
    plane = envtest.start()
    proc = None
    try:
        envtest.install_crds(plane, [yaml.safe_load(p.read_text()) for p in sorted((REPO / "crds").glob("*.yaml"))])
        user = Client.from_kubeconfig(str(plane.kubeconfig), user_agent="bench")
        user.request(
            "POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}
        )
        user.request(
            "POST",
            path("ServiceAccount", NS),
            body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}},
        )
        env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig), "PYTHONPATH": str(REPO / "operator")}
        log = (plane.root / "operator.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "flownexus", "-n", NS, "--metrics-port", "0", "--health-port", "0"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        time.sleep(3)
        nc = {
            "apiVersion": "flownexus.io/v1alpha1",
            "kind": "NeuralCluster",
            "metadata": {"name": "demo"},
            "spec": {"artifactStore": {"size": "1Gi"}, "limits": {"maxConcurrentTrainingJobs": args.jobs}},
        }
        user.request("POST", path("NeuralCluster", NS), body=nc)
        wait(
            "the NeuralCluster",
            lambda: (user.get("NeuralCluster", NS, "demo") or {}).get("status", {}).get("phase") == "Ready",
            30,
        )

        mark = plane.audit_lines()
        for i in range(args.jobs):
            tj = {
                "apiVersion": "flownexus.io/v1alpha1",
                "kind": "TrainingJob",
                "metadata": {"name": f"tj-{i:04d}"},
                "spec": {
                    "clusterRef": {"name": "demo"},
                    "model": {"architecture": "mlp"},
                    "dataset": {"source": "builtin", "name": "iris"},
                    "distributed": {"workers": 1},
                },
            }
            user.request("POST", path("TrainingJob", NS), body=tj)
        done: set[str] = set()

        def all_succeeded() -> bool:
            play_job_controller(user, done)
            tjs = user.list("TrainingJob", NS)
            return len(tjs) == args.jobs and all((t.get("status") or {}).get("phase") == "Succeeded" for t in tjs)

        elapsed = wait("every TrainingJob to succeed", all_succeeded, 600)
        time.sleep(3)  # the last echoes
        per_job = operator_requests(plane, mark)
        print(f"TrainingJobs: {args.jobs}, apply -> all Succeeded in {elapsed:.1f} s (script = Job controller)")
        print(f"operator requests per TrainingJob, apply -> Succeeded: {len(per_job) / args.jobs:.1f}")
        for what, n in summary(per_job).items():
            print(f"  {what:45s} {n / args.jobs:6.2f} per job")

        mark = plane.audit_lines()
        time.sleep(10)
        idle = operator_requests(plane, mark)
        print(f"requests in 10 s while nothing changes: {len(idle)}")

        mark = plane.audit_lines()
        for epoch in range(10):  # what rank 0 sends every epoch
            user.request(
                "PATCH",
                path("TrainingJob", NS, "tj-0000", "status"),
                body={"status": {"progress": {"epoch": epoch, "loss": 1.0 / (epoch + 1)}}},
                content_type="application/merge-patch+json",
            )
        time.sleep(3)
        print(f"requests per progress report from rank 0 (10 reports): {len(operator_requests(plane, mark)) / 10:.1f}")

        md = {
            "apiVersion": "flownexus.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "served"},
            "spec": {
                "clusterRef": {"name": "demo"},
                "model": {"trainingJobRef": {"name": "tj-0000"}, "version": "1.0.0"},
            },
        }
        user.request("POST", path("ModelDeployment", NS), body=md)
        wait("the stable Deployment", lambda: user.get("Deployment", NS, "served-stable") is not None, 30)
        dep = user.get("Deployment", NS, "served-stable") or {}
        n = dep["spec"]["replicas"]
        user.request(
            "PATCH",
            path("Deployment", NS, "served-stable", "status"),
            content_type="application/merge-patch+json",
            body={
                "status": {
                    "observedGeneration": dep["metadata"]["generation"],
                    "replicas": n,
                    "updatedReplicas": n,
                    "readyReplicas": n,
                    "availableReplicas": n,
                }
            },
        )
        wait(
            "Available",
            lambda: (user.get("ModelDeployment", NS, "served") or {}).get("status", {}).get("phase") == "Available",
            30,
        )
        time.sleep(3)
        for kind, name in (("NeuralCluster", "demo"), ("ModelDeployment", "served")):
            mark = plane.audit_lines()
            for i in range(10):  # a label change: the watch delivers the object, nothing to decide
                user.request(
                    "PATCH",
                    path(kind, NS, name),
                    body={"metadata": {"labels": {"touch": str(i)}}},
                    content_type="application/merge-patch+json",
                )
                time.sleep(0.3)
            time.sleep(2)
            quiet = operator_requests(plane, mark)
            print(f"requests per quiet pass, {kind}: {len(quiet) / 10:.1f} ({summary(quiet)})")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        envtest.remove(plane)
    return 0


if __name__ == "__main__":
    sys.exit(main())
