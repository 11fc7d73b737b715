"""Command line of dev/cluster: up, status, down, load-image, build-image, build, which."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import build, cluster, images
from .config import Layout


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dev/cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build what is missing, start the cluster (idempotent)")
    up.add_argument("--fake-nodes", type=int, default=2, help="KWOK nodes without GPUs (default 2)")
    up.add_argument("--fake-gpu-nodes", type=int, default=1, help="KWOK nodes with 8 nvidia.com/gpu (default 1)")
    up.add_argument("--timeout", type=float, default=300, help="seconds to wait for the node and add-ons")
    sub.add_parser("status", help="exit 0 when the cluster runs and the API server is ready")
    down = sub.add_parser("down", help="stop everything up started; remove its mounts, interfaces, iptables rules")
    down.add_argument("--purge-images", action="store_true", help="also delete containerd's image store")
    sub.add_parser("build", help="only build the binaries into the cache")
    which = sub.add_parser("which", help="print the cached path of a binary (kubectl, helm, kwok, etcd, ...)")
    which.add_argument("binary")
    load = sub.add_parser(
        "load-image", help="import an OCI/docker archive, or build a Containerfile dir, into the node"
    )
    load.add_argument("source", type=Path)
    load.add_argument("--name", help="image name for a directory (default: the directory name)")
    bimg = sub.add_parser("build-image", help="build a Containerfile with buildah and import it; prints the image ref")
    bimg.add_argument("context", type=Path)
    bimg.add_argument("--name", help="image name (default: the context directory name)")
    bimg.add_argument("-f", "--file", type=Path, help="Containerfile/Dockerfile (default: in the context)")
    bimg.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE")
    bimg.add_argument(
        "--tag", action="append", default=[], help="also name the image so (e.g. flownexus/trainer:0.1.0)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    layout = Layout()
    if args.command not in {"build", "which"} and os.geteuid() != 0:
        print("dev/cluster needs root (it runs containerd, kubelet and changes iptables)", file=sys.stderr)
        return 2
    if args.command == "up":
        cluster.up(layout, args.fake_nodes, args.fake_gpu_nodes, args.timeout)
    elif args.command == "status":
        return 0 if cluster.status(layout) else 1
    elif args.command == "down":
        problems = cluster.down(layout, args.purge_images)
        for problem in problems:
            print(f"left behind: {problem}", file=sys.stderr)
        return 1 if problems else 0
    elif args.command == "build":
        build.ensure_built(layout)
    elif args.command == "which":
        for component in build.components(layout):
            if args.binary in component.binaries:
                print(layout.binary(component.name, args.binary))
                return 0
        print(f"unknown binary {args.binary!r}", file=sys.stderr)
        return 1
    elif args.command == "load-image":
        print(cluster.load_image(layout, args.source.resolve(), args.name))
    elif args.command == "build-image":
        build_args = dict(arg.split("=", 1) for arg in args.build_arg)
        file = args.file.resolve() if args.file else None
        context = args.context.resolve()
        print(images.build_image(layout, context, args.name or context.name, file, build_args, args.tag))
    return 0
