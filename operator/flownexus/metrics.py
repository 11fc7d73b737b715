"""The operator's own Prometheus metrics (prometheus-client), served on the metrics port.

Counters and histograms are updated by the passes; the TrainingJob gauges are read from the watch-fed cache at
scrape time (:class:`TrainingJobCollector`), so they keep no state of their own and are right after a restart.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import get_args

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .api.trainingjob import TrainingJobPhase
from .meta import Manifest
from .runtime.cache import Cache
from .trainingjob.decide import FINISHED, cluster_of, is_waiting

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
TRAININGJOBS_FINISHED = Counter(
    "flownexus_trainingjob_finished_total",
    "TrainingJobs that reached a final phase, by namespace, result (Succeeded, Failed) and status.reason.",
    ["namespace", "result", "reason"],
)

TRAININGJOB_PHASES: tuple[str, ...] = get_args(TrainingJobPhase)
# decide.py's reason for a job that waits for a slot of its NeuralCluster's limits.maxConcurrentTrainingJobs
# (not for a cluster that is not ready, nor for too many workers).
WAITING_FOR_CAPACITY = "WaitingForCapacity"
NC = "NeuralCluster"


def count_finished(before: Manifest, after: Manifest) -> bool:
    """Count a TrainingJob that the status write from ``before`` to ``after`` took into a final phase.

    The transition is counted, not the state: a pass that writes a final phase again, or a restarted operator
    that finds the job already finished, counts nothing. True when it counted."""
    if (after.get("kind") or before.get("kind")) != "TrainingJob":
        return False
    old, new = before.get("status") or {}, after.get("status") or {}
    if new.get("phase") not in FINISHED or old.get("phase") in FINISHED:
        return False
    namespace = (after.get("metadata") or before["metadata"]).get("namespace") or ""
    TRAININGJOBS_FINISHED.labels(namespace, new["phase"], new.get("reason") or "").inc()
    return True


class TrainingJobCollector(Collector):
    """``flownexus_trainingjobs{namespace,phase}`` and ``flownexus_trainingjob_queue_depth{namespace,cluster}``,
    counted from the cache at every scrape.

    Every phase is reported (0 included) for each namespace that has a TrainingJob or a NeuralCluster, and a
    queue depth (0 included) for every NeuralCluster. A job whose status has no phase yet counts as Pending. The
    queue holds the jobs that wait for a slot of their cluster's ``limits.maxConcurrentTrainingJobs``: not
    started, not suspended, and told so by their last status (reason WaitingForCapacity). Before the cache is
    filled (``cache()`` returns None) nothing is reported.
    """

    def __init__(self, cache: Callable[[], Cache | None]) -> None:
        self._cache = cache

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "flownexus_trainingjobs", "TrainingJobs by namespace and phase.", labels=["namespace", "phase"]
            ),
            GaugeMetricFamily(
                "flownexus_trainingjob_queue_depth",
                "TrainingJobs waiting for a slot of their NeuralCluster's limits.maxConcurrentTrainingJobs.",
                labels=["namespace", "cluster"],
            ),
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs, queue = self._families()
        cache = self._cache()
        if cache is not None:
            clusters = {
                (o["metadata"].get("namespace") or "", o["metadata"]["name"]) for o in cache.list("NeuralCluster")
            }
            phases: Tally[tuple[str, str]] = Tally()
            waiting: Tally[tuple[str, str]] = Tally({c: 0 for c in clusters})
            for tj in cache.list("TrainingJob"):
                namespace, status = tj["metadata"].get("namespace") or "", tj.get("status") or {}
                phases[(namespace, str(status.get("phase") or "Pending"))] += 1
                if is_waiting(tj) and status.get("reason") == WAITING_FOR_CAPACITY:
                    waiting[(namespace, cluster_of(tj))] += 1
            namespaces = {ns for ns, _ in clusters} | {ns for ns, _ in phases}
            for namespace in sorted(namespaces):
                for phase in TRAININGJOB_PHASES:
                    jobs.add_metric([namespace, phase], phases[(namespace, phase)])
            for (namespace, cluster), depth in sorted(waiting.items()):
                queue.add_metric([namespace, cluster], depth)
        yield jobs
        yield queue


def register_cache_metrics(
    cache: Callable[[], Cache | None], registry: CollectorRegistry = REGISTRY
) -> TrainingJobCollector:
    """Serve the cache-derived gauges from ``registry`` (the operator's metrics port serves the default one)."""
    collector = TrainingJobCollector(cache)
    registry.register(collector)
    return collector
