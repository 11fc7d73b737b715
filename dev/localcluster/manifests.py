"""In-cluster objects `up` applies: CoreDNS, metrics-server, KEDA, the default StorageClass, KWOK fake nodes,
and the rights of kube-network-policies.

Built as plain dicts (applied as one JSON List) so each piece reads like the upstream manifest it mirrors.
"""

from __future__ import annotations

import base64
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


KEDA_NAMESPACE = "keda"
KEDA_OPERATOR = "keda-operator"
KEDA_ADAPTER = "keda-metrics-apiserver"
KEDA_CERT_SECRET = "kedaorg-certs"
KEDA_METRICS_SERVICE_PORT = 9666
KEDA_ADAPTER_PORT = 6443
# The only kinds ScaledObjects may target here (the ModelDeployment's serving Deployment, and StatefulSets):
# upstream's operator may get any object and any /scale subresource ("*"); ours only these.
KEDA_SCALE_TARGETS = ["deployments", "statefulsets"]


def keda_dns_names(namespace: str = KEDA_NAMESPACE) -> list[str]:
    """Every name the operator's gRPC service and the adapter are reached by (one cert serves both)."""
    return [
        f"{service}{suffix}"
        for service in (KEDA_OPERATOR, KEDA_ADAPTER)
        for suffix in ("", f".{namespace}", f".{namespace}.svc", f".{namespace}.svc.{CLUSTER_DOMAIN}")
    ]


def _restricted(container: Obj) -> Obj:
    """Pod Security `restricted`, with a read-only root filesystem on top."""
    container["securityContext"] = {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return container


def _keda_deployment(name: str, service_account: str, container: Obj, volumes: list[Obj]) -> Obj:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, KEDA_NAMESPACE, **labels),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": service_account,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 65534,
                        "runAsGroup": 65534,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    # KWOK nodes are tainted and run nothing; KEDA belongs on the real node.
                    "nodeSelector": {"kubernetes.io/os": "linux", "type": "real"},
                    "terminationGracePeriodSeconds": 10,
                    "containers": [_restricted(container)],
                    "volumes": volumes,
                },
            },
        },
    }


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def keda(operator_image: str, adapter_image: str, crds: list[Obj], tls: dict[str, str]) -> list[Obj]:
    """KEDA (operator + external-metrics adapter) in namespace `keda`, after upstream's config/ (v2.21):
    the CRDs as shipped, our own least-privilege RBAC, no admission webhooks.

    `tls` holds `ca.crt`, `tls.crt`, `tls.key` (PEM) for the Secret both pods mount at /certs: the operator's
    gRPC metrics service and the adapter use it for mutual TLS, the adapter also to serve the aggregated API,
    whose APIService trusts `ca.crt`. Made by the local PKI, so the operator's cert rotation is off."""
    ns = KEDA_NAMESPACE
    certs = {"name": "certificates", "secret": {"secretName": KEDA_CERT_SECRET}}
    cert_mount = {"name": "certificates", "mountPath": "/certs", "readOnly": True}
    env = [
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "WATCH_NAMESPACE", "value": ""},
    ]
    operator_container: Obj = {
        "name": KEDA_OPERATOR,
        "image": operator_image,
        "imagePullPolicy": "IfNotPresent",
        "args": [
            "--leader-elect=false",
            "--zap-log-level=info",
            "--zap-encoder=console",
            "--zap-time-encoding=rfc3339",
            # Certificates come from the Secret below (local PKI): no rotation, no APIService/webhook patching.
            "--enable-cert-rotation=false",
            "--cert-dir=/certs",
            f"--k8s-cluster-domain={CLUSTER_DOMAIN}",
            "--metrics-bind-address=:8080",
            "--health-probe-bind-address=:8081",
            f"--metrics-service-bind-address=:{KEDA_METRICS_SERVICE_PORT}",
        ],
        # Secrets only from namespace keda (ClusterTriggerAuthentication), so it needs no cluster-wide read
        # of Secrets (upstream's default); a namespaced TriggerAuthentication's secretTargetRef is refused.
        "env": [*env, {"name": "KEDA_RESTRICT_SECRET_ACCESS", "value": "true"}],
        "ports": [
            {"name": "metricsservice", "containerPort": KEDA_METRICS_SERVICE_PORT, "protocol": "TCP"},
            {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        ],
        "resources": {"requests": {"cpu": "50m", "memory": "100Mi"}, "limits": {"memory": "1000Mi"}},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8081}, "initialDelaySeconds": 15},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8081}, "periodSeconds": 2},
        "volumeMounts": [cert_mount],
    }
    adapter_container: Obj = {
        "name": KEDA_ADAPTER,
        "image": adapter_image,
        "imagePullPolicy": "IfNotPresent",
        "args": [
            f"--secure-port={KEDA_ADAPTER_PORT}",
            "--cert-dir=/certs",
            "--tls-cert-file=/certs/tls.crt",
            "--tls-private-key-file=/certs/tls.key",
            "--client-ca-file=/certs/ca.crt",
            f"--metrics-service-address={KEDA_OPERATOR}.{ns}.svc.{CLUSTER_DOMAIN}:{KEDA_METRICS_SERVICE_PORT}",
            "--zap-log-level=info",
        ],
        "env": env,
        "ports": [
            {"name": "https", "containerPort": KEDA_ADAPTER_PORT, "protocol": "TCP"},
            {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        ],
        "resources": {"requests": {"cpu": "50m", "memory": "100Mi"}, "limits": {"memory": "1000Mi"}},
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "https", "scheme": "HTTPS"},
            "initialDelaySeconds": 15,
        },
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "https", "scheme": "HTTPS"}, "periodSeconds": 2},
        "volumeMounts": [cert_mount, {"name": "tmp", "mountPath": "/tmp"}],
    }
    keda_rw = ["get", "list", "watch", "patch", "update"]
    operator_rules = [
        _rule(
            [""],
            ["configmaps", "configmaps/status", "external", "pods", "services"],
            ["get", "list", "watch"],
        ),
        _rule([""], ["limitranges", "serviceaccounts"], ["list", "watch"]),
        _rule(["", "events.k8s.io"], ["events"], ["create", "patch"]),
        _rule(["apps"], ["deployments", "replicasets", "statefulsets"], ["get", "list", "watch"]),
        _rule(["apps"], [f"{r}/scale" for r in KEDA_SCALE_TARGETS], ["get", "list", "watch", "patch", "update"]),
        _rule(["autoscaling"], ["horizontalpodautoscalers"], ["create", "delete", *keda_rw]),
        _rule(["batch"], ["jobs"], ["create", "delete", *keda_rw]),
        _rule(["discovery.k8s.io"], ["endpointslices"], ["get", "list", "watch"]),
        _rule(
            ["eventing.keda.sh"],
            [
                "cloudeventsources",
                "cloudeventsources/status",
                "clustercloudeventsources",
                "clustercloudeventsources/status",
            ],
            keda_rw,
        ),
        _rule(
            ["keda.sh"],
            [
                f"{kind}{sub}"
                for kind in ("scaledobjects", "scaledjobs", "triggerauthentications", "clustertriggerauthentications")
                for sub in ("", "/status", *(("/finalizers",) if kind.startswith("scaled") else ()))
            ],
            keda_rw,
        ),
    ]

    def binding(kind: str, name: str, role_kind: str, role: str, sa: str, namespace: str | None = None) -> Obj:
        obj = _binding(kind, name, role_kind, role, sa, namespace)
        obj["subjects"][0]["namespace"] = ns
        return obj

    def service(name: str, ports: list[Obj]) -> Obj:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(name, ns, app=name),
            "spec": {"selector": {"app": name}, "ports": ports},
        }

    return [
        *crds,
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            # The API server itself refuses KEDA pods that are not Pod Security `restricted`.
            "metadata": _meta(ns, None, **{"pod-security.kubernetes.io/enforce": "restricted"}),
        },
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(KEDA_OPERATOR, ns)},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(KEDA_ADAPTER, ns)},
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta(KEDA_CERT_SECRET, ns),
            "type": "kubernetes.io/tls",
            "data": {key: _b64(tls[key]) for key in ("ca.crt", "tls.crt", "tls.key")},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": _meta("flownexus:keda-operator", None),
            "rules": operator_rules,
        },
        binding(
            "ClusterRoleBinding", "flownexus:keda-operator", "ClusterRole", "flownexus:keda-operator", KEDA_OPERATOR
        ),
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta("flownexus:keda-operator", ns),
            # Its informer of namespace keda's Secrets (certificates, ClusterTriggerAuthentication secrets).
            "rules": [_rule([""], ["secrets"], ["get", "list", "watch"])],
        },
        binding("RoleBinding", "flownexus:keda-operator", "Role", "flownexus:keda-operator", KEDA_OPERATOR, ns),
        # The adapter only serves the aggregated API (it asks the operator for values over gRPC): delegated
        # authentication and authorization, nothing else. The HPA controller may already read external metrics
        # (bootstrap role system:controller:horizontal-pod-autoscaler), so upstream's reader role is not needed.
        binding(
            "ClusterRoleBinding",
            "flownexus:keda-adapter:auth-delegator",
            "ClusterRole",
            "system:auth-delegator",
            KEDA_ADAPTER,
        ),
        binding(
            "RoleBinding",
            "flownexus:keda-adapter:auth-reader",
            "Role",
            "extension-apiserver-authentication-reader",
            KEDA_ADAPTER,
            "kube-system",
        ),
        _keda_deployment(KEDA_OPERATOR, KEDA_OPERATOR, operator_container, [certs]),
        _keda_deployment(KEDA_ADAPTER, KEDA_ADAPTER, adapter_container, [certs, {"name": "tmp", "emptyDir": {}}]),
        service(
            KEDA_OPERATOR,
            [
                {"name": "metricsservice", "port": KEDA_METRICS_SERVICE_PORT, "targetPort": "metricsservice"},
                {"name": "metrics", "port": 8080, "targetPort": "http"},
            ],
        ),
        service(
            KEDA_ADAPTER,
            [
                {"name": "https", "port": 443, "targetPort": "https"},
                {"name": "metrics", "port": 8080, "targetPort": "http"},
            ],
        ),
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": _meta("v1beta1.external.metrics.k8s.io", None),
            "spec": {
                "group": "external.metrics.k8s.io",
                "version": "v1beta1",
                "groupPriorityMinimum": 100,
                "versionPriority": 100,
                "caBundle": _b64(tls["ca.crt"]),
                "service": {"name": KEDA_ADAPTER, "namespace": ns, "port": 443},
            },
        },
    ]
