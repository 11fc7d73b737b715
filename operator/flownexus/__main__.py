"""``python -m flownexus``: run the operator against the current kubeconfig (or in-cluster config)."""

from __future__ import annotations

import asyncio
import logging
import sys

from .settings import Settings, from_args


def run(settings: Settings) -> None:
    """Start the metrics endpoint and Kopf with our handlers until interrupted."""
    # Imported here so that `--help` works without a cluster or the heavy imports.
    import kopf
    from prometheus_client import start_http_server

    from . import handlers
    from .metrics import register_cache_metrics

    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers.configure(settings)
    if settings.metrics_port:
        register_cache_metrics(lambda: handlers.RUNTIME.cache if handlers.RUNTIME is not None else None)
        start_http_server(settings.metrics_port)
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    asyncio.run(
        kopf.operator(
            # One replica (the chart's Deployment: replicas 1, strategy Recreate; docs/SECURITY.md): no peering.
            standalone=True,
            clusterwide=settings.cluster_wide,
            namespaces=list(settings.namespaces),
            liveness_endpoint=liveness,
        )
    )


def main(argv: list[str] | None = None) -> int:
    settings = from_args(argv)
    try:
        run(settings)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
