"""Stopping what a test started, by its pid: SIGTERM, then SIGKILL if it does not exit in time."""

from __future__ import annotations

import subprocess
from typing import Any


def stop(proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    """Terminate ``proc`` and wait for it; kill it when it is still there after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
