"""The API types: defaults from the requirements, lossless round trips, and clear rejections."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from flownexus.api import KINDS
from flownexus.api.common import format_validation_error
from flownexus.api.modeldeployment import ModelDeploymentSpec
from flownexus.api.neuralcluster import NeuralClusterSpec
from flownexus.api.trainingjob import TrainingJobSpec
from tests.corpus import INVALID_CASES, VALID_MANIFESTS, InvalidCase
from tests.factories import model_deployment, training_job

SPEC_BY_KIND: dict[str, type[BaseModel]] = {k.kind: k.spec for k in KINDS}


def parse(manifest: dict[str, Any]) -> BaseModel:
    return SPEC_BY_KIND[manifest["kind"]].model_validate(manifest["spec"])


def test_trainingjob_defaults_match_the_requirements() -> None:
    spec = TrainingJobSpec.model_validate(training_job()["spec"])
    assert spec.training.checkpoint_every == 5
    assert spec.dataset.seed == 42
    assert spec.validation.min_accuracy == 0.85
    assert spec.validation.max_latency_p95_ms == 100
    assert spec.validation.max_train_val_gap == 0.05
    assert spec.validation.require_convergence is True
    assert spec.run_policy.suspend is False


def test_modeldeployment_defaults_match_the_requirements() -> None:
    spec = ModelDeploymentSpec.model_validate(model_deployment()["spec"])
    assert (spec.autoscaling.min_replicas, spec.autoscaling.max_replicas) == (2, 10)
    assert spec.autoscaling.target_cpu_utilization == 70
    assert spec.rollout.steps[:2] == [5, 15]
    assert all(b - a == 10 for a, b in zip(spec.rollout.steps[1:], spec.rollout.steps[2:], strict=False))
    assert spec.rollout.thresholds.max_error_rate == 0.01
    assert spec.rollout.thresholds.max_latency_p99_ms == 100
    assert spec.rollout.thresholds.window == "5m"
    assert spec.rollout.failed_checks_before_rollback == 3
    assert (spec.serving.batch_size, spec.serving.max_batch_delay_ms) == (32, 100)


@pytest.mark.parametrize("manifest", VALID_MANIFESTS, ids=lambda m: f"{m['kind']}/{m['metadata']['name']}")
def test_valid_manifests_round_trip_without_loss(manifest: dict[str, Any]) -> None:
    model = parse(manifest)
    wire = model.model_dump(by_alias=True, exclude_none=True, mode="json")
    again = type(model).model_validate(wire)
    assert again == model
    assert again.model_dump(by_alias=True, exclude_none=True, mode="json") == wire
    # Every field the user wrote survives, unchanged, in the dumped form.
    assert _contains(wire, manifest["spec"])


def _contains(big: Any, small: Any) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _contains(big[k], v) for k, v in small.items())
    return bool(big == small)


@pytest.mark.parametrize("case", INVALID_CASES, ids=lambda c: c.name)
def test_invalid_manifests_are_rejected_with_path_and_value(case: InvalidCase) -> None:
    with pytest.raises(ValidationError) as caught:
        parse(case.manifest)
    message = "\n".join(format_validation_error(caught.value))
    assert case.path in message
    if case.value is not None:
        assert str(case.value) in message


def test_error_lines_name_field_and_value() -> None:
    with pytest.raises(ValidationError) as caught:
        TrainingJobSpec.model_validate(training_job(**{"spec.distributed.workers": 0})["spec"])
    (line,) = format_validation_error(caught.value)
    assert line.startswith("spec.distributed.workers: ")
    assert line.endswith("got 0")


def test_neuralcluster_needs_claim_or_size() -> None:
    assert NeuralClusterSpec.model_validate({"artifactStore": {"size": "1Gi"}}).artifact_store.size == "1Gi"
    with pytest.raises(ValidationError):
        NeuralClusterSpec.model_validate({"artifactStore": {}})


# Hypothesis: any spec drawn from the valid space parses and round-trips.
steps_strategy = st.lists(st.integers(1, 100), min_size=1, max_size=12, unique=True).map(sorted)


@st.composite
def deployment_specs(draw: st.DrawFn) -> dict[str, Any]:
    low = draw(st.integers(1, 50))
    source = draw(st.sampled_from([{"trainingJobRef": {"name": "digits"}}, {"archivePath": "m/a.mar"}]))
    return {
        "clusterRef": {"name": draw(st.from_regex(r"^[a-z][a-z0-9-]{0,20}[a-z0-9]$", fullmatch=True))},
        "model": {**source, "version": draw(st.from_regex(r"^[0-9][0-9.]{0,8}$", fullmatch=True))},
        "serving": {"batchSize": draw(st.integers(1, 1024)), "maxBatchDelayMs": draw(st.integers(0, 60000))},
        "autoscaling": {
            "minReplicas": low,
            "maxReplicas": draw(st.integers(low, 1000)),
            "targetCpuUtilization": draw(st.integers(1, 100)),
        },
        "rollout": {
            "steps": draw(steps_strategy),
            "failedChecksBeforeRollback": draw(st.integers(1, 100)),
            "interval": f"{draw(st.integers(1, 600))}{draw(st.sampled_from('smh'))}",
        },
    }


@st.composite
def training_specs(draw: st.DrawFn) -> dict[str, Any]:
    arch = draw(st.sampled_from(["mlp", "residual_mlp", "transformer", "lstm"]))
    heads = draw(st.integers(1, 8))
    epochs = draw(st.integers(1, 500))
    gpus = draw(st.integers(0, 4))
    procs = draw(st.integers(1, max(gpus, 1)))
    return {
        "clusterRef": {"name": "demo"},
        "model": {
            "architecture": arch,
            "numHeads": heads,
            "dModel": heads * draw(st.integers(1, 32)),
            "hiddenSizes": draw(st.lists(st.integers(1, 512), min_size=1, max_size=4)),
            "dropout": draw(st.floats(0, 0.9)),
        },
        "dataset": draw(
            st.sampled_from(
                [
                    {"source": "builtin", "name": "wine"},
                    {"source": "synthetic", "task": "regression", "split": "temporal"},
                    {"source": "file", "path": "d/x.npz", "task": "classification"},
                ]
            )
        ),
        "training": {
            "epochs": epochs,
            "scheduler": {"warmupEpochs": draw(st.integers(0, epochs - 1))},
            "learningRate": draw(st.floats(1e-6, 1.0)),
            "optimizer": draw(st.sampled_from(["adamw", "sgd"])),
        },
        "distributed": {"workers": draw(st.integers(1, 512)), "procsPerWorker": procs, "gpusPerWorker": gpus},
        "runPolicy": {"maxRestarts": draw(st.integers(0, 100)), "suspend": draw(st.booleans())},
    }


@settings(max_examples=60, deadline=None)
@given(deployment_specs())
def test_generated_deployment_specs_are_accepted(spec: dict[str, Any]) -> None:
    model = ModelDeploymentSpec.model_validate(spec)
    assert ModelDeploymentSpec.model_validate(model.model_dump(by_alias=True)) == model


@settings(max_examples=60, deadline=None)
@given(training_specs())
def test_generated_training_specs_are_accepted(spec: dict[str, Any]) -> None:
    model = TrainingJobSpec.model_validate(spec)
    assert TrainingJobSpec.model_validate(model.model_dump(by_alias=True)) == model
