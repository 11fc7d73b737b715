"""The four architectures: mlp, residual_mlp, transformer over tabular features; lstm over sequence rows.

This module imports only torch: it is copied into every model archive (as ``flownexus_models.py``)
so that a stock TorchServe image can rebuild the network without installing this package.
``build_model`` takes the camelCase model spec as a plain dict for the same reason.
"""

from __future__ import annotations

import math
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


def sequence_shape(num_features: int, sequence_length: int) -> tuple[int, int]:
    """(time steps, features per step) the lstm reads a row as.

    ``sequence_length`` > 0 must divide the feature count. 0 picks: a square feature count as
    square rows (digits' 64 pixels: 8 steps of 8, the image's rows), else one feature per step.
    """
    if sequence_length < 0:
        raise ValueError(f"model.sequenceLength: must be >= 0 (0 = automatic), got {sequence_length}")
    if sequence_length == 0:
        side = math.isqrt(num_features)
        return (side, side) if side > 1 and side * side == num_features else (num_features, 1)
    if num_features % sequence_length:
        raise ValueError(
            f"model.sequenceLength: {sequence_length} does not divide the {num_features} features "
            f"into equal time steps; use a divisor of {num_features} or 0 (automatic)"
        )
    return sequence_length, num_features // sequence_length


class FeatureLSTM(nn.Module):
    """LSTM over a row read as ``steps`` time steps of ``width`` features each.

    Meant for rows that are sequences: a window of a time series (one or more values per time
    step) or an image read row by row. The row's features must be ordered in time: step 0's
    features first. Each step is projected to ``d_model``, and the last hidden state, layer-normed,
    feeds the head (measured: the norm and projection lift digits 0.915 -> 0.956 and the synthetic
    sequence task 0.933 -> 0.982 at the default learning rate). ``legacy`` rebuilds the network of
    archives written before sequences existed: one scalar per step, no projection, no norm.
    """

    def __init__(
        self,
        num_features: int,
        num_outputs: int,
        d_model: int,
        num_layers: int,
        dropout: float,
        sequence_length: int,
        legacy: bool = False,
    ) -> None:
        super().__init__()
        self.steps, self.width = sequence_shape(num_features, sequence_length)
        self.proj: nn.Module = nn.Identity() if legacy else nn.Linear(self.width, d_model)
        self.lstm = nn.LSTM(
            self.width if legacy else d_model,
            d_model,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.norm: nn.Module = nn.Identity() if legacy else nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(self.proj(x.reshape(x.shape[0], self.steps, self.width)))
        out: torch.Tensor = self.head(self.norm(hidden[-1]))
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
        d_model, num_layers = int(spec.get("dModel", 32)), int(spec.get("numLayers", 2))
        if "sequenceLength" not in spec:
            # An archive written before sequenceLength existed: the network its weights were trained in.
            return FeatureLSTM(num_features, num_outputs, d_model, num_layers, dropout, num_features, legacy=True)
        sequence_length = int(spec["sequenceLength"])
        return FeatureLSTM(num_features, num_outputs, d_model, num_layers, dropout, sequence_length)
    if arch == "custom":
        raise ValueError(
            "model.architecture custom: the network is the user's own (spec.trainer); it is trained by their code "
            "and loaded from its TorchScript export, never built here"
        )
    raise ValueError(f"model.architecture: unknown architecture {arch!r}")
