"""In-cluster objects `up` applies: CoreDNS, metrics-server, the default StorageClass, KWOK fake nodes, and the
rights of kube-network-policies.

Built as plain dicts (applied as one JSON List) so each piece reads like the upstream manifest it mirrors.
"""

from __future__ import annotations

import json
from typing import Any

from .config import CLUSTER_DOMAIN, DNS_SERVICE_IP, NETWORK_POLICY_USER
from .provisioner import PROVISIONER, STORAGE_CLASS

Obj = dict[str, Any]

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_TAINT = {"key": KWOK_ANNOTATION, "value": "fake", "effect": "NoSchedule"}
GPU_RESOURCE = "nvidia.com/gpu"


def as_list(objects: list[Obj]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})


def _meta(name: str, namespace: str | None = "kube-system", **labels: str) -> Obj:
    meta: Obj = {"name": name, "labels": {"app.kubernetes.io/part-of": "flownexus-dev-cluster", **labels}}
    if namespace:
        meta["namespace"] = namespace
    return meta


def _rule(groups: list[str], resources: list[str], verbs: list[str]) -> Obj:
    return {"apiGroups": groups, "resources": resources, "verbs": verbs}


def _binding(kind: str, name: str, role_kind: str, role: str, sa: str, namespace: str | None = None) -> Obj:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": _meta(name, namespace),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": "kube-system"}],
    }


def coredns(image: str) -> list[Obj]:
    corefile = f""".:53 {{
    errors
    health :8080
    ready :8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }}
    prometheus :9153
    forward . /etc/resolv.conf
    cache 30
    reload
}}
"""
    labels = {"k8s-app": "kube-dns"}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta("coredns")},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": _meta("system:coredns", None),
            "rules": [
                _rule([""], ["endpoints", "services", "pods", "namespaces"], ["list", "watch"]),
                _rule(["discovery.k8s.io"], ["endpointslices"], ["list", "watch"]),
            ],
        },
        _binding("ClusterRoleBinding", "system:coredns", "ClusterRole", "system:coredns", "coredns"),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("coredns"), "data": {"Corefile": corefile}},
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta("coredns", **labels),
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "priorityClassName": "system-cluster-critical",
                        # The host's resolver, for names outside the cluster.
                        "dnsPolicy": "Default",
                        "containers": [
                            {
                                "name": "coredns",
                                "image": image,
                                "imagePullPolicy": "IfNotPresent",
                                "args": ["-conf", "/etc/coredns/Corefile"],
                                "ports": [
                                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                    {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                                    {"name": "metrics", "containerPort": 9153, "protocol": "TCP"},
                                ],
                                "resources": {
                                    "requests": {"cpu": "50m", "memory": "40Mi"},
                                    "limits": {"memory": "170Mi"},
                                },
                                "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
                                "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10},
                                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta("kube-dns", **labels),
            "spec": {
                "clusterIP": DNS_SERVICE_IP,
                "selector": labels,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                    {"name": "metrics", "port": 9153, "protocol": "TCP"},
                ],
            },
        },
    ]


def metrics_server(image: str) -> list[Obj]:
    labels = {"k8s-app": "metrics-server"}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta("metrics-server")},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": _meta("system:metrics-server", None),
            "rules": [
                _rule([""], ["nodes/metrics"], ["get"]),
                _rule([""], ["pods", "nodes"], ["get", "list", "watch"]),
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": _meta(
                "system:aggregated-metrics-reader",
                None,
                **{
                    "rbac.authorization.k8s.io/aggregate-to-view": "true",
                    "rbac.authorization.k8s.io/aggregate-to-edit": "true",
                    "rbac.authorization.k8s.io/aggregate-to-admin": "true",
                },
            ),
            "rules": [_rule(["metrics.k8s.io"], ["pods", "nodes"], ["get", "list", "watch"])],
        },
        _binding(
            "ClusterRoleBinding", "system:metrics-server", "ClusterRole", "system:metrics-server", "metrics-server"
        ),
        _binding(
            "ClusterRoleBinding",
            "metrics-server:system:auth-delegator",
            "ClusterRole",
            "system:auth-delegator",
            "metrics-server",
        ),
        _binding(
            "RoleBinding",
            "metrics-server-auth-reader",
            "Role",
            "extension-apiserver-authentication-reader",
            "metrics-server",
            "kube-system",
        ),
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta("metrics-server", **labels),
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "metrics-server",
                        "priorityClassName": "system-cluster-critical",
                        # KWOK nodes are tainted; metrics-server belongs on the real node.
                        "nodeSelector": {"kubernetes.io/os": "linux", "type": "real"},
                        "containers": [
                            {
                                "name": "metrics-server",
                                "image": image,
                                "imagePullPolicy": "IfNotPresent",
                                "args": [
                                    "--cert-dir=/tmp",
                                    "--secure-port=10250",
                                    "--kubelet-preferred-address-types=InternalIP",
                                    "--kubelet-use-node-status-port",
                                    # KWOK nodes have no kubelet to scrape; only the real node does.
                                    "--node-selector=type=real",
                                    # kubelet's serving cert is signed by our CA, but metrics-server is not given it.
                                    "--kubelet-insecure-tls",
                                    # Short, so the HPA sees utilization within seconds of load starting.
                                    "--metric-resolution=10s",
                                    "--kubelet-request-timeout=5s",
                                ],
                                "ports": [{"name": "https", "containerPort": 10250, "protocol": "TCP"}],
                                "resources": {"requests": {"cpu": "50m", "memory": "100Mi"}},
                                "readinessProbe": {
                                    "httpGet": {"path": "/readyz", "port": "https", "scheme": "HTTPS"},
                                    "periodSeconds": 5,
                                },
                                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                            }
                        ],
                        "volumes": [{"name": "tmp", "emptyDir": {}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta("metrics-server", **labels),
            "spec": {"selector": labels, "ports": [{"name": "https", "port": 443, "targetPort": "https"}]},
        },
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": _meta("v1beta1.metrics.k8s.io", None),
            "spec": {
                "group": "metrics.k8s.io",
                "version": "v1beta1",
                "groupPriorityMinimum": 100,
                "versionPriority": 100,
                "insecureSkipTLSVerify": True,
                "service": {"name": "metrics-server", "namespace": "kube-system"},
            },
        },
    ]


def kube_network_policies_rbac() -> list[Obj]:
    """Upstream's ClusterRole (install.yaml, NetworkPolicy only), bound to the host process's user."""
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": _meta("flownexus:kube-network-policies", None),
            "rules": [
                _rule([""], ["pods", "namespaces"], ["list", "watch"]),
                _rule(["networking.k8s.io"], ["networkpolicies"], ["list", "watch"]),
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": _meta("flownexus:kube-network-policies", None),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "flownexus:kube-network-policies",
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": NETWORK_POLICY_USER}],
        },
    ]


def default_storage_class() -> list[Obj]:
    """Served by dev/localcluster/provisioner.py: a 0777 directory per claim, like kind's default class.

    PVs get the claim's access modes, so ReadWriteMany works for pods on the one real node.
    """
    return [
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": PROVISIONER,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
        }
    ]


def fake_node(name: str, gpus: int = 0) -> Obj:
    """A KWOK-managed Node; tainted so only pods that opt in (by toleration) land on it."""
    capacity = {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "1Ti"}
    labels = {
        "type": "kwok",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node-role.kubernetes.io/agent": "",
    }
    if gpus:
        capacity[GPU_RESOURCE] = str(gpus)
        labels["nvidia.com/gpu.present"] = "true"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "annotations": {KWOK_ANNOTATION: "fake"}, "labels": labels},
        "spec": {"taints": [KWOK_TAINT]},
        "status": {"allocatable": capacity, "capacity": capacity},
    }


def fake_nodes(cpu_nodes: int, gpu_nodes: int, gpus_per_node: int = 8) -> list[Obj]:
    return [fake_node(f"kwok-node-{i}") for i in range(cpu_nodes)] + [
        fake_node(f"kwok-gpu-node-{i}", gpus_per_node) for i in range(gpu_nodes)
    ]
