"""The local cluster behaves like a real one: networking, DNS, Jobs, GC, storage, HPA, KWOK GPUs, clean `down`."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

import pytest

from tests.e2e.conftest import REPO, Cluster, run_down, wait_until

pytestmark = pytest.mark.e2e

WEB_PORT = 8080


# The e2e namespaces enforce Pod Security "restricted" (conftest.create_namespace); the test image runs as nobody.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 65534, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _labels(app: str) -> dict[str, str]:
    return {"app": app}


def web_deployment(name: str, image: str, replicas: int = 1, cpu: str = "100m") -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": _labels(name)},
            "template": {
                "metadata": {"labels": _labels(name)},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "securityContext": POD_SECURITY,
                    "containers": [
                        {
                            "name": "web",
                            "image": image,
                            "imagePullPolicy": "IfNotPresent",
                            "securityContext": CONTAINER_SECURITY,
                            "ports": [{"containerPort": WEB_PORT}],
                            "resources": {"requests": {"cpu": cpu, "memory": "32Mi"}},
                            "readinessProbe": {"httpGet": {"path": "/", "port": WEB_PORT}, "periodSeconds": 1},
                        }
                    ],
                },
            },
        },
    }


def service(name: str, node_port: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": _labels(name), "ports": [{"port": 80, "targetPort": WEB_PORT}]}
    if node_port:
        spec["type"] = "NodePort"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}


def pod(name: str, image: str, command: list[str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "securityContext": POD_SECURITY,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": command,
                    "securityContext": CONTAINER_SECURITY,
                }
            ],
            **spec,
        },
    }


def python_pod(name: str, image: str, code: str, **spec: Any) -> dict[str, Any]:
    return pod(name, image, ["python3", "-c", code], **spec)


def wait_pod_phase(cluster: Cluster, namespace: str, name: str, phase: str, timeout: float = 90) -> None:
    def reached() -> bool:
        out = cluster.kubectl("-n", namespace, "get", "pod", name, "-o", "jsonpath={.status.phase}", check=False)
        if out.stdout in {"Failed", "Succeeded"} and out.stdout != phase:
            logs = cluster.kubectl("-n", namespace, "logs", name, check=False).stdout
            pytest.fail(f"pod {name} ended {out.stdout}, wanted {phase}:\n{logs}")
        return out.stdout == phase

    wait_until(f"pod {namespace}/{name} {phase}", reached, timeout)


def rollout(cluster: Cluster, namespace: str, name: str, timeout: int = 120) -> None:
    cluster.kubectl(
        "-n", namespace, "rollout", "status", f"deployment/{name}", f"--timeout={timeout}s", timeout=timeout + 10
    )


def node_ip(cluster: Cluster) -> str:
    addresses = cluster.get("node", "fnx-node")["status"]["addresses"]
    return str(next(a["address"] for a in addresses if a["type"] == "InternalIP"))


def test_deployment_serves_http_by_dns_name_and_from_host(cluster: Cluster, namespace: str, web_image: str) -> None:
    cluster.apply(web_deployment("web", web_image), service("web", node_port=True), namespace=namespace)
    rollout(cluster, namespace, "web")

    # Retried for a few seconds: DNS and kube-proxy pick up a new Service asynchronously.
    fetch = (
        "import time, urllib.request\n"
        f"url = 'http://web.{namespace}.svc.cluster.local'\n"
        "for attempt in range(20):\n"
        "    try:\n"
        "        print(urllib.request.urlopen(url, timeout=5).read().decode())\n"
        "        break\n"
        "    except OSError as error:\n"
        "        print('retrying:', error)\n"
        "        time.sleep(1)\n"
    )
    cluster.apply(python_pod("client", web_image, fetch), namespace=namespace)
    wait_pod_phase(cluster, namespace, "client", "Succeeded")
    assert "hello from web-" in cluster.kubectl("-n", namespace, "logs", "client").stdout

    port = cluster.get("-n", namespace, "service", "web")["spec"]["ports"][0]["nodePort"]
    with urllib.request.urlopen(f"http://{node_ip(cluster)}:{port}/", timeout=5) as resp:
        assert resp.read().decode().startswith("hello from web-")


def test_job_completes_and_deleting_owner_collects_children(cluster: Cluster, namespace: str, web_image: str) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "once"},
        "spec": {"backoffLimit": 0, "template": {"spec": python_pod("x", web_image, "print('done')")["spec"]}},
    }
    cluster.apply(job, namespace=namespace)
    cluster.kubectl("-n", namespace, "wait", "--for=condition=Complete", "job/once", "--timeout=90s", timeout=100)
    pods = cluster.kubectl("-n", namespace, "get", "pods", "-l", "job-name=once", "-o", "name").stdout.split()
    assert pods, "the Job's pod is gone before its owner was deleted"

    # Background propagation: the API server deletes the Job, the garbage collector its pods.
    cluster.kubectl("-n", namespace, "delete", "job", "once", "--cascade=background")
    wait_until(
        "garbage collection of the Job's pods",
        lambda: not cluster.kubectl("-n", namespace, "get", "pods", "-l", "job-name=once", "-o", "name").stdout.strip(),
        60,
    )


def test_default_storage_class_binds_read_write_many_writable_by_a_non_root_pod(
    cluster: Cluster, namespace: str, web_image: str
) -> None:
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "shared"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    volume = {"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "shared"}}]}

    def with_mount(p: dict[str, Any]) -> dict[str, Any]:
        # As nobody: the local provisioner's volumes are writable by any pod user, like kind's.
        p["spec"]["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
        return p

    writer = with_mount(python_pod("writer", web_image, "open('/data/msg','w').write('shared')", **volume))
    # The reader starts alongside the writer: both mount the same claim at once.
    reader = with_mount(
        python_pod(
            "reader",
            web_image,
            (
                "import os,time\nfor _ in range(60):\n  time.sleep(1)\n  if os.path.exists('/data/msg'): break\n"
                "print(open('/data/msg').read())"
            ),
            **volume,
        )
    )
    cluster.apply(claim, reader, writer, namespace=namespace)
    wait_until(
        "claim bound", lambda: cluster.get("-n", namespace, "pvc", "shared")["status"].get("phase") == "Bound", 60
    )
    wait_pod_phase(cluster, namespace, "writer", "Succeeded")
    wait_pod_phase(cluster, namespace, "reader", "Succeeded")
    assert cluster.kubectl("-n", namespace, "logs", "reader").stdout.strip() == "shared"


def test_hpa_sees_cpu_utilization_and_scales_up(cluster: Cluster, namespace: str, web_image: str) -> None:
    cluster.apply(
        web_deployment("busy", web_image, cpu="50m"),
        service("busy", node_port=True),
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "busy"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "busy"},
                "minReplicas": 1,
                "maxReplicas": 3,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}},
                    }
                ],
            },
        },
        namespace=namespace,
    )
    rollout(cluster, namespace, "busy")
    port = cluster.get("-n", namespace, "service", "busy")["spec"]["ports"][0]["nodePort"]
    url = f"http://{node_ip(cluster)}:{port}/burn?ms=50"
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                urllib.request.urlopen(url, timeout=5).read()
            except OSError:
                time.sleep(0.1)

    workers = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:

        def utilization() -> int | None:
            current = cluster.get("-n", namespace, "hpa", "busy").get("status", {}).get("currentMetrics") or []
            return next(
                (m["resource"]["current"].get("averageUtilization") for m in current if m.get("type") == "Resource"),
                None,
            )

        wait_until("a real CPU utilization on the HPA", lambda: utilization() is not None, 120, interval=2)
        wait_until(
            "HPA scale-up beyond 1 replica",
            lambda: cluster.get("-n", namespace, "hpa", "busy")["status"].get("desiredReplicas", 1) > 1,
            120,
            interval=2,
        )
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=10)
    assert (utilization() or 0) > 0


def test_gpu_pod_schedules_on_kwok_gpu_node_only(cluster: Cluster, namespace: str) -> None:
    real = cluster.get("node", "fnx-node")["status"]["allocatable"]
    assert "nvidia.com/gpu" not in real
    gpu_pod = pod(
        "gpu",
        "localhost/flownexus/never-pulled:0",
        ["true"],
        tolerations=[{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
    )
    gpu_pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": 1}}
    cluster.apply(gpu_pod, namespace=namespace)
    # KWOK marks its pods Running without pulling anything.
    wait_pod_phase(cluster, namespace, "gpu", "Running", timeout=60)
    node = cluster.get("-n", namespace, "pod", "gpu")["spec"]["nodeName"]
    assert node.startswith("kwok-gpu-node-"), node
    assert cluster.get("node", node)["status"]["allocatable"]["nvidia.com/gpu"] != "0"


def test_down_leaves_nothing_behind(cluster: Cluster) -> None:
    if not cluster.started_here:
        pytest.skip("the cluster was running before the session; leaving it up")
    result = run_down()
    cluster.stopped = True
    assert result.returncode == 0, result.stderr
    # `leftovers` checks processes, mounts, interfaces and iptables rules independently of `down`'s own report.
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import sys; sys.path.insert(0, 'dev')\n"
                "from localcluster.cluster import leftovers\nfrom localcluster.config import Layout\n"
                "print('\\n'.join(leftovers(Layout())))"
            ),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert check.stdout.strip() == "", check.stdout
