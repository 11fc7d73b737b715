"""Configuration files for the node: containerd, the CNI network, kubelet and kube-proxy."""

from __future__ import annotations

import json

from .config import (
    CLUSTER_DOMAIN,
    CNI_BRIDGE,
    CNI_NETWORK,
    DNS_SERVICE_IP,
    NODE_NAME,
    NODE_POD_CIDR,
    PAUSE_IMAGE,
    POD_CIDR,
    Layout,
)


def containerd_toml(layout: Layout) -> str:
    """containerd 1.6 (Debian) with its own root, state and socket, so it never meets another containerd."""
    var, run = layout.var / "containerd", layout.runtime / "containerd"
    return f"""version = 2
root = "{var}"
state = "{run}"

[grpc]
  address = "{layout.containerd_socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{var}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # Keeps pod network namespaces under our state dir, so `down` finds and unmounts all of them.
  netns_mounts_under_state_dir = true
  # This sandbox withholds CAP_SYS_RESOURCE, so runc cannot lower a pod's oom_score_adj below ours
  # ("failed to update /proc/self/oom_score_adj: Permission denied"); kind sets the same when rootless.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # No systemd here: kubelet and runc both use the cgroupfs driver.
        SystemdCgroup = false
        # runc's state under our runtime dir too, so nothing of ours lands in /run/containerd.
        Root = "{run}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{layout.cni_conf_dir}"
"""


def cni_conflist(layout: Layout) -> str:
    return json.dumps(
        {
            "cniVersion": "0.4.0",
            "name": CNI_NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": CNI_BRIDGE,
                    "isGateway": True,
                    "ipMasq": True,
                    # Lets a pod reach itself through its own Service.
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(layout.var / "cni" / "ipam"),
                        "ranges": [[{"subnet": NODE_POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
                {"type": "loopback"},
            ],
        },
        indent=2,
    )


def kubelet_yaml(layout: Layout) -> str:
    pki = layout.pki
    return f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {pki / "ca.crt"}}}
authorization:
  mode: Webhook
tlsCertFile: {pki / "kubelet.crt"}
tlsPrivateKeyFile: {pki / "kubelet.key"}
clusterDomain: {CLUSTER_DOMAIN}
clusterDNS: [{DNS_SERVICE_IP}]
containerRuntimeEndpoint: unix://{layout.containerd_socket}
cgroupDriver: cgroupfs
# This machine has cgroup v1 only; Kubernetes >= 1.35 refuses that unless told otherwise.
failCgroupV1: false
failSwapOn: false
readOnlyPort: 0
healthzPort: 10248
serializeImagePulls: false
# Nothing can be pulled here, so images must never be garbage-collected away.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 2%
  imagefs.available: 2%
  nodefs.inodesFree: 2%
resolvConf: /etc/resolv.conf
podCIDR: {NODE_POD_CIDR}
maxPods: 110
nodeStatusReportFrequency: 10s
"""


def kube_proxy_yaml(layout: Layout) -> str:
    return f"""apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: {POD_CIDR}
hostnameOverride: {NODE_NAME}
clientConnection:
  kubeconfig: {layout.conf / "kube-proxy.kubeconfig"}
# The sandbox does not let us raise nf_conntrack_max; 0 leaves the kernel's values alone.
conntrack:
  maxPerCore: 0
  min: 0
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
"""
