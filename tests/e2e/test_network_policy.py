"""The ModelDeployment's NetworkPolicy, enforced on the local cluster (kube-network-policies, docs/CLUSTER.md).

The policy and the Service are the operator's own children, made by `build_network_policy` and `build_service`
for a ModelDeployment `digits` with `allowedFrom` and `metricsFrom` set; the serving pod is a stand-in for
TorchServe (the e2e web image's Python, answering on the inference port 8080 and the metrics port 8082, labelled
as the operator labels serving pods), so the test needs neither the server image nor a trained model.

Four namespaces: `app` (the server), `frontend` (in allowedFrom), `monitor` (in metricsFrom) and `other` (in
neither). A client pod in each probes both ports; the server pod itself tries to reach CoreDNS, which its policy's
empty egress forbids. A refused connection would mean nobody listens; a dropped one times out, which is what a
policy denial looks like here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from flownexus.api.modeldeployment import ModelDeploymentSpec
from flownexus.api.neuralcluster import NeuralClusterSpec
from flownexus.modeldeployment.children import (
    INFERENCE_PORT,
    METRICS_PORT,
    ServingContext,
    build_network_policy,
    build_service,
    selector_labels,
)
from tests.e2e.conftest import Cluster, create_namespace
from tests.e2e.test_cluster import CONTAINER_SECURITY, POD_SECURITY, python_pod, wait_pod_phase
from tests.factories import model_deployment, neural_cluster

pytestmark = pytest.mark.e2e

MD = "digits"
DNS = ("10.96.0.10", 53)  # the kube-dns Service (dev/localcluster/config.py DNS_SERVICE_IP)
ALLOWED_TRIES, TRY_TIMEOUT_S = 20, 3.0

# Serves the ports in its arguments (inference, metrics), like a TorchServe pod, with the stdlib's server.
SERVER = """
import sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"port {self.server.server_port}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

servers = [ThreadingHTTPServer(("", int(port)), Handler) for port in sys.argv[1:]]
for server in servers[1:]:
    threading.Thread(target=server.serve_forever, daemon=True).start()
servers[0].serve_forever()
"""

# Runs each probe (name, host, port, expected) of its argument and prints {name: outcome} as JSON. An expected
# connection is retried for a while (a new Service takes DNS and kube-proxy a moment); an expected denial is tried
# once: it must time out.
CLIENT = """
import json, socket, sys, time

plan = json.loads(sys.argv[1])

def once(host, port):
    try:
        with socket.create_connection((host, port), timeout=plan["timeout"]) as s:
            if port != 53:
                s.settimeout(plan["timeout"])
                s.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
                if not s.recv(64).startswith(b"HTTP/1.0 200"):
                    return "bad answer"
        return "ok"
    except socket.timeout:
        return "timeout"
    except OSError as error:
        return f"{type(error).__name__}: {error}"

results = {}
for name, host, port, expected in plan["probes"]:
    for attempt in range(plan["tries"] if expected == "ok" else 1):
        results[name] = once(host, port)
        if results[name] == "ok":
            break
        time.sleep(1)
print(json.dumps(results))
"""


def serving_context(namespace: str, frontend: str, monitor: str) -> ServingContext:
    """The operator's view of a ModelDeployment `digits` in `namespace` that admits its own namespace and
    `frontend` to inference, and `monitor` to metrics."""
    md = model_deployment(
        MD,
        **{
            "metadata.namespace": namespace,
            "metadata.uid": str(uuid.uuid4()),
            "spec.serving.allowedFrom": [
                {"podSelector": {}},
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": frontend}}},
            ],
            "spec.serving.metricsFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": monitor}}},
            ],
        },
    )
    return ServingContext(
        owner=md,
        spec=ModelDeploymentSpec.model_validate(md["spec"]),
        cluster=NeuralClusterSpec.model_validate(neural_cluster()["spec"]),
        artifact_claim="unused",
    )


def unowned(child: dict[str, Any]) -> dict[str, Any]:
    """The child without its owner reference: the ModelDeployment does not exist, and the garbage collector
    would delete a child whose owner is gone."""
    child["metadata"].pop("ownerReferences")
    return child


def server_pod(image: str) -> dict[str, Any]:
    """The stand-in for a stable TorchServe pod of `digits`: its labels, its named ports."""
    pod = python_pod("server", image, SERVER)
    pod["metadata"]["labels"] = selector_labels(MD, "stable")
    container = pod["spec"]["containers"][0]
    container["command"] += [str(INFERENCE_PORT), str(METRICS_PORT)]
    container["ports"] = [
        {"name": "inference", "containerPort": INFERENCE_PORT},
        {"name": "metrics", "containerPort": METRICS_PORT},
    ]
    # kubelet probes from the host: not subject to the policy (kube-network-policies lets the node's root through).
    container["readinessProbe"] = {"tcpSocket": {"port": INFERENCE_PORT}, "periodSeconds": 1}
    container["resources"] = {"requests": {"cpu": "50m", "memory": "32Mi"}}
    pod["spec"]["restartPolicy"] = "Always"
    assert pod["spec"]["securityContext"] == POD_SECURITY and container["securityContext"] == CONTAINER_SECURITY
    return pod


@pytest.fixture
def namespaces(cluster: Cluster) -> Iterator[dict[str, str]]:
    """Four fresh `e2e-*` namespaces enforcing Pod Security restricted, deleted afterwards."""
    run = uuid.uuid4().hex[:6]
    names = {role: f"e2e-np-{run}-{role}" for role in ("app", "frontend", "monitor", "other")}
    try:
        for name in names.values():
            create_namespace(cluster, name)
        yield names
    finally:
        for name in names.values():
            cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _results(cluster: Cluster, namespace: str, pod: str) -> dict[str, str]:
    logs = cluster.kubectl("-n", namespace, "logs", pod).stdout
    return dict(json.loads(logs.strip().splitlines()[-1]))


def test_modeldeployment_network_policy_admits_only_its_peers_per_port_and_no_egress(
    cluster: Cluster, namespaces: dict[str, str], web_image: str
) -> None:
    app, frontend, monitor, other = (namespaces[r] for r in ("app", "frontend", "monitor", "other"))
    ctx = serving_context(app, frontend, monitor)
    policy, service = unowned(build_network_policy(ctx)), unowned(build_service(ctx, route_canary=True))
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and policy["spec"]["egress"] == []
    cluster.apply(policy, service, server_pod(web_image), namespace=app)
    cluster.kubectl("-n", app, "wait", "pod/server", "--for=condition=Ready", "--timeout=90s", timeout=100)
    server_ip = cluster.get("-n", app, "pod", "server")["status"]["podIP"]
    svc = f"{MD}.{app}.svc.cluster.local"

    expected = {
        app: {"inference": "ok", "metrics": "timeout", "dns": "ok"},  # dns: the client itself may call out
        frontend: {"inference": "ok", "inference-by-service": "ok", "metrics": "timeout"},
        monitor: {"inference": "timeout", "metrics": "ok"},
        other: {"inference": "timeout", "inference-by-service": "timeout", "metrics": "timeout"},
    }
    targets = {
        "inference": (server_ip, INFERENCE_PORT),
        "inference-by-service": (svc, INFERENCE_PORT),
        "metrics": (server_ip, METRICS_PORT),
        "dns": DNS,
    }
    for namespace, outcomes in expected.items():
        client = python_pod("client", web_image, CLIENT)
        probes = [(name, *targets[name], outcome) for name, outcome in outcomes.items()]
        plan = {"timeout": TRY_TIMEOUT_S, "tries": ALLOWED_TRIES, "probes": probes}
        client["spec"]["containers"][0]["command"].append(json.dumps(plan))  # sys.argv[1]
        cluster.apply(client, namespace=namespace)

    # The serving pod's own egress: nothing, not even DNS (its policy lists no egress rule).
    egress = cluster.kubectl(
        "-n", app, "exec", "server", "--", "python3", "-c",
        "import socket\n"
        "try:\n"
        f"    socket.create_connection({DNS!r}, timeout={TRY_TIMEOUT_S}).close(); print('ok')\n"
        "except socket.timeout:\n"
        "    print('timeout')\n",
        timeout=30,
    ).stdout.strip()  # fmt: skip

    seen = {}
    for namespace in expected:
        wait_pod_phase(cluster, namespace, "client", "Succeeded", timeout=120)
        seen[namespace] = _results(cluster, namespace, "client")
    # Every "ok" shows the server answers on that port; so each "timeout" is the policy dropping the connection.
    assert seen == expected
    assert egress == "timeout"
