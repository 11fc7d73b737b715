"""Prepare this machine the way kind's node image prepares its container, and undo it on `down`.

What kubelet needs here: shared mount propagation on / (volume mounts must reach containers), IPv4
forwarding and bridge netfilter (Service traffic between pods on the bridge), /dev/kmsg (kubelet's OOM
watcher), and no swap (or failSwapOn=false). The original values are saved so `down` restores them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from .config import CNI_BRIDGE, CNI_NETWORK, HOSTPATH_PV_DIR, NETWORK_POLICY_TABLE, STATE_ROOTS, Layout

SYSCTLS = {
    "/proc/sys/net/ipv4/ip_forward": "1",
    "/proc/sys/net/bridge/bridge-nf-call-iptables": "1",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables": "1",
}


def _state_file(layout: Layout) -> Path:
    return layout.run / "host-state.json"


def root_propagation() -> str:
    out = subprocess.run(["findmnt", "-no", "PROPAGATION", "/"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def prepare(layout: Layout) -> list[str]:
    """Apply the host settings kubelet needs; returns human-readable notes about what was changed."""
    notes: list[str] = []
    state_path = _state_file(layout)
    saved: dict[str, str] = json.loads(state_path.read_text()) if state_path.exists() else {}
    layout.run.mkdir(parents=True, exist_ok=True)

    propagation = root_propagation()
    if "shared" not in propagation:
        saved.setdefault("propagation", propagation)
        # kind's entrypoint does the same: without rshared, mounts kubelet makes never reach the containers.
        subprocess.run(["mount", "--make-rshared", "/"], check=True)
        notes.append(f"mount propagation of / changed from {propagation} to rshared")
    for path, value in SYSCTLS.items():
        p = Path(path)
        if not p.exists():
            notes.append(f"{path} missing; skipped")
            continue
        current = p.read_text().strip()
        if current != value:
            saved.setdefault(path, current)
            p.write_text(value)
            notes.append(f"{path}: {current} -> {value}")
    if not Path("/dev/kmsg").exists():
        # kind links /dev/kmsg to /dev/console when the container has none; kubelet only reads it.
        os.symlink("/dev/console", "/dev/kmsg")
        saved["kmsg_link"] = "1"
        notes.append("/dev/kmsg linked to /dev/console")
    swaps = Path("/proc/swaps").read_text().splitlines()[1:]
    if swaps:
        notes.append("swap is on; kubelet runs with failSwapOn=false")
    for root in STATE_ROOTS:
        root.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps(saved, indent=2))
    return notes


def restore(layout: Layout) -> None:
    """Put back the propagation, sysctls and /dev/kmsg that `prepare` changed."""
    state_path = _state_file(layout)
    if not state_path.exists():
        return
    saved: dict[str, str] = json.loads(state_path.read_text())
    for path, value in saved.items():
        if path.startswith("/proc/sys/"):
            Path(path).write_text(value)
    if saved.get("propagation") == "private":
        # Only / itself: submounts made shared by --make-rshared stay so, as other tools may rely on that now.
        subprocess.run(["mount", "--make-private", "/"], check=False)
    if saved.get("kmsg_link") and Path("/dev/kmsg").is_symlink():
        Path("/dev/kmsg").unlink()
    state_path.unlink()


def our_mounts() -> list[str]:
    """Mount points under our state roots (containerd rootfs, netns, kubelet volumes), deepest first."""
    roots = (*tuple(str(r) + "/" for r in STATE_ROOTS), str(HOSTPATH_PV_DIR) + "/")
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(roots) or point in {str(r) for r in STATE_ROOTS}:
            points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def unmount_ours() -> list[str]:
    left = []
    for point in our_mounts():
        result = subprocess.run(["umount", point], capture_output=True, text=True)
        if result.returncode != 0:
            result = subprocess.run(["umount", "-l", point], capture_output=True, text=True)
        if result.returncode != 0:
            left.append(f"{point}: {result.stderr.strip()}")
    return left


def our_interfaces() -> list[str]:
    """Our CNI bridge and the host ends of veth pairs attached to it."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    names = []
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name == CNI_BRIDGE or f"master {CNI_BRIDGE} " in line:
            names.append(name)
    return names


def remove_interfaces() -> None:
    # veths first: deleting the bridge alone would leave them dangling when their netns is still held.
    for name in sorted(our_interfaces(), key=lambda n: n == CNI_BRIDGE):
        subprocess.run(["ip", "link", "delete", name], capture_output=True)


_OUR_CHAIN = re.compile(r"^(KUBE-|CNI-)")


def our_iptables_rules(tool: str = "iptables") -> dict[str, tuple[list[str], list[str]]]:
    """Per table: (rules in other chains that point at our chains or carry our CNI comment, our chains).

    Our chains are kube-proxy's and kubelet's KUBE-* and the CNI plugins' CNI-* ones; nothing else on
    this machine runs Kubernetes or CNI, and `down` runs `kube-proxy --cleanup` first anyway.
    """
    save = shutil.which(f"{tool}-save")
    if save is None:
        return {}
    dump = subprocess.run([save], capture_output=True, text=True, check=False).stdout
    result: dict[str, tuple[list[str], list[str]]] = {}
    table = ""
    for line in dump.splitlines():
        if line.startswith("*"):
            table = line[1:]
            result[table] = ([], [])
        elif line.startswith(":"):
            chain = line[1:].split()[0]
            if _OUR_CHAIN.match(chain):
                result[table][1].append(chain)
        elif line.startswith("-A "):
            chain = line.split()[1]
            if _OUR_CHAIN.match(chain):
                continue  # flushed with its chain
            target = re.search(r" -[jg] (\S+)", line)
            ours = (target is not None and _OUR_CHAIN.match(target.group(1))) or f'name: \\"{CNI_NETWORK}\\"' in line
            if ours:
                result[table][0].append(line)
    return {t: v for t, v in result.items() if v[0] or v[1]}


def remove_iptables_rules() -> list[str]:
    errors = []
    for tool in ("iptables", "ip6tables"):
        rules = our_iptables_rules(tool)
        if not rules:
            continue
        script = []
        for table, (refs, chains) in rules.items():
            script.append(f"*{table}")
            script += ["-D " + r[3:] for r in refs]
            script += [f"-F {c}" for c in chains]
            script += [f"-X {c}" for c in chains]
            script.append("COMMIT")
        result = subprocess.run(
            [f"{tool}-restore", "--noflush"], input="\n".join(script) + "\n", capture_output=True, text=True
        )
        if result.returncode != 0:
            errors.append(f"{tool}-restore: {result.stderr.strip()}")
    return errors


def our_nft_tables() -> list[str]:
    """kube-network-policies' nftables tables still present (`ip` and/or `inet` family), as `<family> <name>`.

    Read with Debian's `nft`; without it (not installed) nothing can be seen and nothing is reported.
    """
    if shutil.which("nft") is None:
        return []
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False).stdout
    tables = [line.split(maxsplit=1)[1] for line in out.splitlines() if line.startswith("table ")]
    return [t for t in tables if t.split()[-1] == NETWORK_POLICY_TABLE]


def remove_nft_tables() -> list[str]:
    """Delete what `kube-network-policies --cleanup` (run first by `down`) did not."""
    errors = []
    for table in our_nft_tables():
        result = subprocess.run(["nft", "delete", "table", *table.split()], capture_output=True, text=True)
        if result.returncode != 0:
            errors.append(f"nft delete table {table}: {result.stderr.strip()}")
    return errors


def remove_cgroups() -> None:
    """Remove the empty kubepods cgroup trees kubelet created (cgroupfs driver, v1 and v2 layouts)."""
    base = Path("/sys/fs/cgroup")
    candidates = [base / "kubepods", base / "kubepods.slice"]
    candidates += [c / "kubepods" for c in base.iterdir() if c.is_dir()] if base.exists() else []
    for top in candidates:
        if not top.is_dir():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: w[0].count("/"), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def remove_state_dirs(keep: tuple[Path, ...] = ()) -> None:
    """Delete our state roots (never while something is still mounted below them), except `keep`."""
    if our_mounts():
        return
    for root in (*STATE_ROOTS, HOSTPATH_PV_DIR):
        if not root.exists():
            continue
        kept = [k for k in keep if k.is_relative_to(root)]
        if not kept:
            shutil.rmtree(root, ignore_errors=True)
            continue
        for child in root.iterdir():
            if child in kept:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink()
