"""The local cluster's volume provisioner: a directory per claim, writable by any pod user, like kind's.

kube-controller-manager's built-in hostPath provisioner creates each volume root-owned with mode 0750, and
the kubelet applies no ``fsGroup`` to hostPath volumes, so a pod that runs as a non-root user (as Pod
Security ``restricted`` requires) could not write its own volume without a root helper container. kind's
default StorageClass (rancher's local-path-provisioner) creates its directories with mode 0777; this does
the same for claims of the ``standard`` StorageClass, and deletes the directory and the PV once the claim
is gone (reclaim policy Delete). Single node only: the PVs are hostPath volumes on this machine, so pods on
KWOK nodes (which never run anything) may use them too.

Runs as a process of ``dev/cluster up`` (``python -m dev.localcluster.provisioner``), polling once a second
as cluster-admin; stopped by pid like every other process of the cluster.
"""

from __future__ import annotations

import argparse
import json
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .config import APISERVER_PORT, Layout

PROVISIONER = "flownexus.dev/local-path"
STORAGE_CLASS = "standard"
USER_AGENT = "flownexus-dev-provisioner"


class Api:
    def __init__(self, pki: Path, server: str = f"https://127.0.0.1:{APISERVER_PORT}") -> None:
        self.server = server
        self.context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

    def request(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": USER_AGENT}
        req = urllib.request.Request(self.server + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, context=self.context, timeout=10) as response:
            return json.loads(response.read() or b"{}")


def volume_for(claim: dict[str, Any], path: Path) -> dict[str, Any]:
    """The PV that satisfies ``claim``: pre-bound to it, its size and access modes, a hostPath at ``path``."""
    meta, spec = claim["metadata"], claim["spec"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"pvc-{meta['uid']}", "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
        "spec": {
            "capacity": {"storage": spec["resources"]["requests"]["storage"]},
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": STORAGE_CLASS,
            "volumeMode": spec.get("volumeMode", "Filesystem"),
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
            "hostPath": {"path": str(path), "type": "Directory"},
        },
    }


def wants_volume(claim: dict[str, Any]) -> bool:
    spec, status = claim["spec"], claim.get("status") or {}
    return (
        spec.get("storageClassName") == STORAGE_CLASS
        and not spec.get("volumeName")
        and status.get("phase", "Pending") == "Pending"
        and not claim["metadata"].get("deletionTimestamp")
    )


def sync(api: Api, root: Path) -> None:
    """One pass: a volume for every unbound claim of our class; released volumes deleted with their data."""
    claims = api.request("GET", "/api/v1/persistentvolumeclaims")["items"]
    volumes = api.request("GET", "/api/v1/persistentvolumes")["items"]
    ours = {
        v["metadata"]["name"]: v
        for v in volumes
        if (v["metadata"].get("annotations") or {}).get("pv.kubernetes.io/provisioned-by") == PROVISIONER
    }
    for claim in claims:
        name = f"pvc-{claim['metadata']['uid']}"
        if not wants_volume(claim) or name in ours:
            continue
        path = root / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)  # mkdir's mode is cut by the umask
        try:
            api.request("POST", "/api/v1/persistentvolumes", volume_for(claim, path))
        except urllib.error.HTTPError as exc:
            if exc.code != 409:
                raise
        print(f"provisioned {name} at {path} for {claim['metadata']['namespace']}/{claim['metadata']['name']}")
    for name, volume in ours.items():
        if (volume.get("status") or {}).get("phase") == "Released" and not volume["metadata"].get("deletionTimestamp"):
            shutil.rmtree(volume["spec"]["hostPath"]["path"], ignore_errors=True)
            try:
                api.request("DELETE", f"/api/v1/persistentvolumes/{name}")
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise
            print(f"deleted {name}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dev.localcluster.provisioner", description=__doc__)
    parser.add_argument("--root", type=Path, default=Layout().var / "volumes", help="where volumes are created")
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    api = Api(Layout().pki)
    while True:
        try:
            sync(api, args.root)
        except (OSError, urllib.error.URLError, KeyError, ValueError) as exc:
            # The API server restarting (or not up yet): try again on the next tick.
            print(f"sync failed: {exc}", file=sys.stderr, flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
