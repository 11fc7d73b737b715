"""Config parsing: defaults for missing keys, errors that name the field path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flownexus_trainer.config import ConfigError, JobConfig, load_config


def test_empty_config_takes_the_trainingjob_defaults() -> None:
    cfg = JobConfig.from_dict({"name": "digits"})
    assert cfg.model.architecture == "mlp" and cfg.model.hidden_sizes == (128, 64)
    assert cfg.dataset.source == "builtin" and cfg.dataset.name == "digits" and cfg.dataset.seed == 42
    assert cfg.training.epochs == 30 and cfg.training.checkpoint_every == 5 and cfg.training.optimizer == "adamw"
    assert cfg.validation.min_accuracy == 0.85 and cfg.validation.max_latency_p95_ms == 100.0
    assert cfg.output.model_name == "digits"
    assert cfg.run_dir == Path("/artifacts/default/digits")


def test_explicit_null_switches_a_threshold_off() -> None:
    cfg = JobConfig.from_dict({"validation": {"minAccuracy": None, "maxRmse": 3}})
    assert cfg.validation.min_accuracy is None
    assert cfg.validation.max_rmse == 3.0


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"model": {"architecture": "cnn"}}, "model.architecture"),
        ({"training": {"epochs": 0}}, "training.epochs"),
        ({"training": {"batchSize": "64"}}, "training.batchSize"),
        ({"dataset": {"source": "file"}}, "dataset.path"),
        ({"dataset": {"name": "mnist"}}, "dataset.name"),
        ({"model": {"architecture": "transformer", "dModel": 30, "numHeads": 4}}, "model.dModel"),
        ({"training": {"earlyStopping": {"enabled": "yes"}}}, "training.earlyStopping.enabled"),
    ],
)
def test_bad_values_name_their_field(raw: dict, path: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        JobConfig.from_dict(raw)


def test_load_config_reads_the_env_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"name": "x", "namespace": "ns"}))
    monkeypatch.setenv("FLOWNEXUS_CONFIG", str(path))
    assert load_config().run_dir == Path("/artifacts/ns/x")
