"""Architectures nnmark does not ship, named in the harness configs as ``user_models:FACTORY``.

Each factory takes ``(in_shape, num_classes)`` -- ``in_shape`` = (C, H, W) -- and returns a plain
``nn.Module`` (no ``.spec``), the way a user brings their own network to ``nnmark evaluate``.
"""

from __future__ import annotations

import torch
from torch import nn


class EluNet(nn.Module):
    """conv1..conv4 (3x3, ELU) with average pooling, one dense layer of 128, ``head``: the zoo CNN's layer names
    and conv shapes (so white-box verifiers can read its conv4) but another activation, pooling and width."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = in_shape
        self.conv1 = nn.Conv2d(c, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(64 * (h // 4) * (w // 4), 128)
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = nn.functional.elu
        x = self.pool(act(self.conv2(act(self.conv1(x)))))
        x = self.pool(act(self.conv4(act(self.conv3(x)))))
        return self.head(act(self.fc1(x.flatten(1))))


def elu_net(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """An :class:`EluNet` for inputs of ``in_shape`` and ``num_classes`` classes."""
    return EluNet(tuple(in_shape), num_classes)


def wide_mlp(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Flatten, 256 tanh units, ``head``: a network with no conv layer at all."""
    c, h, w = in_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 256), nn.Tanh(), nn.Linear(256, num_classes))
