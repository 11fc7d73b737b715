"""TorchServe model file inside each archive: rebuilds the trained network from ``model_config.json``.

TorchServe instantiates the single class here with no arguments, then loads ``model.pt`` into it,
so the architecture must come from a file next to this one. ``flownexus_models`` is this package's
``models.py``, copied into the archive so that a stock TorchServe image needs nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flownexus_models import build_model  # type: ignore[import-not-found]
from torch import nn


class ServedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        spec = json.loads((Path(__file__).parent / "model_config.json").read_text(encoding="utf-8"))
        self.net = build_model(spec["model"], spec["numFeatures"], spec["numOutputs"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out
