"""Factories for trainer unit tests: tiny configs and tiny trained-model directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flownexus_trainer.config import JobConfig


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def raw_config(root: Path, **sections: Any) -> dict[str, Any]:
    """A small, fast job: synthetic 3-class data, a narrow MLP, a few epochs."""
    base: dict[str, Any] = {
        "name": "tiny",
        "namespace": "test",
        "model": {"architecture": "mlp", "hiddenSizes": [16], "dropout": 0.1},
        "dataset": {"source": "synthetic", "synthetic": {"samples": 240, "features": 6, "classes": 3}},
        # minSteps 0: these tests count epochs; the minSteps extension has tests of its own.
        "training": {"epochs": 4, "batchSize": 32, "learningRate": 0.01, "checkpointEvery": 2, "minSteps": 0},
        "paths": {"artifactRoot": str(root), "runDir": str(root / "test" / "tiny")},
    }
    return deep_merge(base, sections)


@pytest.fixture
def make_config(tmp_path: Path):  # type: ignore[no-untyped-def]
    def factory(**sections: Any) -> JobConfig:
        return JobConfig.from_dict(raw_config(tmp_path, **sections))

    return factory


@pytest.fixture
def write_config(tmp_path: Path):  # type: ignore[no-untyped-def]
    def factory(**sections: Any) -> Path:
        path = tmp_path / "config.json"
        path.write_text(json.dumps(raw_config(tmp_path, **sections)))
        return path

    return factory
