"""The operator's own Prometheus metrics (prometheus-client), served on the metrics port."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RECONCILES = Counter(
    "flownexus_reconcile_total", "Reconcile passes by kind and result (ok, conflict, gone, error).", ["kind", "result"]
)
RECONCILE_SECONDS = Histogram(
    "flownexus_reconcile_duration_seconds",
    "Duration of reconcile passes by kind.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CANARY_DECISIONS = Counter(
    "flownexus_canary_decisions_total", "Canary analysis outcomes and transitions.", ["decision"]
)
