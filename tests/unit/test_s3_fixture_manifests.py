"""Table tests of the e2e S3 store's pure manifest builders (tests/e2e/s3.py): what the SeaweedFS pod must be to
start in a Pod Security ``restricted`` namespace with a read-only root, and that its arguments, mounts, ports
and probes agree with each other."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from flownexus.api.neuralcluster import S3Store
from tests.e2e import s3

REPO = Path(__file__).resolve().parents[2]
ADMIN, READER = s3.S3Keys("admin-key", "admin-secret"), s3.S3Keys("reader-key", "reader-secret")


def manifests(admin: s3.S3Keys = ADMIN, reader: s3.S3Keys = READER) -> dict[str, dict[str, Any]]:
    return {
        m["kind"]: m
        for m in s3.seaweedfs_manifests("localhost/flownexus/seaweedfs:x", s3.identities_config(admin, reader))
    }


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = manifests()["Deployment"]["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    (c,) = pod_spec()["containers"]
    assert isinstance(c, dict)
    return c


def arg(name: str) -> str:
    values = [a.split("=", 1)[1] for a in container()["args"] if a.startswith(f"-{name}=")]
    assert len(values) == 1, f"-{name} given {len(values)} times"
    return str(values[0])


def test_builds_a_secret_a_deployment_and_a_service_in_the_store_namespace() -> None:
    built = s3.seaweedfs_manifests("img", s3.identities_config(ADMIN, READER))
    assert [m["kind"] for m in built] == ["Secret", "Deployment", "Service"]
    assert {m["metadata"]["namespace"] for m in built} == {"flownexus-s3"}


@pytest.mark.parametrize(
    ("where", "key", "expected"),
    [
        ("pod", "runAsNonRoot", True),
        ("pod", "runAsUser", 10001),
        ("pod", "seccompProfile", {"type": "RuntimeDefault"}),
        ("container", "allowPrivilegeEscalation", False),
        ("container", "readOnlyRootFilesystem", True),
        ("container", "capabilities", {"drop": ["ALL"]}),
    ],
)
def test_security_context_meets_restricted_pod_security(where: str, key: str, expected: object) -> None:
    context = pod_spec()["securityContext"] if where == "pod" else container()["securityContext"]
    assert context[key] == expected
    assert "privileged" not in container()["securityContext"]
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod_spec())


def test_every_writable_path_is_an_emptydir_and_only_the_config_is_a_secret() -> None:
    """The root is read-only: weed writes its data under -dir and its Unix sockets under /tmp."""
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    assert "emptyDir" in volumes[mounts[arg("dir")]["name"]]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert not any("hostPath" in v for v in volumes.values())
    config_dir = arg("s3.config").rsplit("/", 1)[0]
    assert mounts[config_dir]["readOnly"] is True
    assert volumes[mounts[config_dir]["name"]]["secret"]["secretName"] == manifests()["Secret"]["metadata"]["name"]


def test_s3_config_argument_names_the_secret_key_that_holds_the_identities() -> None:
    secret = manifests()["Secret"]
    key = arg("s3.config").rsplit("/", 1)[1]
    assert json.loads(secret["stringData"][key]) == s3.identities_config(ADMIN, READER)


def test_service_publishes_the_s3_port_to_the_container_port_the_server_listens_on() -> None:
    service = manifests()["Service"]
    (port,) = service["spec"]["ports"]
    (container_port,) = container()["ports"]
    assert port["port"] == s3.S3_PORT == container_port["containerPort"] == int(arg("s3.port"))
    assert port["targetPort"] == container_port["name"]
    assert service["spec"]["selector"] == manifests()["Deployment"]["spec"]["selector"]["matchLabels"]
    assert arg("ip.bind") == "0.0.0.0"


@pytest.mark.parametrize("probe", ["readinessProbe", "livenessProbe"])
def test_probes_ask_the_s3_gateway_status_on_its_named_port(probe: str) -> None:
    assert container()[probe]["httpGet"] == {"path": "/status", "port": container()["ports"][0]["name"]}


def test_bucket_is_created_at_start_and_extra_gateways_are_off() -> None:
    args = container()["args"]
    assert arg("bucket") == s3.BUCKET
    for off in ("-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"):
        assert off in args
    assert args.index("mini") == 1 and args[0] == "-logtostderr=true"  # a global flag goes before the command


def test_one_replica_recreated_never_two_writers() -> None:
    spec = manifests()["Deployment"]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert container()["imagePullPolicy"] == "IfNotPresent"
    assert container()["resources"]["limits"]["memory"]


def test_new_keys_change_the_pod_template_so_the_server_rereads_them() -> None:
    def template_hash(admin: s3.S3Keys) -> str:
        annotations = manifests(admin=admin)["Deployment"]["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["flownexus.io/s3-config-hash"])

    assert template_hash(ADMIN) == template_hash(ADMIN)
    assert template_hash(ADMIN) != template_hash(s3.S3Keys("other-key", "other-secret"))


def test_admin_may_do_everything_and_the_reader_only_read_and_list_the_bucket() -> None:
    admin, reader = s3.identities_config(ADMIN, READER)["identities"]
    assert admin["credentials"] == [{"accessKey": "admin-key", "secretKey": "admin-secret"}]
    assert "Admin" in admin["actions"] and "Write" in admin["actions"]
    assert reader["credentials"] == [{"accessKey": "reader-key", "secretKey": "reader-secret"}]
    assert sorted(reader["actions"]) == [f"List:{s3.BUCKET}", f"Read:{s3.BUCKET}"]


def test_credentials_secret_has_the_aws_key_names_the_store_reads() -> None:
    secret = s3.credentials_secret("creds", READER)
    assert secret["metadata"] == {"name": "creds"}
    assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": "reader-key", "AWS_SECRET_ACCESS_KEY": "reader-secret"}


def test_endpoint_is_the_service_dns_name_and_a_valid_store_endpoint() -> None:
    assert s3.ENDPOINT == "http://seaweedfs.flownexus-s3.svc:8333"
    store = S3Store.model_validate({"endpoint": s3.ENDPOINT, "bucket": s3.BUCKET, "secretRef": {"name": "creds"}})
    assert store.uri() == "s3://flownexus"


def test_fresh_keys_differ_each_time() -> None:
    assert s3.S3Keys.fresh("a") != s3.S3Keys.fresh("a")


def test_kind_example_runs_the_validated_command_line_with_the_same_security() -> None:
    """examples/kind/seaweedfs.yaml (upstream's image) runs weed with the fixture's arguments, the identities at
    the same path, and a pod that passes Pod Security ``restricted`` with a read-only root."""
    docs = {d["kind"]: d for d in yaml.safe_load_all((REPO / "examples" / "kind" / "seaweedfs.yaml").read_text())}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (example,) = pod["containers"]
    assert example["command"] == ["/usr/bin/weed"]
    assert example["args"] == s3.weed_args()
    assert example["securityContext"] == s3.CONTAINER_SECURITY
    assert pod["securityContext"] == s3.POD_SECURITY
    assert example["readinessProbe"]["httpGet"] == {"path": "/status", "port": "s3"}
    assert docs["Service"]["spec"]["ports"][0]["port"] == s3.S3_PORT
    assert (
        f"http://{docs['Service']['metadata']['name']}.{docs['Namespace']['metadata']['name']}.svc:8333" == s3.ENDPOINT
    )
    identities = json.loads(docs["Secret"]["stringData"]["s3.json"])["identities"]
    assert [i["actions"] for i in identities] == [
        i["actions"] for i in s3.identities_config(ADMIN, READER)["identities"]
    ]
    credentials = yaml.safe_load((REPO / "examples" / "kind" / "s3-credentials.yaml").read_text())
    assert identities[0]["credentials"] == [
        {
            "accessKey": credentials["stringData"]["AWS_ACCESS_KEY_ID"],
            "secretKey": credentials["stringData"]["AWS_SECRET_ACCESS_KEY"],
        }
    ]
