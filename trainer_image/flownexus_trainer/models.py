"""The four architectures over tabular features: mlp, residual_mlp, transformer, lstm.

This module imports only torch: it is copied into every model archive (as ``flownexus_models.py``)
so that a stock TorchServe image can rebuild the network without installing this package.
``build_model`` takes the camelCase model spec as a plain dict for the same reason.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MLP(nn.Module):
    """Stack of Linear-ReLU-Dropout layers."""

    def __init__(self, num_features: int, num_outputs: int, hidden_sizes: list[int], dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = num_features
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class ResidualBlock(nn.Module):
    """Pre-norm residual block: x + MLP(LayerNorm(x))."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.body(x)
        return out


class ResidualMLP(nn.Module):
    def __init__(self, num_features: int, num_outputs: int, hidden_size: int, num_blocks: int, dropout: float) -> None:
        super().__init__()
        self.stem = nn.Linear(num_features, hidden_size)
        self.blocks = nn.Sequential(*[ResidualBlock(hidden_size, dropout) for _ in range(num_blocks)])
        self.head = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.blocks(self.stem(x)))
        return out


class FeatureTransformer(nn.Module):
    """Transformer encoder where every feature is a token (FT-Transformer style) plus a [CLS] token.

    Each scalar feature gets its own learned embedding (value * w_i + b_i), which also encodes its
    position, so no separate positional encoding is needed.
    """

    def __init__(
        self, num_features: int, num_outputs: int, d_model: int, num_heads: int, num_layers: int, dropout: float
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_features, d_model) * 0.02)
        self.bias = nn.Parameter(torch.zeros(num_features, d_model))
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, num_heads, dim_feedforward=2 * d_model, dropout=dropout, batch_first=True, norm_first=True
        )
        # enable_nested_tensor only matters for padded batches, which feature tokens never have.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.unsqueeze(-1) * self.weight + self.bias
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        out: torch.Tensor = self.head(self.encoder(tokens)[:, 0])
        return out


class FeatureLSTM(nn.Module):
    """LSTM reading the features as a sequence of scalars; the last hidden state feeds the head."""

    def __init__(self, num_outputs: int, d_model: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(
            1, d_model, num_layers=num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.head = nn.Linear(d_model, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(x.unsqueeze(-1))
        out: torch.Tensor = self.head(hidden[-1])
        return out


def build_model(spec: dict[str, Any], num_features: int, num_outputs: int) -> nn.Module:
    """Build the network named by ``spec["architecture"]`` from the camelCase model spec."""
    arch = spec.get("architecture", "mlp")
    dropout = float(spec.get("dropout", 0.1))
    if arch == "mlp":
        return MLP(num_features, num_outputs, list(spec.get("hiddenSizes", [128, 64])), dropout)
    if arch == "residual_mlp":
        return ResidualMLP(
            num_features, num_outputs, int(spec.get("hiddenSize", 128)), int(spec.get("numBlocks", 2)), dropout
        )
    if arch == "transformer":
        return FeatureTransformer(
            num_features,
            num_outputs,
            int(spec.get("dModel", 32)),
            int(spec.get("numHeads", 4)),
            int(spec.get("numLayers", 2)),
            dropout,
        )
    if arch == "lstm":
        return FeatureLSTM(num_outputs, int(spec.get("dModel", 32)), int(spec.get("numLayers", 2)), dropout)
    raise ValueError(f"model.architecture: unknown architecture {arch!r}")
