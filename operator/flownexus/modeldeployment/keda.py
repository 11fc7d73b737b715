"""spec.autoscaling.targetRequestsPerSecond through KEDA: which autoscaler the stable Deployment gets, and the
ScaledObjects read through the client.

ScaledObject is an optional kind: its CRD exists only where KEDA is installed, so it has no informer (a LIST or
WATCH of a kind that is not served would break the operator's start). Whether it is served is asked of the
API server's discovery, at most once a minute; a ModelDeployment's ScaledObject is read with one GET per pass
while one is wanted or may exist, and the read goes into the cache, where the controller's ownership check and
its skip of unchanged applies look.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..api.modeldeployment import ModelDeploymentSpec
from ..meta import Manifest
from ..runtime.client import Client

KIND = "ScaledObject"
CONDITION = "RequestRateAutoscaling"  # present while spec.autoscaling.targetRequestsPerSecond is set
SERVED_TTL_S = 60.0  # how long a discovery answer is trusted (KEDA installed or removed meanwhile)
FIELD = "spec.autoscaling.targetRequestsPerSecond"


class ScaledObjects(Protocol):
    """What the reconciler needs to know about KEDA's ScaledObjects."""

    def served(self) -> bool:
        """Whether the cluster serves keda.sh/v1alpha1 ScaledObjects."""
        ...

    def get(self, namespace: str, name: str) -> Manifest | None:
        """The ScaledObject, or None when there is none."""
        ...


class ApiScaledObjects:
    """ScaledObjects through the operator's client; discovery answers are kept for ``ttl_s``."""

    def __init__(
        self, client: Client, ttl_s: float = SERVED_TTL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.clock = clock
        self._lock = threading.Lock()
        self._answer: tuple[float, bool] | None = None

    def served(self) -> bool:
        with self._lock:
            if self._answer is not None and self.clock() - self._answer[0] < self.ttl_s:
                return self._answer[1]
        served = self.client.serves(KIND)
        with self._lock:
            self._answer = (self.clock(), served)
        return served

    def get(self, namespace: str, name: str) -> Manifest | None:
        return self.client.get(KIND, namespace, name)


class NoKeda:
    """A cluster without KEDA (what the reconciler assumes when it is given no client)."""

    def served(self) -> bool:
        return False

    def get(self, namespace: str, name: str) -> Manifest | None:
        return None


@dataclass(frozen=True)
class Autoscaler:
    """How the stable Deployment is autoscaled this pass.

    ``scaled_object``: a KEDA ScaledObject instead of our HPA; ``remove_scaled_object``: one of ours exists and
    is not wanted (any more); ``problem``/``reason``: targetRequestsPerSecond is set but cannot be honoured (the
    HPA on CPU and memory stands in meanwhile), why, for people and as the condition's reason.
    """

    scaled_object: bool = False
    remove_scaled_object: bool = False
    prometheus_url: str = ""
    problem: str = ""
    reason: str = ""


def choose(spec: ModelDeploymentSpec, prometheus_url: str | None, keda_served: bool, exists: bool) -> Autoscaler:
    """The autoscaler for ``spec``: KEDA when a request rate is asked for and both KEDA and a Prometheus are
    there; otherwise our HPA (CPU, memory), with the reason when a request rate was asked for."""
    auto = spec.autoscaling
    rate = auto.target_requests_per_second
    if not auto.enabled or rate is None:
        return Autoscaler(remove_scaled_object=exists)
    if not prometheus_url:
        problem = (
            f"{FIELD} ({rate:g}) needs the NeuralCluster {spec.cluster_ref.name} to set spec.prometheusUrl, and it "
            "sets none: autoscaling on CPU/memory only until it does"
        )
        return Autoscaler(remove_scaled_object=exists, problem=problem, reason="NoPrometheusUrl")
    if not keda_served:
        problem = (
            f"{FIELD} ({rate:g}) needs KEDA (keda.sh/v1alpha1 ScaledObject), which this cluster does not serve: "
            "autoscaling on CPU/memory only until it does"
        )
        return Autoscaler(problem=problem, reason="KEDANotServed")
    return Autoscaler(scaled_object=True, prometheus_url=prometheus_url, reason="ScaledObject")
