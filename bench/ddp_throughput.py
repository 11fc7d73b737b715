"""DDP throughput on CPU: training samples/s with 1 vs 2 torchrun processes, and scaling efficiency.

Runs the real trainer (``torchrun -m flownexus_trainer.train``) on a compute-bound MLP
(256-1024-1024-10, synthetic data) and reads samples/s from the run's metrics.jsonl (mean over the
epochs after the first, which pays for warm-up). Usage: ``python bench/ddp_throughput.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TRAINER_SRC = Path(__file__).resolve().parents[1] / "trainer_image"


def job_config(root: Path, name: str, batch: int, samples: int, epochs: int) -> Path:
    raw = {
        "name": name,
        "namespace": "bench",
        "model": {"architecture": "mlp", "hiddenSizes": [1024, 1024], "dropout": 0.0},
        "dataset": {"source": "synthetic", "synthetic": {"samples": samples, "features": 256, "classes": 10}},
        "training": {
            "epochs": epochs,
            "batchSize": batch,
            "checkpointEvery": 1000,
            "earlyStopping": {"enabled": False},
        },
        "paths": {"artifactRoot": str(root), "runDir": str(root / name)},
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(raw))
    return path


def run(root: Path, nproc: int, threads: int, batch: int, samples: int, epochs: int) -> float:
    name = f"p{nproc}-t{threads}-b{batch}"
    # training.batchSize is the global batch: per-rank batch x processes.
    config = job_config(root, name, batch * nproc, samples, epochs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRAINER_SRC), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "flownexus_trainer.train", "--config", str(config)]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    lines = (root / name / "metrics.jsonl").read_text().splitlines()
    return float(statistics.mean(json.loads(line)["samplesPerSecond"] for line in lines[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=24000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024], help="per-rank batch sizes")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"# DDP throughput, gloo on CPU, {cores} cores, MLP 256-1024-1024-10, {args.samples} samples")
    print("| per-rank batch | 1 proc x 1 thread | 1 proc x 2 threads | 2 procs x 1 thread | efficiency 2p vs 1p1t |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for batch in args.batches:
            one = run(root, 1, 1, batch, args.samples, args.epochs)
            one_two = run(root, 1, 2, batch, args.samples, args.epochs)
            two = run(root, 2, 1, batch, args.samples, args.epochs)
            print(f"| {batch} | {one:,.0f} | {one_two:,.0f} | {two:,.0f} | {two / (2 * one):.2f} |", flush=True)


if __name__ == "__main__":
    main()
