"""The p99 a client sees next to the p99 the canary analysis reads, in one run of the served digits model.

The canary analysis reads p99 from the serving pod's edge: the proxy's histogram
``flownexus_edge_request_duration_seconds`` (end of the request's headers to the last byte of the response:
TorchServe's queue, batching delay and handler, and the proxy). Until then it read the handler's own histogram
``flownexus_inference_latency_seconds`` (the time inside the handler: parse, forward, format), which this bench
still shows as a column for comparison. This bench serves the digits model as bench/serving_latency.py does
(TorchServe 0.12 on loopback with the operator's ConfigMap, one worker; its ``TorchServe``, ``wrk`` and POST
script are reused) with the pod's edge proxy (the ConfigMap's ``auth_proxy.py``, no token) in front of it, as in
a pod, and a real Prometheus (Debian's ``prometheus``) scraping the proxy's metrics port every second, as
tests/integration does. For each batching
variant and concurrency, ``wrk`` posts one digit per request for ``--seconds``; the client p50/p99 are wrk's latency
distribution (the one ``--latency`` prints, read through the Lua ``done()``). After the run and one more scrape,
Prometheus is asked, at the run's end and over a window of the run's length, the operator's exact
``latency_p99_ms_query`` (the analysis p99, the edge's), the handler histogram's p99 with the same selector, plus
two frontend means from TorchServe's counters for context:
``ts_inference_latency_microseconds`` / ``ts_inference_requests_total`` (the frontend's time per request) and
``ts_queue_latency_microseconds`` / ``ts_inference_requests_total`` (the time in the queue), and the handler's
mean from the histogram's ``_sum`` / ``_count``.

TorchServe labels its series with the machine's hostname (the pod name in a cluster), so the selector's pod
prefix is the hostname less its last character, as in tests/integration/test_modeldeployment_torchserve.py.

Usage: ``python bench/analysis_latency.py [--archive digits.mar] [--seconds 20]`` (without --archive it trains
the digits model first, about a minute). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "operator"), str(ROOT / "trainer_image")]

from bench.serving_latency import DIGIT, WRK_SCRIPT, TorchServe, train_archive, wrk  # noqa: E402
from tests.integration.trainer.procs import free_port, kill_group, subprocess_env  # noqa: E402

from flownexus.modeldeployment.children import INFERENCE_PORT, METRICS_PORT  # noqa: E402
from flownexus.prometheus import (  # noqa: E402
    HANDLER_LATENCY_HISTOGRAM,
    LATENCY_HISTOGRAM,
    REQUESTS_TOTAL,
    CanarySelector,
    NoData,
    QueryResult,
    latency_p99_ms_query,
    parse_response,
    pods_regex,
)

VARIANTS = {  # name: (batchSize, maxBatchDelayMs)
    "batch 32, delay 5 ms (API default)": (32, 5),
    "batch 32, delay 20 ms (example)": (32, 20),
    "batch 1 (no batching)": (1, 0),
}
CONCURRENCY = (1, 8, 32)
SCRAPE_S = 1
MODEL = "digits"


class EdgePod(TorchServe):
    """bench/serving_latency.py's TorchServe with the pod's edge proxy in front, as a serving pod runs them: the
    proxy listens on the ports the bench gave the inference and metrics listeners (``url``, ``ports``), and
    forwards to TorchServe's loopback listeners wherever the rendered config.properties put them."""

    def __init__(self, archive: Path, batch: int, delay: int, work: Path) -> None:
        super().__init__(archive, batch, delay, work)
        srv = work / "srv"
        conf = srv / "conf" / "config.properties"
        props = dict(line.split("=", 1) for line in conf.read_text().splitlines() if "=" in line)

        def port(key: str) -> str:
            match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)", props[key])
            if match is None:
                raise RuntimeError(f"{key}={props[key]} is not on loopback: the proxy cannot sit in front")
            return match.group(1)

        env = {
            **subprocess_env(),
            "FLOWNEXUS_PROXY_PORT": str(self.ports[INFERENCE_PORT]),
            "FLOWNEXUS_METRICS_PORT": str(self.ports[METRICS_PORT]),
            "FLOWNEXUS_UPSTREAM_PORT": port("inference_address"),
            "FLOWNEXUS_UPSTREAM_METRICS_PORT": port("metrics_address"),
            "FLOWNEXUS_CONF_FILE": str(conf),
            "HOSTNAME": socket.gethostname(),  # TorchServe's Hostname label; the pod name in a cluster
        }
        self.proxy_log = open(work / "proxy.log", "wb")  # noqa: SIM115
        cmd = [sys.executable, str(srv / "templates" / "auth_proxy.py")]
        self.proxy = subprocess.Popen(
            cmd, env=env, stdout=self.proxy_log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.ports[METRICS_PORT])) == 0:
                    break
            if time.monotonic() > deadline or self.proxy.poll() is not None:
                self.close()
                raise RuntimeError(f"the edge proxy did not start; see {work / 'proxy.log'}")
            time.sleep(0.2)
        # Clients go through the proxy (TorchServe's own listener is the upstream one, as in a pod).
        self.url = f"http://127.0.0.1:{self.ports[INFERENCE_PORT]}/predictions/{MODEL}"

    def close(self) -> None:
        try:
            if hasattr(self, "proxy"):
                kill_group(self.proxy)
                self.proxy_log.close()
        finally:
            super().close()


class Prometheus:
    """Prometheus on loopback scraping one serving pod's metrics port every second, in a scratch directory."""

    def __init__(self, metrics_port: int, work: Path) -> None:
        work.mkdir(parents=True)
        port = free_port()
        (work / "prometheus.yml").write_text(
            f"global: {{scrape_interval: {SCRAPE_S}s, evaluation_interval: {SCRAPE_S}s}}\n"
            f"scrape_configs: [{{job_name: torchserve, static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]}}]\n"
        )
        cmd = [shutil.which("prometheus") or "prometheus", f"--config.file={work / 'prometheus.yml'}",
               f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
        self.log = open(work / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"Prometheus did not get ready; see {work / 'prometheus.log'}")
            time.sleep(0.5)

    def query_at(self, promql: str, at: float) -> QueryResult:
        """An instant query evaluated at ``at`` (Unix time), read as the analysis reads its answers."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql, "time": f"{at:.3f}"})
        with urllib.request.urlopen(url, timeout=10) as resp:
            body: dict[str, Any] = json.loads(resp.read().decode("utf-8"))
        return parse_response(body)

    def close(self) -> None:
        kill_group(self.proc)
        self.log.close()


@dataclass(frozen=True)
class Row:
    variant: str
    connections: int
    client: dict[str, Any]
    analysis_p99_ms: QueryResult  # the edge histogram's, as the analysis reads it
    handler_p99_ms: QueryResult  # the handler histogram's, what the analysis read before
    handler_mean_ms: QueryResult
    frontend_mean_ms: QueryResult
    queue_mean_ms: QueryResult


def frontend_queries(sel: CanarySelector, window: str) -> dict[str, str]:
    """Means per request in ms over ``window``: rate of a cumulative time over the rate of its count."""
    ts = f'{{model_name="{sel.model_name}",hostname=~"{pods_regex(sel.pod_prefix)}"}}'
    handler = f'{{ModelName="{sel.model_name}",Hostname=~"{pods_regex(sel.pod_prefix)}"}}'
    requests = f"sum(rate({REQUESTS_TOTAL}{ts}[{window}]))"
    return {
        "handler": f"sum(rate({HANDLER_LATENCY_HISTOGRAM}_sum{handler}[{window}])) "
        f"/ sum(rate({HANDLER_LATENCY_HISTOGRAM}_count{handler}[{window}])) * 1000",
        "frontend": f"sum(rate(ts_inference_latency_microseconds{ts}[{window}])) / {requests} / 1000",
        "queue": f"sum(rate(ts_queue_latency_microseconds{ts}[{window}])) / {requests} / 1000",
    }


def handler_p99_query(sel: CanarySelector, window: str) -> str:
    """The analysis' p99 query with the handler's histogram in place of the edge's (no status class there)."""
    query = latency_p99_ms_query(sel, window).replace(LATENCY_HISTOGRAM, HANDLER_LATENCY_HISTOGRAM)
    return query.replace(',code="2xx"', "")


def measure(server: TorchServe, prom: Prometheus, script: Path, name: str, connections: int, seconds: int) -> Row:
    """One wrk run, then the analysis' p99 (the edge's), the handler's p99 and the frontend means over the run,
    evaluated at its end."""
    sel = CanarySelector(model_name=MODEL, pod_prefix=socket.gethostname()[:-1])
    client = wrk(server.url, connections, seconds, script)
    end = time.time()
    time.sleep(2 * SCRAPE_S + 0.5)  # the scrape at the run's end is in
    window = f"{seconds}s"  # the run's length, in the analysis' rate(...[window]) form
    means = {key: prom.query_at(q, end) for key, q in frontend_queries(sel, window).items()}
    return Row(name, connections, client, prom.query_at(latency_p99_ms_query(sel, window), end),
               prom.query_at(handler_p99_query(sel, window), end), means["handler"], means["frontend"],
               means["queue"])  # fmt: skip


def fmt(value: QueryResult, digits: int = 2) -> str:
    return "no data" if isinstance(value, NoData) else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, help="the digits .mar (default: train one)")
    parser.add_argument("--seconds", type=int, default=20, help="wrk duration per concurrency")
    args = parser.parse_args()
    if any(shutil.which(tool) is None for tool in ("wrk", "torchserve", "prometheus")):
        sys.exit("needs wrk, torchserve and prometheus on PATH")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="analysis-bench-") as tmp:
        work = Path(tmp)
        if args.archive is None:
            (work / "train").mkdir()
        archive = args.archive or train_archive(work / "train")
        script = work / "post.lua"
        script.write_text(WRK_SCRIPT % json.dumps({"inputs": [DIGIT]}))
        for name, (batch, delay) in VARIANTS.items():
            server = EdgePod(archive, batch, delay, work / f"ts-{batch}-{delay}")
            try:
                prom = Prometheus(server.ports[METRICS_PORT], work / f"prom-{batch}-{delay}")
                try:
                    wrk(server.url, 8, 3, script)  # warm-up; the series exist from here on
                    time.sleep(2 * SCRAPE_S + 0.5)
                    for connections in CONCURRENCY:
                        row = measure(server, prom, script, name, connections, args.seconds)
                        rows.append(row)
                        c = row.client
                        print(f"{name}, c={connections}: {c['rps']:.0f} req/s, client p50 {c['p50']:.2f} ms, "
                              f"p99 {c['p99']:.2f} ms, analysis p99 {fmt(row.analysis_p99_ms)} ms (edge), handler "
                              f"p99 {fmt(row.handler_p99_ms)} ms, handler mean "
                              f"{fmt(row.handler_mean_ms, 3)} ms, frontend mean {fmt(row.frontend_mean_ms)} ms, "
                              f"queue mean {fmt(row.queue_mean_ms)} ms, errors {c['errors'] + c['non2xx']}",
                              flush=True)  # fmt: skip
                finally:
                    prom.close()
            finally:
                server.close()
    print()
    print("| batching | concurrency | req/s | client p50 ms | client p99 ms | analysis p99 ms (edge) | handler p99 ms "
          "| handler mean ms | frontend mean ms | queue mean ms | client p99 / analysis p99 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        c, p99 = row.client, row.analysis_p99_ms
        ratio = "-" if isinstance(p99, NoData) or p99 == 0 else f"{c['p99'] / p99:.1f}x"
        print(f"| {row.variant} | {row.connections} | {c['rps']:.0f} | {c['p50']:.2f} | {c['p99']:.2f} | "
              f"{fmt(p99)} | {fmt(row.handler_p99_ms)} | {fmt(row.handler_mean_ms, 3)} | {fmt(row.frontend_mean_ms)} | "
              f"{fmt(row.queue_mean_ms)} | {ratio} |")  # fmt: skip


if __name__ == "__main__":
    main()
