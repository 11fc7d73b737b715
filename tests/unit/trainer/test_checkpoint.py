"""Checkpoints are atomic: a crash mid-write never costs the previous complete checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from flownexus_trainer import checkpoint as ck


def test_crash_mid_write_leaves_the_previous_latest_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck.save_checkpoint(tmp_path, 5, {"w": torch.ones(3)})

    def crash(*_: object) -> None:
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 10, {"w": torch.zeros(3)})
    monkeypatch.undo()

    path, state = ck.load_latest_checkpoint(tmp_path)  # type: ignore[misc]
    assert path.name == "ckpt-epoch-00005.pt" and state["epoch"] == 5
    assert torch.equal(state["w"], torch.ones(3))


def test_a_truncated_newest_file_falls_back_to_the_older_one(tmp_path: Path) -> None:
    ck.save_checkpoint(tmp_path, 2, {"w": torch.ones(1)})
    newest = ck.save_checkpoint(tmp_path, 4, {"w": torch.ones(1)})
    newest.write_bytes(newest.read_bytes()[:20])  # e.g. a disk that lied about fsync
    _, state = ck.load_latest_checkpoint(tmp_path)  # type: ignore[misc]
    assert state["epoch"] == 2


def test_only_the_newest_checkpoints_are_kept(tmp_path: Path) -> None:
    for epoch in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, epoch, {}, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["ckpt-epoch-00003.pt", "ckpt-epoch-00004.pt"]


def test_no_checkpoint_means_a_fresh_start(tmp_path: Path) -> None:
    assert ck.load_latest_checkpoint(tmp_path / "missing") is None
