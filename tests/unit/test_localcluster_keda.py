"""Table tests of the local cluster's KEDA install (dev/localcluster): the pure manifests of `manifests.keda`
(Pod Security ``restricted`` pods on the real node, least-privilege RBAC without wildcards, arguments, ports,
Services, the Secret and the APIService agreeing with each other), the certificate `up` issues for it with
the local PKI (openssl), and the build component that makes its binaries."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from dev.localcluster import build, cluster, manifests
from dev.localcluster.config import CLUSTER_DOMAIN, Layout, read_versions

Obj = dict[str, Any]

TLS = {"ca.crt": "CA PEM\n", "tls.crt": "CERT PEM\n", "tls.key": "KEY PEM\n"}
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "scaledobjects.keda.sh"},
    "spec": {"group": "keda.sh"},
}
DEPLOYMENTS = [manifests.KEDA_OPERATOR, manifests.KEDA_ADAPTER]
# Pod Security `restricted` allows only these volume sources.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
ROLE_KINDS = ("ClusterRole", "Role")


def objects() -> list[Obj]:
    return manifests.keda("localhost/flownexus/keda-operator:x", "localhost/flownexus/keda-adapter:y", [CRD], TLS)


def find(kind: str, name: str) -> Obj:
    (obj,) = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def pod_spec(deployment: str) -> Obj:
    spec: Obj = find("Deployment", deployment)["spec"]["template"]["spec"]
    return spec


def container(deployment: str) -> Obj:
    (c,) = pod_spec(deployment)["containers"]
    assert isinstance(c, dict)
    return c


def arg(deployment: str, name: str) -> str:
    values: list[str] = [a.split("=", 1)[1] for a in container(deployment)["args"] if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"{deployment}: --{name} given {len(values)} times"
    return values[0]


def container_port(deployment: str, port_name: str) -> int:
    (port,) = [p["containerPort"] for p in container(deployment)["ports"] if p["name"] == port_name]
    assert isinstance(port, int)
    return port


def roles() -> list[Obj]:
    return [o for o in objects() if o["kind"] in ROLE_KINDS]


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_keda_pod_is_pod_security_restricted_with_read_only_root(deployment: str) -> None:
    spec, c = pod_spec(deployment), container(deployment)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    assert "privileged" not in sc
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key)
    assert all("hostPort" not in p for p in c["ports"])
    for volume in spec["volumes"]:
        (source,) = set(volume) - {"name"}
        assert source in RESTRICTED_VOLUMES, volume


def test_keda_namespace_enforces_restricted_so_the_api_server_rejects_other_pods() -> None:
    ns = find("Namespace", manifests.KEDA_NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_keda_pod_runs_on_the_real_node_only(deployment: str) -> None:
    spec = pod_spec(deployment)
    assert spec["nodeSelector"]["type"] == "real"
    tolerated = {t.get("key") for t in spec.get("tolerations", [])}
    assert manifests.KWOK_ANNOTATION not in tolerated


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_keda_pod_uses_its_image_without_pulling_and_its_own_service_account(deployment: str) -> None:
    c = container(deployment)
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["image"].startswith("localhost/flownexus/keda-")
    assert ("operator" in c["image"]) == (deployment == manifests.KEDA_OPERATOR)
    sa = pod_spec(deployment)["serviceAccountName"]
    assert sa == deployment
    assert find("ServiceAccount", sa)["metadata"]["namespace"] == manifests.KEDA_NAMESPACE


@pytest.mark.parametrize("role", [f"{r['kind']}/{r['metadata']['name']}" for r in roles()])
def test_keda_rbac_has_no_wildcard_groups_resources_or_verbs(role: str) -> None:
    (obj,) = [r for r in roles() if f"{r['kind']}/{r['metadata']['name']}" == role]
    for rule in obj["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert not any("*" in value for value in rule[field]), (role, rule)
        assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"]), rule


def rules_granting(resource: str, group: str = "", kinds: tuple[str, ...] = ROLE_KINDS) -> list[Obj]:
    return [
        rule
        for role in roles()
        if role["kind"] in kinds
        for rule in role["rules"]
        if resource in rule["resources"] and group in rule["apiGroups"]
    ]


@pytest.mark.parametrize(
    ("group", "resource", "verbs", "granted"),
    [
        # What the operator needs: read its CRs and write their status/finalizers, own HPAs, scale targets.
        ("keda.sh", "scaledobjects", {"get", "list", "watch", "update", "patch"}, True),
        ("keda.sh", "scaledobjects/status", {"update", "patch"}, True),
        ("keda.sh", "scaledobjects/finalizers", {"update"}, True),
        ("keda.sh", "triggerauthentications", {"get", "list", "watch"}, True),
        ("autoscaling", "horizontalpodautoscalers", {"create", "update", "delete", "get", "list", "watch"}, True),
        ("apps", "deployments/scale", {"get", "update", "patch"}, True),
        ("apps", "deployments", {"get", "list", "watch"}, True),
        ("", "configmaps", {"get", "list", "watch"}, True),
        # What it must not get: write secrets or workloads, patch APIServices or webhooks (no cert rotation).
        ("", "secrets", {"create"}, False),
        ("", "secrets", {"update"}, False),
        ("", "secrets", {"patch"}, False),
        ("apps", "deployments", {"update"}, False),
        ("apps", "deployments", {"patch"}, False),
        ("apiregistration.k8s.io", "apiservices", {"patch"}, False),
        ("admissionregistration.k8s.io", "validatingwebhookconfigurations", {"get"}, False),
        ("coordination.k8s.io", "leases", {"create"}, False),
    ],
)
def test_keda_rbac_grants_what_the_operator_needs_and_nothing_it_does_not(
    group: str, resource: str, verbs: set[str], granted: bool
) -> None:
    allowed = {v for r in rules_granting(resource, group) for v in r["verbs"]}
    assert (verbs <= allowed) is granted, (group, resource, allowed)


def test_keda_operator_reads_secrets_only_in_its_namespace_as_its_env_promises() -> None:
    assert not rules_granting("secrets", kinds=("ClusterRole",))
    (role,) = [r for r in roles() if r["kind"] == "Role" and rules_granting("secrets", kinds=("Role",))]
    assert role["metadata"]["namespace"] == manifests.KEDA_NAMESPACE
    env = {e["name"]: e.get("value") for e in container(manifests.KEDA_OPERATOR)["env"]}
    assert env["KEDA_RESTRICT_SECRET_ACCESS"] == "true"
    assert {"get", "list", "watch"} <= {v for r in rules_granting("secrets", kinds=("Role",)) for v in r["verbs"]}


def test_keda_bindings_bind_the_roles_to_the_service_accounts_in_the_keda_namespace() -> None:
    bindings = [o for o in objects() if o["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    ours = {r["metadata"]["name"] for r in roles()}
    builtin = {"system:auth-delegator", "extension-apiserver-authentication-reader"}
    assert bindings
    for b in bindings:
        (subject,) = b["subjects"]
        assert subject["kind"] == "ServiceAccount"
        assert subject["namespace"] == manifests.KEDA_NAMESPACE
        find("ServiceAccount", subject["name"])
        assert b["roleRef"]["name"] in ours | builtin
    adapter_roles = {b["roleRef"]["name"] for b in bindings if b["subjects"][0]["name"] == manifests.KEDA_ADAPTER}
    # The adapter only delegates authn/authz to the API server; it reads nothing else.
    assert adapter_roles == builtin
    (reader,) = [b for b in bindings if b["roleRef"]["name"] == "extension-apiserver-authentication-reader"]
    assert reader["kind"] == "RoleBinding"
    assert reader["metadata"]["namespace"] == "kube-system"


@pytest.mark.parametrize(
    ("service", "deployment", "port_name"),
    [
        (manifests.KEDA_OPERATOR, manifests.KEDA_OPERATOR, "metricsservice"),
        (manifests.KEDA_OPERATOR, manifests.KEDA_OPERATOR, "metrics"),
        (manifests.KEDA_ADAPTER, manifests.KEDA_ADAPTER, "https"),
        (manifests.KEDA_ADAPTER, manifests.KEDA_ADAPTER, "metrics"),
    ],
)
def test_keda_service_port_reaches_a_named_container_port_of_its_pods(
    service: str, deployment: str, port_name: str
) -> None:
    svc = find("Service", service)
    assert svc["spec"]["selector"] == find("Deployment", deployment)["spec"]["template"]["metadata"]["labels"]
    (port,) = [p for p in svc["spec"]["ports"] if p["name"] == port_name]
    assert port["targetPort"] in {p["name"] for p in container(deployment)["ports"]}


@pytest.mark.parametrize(
    ("deployment", "flag", "port_name"),
    [
        (manifests.KEDA_OPERATOR, "metrics-service-bind-address", "metricsservice"),
        (manifests.KEDA_OPERATOR, "metrics-bind-address", "http"),
        (manifests.KEDA_ADAPTER, "secure-port", "https"),
    ],
)
def test_keda_listen_flags_match_the_declared_container_ports(deployment: str, flag: str, port_name: str) -> None:
    assert int(arg(deployment, flag).rsplit(":", 1)[-1]) == container_port(deployment, port_name)


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_keda_probes_hit_a_port_the_process_listens_on(deployment: str) -> None:
    c = container(deployment)
    listening = {p["name"] for p in c["ports"]} | {p["containerPort"] for p in c["ports"]}
    if deployment == manifests.KEDA_OPERATOR:
        listening.add(int(arg(deployment, "health-probe-bind-address").rsplit(":", 1)[-1]))
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in listening


def test_keda_operator_takes_its_certs_from_the_secret_not_from_rotation() -> None:
    assert arg(manifests.KEDA_OPERATOR, "enable-cert-rotation") == "false"
    assert arg(manifests.KEDA_OPERATOR, "leader-elect") == "false"
    assert arg(manifests.KEDA_OPERATOR, "k8s-cluster-domain") == CLUSTER_DOMAIN


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_keda_cert_dir_is_the_mounted_secret_with_every_key_the_flags_name(deployment: str) -> None:
    secret = find("Secret", manifests.KEDA_CERT_SECRET)
    cert_dir = arg(deployment, "cert-dir")
    (mount,) = [m for m in container(deployment)["volumeMounts"] if m["mountPath"] == cert_dir]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert not volume["secret"].get("optional")
    # Both sides of KEDA's gRPC mutual TLS read ca.crt, tls.crt and tls.key from the cert dir.
    assert {base64.b64decode(v).decode() for v in secret["data"].values()} == set(TLS.values())
    assert set(secret["data"]) == set(TLS)
    for flag in ("tls-cert-file", "tls-private-key-file", "client-ca-file"):
        if deployment == manifests.KEDA_ADAPTER:
            path = Path(arg(deployment, flag))
            assert path.parent == Path(cert_dir) and path.name in secret["data"]


def test_keda_apiservice_points_at_the_adapter_service_and_trusts_the_keda_ca() -> None:
    api = find("APIService", "v1beta1.external.metrics.k8s.io")["spec"]
    assert (api["group"], api["version"]) == ("external.metrics.k8s.io", "v1beta1")
    svc = find("Service", api["service"]["name"])
    assert svc["metadata"]["namespace"] == api["service"]["namespace"]
    assert api["service"]["port"] in {p["port"] for p in svc["spec"]["ports"] if p["name"] == "https"}
    assert base64.b64decode(api["caBundle"]).decode() == TLS["ca.crt"]
    assert not api.get("insecureSkipTLSVerify")
    # The API server checks the adapter's cert against <service>.<namespace>.svc.
    assert f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc" in manifests.keda_dns_names()


def test_keda_adapter_dials_the_operator_service_by_a_name_its_cert_carries() -> None:
    host, port = arg(manifests.KEDA_ADAPTER, "metrics-service-address").rsplit(":", 1)
    assert host in manifests.keda_dns_names()
    assert host.split(".")[0] == manifests.KEDA_OPERATOR
    assert host.split(".")[1] == manifests.KEDA_NAMESPACE
    assert int(port) == container_port(manifests.KEDA_OPERATOR, "metricsservice")


def test_keda_objects_come_in_an_order_apply_accepts() -> None:
    kinds = [o["kind"] for o in objects()]
    assert objects()[0] == CRD
    namespaced = [i for i, o in enumerate(objects()) if o["metadata"].get("namespace") == manifests.KEDA_NAMESPACE]
    assert kinds.index("Namespace") < min(namespaced)
    assert kinds.index("Secret") < kinds.index("Deployment")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI, as dev/cluster does")
def test_keda_certificate_from_the_local_pki_verifies_for_every_keda_name_and_both_usages(tmp_path: Path) -> None:
    layout = Layout(repo=tmp_path)
    layout.pki.mkdir(parents=True)
    tls = cluster._keda_tls(layout)
    assert set(tls) == set(TLS)
    assert tls == cluster._keda_tls(layout), "a second `up` must reuse the certificate, not issue another"
    ca, cert = layout.pki / "keda-ca.crt", layout.pki / "keda.crt"
    for purpose in ("sslserver", "sslclient"):
        verified = subprocess.run(
            ["openssl", "verify", "-purpose", purpose, "-CAfile", str(ca), str(cert)], capture_output=True, text=True
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(cert)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert set(re.findall(r"DNS:([^,\s]+)", text)) == set(manifests.keda_dns_names())
    # Its own CA, not the cluster's: the operator's gRPC server trusts every client cert of ca.crt.
    assert not (layout.pki / "ca.crt").exists()


def test_keda_is_built_last_with_both_commands_at_the_pinned_version() -> None:
    layout = Layout()
    *_, last = build.components(layout)
    assert last.name == "keda"
    assert last.binaries == {
        "keda-operator": "github.com/kedacore/keda/v2/cmd/operator",
        "keda-adapter": "github.com/kedacore/keda/v2/cmd/adapter",
    }
    pinned = read_versions()["KEDA_VERSION"]
    assert re.fullmatch(r"v2\.21\.\d+", pinned)
    assert f"-X github.com/kedacore/keda/v2/version.Version={pinned}" in last.ldflags
    build.check_pin(layout, last)  # raises SystemExit when dev/go/keda/go.mod requires another version
    go_mod = (last.module_dir / "go.mod").read_text()
    for package in last.binaries.values():
        assert f"\t{package}\n" in go_mod, f"{package} is not a tool of {last.module_dir / 'go.mod'}"


def _kubectl() -> Path | None:
    cached = Layout().k8s("kubectl")
    found = shutil.which("kubectl")
    return cached if cached.exists() else Path(found) if found else None


def _crd_dir() -> Path | None:
    """The CRDs `build` copied, else those of the pinned module in the Go module cache."""
    built = Layout().bin_dir("keda") / build.KEDA_CRD_DIR
    if built.is_dir():
        return built
    if shutil.which("go") is None:
        return None
    modcache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True).stdout.strip()
    module = Path(modcache) / f"github.com/kedacore/keda/v2@{read_versions()['KEDA_VERSION']}/config/crd/bases"
    return module if module.is_dir() else None


def test_keda_crds_are_read_from_yaml_as_json_objects_labelled_like_ours() -> None:
    kubectl, crd_dir = _kubectl(), _crd_dir()
    if kubectl is None or crd_dir is None:
        pytest.skip("needs kubectl and KEDA's CRDs (dev/cluster build, or the module in the Go module cache)")
    crds = cluster.yaml_objects(kubectl, crd_dir)
    assert {c["kind"] for c in crds} == {"CustomResourceDefinition"}
    assert len(crds) == len(list(crd_dir.glob("*.yaml")))
    by_name = {c["metadata"]["name"]: c for c in crds}
    scaled_objects = by_name["scaledobjects.keda.sh"]["spec"]
    assert scaled_objects["names"]["kind"] == "ScaledObject"
    assert [(v["name"], v["served"], v["storage"]) for v in scaled_objects["versions"]] == [("v1alpha1", True, True)]
    assert all(c["metadata"]["labels"][cluster.PART_OF] == "flownexus-dev-cluster" for c in crds)
    applied = manifests.keda("op", "ad", crds, TLS)
    assert applied[: len(crds)] == crds


@pytest.mark.parametrize(
    ("deployment", "binary"), [(manifests.KEDA_OPERATOR, "keda-operator"), (manifests.KEDA_ADAPTER, "keda-adapter")]
)
def test_keda_binary_knows_every_flag_its_deployment_passes(deployment: str, binary: str) -> None:
    path = Layout().binary("keda", binary)
    if not path.exists():
        pytest.skip(f"{path} not built (dev/cluster build)")
    usage = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60)
    for flag in container(deployment)["args"]:
        name = flag.split("=", 1)[0]
        assert re.search(rf"^\s+(-\w, )?{name} ", usage.stdout + usage.stderr, re.MULTILINE), f"{binary}: {name}"
