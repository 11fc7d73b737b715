"""Failures that no restart can fix, and how a pod tells the operator about its own failure.

A pod's last words travel in its termination message (``/dev/termination-log``, at most 4 KiB, read by
the operator from the pod's status): the pods need no API rights for it. The trainer writes
``{"error": "...", "retryable": false}`` when the job's input is wrong (a dataset that does not exist,
a column that is not there, a config value it cannot use); the operator then fails the TrainingJob at
once with that message instead of spending every restart on it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TERMINATION_LOG = Path("/dev/termination-log")
TERMINATION_LIMIT = 4096  # kubelet truncates termination messages beyond 4 KiB
ERROR_CHARS = 1500


class InputError(ValueError):
    """The job's input (config, dataset) cannot work as given; the message names the field and the value."""


def write_termination_message(summary: dict[str, Any], path: Path = TERMINATION_LOG) -> None:
    """Best effort: the operator reads this from the pod status; outside a pod the path is absent."""
    payload = json.dumps(summary, separators=(",", ":"))
    if len(payload) > TERMINATION_LIMIT:
        summary = {**summary, "failed": [m[:120] for m in summary.get("failed", [])][:8]}
        payload = json.dumps(summary, separators=(",", ":"))[:TERMINATION_LIMIT]
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(payload)
    except OSError as exc:
        log.debug("no termination log at %s (%s)", path, exc)


def failure_summary(exc: BaseException) -> dict[str, Any]:
    """The termination message of a failed trainer: the error, and whether a restart could help."""
    return {"error": f"{type(exc).__name__}: {exc}"[:ERROR_CHARS], "retryable": not isinstance(exc, InputError)}
