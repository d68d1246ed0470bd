from __future__ import annotations

import torch
from torch import nn

INPUTS = 64
CLASSES = 10
PIXEL_MAX = 16


class DigitsMLP(nn.Module):
    """MLP for sklearn's 8x8 digits: raw pixels 0..16, [N, 64] float32 -> logits [N, 10]."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(INPUTS, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x * (1.0 / PIXEL_MAX))
        return out
