"""The e2e session's Prometheus: Debian's binary on the host, scraping every pod annotated
`prometheus.io/scrape=true` and the operator, reachable from the host and from pods (KEDA's Prometheus scaler
queries it from inside the cluster).

It listens on the pod network's gateway address (the node end of the cluster bridge), not on a public interface:
the host and every pod reach that address, nothing outside the machine does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import Cluster, _free_port, wait_until
from tests.prereq import missing
from tests.processes import stop

SCRAPE_S = 2  # short, so that the canary's rollback bound holds (see test_modeldeployment.py)
BRIDGE = "fnx0"  # dev/localcluster/config.py CNI_BRIDGE


def bridge_address() -> str:
    """The node's address on the cluster bridge (the pods' gateway), e.g. 10.244.0.1."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", BRIDGE], capture_output=True, text=True).stdout
    for word_list in (line.split() for line in out.splitlines()):
        if "inet" in word_list:
            return word_list[word_list.index("inet") + 1].split("/")[0]
    raise AssertionError(f"the cluster bridge {BRIDGE} has no IPv4 address (is the cluster up, with a pod running?)")


def scrape_targets(cluster: Cluster) -> list[dict[str, Any]] | None:
    """The pods a `kubernetes_sd_configs: [{role: pod}]` job with the usual annotation rules would scrape:
    running, annotated `prometheus.io/scrape: "true"`, at `<podIP>:<prometheus.io/port>`; None on an API error."""
    done = cluster.kubectl("get", "pods", "--all-namespaces", "-o", "json", check=False, timeout=30)
    if done.returncode != 0:
        return None
    groups = []
    for pod in json.loads(done.stdout)["items"]:
        annotations = pod["metadata"].get("annotations") or {}
        ip, port = pod.get("status", {}).get("podIP"), annotations.get("prometheus.io/port")
        if annotations.get("prometheus.io/scrape") != "true" or not ip or not port:
            continue
        if pod["status"].get("phase") != "Running":
            continue
        labels = {"namespace": pod["metadata"]["namespace"], "pod": pod["metadata"]["name"]}
        labels["__metrics_path__"] = annotations.get("prometheus.io/path", "/metrics")
        groups.append({"targets": [f"{ip}:{port}"], "labels": labels})
    return groups


def http_status(url: str, timeout: float = 3) -> int:
    """The HTTP status of a GET, 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


@pytest.fixture(scope="session")
def prometheus(cluster: Cluster, operator: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus scraping every pod annotated `prometheus.io/scrape=true`; yields its URL.

    Debian's prometheus 2.42 is built without Kubernetes service discovery ("field kubernetes_sd_configs not
    found"), so a thread here does that discovery through the API server every 2 s (the same rules as the
    annotation-driven job in docs/MODELDEPLOYMENT.md) and hands the targets to Prometheus by `file_sd_configs`.
    """
    binary = shutil.which("prometheus")
    if binary is None:
        missing("prometheus is not installed (apt-get install prometheus)")
    work = tmp_path_factory.mktemp("prometheus")
    targets = work / "targets.json"
    targets.write_text("[]")
    port = _free_port()
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "scrape_configs": [
            {
                "job_name": "flownexus-serving",
                "scrape_interval": f"{SCRAPE_S}s",
                "scrape_timeout": f"{SCRAPE_S}s",
                "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "5s"}],
            },
            # The operator's own metrics (its dashboard and alerts read them).
            {
                "job_name": "flownexus-operator",
                "scrape_interval": f"{SCRAPE_S}s",
                "static_configs": [{"targets": [f"127.0.0.1:{operator}"]}],
            },
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = threading.Event()

    def discover() -> None:
        while not done.is_set():
            groups = scrape_targets(cluster)
            if groups is not None:
                (work / "targets.json.tmp").write_text(json.dumps(groups))
                (work / "targets.json.tmp").replace(targets)
            done.wait(2)

    discovery = threading.Thread(target=discover, daemon=True)
    discovery.start()
    address = f"{bridge_address()}:{port}"
    log = open(work / "prometheus.log", "wb")  # noqa: SIM115 (closed after the process)
    proc = subprocess.Popen(
        [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address={address}", "--storage.tsdb.retention.time=2h"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://{address}"
    try:
        wait_until("Prometheus /-/ready", lambda: http_status(f"{url}/-/ready") == 200, 60)
        yield url
    finally:
        done.set()
        stop(proc)
        log.close()
        discovery.join(timeout=40)
