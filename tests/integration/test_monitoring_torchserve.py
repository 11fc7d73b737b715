"""The ModelDeployment dashboard's queries against a real TorchServe 0.12 (the serving pod's config, on loopback)
scraped by a real Prometheus that sets the target labels a Kubernetes scrape job sets (``namespace``, ``pod``):
after some traffic, every query that is not marked as legitimately empty returns data.

The operator dashboard is checked in e2e, where the operator runs (tests/e2e/monitoring_check.py)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from monitoring.render import MODELDEPLOYMENT, substitute

from tests.e2e.monitoring_check import queries_without_data, query, skipped_queries, variables
from tests.integration.test_modeldeployment_torchserve import Pod, pod, predict  # noqa: F401 (pod: a fixture)
from tests.integration.trainer.procs import free_port, kill_group
from tests.prereq import missing

pytestmark = pytest.mark.integration
NAMESPACE, MD = "team-a", "digits"
POD_NAME = f"{MD}-stable-7d9f8b6c5-x2k4p"  # what the stable Deployment's pod is called in a cluster


@pytest.mark.parametrize("pod", [False], ids=["open-inference"], indirect=True)
def test_modeldeployment_dashboard_queries_return_data_from_torchserve(pod: Pod, tmp_path: Path) -> None:  # noqa: F811
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        missing("prometheus is not installed (apt-get install prometheus)")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "flownexus-serving",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{pod.metrics}"], "labels": {"namespace": NAMESPACE, "pod": POD_NAME}}
                ],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    cmd = [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        empty: list[str] = ["(not queried yet)"]
        while time.monotonic() < deadline:
            assert predict(pod, [1.0, 2.0, 3.0, 4.0])[0] == 200
            time.sleep(0.2)
            try:
                empty = queries_without_data(url, NAMESPACE, MD, dashboards=("modeldeployment",))
            except OSError:  # Prometheus not listening yet
                continue
            if not empty:
                break
        assert empty == [], "\n".join(empty)
        # The per-track panels carry the track from the pod name.
        values = variables(NAMESPACE, MD)
        for panel in MODELDEPLOYMENT.panels:
            for q in panel.queries:
                if q.empty_reason is None:
                    series = query(url, substitute(q.expr, values))
                    print(f"[figure] {panel.title} / {q.legend}: {[(s['metric'], s['value'][1]) for s in series]}")
                    if "{{track}}" in q.legend:
                        assert [s["metric"].get("track") for s in series] == ["stable"], (panel.title, series)
        # A namespace with no ModelDeployment: the same queries answer nothing (the check can fail).
        assert queries_without_data(url, "other-namespace", MD, dashboards=("modeldeployment",))
        assert skipped_queries(("modeldeployment",))
    finally:
        kill_group(proc)
