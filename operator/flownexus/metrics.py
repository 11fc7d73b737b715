"""The operator's own Prometheus metrics (prometheus-client), served on the metrics port."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from prometheus_client import Counter, Histogram

RECONCILES = Counter(
    "flownexus_reconcile_total", "Reconcile passes by kind and result (ok, retry, error).", ["kind", "result"]
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

P = ParamSpec("P")
R = TypeVar("R")


def instrumented(kind: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Count and time every pass of a (sync) handler for ``kind``; Kopf's TemporaryError counts as ``retry``."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            started = time.perf_counter()
            result = "ok"
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                result = "retry" if type(exc).__name__ == "TemporaryError" else "error"
                raise
            finally:
                RECONCILES.labels(kind, result).inc()
                RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)

        return run

    return wrap
