"""Small MNIST-sized CNNs: Madry et al.'s MNIST network and Etmann et al.'s MNIST network."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastsat._checks import integer, number

from .layers import Normalize, check_homogeneous_input, init_weights

__all__ = ["EtmannCNN", "MadryCNN"]


class MadryCNN(nn.Module):
    """Madry et al.'s MNIST network (the "naturally trained / adversarially trained" MNIST model of
    their code): conv5x5(32) - ReLU - maxpool2 - conv5x5(64) - ReLU - maxpool2 - FC(1024) - ReLU - FC(K).

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


class EtmannCNN(nn.Module):
    """Etmann et al.'s MNIST network (``smallnet.py`` of cetmann/robustness-interpretability):
    three blocks conv3x3 (``width``, 2·``width``, 4·``width`` = 32/64/128 channels, "same" padding)
    - ReLU - maxpool2, then flatten - FC(``hidden`` = 128) - ReLU - dropout(0.5) - FC(K).

    Args:
        num_classes: K, the number of logits.
        in_channels: C of the input (1 for MNIST and the 8x8 digits).
        image_size: side of the (square) input in pixels (28 for MNIST, 8 for scikit-learn's
            digits); the flattened feature map has 4·width·(image_size // 8)² values, as in the
            original (no pooling to a fixed size). At least 8.
        width: channels of the first convolution (32).
        hidden: units of the hidden linear layer (128).
        dropout: dropout probability after the hidden layer (0.5; active in train mode only).
        bias: False removes every bias: the network is then positively one-homogeneous
            (Ψ(λx) = λΨ(x), λ > 0; dropout in eval mode is the identity), so Etmann et al.'s
            Theorem 1 holds exactly: ρ̃(x) = α_bin(x). Refuses an input ``mean`` then.
        mean, std: input normalisation (pixel units), see :class:`Normalize`.

    Shapes: (B, C, image_size, image_size) in [0, 1] -> logits (B, K). ``cam_layer = "features"``.
    """

    cam_layer = "features"

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 1,
        image_size: int = 28,
        width: int = 32,
        hidden: int = 128,
        dropout: float = 0.5,
        bias: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        image_size = integer(image_size, "image_size", minimum=8)  # three 2x2 poolings need 8 pixels
        dropout = number(dropout, "dropout", minimum=0, maximum=1, exclusive_max=True)
        check_homogeneous_input(mean, not bias, "bias=False")
        self.image_size = image_size
        self.normalize = Normalize(mean, std, in_channels)
        layers: list[nn.Module] = []
        channels = in_channels
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Linear(channels * side * side, hidden, bias=bias),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes, bias=bias),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"x: expected {self.image_size}x{self.image_size} images (the model's image_size), "
                             f"got {tuple(x.shape[-2:])}")
        return self.classifier(torch.flatten(self.features(self.normalize(x)), 1))
