"""Atomic checkpoints: a checkpoint file is either complete or absent, never half-written.

A pod can be killed at any instant (node loss, gang restart), so a checkpoint is written to a
temporary name, fsynced, then renamed into place with ``os.replace`` (atomic on POSIX), and the
directory is fsynced so the rename itself survives a crash. Loading walks from the newest
checkpoint back and skips any file that does not load, so the latest *complete* one wins.
"""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-epoch-(\d{5})\.pt$")


def checkpoint_path(directory: Path, epoch: int) -> Path:
    return directory / f"ckpt-epoch-{epoch:05d}.pt"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see the old file or the new one, nothing between."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(directory: Path, epoch: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Atomically write the state of a finished ``epoch``; keep only the newest ``keep`` files."""
    buffer = io.BytesIO()
    torch.save({**state, "epoch": epoch}, buffer)
    path = checkpoint_path(directory, epoch)
    atomic_write_bytes(path, buffer.getvalue())
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete-looking checkpoint files, oldest first (temporary files never match the name)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def load_latest_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest checkpoint that reads back; ``None`` when there is none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            # weights_only: a checkpoint holds tensors and plain containers, never code to run.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            log.warning("checkpoint %s is unreadable (%s); trying an older one", path, exc)
            continue
        return path, state
    return None
