"""Build the cluster's binaries from Go modules (dev/go/*) into the shared, version-keyed cache.

A cold build of k8s.io/kubernetes takes a long time on two cores, so progress is printed while `go build`
runs and a finished build is marked complete; later runs, CI and the demo reuse the cached binaries.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import DEV_DIR, Layout

COMPLETE_MARK = ".complete"
# Under the keda bin dir: the CRD YAML files copied from the module (config/crd/bases).
KEDA_CRD_DIR = "crds"


@dataclass(frozen=True)
class Component:
    """One cache directory: the helper module it is built from and the binaries (name -> package)."""

    name: str
    binaries: dict[str, str]
    ldflags: list[str] = field(default_factory=list)
    # The upstream module whose version versions.env pins (checked against the helper's go.mod).
    module: str = ""
    # The helper module has Go sources of its own (not only a pinned upstream command): a change to them
    # rebuilds the binary although the pinned version stays the same.
    own_sources: bool = False

    @property
    def module_dir(self) -> Path:
        return DEV_DIR / "go" / self.name


def _k8s_version_flags(version: str) -> list[str]:
    # Without these the binaries report v0.0.0-master and kubectl warns about version skew.
    major, minor = version.lstrip("v").split(".")[:2]
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    return flags


def components(layout: Layout) -> list[Component]:
    """Everything `up` needs, in build order (Kubernetes first: it is the slow one)."""
    v = layout.versions
    k8s = {
        name: f"k8s.io/kubernetes/cmd/{name}"
        for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl")
    }
    return [
        Component("kubernetes", k8s, _k8s_version_flags(v["KUBERNETES_VERSION"]), "k8s.io/kubernetes"),
        Component("etcd", {"etcd": "go.etcd.io/etcd/server/v3"}, module="go.etcd.io/etcd/server/v3"),
        Component("kwok", {"kwok": "sigs.k8s.io/kwok/cmd/kwok"}, module="sigs.k8s.io/kwok"),
        Component(
            "helm",
            {"helm": "helm.sh/helm/v3/cmd/helm"},
            [f"-X helm.sh/helm/v3/internal/version.version={v['HELM_VERSION']}"],
            "helm.sh/helm/v3",
        ),
        Component("coredns", {"coredns": "github.com/coredns/coredns"}, module="github.com/coredns/coredns"),
        Component(
            "metrics-server",
            {"metrics-server": "sigs.k8s.io/metrics-server/cmd/metrics-server"},
            module="sigs.k8s.io/metrics-server",
        ),
        Component("pause", {"pause": "flownexus.dev/build/pause"}),
        # Upstream's command runs only in a pod; dev/go/kube-network-policies/main.go is the same for a host
        # process (and divert.go makes it work on a kernel without nftables' queue statement).
        Component(
            "kube-network-policies",
            {"kube-network-policies": "flownexus.dev/build/kube-network-policies"},
            module="sigs.k8s.io/kube-network-policies",
            own_sources=True,
        ),
        # KEDA's operator (scalers, ScaledObject controller, metrics gRPC service) and its external-metrics
        # adapter; a huge dependency tree (every cloud SDK its scalers use), so it goes last.
        Component(
            "keda",
            {
                "keda-operator": "github.com/kedacore/keda/v2/cmd/operator",
                "keda-adapter": "github.com/kedacore/keda/v2/cmd/adapter",
            },
            [f"-X github.com/kedacore/keda/v2/version.Version={v['KEDA_VERSION']}"],
            "github.com/kedacore/keda/v2",
        ),
    ]


def check_pin(layout: Layout, component: Component) -> None:
    """Fail when versions.env and the helper module's go.mod disagree (the cache key would lie)."""
    if not component.module:
        return
    pinned = layout.versions[component.name.upper().replace("-", "_") + "_VERSION"]
    required = f"{component.module} {pinned}"
    if required not in (component.module_dir / "go.mod").read_text():
        raise SystemExit(
            f"dev/versions.env pins {required} but {component.module_dir / 'go.mod'} requires another version; "
            f"run `go get {component.module}@{pinned} && go mod tidy` there"
        )


def sources_digest(component: Component) -> str:
    """A digest of the helper module's files (go.mod, go.sum, *.go)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in component.module_dir.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def is_built(layout: Layout, component: Component) -> bool:
    mark = layout.bin_dir(component.name) / COMPLETE_MARK
    if not mark.exists():
        return False
    return not component.own_sources or f"sources {sources_digest(component)}" in mark.read_text()


def _go_build(component: Component, out_dir: Path, log_path: Path) -> None:
    """One `go build -v` for all of the component's binaries (one package graph, the links run in parallel),
    echoing a package count every 30 s so a long build visibly moves."""
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-buildvcs=false -mod=readonly")
    ldflags = " ".join(["-s", "-w", *component.ldflags])
    # With several packages, -o names a directory: each command is written there under its last path element
    # (renamed to the component's binary name below).
    packages = list(component.binaries.values())
    target = str(out_dir / next(iter(component.binaries))) if len(packages) == 1 else str(out_dir) + os.sep
    cmd = ["go", "build", "-v", "-trimpath", "-ldflags", ldflags, "-o", target, *packages]
    with log_path.open("a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        started = last_report = time.monotonic()
        proc = subprocess.Popen(
            cmd, cwd=component.module_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for compiled, line in enumerate(proc.stdout, start=1):
            log.write(line)
            if time.monotonic() - last_report > 30:
                last_report = time.monotonic()
                print(
                    f"[build] {component.name}: {compiled} packages compiled, "
                    f"{int(last_report - started)}s (log: {log_path})",
                    flush=True,
                )
        if proc.wait() != 0:
            raise SystemExit(f"go build of {' '.join(packages)} failed; see {log_path}")
    for binary, package in component.binaries.items():
        built = out_dir / package.rstrip("/").rsplit("/", 1)[-1]
        if built.name != binary and built.exists():
            built.rename(out_dir / binary)
        if not (out_dir / binary).is_file():
            raise SystemExit(f"go build of {package} wrote no {out_dir / binary}; see {log_path}")


def _module_dir(component: Component) -> Path:
    """Where the module cache holds the pinned upstream module's files."""
    return Path(
        subprocess.run(
            ["go", "list", "-m", "-f", "{{.Dir}}", component.module],
            cwd=component.module_dir,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )


def _post_build(layout: Layout, component: Component, out_dir: Path) -> None:
    if component.name == "keda":
        # The CRDs of the pinned version, so that `up` needs no Go (manifests.keda applies them).
        crd_dir = out_dir / KEDA_CRD_DIR
        crd_dir.mkdir()
        for crd in sorted((_module_dir(component) / "config" / "crd" / "bases").glob("*.yaml")):
            shutil.copyfile(crd, crd_dir / crd.name)
        if not any(crd_dir.iterdir()):
            raise SystemExit(f"no CRDs under config/crd/bases of {component.module}")
    if component.name == "kwok":
        # kwok ships its "fast" node and pod lifecycle stages as YAML inside the module; use them as they are.
        mod_dir = _module_dir(component)
        stage_root = Path(mod_dir) / "kustomize" / "stage"
        docs = [
            p.read_text()
            for sub in ("node/fast", "node/heartbeat", "pod/fast")
            for p in sorted((stage_root / sub).glob("*.yaml"))
            if p.name != "kustomization.yaml"
        ]
        (out_dir / "stages.yaml").write_text("\n---\n".join(docs))


def _build_one(layout: Layout, component: Component, log_dir: Path) -> None:
    check_pin(layout, component)
    final = layout.bin_dir(component.name)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # what an interrupted build left
    tmp.mkdir(parents=True)
    log_path = log_dir / f"build-{final.name}.log"
    print(f"[build] {component.name} -> {final} (cold builds take minutes; log: {log_path})", flush=True)
    started = time.monotonic()
    _go_build(component, tmp, log_path)
    _post_build(layout, component, tmp)
    seconds = int(time.monotonic() - started)
    (tmp / COMPLETE_MARK).write_text(f"built in {seconds}s\nsources {sources_digest(component)}\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    print(f"[build] {component.name} done in {seconds}s", file=sys.stderr, flush=True)


def ensure_built(layout: Layout, only: list[str] | None = None, jobs: int | None = None) -> None:
    """Build whatever is missing from the cache; a no-op when every binary is already there.

    Components are built ``jobs`` at a time (``FLOWNEXUS_BUILD_JOBS``, default 2): Kubernetes, by far the
    longest, takes one lane and the others follow each other in the second, so that one build's module
    downloads and single-threaded links overlap another's compilation."""
    if shutil.which("go") is None:
        missing = [c.name for c in components(layout) if not is_built(layout, c)]
        if missing:
            raise SystemExit(f"binaries missing from {layout.cache / 'bin'} ({', '.join(missing)}) and no Go toolchain")
        return
    log_dir = layout.cache / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    todo = [c for c in components(layout) if not (only and c.name not in only) and not is_built(layout, c)]
    if not todo:
        return
    lanes = max(1, min(jobs or int(os.environ.get("FLOWNEXUS_BUILD_JOBS", "2")), len(todo)))
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=lanes) as pool:
        futures = [pool.submit(_build_one, layout, component, log_dir) for component in todo]
        failures = []
        for future in futures:
            try:
                future.result()
            except SystemExit as exc:
                failures.append(str(exc))
    if failures:
        raise SystemExit("; ".join(failures))
    print(f"[build] all done in {int(time.monotonic() - started)}s ({lanes} at a time)", file=sys.stderr, flush=True)
