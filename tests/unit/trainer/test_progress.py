"""KubeStatusSink merge-patches status.progress of its own TrainingJob; failures never raise."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from flownexus_trainer.progress import CheckpointRef, EpochMetrics, KubeStatusSink, MetricsFileSink, Progress

METRICS = EpochMetrics(
    epoch=3, total_epochs=10, loss=0.5, val_loss=0.6, learning_rate=1e-3, grad_norm=0.7, samples_per_second=900.0,
    accuracy=0.9, val_accuracy=0.88,
)  # fmt: skip


@pytest.fixture
def api_server() -> Any:
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()


def test_patches_own_status_with_the_service_account_token(
    api_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen = api_server
    (tmp_path / "token").write_text("secret-token\n")
    monkeypatch.setenv("FLOWNEXUS_ATTEMPT", "2")
    sink = KubeStatusSink("team-a", "digits", host=url, token_path=tmp_path / "token", min_interval_s=0)
    best = METRICS.status_json()
    sink.report(Progress("Running", 3, 10, METRICS, best, CheckpointRef(2, "team-a/digits/checkpoints/c.pt")))
    [call] = seen
    assert call["path"] == "/apis/flownexus.io/v1alpha1/namespaces/team-a/trainingjobs/digits/status"
    assert call["headers"]["Authorization"] == "Bearer secret-token"
    assert call["headers"]["Content-Type"] == "application/merge-patch+json"
    status = call["body"]["status"]
    # Exactly the pod-owned fields of the TrainingJob status schema, nothing the operator owns.
    assert set(status) == {"progress", "bestMetrics", "latestCheckpoint"}
    assert status["progress"]["epoch"] == 3 and status["progress"]["valAccuracy"] == 0.88
    assert status["progress"]["attempt"] == 2 and "rmse" not in status["progress"]
    assert status["latestCheckpoint"] == {"epoch": 2, "path": "team-a/digits/checkpoints/c.pt"}


def test_frequent_running_reports_are_throttled_but_the_final_one_is_sent(api_server: Any, tmp_path: Path) -> None:
    url, seen = api_server
    (tmp_path / "token").write_text("t")
    sink = KubeStatusSink("ns", "job", host=url, token_path=tmp_path / "token", min_interval_s=60)
    for epoch in (1, 2, 3):
        sink.report(Progress("Running", epoch, 10, replace(METRICS, epoch=epoch)))
    sink.report(Progress("Trained", 10, 10, replace(METRICS, epoch=10)))
    assert [c["body"]["status"]["progress"]["epoch"] for c in seen] == [1, 10]


def test_unreachable_api_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "token").write_text("t")
    sink = KubeStatusSink("ns", "job", host="http://127.0.0.1:9", token_path=tmp_path / "token", timeout_s=1)
    sink.report(Progress("Trained", 1, 1, METRICS))
    assert "could not report progress" in caplog.text


def test_metrics_file_gets_one_json_line_per_epoch(tmp_path: Path) -> None:
    sink = MetricsFileSink(tmp_path / "run" / "metrics.jsonl")
    sink.report(Progress("Running", 3, 10, METRICS))
    sink.report(Progress("Trained", 3, 10))
    [line] = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line)["loss"] == 0.5
