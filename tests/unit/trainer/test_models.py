"""Every architecture maps (batch, features) to (batch, outputs); the lstm reads rows as sequences."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from flownexus_trainer.models import FeatureLSTM, build_model, sequence_shape

SPECS: dict[str, dict[str, Any]] = {
    "mlp": {"architecture": "mlp", "hiddenSizes": [8, 8]},
    "residual_mlp": {"architecture": "residual_mlp", "hiddenSize": 8, "numBlocks": 2},
    "transformer": {"architecture": "transformer", "dModel": 8, "numHeads": 2, "numLayers": 1},
    "lstm": {"architecture": "lstm", "dModel": 8, "numLayers": 2, "sequenceLength": 0},
}


@pytest.mark.parametrize("arch", SPECS)
@pytest.mark.parametrize("outputs", [3, 1])
def test_forward_shape(arch: str, outputs: int) -> None:
    model = build_model(SPECS[arch], num_features=5, num_outputs=outputs)
    for batch in (1, 4):
        assert model(torch.randn(batch, 5)).shape == (batch, outputs)


@pytest.mark.parametrize("arch", SPECS)
def test_backward_reaches_every_parameter(arch: str) -> None:
    model = build_model(SPECS[arch], num_features=5, num_outputs=3)
    model(torch.randn(4, 5)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match=r"model\.architecture"):
        build_model({"architecture": "cnn"}, 5, 3)


@pytest.mark.parametrize(
    ("features", "length", "shape"),
    [
        (64, 0, (8, 8)),  # digits: a square image read row by row
        (16, 0, (4, 4)),
        (13, 0, (13, 1)),  # not a square: one feature per step
        (4, 0, (2, 2)),
        (1, 0, (1, 1)),
        (30, 10, (10, 3)),  # explicit: 10 steps of 3 features
        (32, 32, (32, 1)),
    ],
)
def test_sequence_shape_defaults_to_square_rows_else_one_feature_per_step(
    features: int, length: int, shape: tuple[int, int]
) -> None:
    assert sequence_shape(features, length) == shape


def test_a_sequence_length_that_does_not_divide_the_features_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"model\.sequenceLength: 7 does not divide the 64 features"):
        build_model({"architecture": "lstm", "sequenceLength": 7}, 64, 10)


def test_lstm_reads_the_configured_steps_and_old_archives_rebuild_one_feature_per_step() -> None:
    model = build_model({"architecture": "lstm", "sequenceLength": 0}, 64, 10)
    assert isinstance(model, FeatureLSTM) and (model.steps, model.width) == (8, 8)
    assert model(torch.randn(3, 64)).shape == (3, 10)
    # A model_config.json written before sequenceLength existed: the layout those weights were trained with.
    legacy = build_model({"architecture": "lstm"}, 64, 10)
    assert isinstance(legacy, FeatureLSTM) and (legacy.steps, legacy.width) == (64, 1)
    old_keys = {f"lstm.{w}_{p}_l{n}" for w in ("weight", "bias") for p in ("ih", "hh") for n in (0, 1)}
    old_keys |= {"head.weight", "head.bias"}
    assert set(legacy.state_dict()) == old_keys and legacy.lstm.input_size == 1
