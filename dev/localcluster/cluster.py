"""`up`, `status` and `down` for the local cluster: processes on this host, started in dependency order."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from . import build, host, images, manifests, node_config, pki, procs, provisioner
from .config import (
    APISERVER_PORT,
    AUDIT_POLICY,
    DEV_DIR,
    ETCD_CLIENT_PORT,
    ETCD_PEER_PORT,
    NETWORK_POLICY_METRICS,
    NETWORK_POLICY_QUEUE,
    NODE_NAME,
    PAUSE_IMAGE,
    POD_CIDR,
    SERVICE_CIDR,
    STATE_ROOTS,
    Layout,
    host_ip,
)

OWNER_FILE = STATE_ROOTS[1] / "owner"
PART_OF = "app.kubernetes.io/part-of"

# Stop order: the reverse of start order, so nothing loses its upstream while it still runs.
PROCESSES = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "kubelet",
    "kube-proxy",
    "kube-network-policies",
    "kwok",
    "provisioner",
]


def log(message: str) -> None:
    print(f"[cluster] {message}", flush=True)


def kubectl(layout: Layout, *args: str, input: str | None = None, check: bool = True) -> str:
    result = subprocess.run(
        [str(layout.k8s("kubectl")), "--kubeconfig", str(layout.kubeconfig), *args],
        input=input,
        capture_output=True,
        text=True,
    )
    if check and result.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def wait_for(what: str, ready: Callable[[], bool], timeout: float, layout: Layout | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.5)
    hint = f"; logs in {layout.logs}" if layout else ""
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}{hint}")


def _etcd_healthy() -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{ETCD_CLIENT_PORT}/health", timeout=2) as resp:
        return bool(json.load(resp).get("health") == "true")


def _apiserver_ready(layout: Layout) -> bool:
    return kubectl(layout, "get", "--raw", "/readyz", check=False).strip() == "ok"


def _write_if_changed(path: Path, text: str) -> None:
    # kube-proxy exits when its config file changes; an idempotent `up` must not rewrite it needlessly.
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _write_configs(layout: Layout, node_ip: str) -> None:
    layout.conf.mkdir(parents=True, exist_ok=True)
    pki.ensure_pki(layout.pki, node_ip)
    pki.write_kubeconfig(layout.kubeconfig, layout.pki, "admin")
    for stem in ("controller-manager", "scheduler", "kubelet", "kube-proxy", "kube-network-policies"):
        # The node components reach the API server by the node IP, as they would from another machine.
        pki.write_kubeconfig(layout.conf / f"{stem}.kubeconfig", layout.pki, stem)
    _write_if_changed(layout.conf / "audit-policy.yaml", AUDIT_POLICY)
    _write_if_changed(layout.conf / "containerd.toml", node_config.containerd_toml(layout))
    _write_if_changed(layout.conf / "kubelet.yaml", node_config.kubelet_yaml(layout))
    _write_if_changed(layout.conf / "kube-proxy.yaml", node_config.kube_proxy_yaml(layout))
    layout.cni_conf_dir.mkdir(parents=True, exist_ok=True)
    _write_if_changed(layout.cni_conf_dir / "10-flownexus.conflist", node_config.cni_conflist(layout))


def _start_control_plane(layout: Layout, node_ip: str) -> None:
    p, etcd_dir = layout.pki, layout.var / "etcd"
    procs.start(
        layout,
        "etcd",
        [
            layout.binary("etcd"),
            "--name",
            "fnx",
            "--data-dir",
            etcd_dir,
            "--listen-client-urls",
            f"http://127.0.0.1:{ETCD_CLIENT_PORT}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{ETCD_CLIENT_PORT}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{ETCD_PEER_PORT}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{ETCD_PEER_PORT}",
            "--initial-cluster",
            f"fnx=http://127.0.0.1:{ETCD_PEER_PORT}",
            "--listen-metrics-urls",
            "",
            "--log-level",
            "warn",
            # A throwaway test cluster: fsync only costs time on this disk.
            "--unsafe-no-fsync",
        ],
    )
    wait_for("etcd", _etcd_healthy, 30, layout)
    procs.start(
        layout,
        "kube-apiserver",
        [
            layout.k8s("kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{ETCD_CLIENT_PORT}",
            f"--secure-port={APISERVER_PORT}",
            f"--advertise-address={node_ip}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-node-port-range=30000-32767",
            f"--client-ca-file={p / 'ca.crt'}",
            f"--tls-cert-file={p / 'apiserver.crt'}",
            f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={p / 'sa.pub'}",
            f"--service-account-signing-key-file={p / 'sa.key'}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",
            # Aggregation layer for metrics-server; routing to the endpoint IP avoids a hop through kube-proxy.
            f"--requestheader-client-ca-file={p / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={p / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={p / 'front-proxy-client.key'}",
            "--enable-aggregator-routing=true",
            # Every request, who sent it and the answer's code: how benchmarks count an operator's requests.
            f"--audit-policy-file={layout.conf / 'audit-policy.yaml'}",
            f"--audit-log-path={layout.logs / 'audit.log'}",
            "--audit-log-format=json",
            "--audit-log-maxsize=200",
            "--audit-log-maxbackup=1",
            "--profiling=false",
            "--v=1",
        ],
    )
    wait_for("kube-apiserver /readyz", lambda: _apiserver_ready(layout), 120, layout)
    common = ["--leader-elect=false", "--bind-address=127.0.0.1", "--profiling=false", "--v=1"]
    kcm = layout.conf / "controller-manager.kubeconfig"
    procs.start(
        layout,
        "kube-controller-manager",
        [
            layout.k8s("kube-controller-manager"),
            *common,
            "--secure-port=10357",
            f"--kubeconfig={kcm}",
            f"--authentication-kubeconfig={kcm}",
            f"--authorization-kubeconfig={kcm}",
            f"--client-ca-file={p / 'ca.crt'}",
            f"--requestheader-client-ca-file={p / 'front-proxy-ca.crt'}",
            f"--cluster-signing-cert-file={p / 'ca.crt'}",
            f"--cluster-signing-key-file={p / 'ca.key'}",
            f"--root-ca-file={p / 'ca.crt'}",
            f"--service-account-private-key-file={p / 'sa.key'}",
            "--use-service-account-credentials=true",
            f"--cluster-cidr={POD_CIDR}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*,bootstrapsigner,tokencleaner",
            # Faster HPA decisions and quicker release of deleted pods' volumes in tests.
            "--horizontal-pod-autoscaler-sync-period=5s",
        ],
    )
    sched = layout.conf / "scheduler.kubeconfig"
    procs.start(
        layout,
        "kube-scheduler",
        [
            layout.k8s("kube-scheduler"),
            *common,
            "--secure-port=10359",
            f"--kubeconfig={sched}",
            f"--authentication-kubeconfig={sched}",
            f"--authorization-kubeconfig={sched}",
        ],
    )


def _start_node(layout: Layout, node_ip: str) -> None:
    procs.start(layout, "containerd", ["/usr/bin/containerd", "--config", layout.conf / "containerd.toml"])
    wait_for("containerd", lambda: images.ctr(layout, "version", check=False).returncode == 0, 30, layout)
    pause = images.build_binary_image(layout, "pause", [layout.binary("pause")])
    # containerd's sandbox_image is a fixed name; point it at the image built from the current inputs.
    images.ctr(layout, "images", "tag", "--force", pause, PAUSE_IMAGE)
    procs.start(
        layout,
        "kubelet",
        [
            layout.k8s("kubelet"),
            f"--config={layout.conf / 'kubelet.yaml'}",
            f"--kubeconfig={layout.conf / 'kubelet.kubeconfig'}",
            f"--root-dir={layout.var / 'kubelet'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={node_ip}",
            "--node-labels=type=real",
            "--v=1",
        ],
    )
    procs.start(
        layout, "kube-proxy", [layout.k8s("kube-proxy"), f"--config={layout.conf / 'kube-proxy.yaml'}", "--v=1"]
    )
    _start_network_policies(layout)


def _start_network_policies(layout: Layout) -> None:
    """NetworkPolicy enforcement for the pods of the real node (the bridge CNI has none): kube-network-policies
    on the host network, as the user system:kube-network-policies. It sends the first packet of each
    connection to or from a pod that a NetworkPolicy selects to an nfqueue and accepts or drops it there."""
    _apply(layout, manifests.kube_network_policies_rbac())
    procs.start(
        layout,
        "kube-network-policies",
        [
            layout.binary("kube-network-policies"),
            f"--kubeconfig={layout.conf / 'kube-network-policies.kubeconfig'}",
            f"--hostname-override={NODE_NAME}",
            f"--nfqueue-id={NETWORK_POLICY_QUEUE}",
            f"--metrics-bind-address={NETWORK_POLICY_METRICS}",
            "--v=1",
        ],
    )


def _start_provisioner(layout: Layout) -> None:
    """The default StorageClass's provisioner (dev/localcluster/provisioner.py). A StorageClass's provisioner
    cannot change, so one left by an older `up` (kube-controller-manager's hostPath provisioner) is replaced."""
    procs.start(
        layout,
        "provisioner",
        [sys.executable, "-m", "dev.localcluster.provisioner", "--root", layout.var / "volumes"],
        env={"PYTHONPATH": str(layout.repo)},
    )
    current = kubectl(layout, "get", "storageclass", provisioner.STORAGE_CLASS, "-o", "jsonpath={.provisioner}",
                      check=False).strip()  # fmt: skip
    if current and current != provisioner.PROVISIONER:
        kubectl(layout, "delete", "storageclass", provisioner.STORAGE_CLASS)


def _node_ready(layout: Layout) -> bool:
    out = kubectl(
        layout, "get", "node", NODE_NAME, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False
    )
    return out.strip() == "True"


def _apply(layout: Layout, objects: list[manifests.Obj]) -> None:
    kubectl(layout, "apply", "--server-side", "--force-conflicts", "-f", "-", input=manifests.as_list(objects))


def _keda_tls(layout: Layout) -> dict[str, str]:
    """A CA of KEDA's own and one cert (server and client auth) for the operator's gRPC service and the
    adapter: the operator's gRPC server trusts every client cert of that CA, so not the cluster CA."""
    sans = tuple(f"DNS:{name}" for name in manifests.keda_dns_names())
    pki._new_ca(layout.pki, "keda-ca", "flownexus-keda-ca")
    pki._issue(layout.pki, pki.Identity("keda", "keda", sans=sans, ca="keda-ca"))
    return {
        "ca.crt": (layout.pki / "keda-ca.crt").read_text(),
        "tls.crt": (layout.pki / "keda.crt").read_text(),
        "tls.key": (layout.pki / "keda.key").read_text(),
    }


def _keda_crds(layout: Layout) -> list[manifests.Obj]:
    """The CRDs `build` copied from KEDA's module."""
    return yaml_objects(layout.k8s("kubectl"), layout.bin_dir("keda") / build.KEDA_CRD_DIR)


def yaml_objects(kubectl_binary: Path, path: Path) -> list[manifests.Obj]:
    """The objects of a YAML file or directory as JSON, labelled like ours: no YAML library here, so kubectl
    parses them (`label --local` needs no API server) and prints one JSON document per object."""
    label = f"{PART_OF}=flownexus-dev-cluster"
    result = subprocess.run(
        [str(kubectl_binary), "label", "--local", "-o", "json", "-f", str(path), label], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"kubectl could not read {path}: {result.stderr.strip()}")
    decoder, out, at = json.JSONDecoder(), result.stdout, 0
    objects: list[manifests.Obj] = []
    while True:
        at = len(out) - len(out[at:].lstrip())  # the next document, after the whitespace between them
        if at == len(out):
            return objects
        obj, at = decoder.raw_decode(out, at)
        objects += obj["items"] if obj.get("kind") == "List" else [obj]


def _external_metrics_served(layout: Layout) -> bool:
    out = kubectl(layout, "get", "--raw", "/apis/external.metrics.k8s.io/v1beta1", check=False)
    return '"groupVersion":"external.metrics.k8s.io/v1beta1"' in out.replace(" ", "")


def _sync_fake_nodes(layout: Layout, cpu_nodes: int, gpu_nodes: int) -> None:
    wanted = manifests.fake_nodes(cpu_nodes, gpu_nodes)
    if wanted:
        # Plain create (not apply): a Node's status is only taken from the object on create.
        existing = set(kubectl(layout, "get", "nodes", "-l", "type=kwok", "-o", "name").split())
        new = [n for n in wanted if f"node/{n['metadata']['name']}" not in existing]
        if new:
            kubectl(layout, "create", "-f", "-", input=manifests.as_list(new))
    names = {f"node/{n['metadata']['name']}" for n in wanted}
    surplus = [n for n in kubectl(layout, "get", "nodes", "-l", "type=kwok", "-o", "name").split() if n not in names]
    if surplus:
        kubectl(layout, "delete", *surplus, "--wait=false")


def other_owner(layout: Layout) -> Path | None:
    """The checkout whose running cluster holds this machine's state, when that is not this checkout.

    State roots, ports and iptables are machine-wide, so one cluster per machine; a second checkout (CI's
    fresh clone) reuses the running one instead of starting, or tearing down, its own.
    """
    if not OWNER_FILE.exists():
        return None
    repo = Path(OWNER_FILE.read_text().strip())
    if repo == layout.repo:
        return None
    return repo if procs.running_pid(Layout(repo), "kube-apiserver") is not None else None


def up(layout: Layout, fake_nodes: int = 2, fake_gpu_nodes: int = 1, timeout: float = 300) -> None:
    """Bring the cluster up, or finish bringing it up; safe to run again on a running cluster."""
    started = time.monotonic()
    owner = other_owner(layout)
    if owner is not None:
        raise SystemExit(f"the cluster of {owner} runs on this machine; use it or run {owner}/dev/cluster down")
    build.ensure_built(layout)
    node_ip = host_ip()
    for note in host.prepare(layout):
        log(note)
    OWNER_FILE.write_text(f"{layout.repo}\n")
    _write_configs(layout, node_ip)
    _start_control_plane(layout, node_ip)
    _start_node(layout, node_ip)
    log("control plane up; building add-on images")
    coredns = images.build_binary_image(layout, "coredns", [layout.binary("coredns")])
    metrics = images.build_binary_image(layout, "metrics-server", [layout.binary("metrics-server")])
    keda_operator = images.build_binary_image(layout, "keda-operator", [layout.binary("keda", "keda-operator")])
    keda_adapter = images.build_binary_image(layout, "keda-adapter", [layout.binary("keda", "keda-adapter")])
    wait_for(f"node {NODE_NAME} Ready", lambda: _node_ready(layout), timeout, layout)
    _start_provisioner(layout)
    _apply(layout, manifests.coredns(coredns) + manifests.metrics_server(metrics) + manifests.default_storage_class())
    _apply(layout, manifests.keda(keda_operator, keda_adapter, _keda_crds(layout), _keda_tls(layout)))
    procs.start(
        layout,
        "kwok",
        [
            layout.binary("kwok"),
            f"--kubeconfig={layout.kubeconfig}",
            f"--config={layout.bin_dir('kwok') / 'stages.yaml'}",
            f"--config={DEV_DIR / 'kwok' / 'stages-pytorchjob.yaml'}",
            f"--manage-nodes-with-annotation-selector={manifests.KWOK_ANNOTATION}=fake",
            f"--node-ip={node_ip}",
            "--cidr=10.245.0.0/16",
            "--server-address=127.0.0.1:10347",
        ],
    )
    _sync_fake_nodes(layout, fake_nodes, fake_gpu_nodes)
    for deployment in ("coredns", "metrics-server"):
        kubectl(
            layout, "-n", "kube-system", "rollout", "status", f"deployment/{deployment}", f"--timeout={int(timeout)}s"
        )
    for deployment in (manifests.KEDA_OPERATOR, manifests.KEDA_ADAPTER):
        kubectl(
            layout,
            *("-n", manifests.KEDA_NAMESPACE, "rollout", "status", f"deployment/{deployment}"),
            f"--timeout={int(timeout)}s",
        )
    wait_for("KEDA's external metrics API", lambda: _external_metrics_served(layout), timeout, layout)
    log(f"up in {time.monotonic() - started:.0f}s; export KUBECONFIG={layout.kubeconfig}")


def status(layout: Layout) -> bool:
    """Print each process and the nodes; True when every process runs and the API server is ready.

    The last line is `kubeconfig: <path>` when the cluster is usable (possibly another checkout's).
    """
    owner = other_owner(layout)
    if owner is not None:
        print(f"the cluster of {owner} runs on this machine")
        return status(Layout(owner))
    healthy = True
    total_kib = 0
    for name in PROCESSES:
        pid = procs.running_pid(layout, name)
        healthy &= pid is not None
        kib = procs.pss_kib(pid) if pid else 0
        total_kib += kib
        print(f"{name:<24} {f'running pid {pid}, {kib // 1024} MiB' if pid else 'stopped'}")
    containerd = procs.running_pid(layout, "containerd")
    shims = [p for p in procs.pids_with_arg(str(layout.containerd_socket)) if p != containerd]
    pods_kib = sum(procs.pss_kib(p) for shim in shims for p in procs.descendants(shim))
    print(f"{'shims and pods':<24} {pods_kib // 1024} MiB")
    print(f"{'memory (PSS) in all':<24} {(total_kib + pods_kib) // 1024} MiB")
    if healthy and _apiserver_ready(layout):
        print(kubectl(layout, "get", "nodes", "-o", "wide", check=False), end="")
        print(f"kubeconfig: {layout.kubeconfig}")
        return True
    return False


def down(layout: Layout, purge_images: bool = False) -> list[str]:
    """Stop everything `up` started and remove our mounts, interfaces, iptables rules, nftables tables and state.

    containerd's image store (/var/lib/flownexus/containerd) is kept unless `purge_images`.
    Returns what could not be removed (empty when the machine is clean again).
    """
    owner = other_owner(layout)
    if owner is not None:
        log(f"the cluster running here belongs to {owner}; leaving it alone")
        return []
    problems: list[str] = []
    for name in ("provisioner", "kwok", "kube-network-policies", "kube-proxy", "kubelet"):
        procs.stop(layout, name)
    policies = layout.binary("kube-network-policies")
    if policies.exists():
        # On SIGTERM it deletes its nftables table itself; this catches one that was killed.
        subprocess.run([str(policies), "--cleanup"], capture_output=True)
    problems += host.remove_nft_tables()
    if layout.k8s("kube-proxy").exists():
        # kube-proxy knows its own rules best; our generic sweep below catches whatever it leaves.
        subprocess.run([str(layout.k8s("kube-proxy")), "--cleanup", "--v=0"], capture_output=True)
    if procs.running_pid(layout, "containerd") is not None:
        tasks = images.ctr(layout, "tasks", "ls", "-q", check=False).stdout.split()
        for task in tasks:
            images.ctr(layout, "tasks", "kill", "-s", "SIGKILL", task, check=False)
        time.sleep(1)
        for task in tasks:
            images.ctr(layout, "tasks", "delete", "-f", task, check=False)
        # Containers (and their snapshots) go; images stay, so the next `up` need not re-import them.
        containers = images.ctr(layout, "containers", "ls", "-q", check=False).stdout.split()
        if containers:
            images.ctr(layout, "containers", "rm", *containers, check=False)
    procs.stop(layout, "containerd")
    # Shims outlive containerd; they are ours when started for our containerd socket.
    for pid in procs.pids_with_arg(str(layout.containerd_socket)):
        procs.stop_pid(pid, grace=3)
    for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
        procs.stop(layout, name)
    problems += host.unmount_ours()
    host.remove_interfaces()
    problems += host.remove_iptables_rules()
    host.remove_cgroups()
    host.restore(layout)
    host.remove_state_dirs(keep=() if purge_images else (layout.var / "containerd",))
    for path in (layout.kubeconfig, layout.conf, layout.pki, layout.run):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    problems += leftovers(layout)
    return problems


def leftovers(layout: Layout) -> list[str]:
    """Anything of ours still on the machine: processes, mounts, interfaces, iptables rules, nftables tables."""
    found = [f"process {pid}" for pid in procs.pids_with_arg(str(layout.containerd_socket))]
    found += [f"process {n}" for n in PROCESSES if procs.running_pid(layout, n) is not None]
    found += [f"mount {m}" for m in host.our_mounts()]
    found += [f"interface {i}" for i in host.our_interfaces()]
    for tool in ("iptables", "ip6tables"):
        for table, (refs, chains) in host.our_iptables_rules(tool).items():
            found += [f"{tool} -t {table} {r}" for r in refs] + [f"{tool} -t {table} chain {c}" for c in chains]
    found += [f"nftables table {t}" for t in host.our_nft_tables()]
    return found


def load_image(layout: Layout, source: Path, name: str | None = None) -> str:
    """An OCI/docker archive is imported as is; a directory is built (Containerfile) and imported."""
    if source.is_dir():
        return images.build_image(layout, source, name or source.name)
    return images.import_archive(layout, source)
