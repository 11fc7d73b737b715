"""Serving latency and throughput of the digits model in TorchServe, next to its raw in-process forward pass.

TorchServe 0.12 runs on loopback with the operator's own ConfigMap (hardened ``config.properties``, the init
container's ``prepare.py``; only paths and ports moved, as in tests/integration), one worker, and for each
batching variant (batch 32 / 100 ms delay — the API default until issue 10 —, batch 32 / 5 ms — the default
since —, batch 1 = off) ``wrk`` posts one
digit per request at concurrency 1, 8 and 32 (HTTP/1.1 keep-alive, 2 threads). The raw figure is the same
network's forward pass on one row in this process (one intra-op thread, like the server's worker), and the
serving overhead is the ratio of the served p50 to it. ``wrk`` and TorchServe share the machine's cores.

Usage: ``python bench/serving_latency.py [--archive digits.mar] [--seconds 10]`` (without --archive it trains the
digits model first, about a minute). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "operator"), str(ROOT / "trainer_image")]

from tests.integration.trainer.procs import (  # noqa: E402
    free_port,
    kill_group,
    run_torchrun,
    run_validator,
    subprocess_env,
    write_job_config,
)

from flownexus.api.modeldeployment import ModelDeploymentSpec  # noqa: E402
from flownexus.api.neuralcluster import NeuralClusterSpec  # noqa: E402
from flownexus.modeldeployment.children import (  # noqa: E402
    INFERENCE_PORT,
    MANAGEMENT_PORT,
    METRICS_PORT,
    SERVE_ROOT,
    UPSTREAM_INFERENCE_PORT,
    UPSTREAM_METRICS_PORT,
    ServingContext,
    build_config_map,
)
from flownexus_trainer.models import build_model  # noqa: E402

DIGIT = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8,
         8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13,
         10, 0, 0, 0]  # fmt: skip
VARIANTS = {  # name: (batchSize, maxBatchDelayMs)
    "batch 32, delay 100 ms": (32, 100),
    "batch 32, delay 5 ms": (32, 5),
    "batch 1 (no batching)": (1, 0),
}
CONCURRENCY = (1, 8, 32)
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '%s'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %%d, "seconds": %%f, "errors": %%d, "non2xx": %%d, ' ..
    '"p50": %%f, "p95": %%f, "p99": %%f}\\n', summary.requests, summary.duration / 1e6,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000))
end
"""


def train_archive(work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    config = write_job_config(work, "digits", output={"modelName": "digits", "version": "1.0.0"})
    run_torchrun(config, work / "train.log")
    summary = run_validator(config, work / "termination-log")
    assert summary["passed"], summary
    return work / str(summary["modelArchive"])


def raw_forward_ms(archive: Path, iterations: int = 3000) -> dict[str, float]:
    """Median time of the network's forward pass on one row and on 32 rows, in this process, one thread."""
    with zipfile.ZipFile(archive) as mar:
        spec = json.loads(mar.read("model_config.json"))
        state = torch.load(__import__("io").BytesIO(mar.read("model.pt")), map_location="cpu", weights_only=True)
    net = build_model(spec["model"], spec["numFeatures"], spec["numOutputs"])
    state = {k.removeprefix("net."): v for k, v in state.items()}
    net.load_state_dict(state)
    net.eval()
    torch.set_num_threads(1)
    figures = {}
    for rows in (1, 32):
        x = torch.tensor([DIGIT] * rows, dtype=torch.float32)
        times = []
        with torch.inference_mode():
            for _ in range(200):
                net(x)
            for _ in range(iterations):
                t = time.perf_counter()
                net(x)
                times.append(time.perf_counter() - t)
        figures[f"forward_{rows}_ms"] = statistics.median(times) * 1000
    return figures


def context(batch: int, delay: int) -> ServingContext:
    spec = {
        "clusterRef": {"name": "demo"},
        "model": {"archivePath": "bench/digits.mar", "version": "1.0.0"},
        "serving": {"batchSize": batch, "maxBatchDelayMs": delay, "workersPerModel": 1},
    }
    cluster = {"images": {"trainer": "t", "server": "s"}, "artifactStore": {"size": "1Gi"}}
    owner = {"apiVersion": "flownexus.io/v1alpha1", "kind": "ModelDeployment",
             "metadata": {"name": "digits", "namespace": "bench", "uid": "bench"}, "spec": spec}  # fmt: skip
    return ServingContext(
        owner=owner,
        spec=ModelDeploymentSpec.model_validate(spec),
        cluster=NeuralClusterSpec.model_validate(cluster),
        artifact_claim="demo-artifacts",
    )


class TorchServe:
    """TorchServe as the serving pod runs it, on loopback, in a scratch directory."""

    def __init__(self, archive: Path, batch: int, delay: int, work: Path) -> None:
        self.work = work
        srv = work / "srv"
        for sub in ("model-store", "conf", "run", "templates"):
            (srv / sub).mkdir(parents=True)
        # TorchServe listens on the upstream (loopback) ports in the pod, behind the edge proxy; the bench talks
        # to TorchServe directly (the proxy's own cost is in bench/analysis_latency.py).
        self.ports = {
            port: free_port()
            for port in (INFERENCE_PORT, MANAGEMENT_PORT, METRICS_PORT, UPSTREAM_INFERENCE_PORT, UPSTREAM_METRICS_PORT)
        }
        for key, value in build_config_map(context(batch, delay))["data"].items():
            if key == "config.properties":
                value = value.replace(SERVE_ROOT, str(srv))
                for port, moved in self.ports.items():
                    value = value.replace(f":{port}\n", f":{moved}\n")
                value += f"grpc_inference_port={free_port()}\ngrpc_management_port={free_port()}\n"
            (srv / "templates" / key).write_text(value)
        env = {
            **subprocess_env(),
            "FLOWNEXUS_ARCHIVE": str(archive),
            "FLOWNEXUS_MODEL_NAME": "digits",
            "FLOWNEXUS_MODEL_STORE": str(srv / "model-store"),
            "FLOWNEXUS_CONF_DIR": str(srv / "conf"),
            "FLOWNEXUS_MANAGEMENT_PORT": str(self.ports[MANAGEMENT_PORT]),
            "FLOWNEXUS_RUN_DIR": str(srv / "run"),
            "HOME": str(srv / "run"),
            "OMP_NUM_THREADS": "1",
            "TMPDIR": str(work),
        }
        subprocess.run([sys.executable, str(srv / "templates" / "prepare.py"), str(srv / "templates")],
                       env=env, check=True, capture_output=True)  # fmt: skip
        cmd = ["torchserve", "--foreground", "--ncs", "--ts-config", str(srv / "conf" / "config.properties"),
               "--model-store", str(srv / "model-store")]  # fmt: skip
        self.log = open(work / "torchserve.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=srv / "run", env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        probe = [sys.executable, str(srv / "templates" / "probe.py")]
        deadline = time.monotonic() + 180
        while subprocess.run(probe, env=env, capture_output=True).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"TorchServe did not get ready; see {work / 'torchserve.log'}")
            time.sleep(1)
        self.url = f"http://127.0.0.1:{self.ports[UPSTREAM_INFERENCE_PORT]}/predictions/digits"

    def close(self) -> None:
        kill_group(self.proc)
        self.log.close()


def wrk(url: str, connections: int, seconds: int, script: Path) -> dict[str, Any]:
    cmd = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "10s",
           "-s", str(script), url]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    line = next(line for line in out.splitlines() if line.startswith("{"))
    result: dict[str, Any] = json.loads(line)
    result["rps"] = result["requests"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, help="the digits .mar (default: train one)")
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per concurrency")
    args = parser.parse_args()
    if shutil.which("wrk") is None or shutil.which("torchserve") is None:
        sys.exit("needs wrk and torchserve on PATH")
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        work = Path(tmp)
        archive = args.archive or train_archive(work / "train")
        raw = raw_forward_ms(archive)
        print(f"raw forward pass in-process (1 thread): 1 row {raw['forward_1_ms'] * 1000:.1f} us, "
              f"32 rows {raw['forward_32_ms'] * 1000:.1f} us")  # fmt: skip
        script = work / "post.lua"
        script.write_text(WRK_SCRIPT % json.dumps({"inputs": [DIGIT]}))
        rows = []
        for name, (batch, delay) in VARIANTS.items():
            server = TorchServe(archive, batch, delay, work / f"ts-{batch}-{delay}")
            try:
                wrk(server.url, 8, 3, script)  # warm-up
                for connections in CONCURRENCY:
                    r = wrk(server.url, connections, args.seconds, script)
                    rows.append((name, connections, r))
                    print(f"{name}, c={connections}: {r['rps']:.0f} req/s, p50 {r['p50']:.2f} ms, "
                          f"p95 {r['p95']:.2f} ms, p99 {r['p99']:.2f} ms, errors {r['errors'] + r['non2xx']}",
                          flush=True)  # fmt: skip
            finally:
                server.close()
    print()
    print("| batching | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors | p50 / raw forward |")
    print("|---|---|---|---|---|---|---|---|")
    for name, connections, r in rows:
        ratio = r["p50"] / raw["forward_1_ms"]
        print(f"| {name} | {connections} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['p99']:.2f} | "
              f"{r['errors'] + r['non2xx']} | {ratio:,.0f}x |")  # fmt: skip
    print(f"\nraw forward (1 row): {raw['forward_1_ms']:.4f} ms = {1000 / raw['forward_1_ms']:,.0f} rows/s on one "
          f"thread; 32 rows: {raw['forward_32_ms']:.4f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
