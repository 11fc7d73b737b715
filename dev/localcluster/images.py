"""Container images without Docker: buildah builds, containerd (namespace k8s.io) runs.

Repo Containerfiles take their base image as `ARG BASE_IMAGE` (python:3.11-slim for Docker users); here the
base is a Debian rootfs made once with debootstrap and kept in the cache. Image tags are a hash of the build
inputs, so an unchanged image is neither rebuilt nor re-imported.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .config import Layout

DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = "python3,python3-pip,python3-venv,ca-certificates"


def ctr(layout: Layout, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ctr", "--address", str(layout.containerd_socket), "--namespace", "k8s.io", *args],
        capture_output=True,
        text=True,
        check=check,
    )


def in_containerd(layout: Layout, ref: str) -> bool:
    return ref in ctr(layout, "images", "ls", "-q").stdout.split()


def import_archive(layout: Layout, archive: Path) -> str:
    """Import an OCI or docker archive into containerd's k8s.io namespace (unpacked, ready for the CRI)."""
    result = ctr(layout, "images", "import", "--no-unpack=false", str(archive), check=False)
    if result.returncode != 0:
        raise SystemExit(f"ctr images import {archive} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def _buildah_has(ref: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", ref], capture_output=True).returncode == 0


def base_image_ref(layout: Layout) -> str:
    return f"localhost/flownexus/debian-base:{layout.versions['DEBIAN_SUITE']}"


def ensure_base_image(layout: Layout) -> str:
    """A python:3.11-slim stand-in: Debian bookworm (Python 3.11) + pip, pip allowed to install system-wide."""
    ref = base_image_ref(layout)
    if _buildah_has(ref):
        return ref
    suite = layout.versions["DEBIAN_SUITE"]
    rootfs_tar = layout.images_cache / f"debian-{suite}-rootfs.tar"
    if not rootfs_tar.exists():
        layout.images_cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=layout.images_cache) as tmp:
            rootfs = Path(tmp) / "rootfs"
            print(f"[image] debootstrap {suite} (minbase + python3) -> {rootfs_tar}", flush=True)
            subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", suite, str(rootfs), DEBIAN_MIRROR],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            # python:3.11-slim has `python` and `pip` on PATH and lets pip install into the image.
            (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
            for name, target in (("python", "/usr/bin/python3"), ("pip", "/usr/bin/pip3")):
                link = rootfs / "usr/local/bin" / name
                link.unlink(missing_ok=True)
                link.symlink_to(target)
            shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
            for lists in (rootfs / "var/lib/apt/lists").glob("*_*"):
                lists.unlink()
            partial = rootfs_tar.with_suffix(".partial")
            subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
            partial.rename(rootfs_tar)
    container = subprocess.run(
        ["buildah", "from", "scratch"], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        subprocess.run(["buildah", "add", container, str(rootfs_tar), "/"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(
            [
                "buildah",
                "config",
                "--env",
                "LANG=C.UTF-8",
                "--env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--cmd",
                "python3",
                container,
            ],
            check=True,
        )
        subprocess.run(["buildah", "commit", "--quiet", container, ref], check=True, stdout=subprocess.DEVNULL)
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)
    return ref


# Never build inputs, whatever the ignore file says: VCS data and our own cluster state (logs change constantly).
ALWAYS_IGNORED = (".git", ".local", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache")


def _ignore_patterns(context: Path) -> list[str]:
    """Patterns of the context's .containerignore (or .dockerignore), which buildah also applies."""
    for name in (".containerignore", ".dockerignore"):
        path = context / name
        if path.exists():
            lines = (line.strip() for line in path.read_text().splitlines())
            return [line.strip("/") for line in lines if line and not line.startswith(("#", "!"))]
    return []


def _build_inputs(context: Path) -> list[Path]:
    patterns = _ignore_patterns(context)
    inputs = []
    for path in sorted(context.rglob("*")):
        rel = path.relative_to(context)
        if not path.is_file() or any(part in ALWAYS_IGNORED for part in rel.parts):
            continue
        # A pattern matches the file or any directory above it, as in Docker's ignore files.
        prefixes = [Path(*rel.parts[: i + 1]).as_posix() for i in range(len(rel.parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for pattern in patterns for prefix in prefixes):
            continue
        inputs.append(path)
    return inputs


def _inputs_digest(context: Path, containerfile: Path, build_args: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for path in _build_inputs(context):
        digest.update(str(path.relative_to(context)).encode())
        digest.update(path.read_bytes())
    digest.update(containerfile.read_bytes())
    for key, value in sorted(build_args.items()):
        digest.update(f"{key}={value}".encode())
    return digest.hexdigest()[:16]


def _declares_arg(containerfile: Path, name: str) -> bool:
    return any(
        line.strip() == f"ARG {name}" or line.strip().startswith(f"ARG {name}=")
        for line in containerfile.read_text().splitlines()
    )


def _uses_base_arg(containerfile: Path) -> bool:
    return _declares_arg(containerfile, "BASE_IMAGE")


# Registries are reached through a TLS-intercepting proxy here: builds that declare `ARG PIP_CERT` get the
# host's CA bundle mounted (build time only, never committed into the image) and pip pointed at it.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_CA_PATH = "/etc/ssl/certs/host-ca-bundle.crt"
# Only PyPI is reachable here, not PyTorch's CPU wheel index that the Containerfiles default to.
TORCH_INDEX_URL = os.environ.get("FLOWNEXUS_TORCH_INDEX_URL", "https://pypi.org/simple")


def normalize_tag(tag: str) -> str:
    """`flownexus/trainer:0.1.0` -> `docker.io/flownexus/trainer:0.1.0`, the name kubelet looks up."""
    first = tag.split("/", 1)[0]
    if "/" not in tag:
        return f"docker.io/library/{tag}"
    if "." in first or ":" in first or first == "localhost":
        return tag
    return f"docker.io/{tag}"


def tag_image(layout: Layout, ref: str, tags: list[str]) -> None:
    """Give an imported image the names that manifests use (e.g. the examples' `flownexus/trainer:0.1.0`)."""
    for tag in tags:
        ctr(layout, "images", "tag", "--force", ref, normalize_tag(tag))


def build_image(
    layout: Layout,
    context: Path,
    name: str,
    containerfile: Path | None = None,
    build_args: dict[str, str] | None = None,
    tags: list[str] | None = None,
) -> str:
    """Build `context` with buildah and import it into containerd; returns the image reference to use.

    The reference is `localhost/flownexus/<name>:<hash of inputs>`: pods should use it with
    imagePullPolicy IfNotPresent (nothing can be pulled here).
    """
    containerfile = containerfile or next(
        (context / n for n in ("Containerfile", "Dockerfile") if (context / n).exists()), context / "Containerfile"
    )
    args = dict(build_args or {})
    if _uses_base_arg(containerfile) and "BASE_IMAGE" not in args:
        args["BASE_IMAGE"] = ensure_base_image(layout)
        # The base's identity is its image id, so a rebuilt base rebuilds its children.
        args["BASE_IMAGE_ID"] = subprocess.run(
            ["buildah", "inspect", "--type", "image", "--format", "{{.FromImageID}}", args["BASE_IMAGE"]],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    if _declares_arg(containerfile, "TORCH_INDEX_URL") and "TORCH_INDEX_URL" not in args:
        args["TORCH_INDEX_URL"] = TORCH_INDEX_URL
    mounts: list[str] = []
    if _declares_arg(containerfile, "PIP_CERT") and HOST_CA_BUNDLE.exists() and "PIP_CERT" not in args:
        args["PIP_CERT"] = BUILD_CA_PATH
        mounts = ["--volume", f"{HOST_CA_BUNDLE}:{BUILD_CA_PATH}:ro"]
    ref = f"localhost/flownexus/{name}:{_inputs_digest(context, containerfile, args)}"
    if in_containerd(layout, ref):
        tag_image(layout, ref, tags or [])
        return ref
    if not _buildah_has(ref):
        print(f"[image] buildah build {context} -> {ref}", flush=True)
        cmd = ["buildah", "bud", "--quiet", "--layers", "--network", "host", *mounts, "-f", str(containerfile)]
        cmd += ["-t", ref]
        for key, value in args.items():
            if key != "BASE_IMAGE_ID":
                cmd += ["--build-arg", f"{key}={value}"]
        subprocess.run([*cmd, str(context)], check=True, stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "image.tar"
        subprocess.run(["buildah", "push", "--quiet", ref, f"docker-archive:{archive}:{ref}"], check=True)
        import_archive(layout, archive)
    tag_image(layout, ref, tags or [])
    return ref


def build_binary_image(layout: Layout, name: str, binaries: list[Path]) -> str:
    """A FROM-scratch image around static Go binaries (dev/images/<name>/Containerfile)."""
    source = layout.repo / "dev" / "images" / name
    with tempfile.TemporaryDirectory() as tmp:
        context = Path(tmp)
        for binary in binaries:
            # Hard links are free; fall back to a copy across filesystems.
            try:
                os.link(binary, context / binary.name)
            except OSError:
                shutil.copy2(binary, context / binary.name)
        for extra in source.iterdir():
            if extra.name != "Containerfile":
                shutil.copy2(extra, context / extra.name)
        return build_image(layout, context, name, containerfile=source / "Containerfile")
