"""Every architecture maps (batch, features) to (batch, outputs)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from flownexus_trainer.models import build_model

SPECS: dict[str, dict[str, Any]] = {
    "mlp": {"architecture": "mlp", "hiddenSizes": [8, 8]},
    "residual_mlp": {"architecture": "residual_mlp", "hiddenSize": 8, "numBlocks": 2},
    "transformer": {"architecture": "transformer", "dModel": 8, "numHeads": 2, "numLayers": 1},
    "lstm": {"architecture": "lstm", "dModel": 8, "numLayers": 2},
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
