"""The config the operator writes parses in the trainer, and what the pods send fits the operator's status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flownexus.api.neuralcluster import NeuralClusterSpec
from flownexus.api.trainingjob import TrainingJobSpec, TrainingJobStatus
from flownexus.trainingjob.children import TrainingContext, trainer_config
from flownexus_trainer.config import JobConfig
from flownexus_trainer.progress import CheckpointRef, EpochMetrics, Progress
from tests.factories import neural_cluster, training_job


def operator_config(**spec: Any) -> dict[str, Any]:
    tj = training_job(**spec)
    tj["metadata"]["uid"] = "uid-1"
    ctx = TrainingContext(
        owner=tj,
        spec=TrainingJobSpec.model_validate(tj["spec"]),
        cluster=NeuralClusterSpec.model_validate(neural_cluster()["spec"]),
        artifact_claim="demo-artifacts",
    )
    # Through JSON, exactly as the ConfigMap carries it.
    config: dict[str, Any] = json.loads(json.dumps(trainer_config(ctx)))
    return config


def test_default_trainingjob_config_parses_with_its_values() -> None:
    cfg = JobConfig.from_dict(operator_config())
    assert cfg.model.architecture == "mlp" and cfg.model.hidden_sizes == (128, 64)
    assert cfg.dataset.name == "digits" and cfg.training.epochs == 20
    assert cfg.run_dir == Path(f"/artifacts/{cfg.namespace}/digits-uid-1")
    assert cfg.output.model_name == "digits"


@pytest.mark.parametrize(
    "spec",
    [
        {"model": {"architecture": "transformer", "dModel": 32, "numHeads": 4, "numLayers": 2}},
        {"model": {"architecture": "lstm"}, "dataset": {"source": "builtin", "name": "iris", "split": "temporal"}},
        {"training": {"epochs": 5, "optimizer": "sgd", "scheduler": {"type": "constant", "warmupEpochs": 0}}},
    ],
)
def test_other_specs_parse(spec: dict[str, Any]) -> None:
    JobConfig.from_dict(operator_config(**spec))


def test_status_patch_fits_the_trainingjob_status_schema() -> None:
    metrics = EpochMetrics(
        epoch=4, total_epochs=20, loss=0.3, val_loss=0.35, learning_rate=1e-3, grad_norm=0.5,
        samples_per_second=1000.0, accuracy=0.9, val_accuracy=0.88,
    )  # fmt: skip
    progress = Progress("Running", 4, 20, metrics, metrics.status_json(1), CheckpointRef(4, "ns/digits/c.pt"))
    patch = progress.status_patch(attempt=1)["status"]
    status = TrainingJobStatus.model_validate(patch)
    assert status.progress is not None and status.progress.val_accuracy == 0.88 and status.progress.attempt == 1
    assert status.latest_checkpoint is not None and status.latest_checkpoint.epoch == 4
    # Every key we send is a field of the schema (the API server would prune anything else silently).
    dumped = status.model_dump(by_alias=True, exclude_none=True)
    for key in ("progress", "bestMetrics"):
        assert set(patch[key]) <= set(dumped[key]), set(patch[key]) - set(dumped[key])
