"""Session fixtures for the trainer integration tests: one DDP run, its validation, one TorchServe."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.trainer.procs import (
    DigitsRun,
    TorchServe,
    free_port,
    kill_group,
    run_torchrun,
    run_validator,
    subprocess_env,
    write_job_config,
)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> DigitsRun:
    """One uninterrupted 2-process DDP run on digits, shared by the tests that need a trained model."""
    root = tmp_path_factory.mktemp("artifacts")
    config = write_job_config(root, "straight")
    log = root / "straight.log"
    started = time.monotonic()
    run_torchrun(config, log)
    return DigitsRun(root, config, root / "it" / "straight", log, time.monotonic() - started)


@pytest.fixture(scope="session")
def validated_run(digits_run: DigitsRun) -> dict[str, Any]:
    """The validator's termination summary for the shared digits run (it writes the .mar)."""
    return run_validator(digits_run.config, digits_run.root / "termination-log")


@pytest.fixture(scope="session")
def torchserve(
    digits_run: DigitsRun, validated_run: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TorchServe]:
    """A real TorchServe on loopback serving the validated digits archive."""
    work = tmp_path_factory.mktemp("torchserve")
    store = digits_run.run_dir / "model-store"
    if not validated_run["passed"]:
        pytest.fail(f"the digits model did not pass validation: {validated_run}")
    ports = {name: free_port() for name in ("inference", "management", "metrics")}
    (work / "config.properties").write_text(
        "\n".join(
            [
                f"inference_address=http://127.0.0.1:{ports['inference']}",
                f"management_address=http://127.0.0.1:{ports['management']}",
                f"metrics_address=http://127.0.0.1:{ports['metrics']}",
                f"model_store={store}",
                "load_models=digits.mar",
                # Dynamic batching as the operator configures it (batch 32 / 100 ms in production).
                'models={"digits": {"1.0.0": {"marName": "digits.mar", "batchSize": 8, "maxBatchDelay": 100, '
                '"minWorkers": 1, "maxWorkers": 1, "defaultVersion": true}}}',
                "metrics_mode=prometheus",
                "model_metrics_auto_detect=true",
                "disable_token_authorization=true",
            ]
        )
    )
    log = work / "torchserve.log"
    cmd = ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", str(work / "config.properties"),
           "--model-store", str(store)]  # fmt: skip
    # TorchServe keeps its pid file and unpacked models in the temp dir: a private one keeps this
    # server from colliding with any other TorchServe on the machine.
    env = {**subprocess_env(), "TMPDIR": str(work)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=work, env=env,
                                start_new_session=True)  # fmt: skip
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    server = TorchServe(url["inference"], url["management"], url["metrics"], log)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{server.management}/models/digits", timeout=2) as resp:
                    if any(w["status"] == "READY" for w in json.load(resp)[0]["workers"]):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("TorchServe did not load the model:\n" + log.read_text()[-4000:])
            time.sleep(1)
        yield server
    finally:
        kill_group(proc, signal.SIGTERM)
