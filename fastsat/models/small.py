"""Etmann et al.'s small MNIST-style CNN (the Madry et al. MNIST architecture)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import Normalize, check_homogeneous_input, init_weights

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """conv5x5(32) - ReLU - maxpool2 - conv5x5(64) - ReLU - maxpool2 - FC(1024) - ReLU - FC(K).

    The feature map is average-pooled to 7x7 before the first linear layer, which is the identity
    for 28x28 inputs (the original MNIST network) and lets the model run at any input size.

    Args:
        num_classes: K, the number of logits.
        in_channels: C of the input (1 for MNIST, 3 for shapes/CIFAR).
        width: channels of the first convolution (32); the second has twice as many.
        hidden: units of the hidden linear layer (1024).
        bias: False removes every bias; the network is then built from bias-free linear maps,
            ReLU, max- and average-pooling only, hence positively one-homogeneous:
            Ψ(λx) = λΨ(x) for λ > 0 (Etmann et al., Theorem 1), and refuses an input ``mean``
            (a bias; ``std`` alone is allowed), see :func:`~fastsat.models.layers.check_homogeneous_input`.
        mean, std: input normalisation (pixel units), see :class:`Normalize`.

    Shapes: (B, C, H, W) in [0, 1] -> logits (B, K). ``cam_layer = "features"``.
    """

    cam_layer = "features"

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        width: int = 32,
        hidden: int = 1024,
        bias: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_homogeneous_input(mean, not bias, "bias=False")
        self.normalize = Normalize(mean, std, in_channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, padding=2, bias=bias),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2, bias=bias),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(
            nn.Linear(2 * width * 49, hidden, bias=bias),
            nn.ReLU(),
            nn.Linear(hidden, num_classes, bias=bias),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(self.normalize(x)))
        return self.classifier(torch.flatten(x, 1))
