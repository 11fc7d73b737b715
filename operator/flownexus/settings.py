"""Operator settings from command-line flags, falling back to FLOWNEXUS_* environment variables."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """How this operator process runs."""

    namespaces: tuple[str, ...]
    log_level: str
    metrics_port: int
    health_port: int
    # Where pods report progress: the operator only reads; pods patch their own TrainingJob status.
    operator_namespace: str

    @property
    def cluster_wide(self) -> bool:
        return not self.namespaces


def _env(name: str, default: str) -> str:
    return os.environ.get(f"FLOWNEXUS_{name}", default)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flownexus",
        description="Flow Nexus operator: trains, validates, serves and canaries models on Kubernetes. "
        "Uses the current kubeconfig, or the in-cluster service account.",
    )
    p.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=None,
        help="namespace to watch (repeatable; glob patterns allowed). Env FLOWNEXUS_NAMESPACES, comma-separated. "
        "Default: all namespaces.",
    )
    p.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="env FLOWNEXUS_LOG_LEVEL (default INFO)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(_env("METRICS_PORT", "8080")),
        help="Prometheus /metrics port; 0 disables (env FLOWNEXUS_METRICS_PORT, default 8080)",
    )
    p.add_argument(
        "--health-port",
        type=int,
        default=int(_env("HEALTH_PORT", "8081")),
        help="liveness /healthz port; 0 disables (env FLOWNEXUS_HEALTH_PORT, default 8081)",
    )
    return p


def from_args(argv: list[str] | None = None) -> Settings:
    args = parser().parse_args(argv)
    namespaces = args.namespace
    if namespaces is None:
        namespaces = [n for n in _env("NAMESPACES", "").split(",") if n]
    return Settings(
        namespaces=tuple(namespaces),
        log_level=args.log_level,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        operator_namespace=_env("OPERATOR_NAMESPACE", "flownexus-system"),
    )
