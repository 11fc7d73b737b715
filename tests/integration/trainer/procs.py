"""Helpers that start real processes for the trainer tests: torchrun DDP gangs, the validator, TorchServe.

Every process is started in its own session and stopped by its pid and process-group id, never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

TRAINER_SRC = Path(__file__).resolve().parents[3] / "trainer_image"

# Small enough for ~1 minute on two busy cores, large enough for >= 0.94 test accuracy on digits.
DIGITS_CONFIG: dict[str, Any] = {
    "name": "digits",
    "namespace": "it",
    "model": {"architecture": "mlp", "hiddenSizes": [128, 64], "dropout": 0.1},
    "dataset": {"source": "builtin", "name": "digits", "seed": 42},
    "training": {
        "epochs": 20, "batchSize": 32, "learningRate": 0.002, "checkpointEvery": 4,
        "earlyStopping": {"enabled": True, "patience": 6},
    },
    "validation": {"minAccuracy": 0.94, "maxOverfittingGap": 0.08},
    "output": {"modelName": "digits", "version": "1.0.0", "torchscript": True, "quantizeInt8": True, "onnx": True},
}  # fmt: skip


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRAINER_SRC), env.get("PYTHONPATH")]))
    return env


def write_job_config(root: Path, run_name: str, **overrides: Any) -> Path:
    raw = json.loads(json.dumps(DIGITS_CONFIG))
    raw.update(overrides)
    raw["paths"] = {"artifactRoot": str(root), "runDir": str(root / "it" / run_name)}
    path = root / f"{run_name}.json"
    path.write_text(json.dumps(raw))
    return path


def start_torchrun(
    config: Path, log: Path, nproc: int = 2, program: list[str] | None = None
) -> subprocess.Popen[bytes]:
    """torchrun on one node, as a worker pod runs it: the built-in trainer, or ``program`` (a custom trainer's
    script and args, which finds the config through $FLOWNEXUS_CONFIG like in a pod)."""
    target = program if program is not None else ["-m", "flownexus_trainer.train", "--config", str(config)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target]
    env = {**subprocess_env(), "FLOWNEXUS_CONFIG": str(config)}
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal everything we started: the process group and every descendant by pid.

    torchrun starts its workers in sessions of their own, so signalling its group alone would leave
    them running; a pod's deletion kills them all, and so does this.
    """
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(sig)
    _signal_group(proc.pid, sig)
    try:
        proc.wait(timeout=30)
    finally:
        _signal_group(proc.pid, signal.SIGKILL)  # stragglers that ignored a polite signal


def run_torchrun(config: Path, log: Path, timeout: float = 240, program: list[str] | None = None) -> None:
    proc = start_torchrun(config, log, program=program)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        kill_group(proc)
    assert rc == 0, log.read_text()[-4000:]


def run_validator(config: Path, termination_log: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "flownexus_trainer.validate", "--config", str(config),
           "--termination-log", str(termination_log)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    summary: dict[str, Any] = json.loads(termination_log.read_text())
    return summary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TorchServe:
    inference: str
    management: str
    metrics: str
    log: Path


@dataclass(frozen=True)
class DigitsRun:
    root: Path
    config: Path
    run_dir: Path
    log: Path
    seconds: float
