"""The two networks. Both take float32 pixels in [0, 255], NCHW, and return one logit per image (damage = 1).

Training uses the logit (BCEWithLogits is the numerically stable form of sigmoid + binary cross-entropy); the logged
model wraps the network in `Probability`, so what MLflow serves is the sigmoid output, as in the Keras original.
"""

from __future__ import annotations

import torch
from torch import nn

from remote.config import TrainConfig, feature_side

_RESCALE = 1.0 / 255.0


class SeedNet(nn.Module):
    """The original pipeline's Keras network: rescale, Conv 8, pool, Conv 16, pool, separable Conv 32, GAP,
    Dense 32 ReLU, Dropout 0.2, Dense 1."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding="same"),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding="same"),
            nn.ReLU(),
            nn.MaxPool2d(2),
            # Keras SeparableConv2D: a depthwise 3x3 without bias, then a pointwise 1x1 with bias
            nn.Conv2d(16, 16, 3, padding="same", groups=16, bias=False),
            nn.Conv2d(16, 32, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * _RESCALE)).squeeze(1)


class DamageCNN(nn.Module):
    """Cao & Choe's CNN: valid 3x3 Conv-ReLU-MaxPool blocks (32, 64, 128, 128), dropout, Dense 512, one output."""

    def __init__(
        self,
        image_size: int = 128,
        conv_filters: tuple[int, ...] = (32, 64, 128, 128),
        dense_units: int = 512,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in conv_filters:
            layers += [nn.Conv2d(channels, width, 3), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers, nn.Flatten())
        flat = channels * feature_side(image_size, len(conv_filters)) ** 2
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(flat, dense_units), nn.ReLU(), nn.Linear(dense_units, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * _RESCALE)).squeeze(1)


class Probability(nn.Module):
    """The served form: the damage probability, shape (N, 1)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.network(x.float())).unsqueeze(1)


def build_model(config: TrainConfig) -> nn.Module:
    """The network the config names."""
    if config.model == "seed":
        return SeedNet()
    return DamageCNN(config.image_size, config.conv_filters, config.dense_units, config.dropout)
