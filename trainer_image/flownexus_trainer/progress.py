"""Where per-epoch progress goes: the log, the metrics file, and the TrainingJob's status.

Pods get no broad API rights: ``KubeStatusSink`` uses the pod's own service-account token, which the
operator grants only ``patch`` on this TrainingJob's ``status`` subresource, and merge-patches
``status.progress``. Reporting is best effort: a failed patch is logged, never fatal to training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
REPORT_ENV = "FLOWNEXUS_REPORT_STATUS"
ATTEMPT_ENV = "FLOWNEXUS_ATTEMPT"


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch as rank 0 saw it; accuracy for classification, rmse/r2 for regression."""

    epoch: int
    total_epochs: int
    loss: float
    val_loss: float
    learning_rate: float
    grad_norm: float
    samples_per_second: float
    accuracy: float | None = None
    val_accuracy: float | None = None
    rmse: float | None = None
    val_rmse: float | None = None
    r2: float | None = None
    val_r2: float | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """camelCase, rounded, without the metrics that do not apply to the task (a metrics.jsonl line)."""
        return {_camel(k): _rounded(v) for k, v in asdict(self).items() if v is not None}

    def status_json(self, attempt: int | None = None) -> dict[str, Any]:
        """The TrainingJob's ``status.progress`` shape; there ``rmse``/``r2`` mean the validation values."""
        out = {
            "epoch": self.epoch,
            "totalEpochs": self.total_epochs,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "valLoss": self.val_loss,
            "valAccuracy": self.val_accuracy,
            "rmse": self.val_rmse,
            "r2": self.val_r2,
            "learningRate": self.learning_rate,
            "gradNorm": self.grad_norm,
            "samplesPerSecond": self.samples_per_second,
            "attempt": attempt,
            "updatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return {k: _rounded(v) for k, v in out.items() if v is not None}

    def log_line(self) -> str:
        quality = (
            f"acc {self.accuracy:.4f} val_acc {self.val_accuracy:.4f}"
            if self.accuracy is not None and self.val_accuracy is not None
            else f"rmse {self.rmse:.4f} val_rmse {self.val_rmse:.4f}"
        )
        return (
            f"epoch {self.epoch}/{self.total_epochs} loss {self.loss:.4f} val_loss {self.val_loss:.4f} {quality} "
            f"lr {self.learning_rate:.2e} grad_norm {self.grad_norm:.3f} {self.samples_per_second:.0f} samples/s"
        )


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(part.title() for part in rest)


def _rounded(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


@dataclass(frozen=True)
class CheckpointRef:
    epoch: int
    path: str  # relative to the artifact root, as the operator and other pods mount it elsewhere


@dataclass(frozen=True)
class Progress:
    """One report from rank 0: the latest epoch, the best one so far, the newest checkpoint."""

    phase: str  # Running (after each epoch) | Trained | Failed: for logs and pacing
    epoch: int
    total_epochs: int
    metrics: EpochMetrics | None = None
    best: dict[str, Any] = field(default_factory=dict)  # status_json() of the best epoch
    latest_checkpoint: CheckpointRef | None = None
    stopped_early: bool = False
    message: str = ""

    def status_patch(self, attempt: int | None = None) -> dict[str, Any]:
        """Merge patch for the TrainingJob status: only the fields the pods own."""
        status: dict[str, Any] = {}
        if self.metrics is not None:
            status["progress"] = self.metrics.status_json(attempt)
        if self.best:
            status["bestMetrics"] = self.best
        if self.latest_checkpoint is not None:
            status["latestCheckpoint"] = {"epoch": self.latest_checkpoint.epoch, "path": self.latest_checkpoint.path}
        return {"status": status}


class ProgressSink(Protocol):
    def report(self, progress: Progress) -> None: ...


class MetricsFileSink:
    """Appends one JSON object per epoch to ``<runDir>/metrics.jsonl`` (the validator plots it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def report(self, progress: Progress) -> None:
        if progress.phase != "Running" or progress.metrics is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(progress.metrics.to_json()) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


class LogSink:
    """One readable line per epoch."""

    def report(self, progress: Progress) -> None:
        if progress.phase == "Running" and progress.metrics is not None:
            log.info("%s", progress.metrics.log_line())
        elif progress.message:
            log.info("%s: %s", progress.phase, progress.message)


class KubeStatusSink:
    """Merge-patches ``status.progress`` of one TrainingJob with the pod's service-account token."""

    def __init__(
        self,
        namespace: str,
        name: str,
        host: str | None = None,
        token_path: Path = SA_DIR / "token",
        ca_path: Path = SA_DIR / "ca.crt",
        timeout_s: float = 5.0,
        min_interval_s: float = 2.0,
    ) -> None:
        api = host or "https://{}:{}".format(
            os.environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc"),
            os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
        )
        self.url = f"{api}/apis/flownexus.io/v1alpha1/namespaces/{namespace}/trainingjobs/{name}/status"
        self.token_path = token_path
        self.ca_path = ca_path
        self.timeout_s = timeout_s
        # Short epochs would otherwise patch several times a second; the API server deserves better.
        self.min_interval_s = min_interval_s
        self._last_sent = -math.inf
        attempt = os.environ.get(ATTEMPT_ENV, "")
        self.attempt = int(attempt) if attempt.isdigit() else None

    def report(self, progress: Progress) -> None:
        now = time.monotonic()
        if progress.phase == "Running" and now - self._last_sent < self.min_interval_s:
            return
        patch = progress.status_patch(self.attempt)
        if not patch["status"]:
            return
        try:
            self._patch(patch)
            self._last_sent = now
        except (OSError, urllib.error.URLError, ValueError) as exc:
            log.warning("could not report progress to %s: %s", self.url, exc)

    def _patch(self, body: dict[str, Any]) -> None:
        # The token is re-read each time: kubelet rotates projected tokens while the pod runs.
        token = self.token_path.read_text(encoding="utf-8").strip()
        request = urllib.request.Request(
            self.url,
            data=json.dumps(body).encode(),
            method="PATCH",
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/merge-patch+json",
                "Accept": "application/json",
            },
        )
        context = ssl.create_default_context(cafile=str(self.ca_path)) if self.url.startswith("https") else None
        with urllib.request.urlopen(request, timeout=self.timeout_s, context=context) as response:
            response.read()


class FanOut:
    """Sends each report to several sinks; one failing sink does not starve the others."""

    def __init__(self, *sinks: ProgressSink) -> None:
        self.sinks = sinks

    def report(self, progress: Progress) -> None:
        for sink in self.sinks:
            try:
                sink.report(progress)
            except Exception:
                log.exception("progress sink %s failed", type(sink).__name__)


def default_sinks(namespace: str, name: str, metrics_path: Path) -> FanOut:
    """Log + metrics file always; the TrainingJob status when ``$FLOWNEXUS_REPORT_STATUS=1``."""
    sinks: list[ProgressSink] = [LogSink(), MetricsFileSink(metrics_path)]
    if os.environ.get(REPORT_ENV) == "1":
        sinks.append(KubeStatusSink(namespace, name))
    return FanOut(*sinks)
