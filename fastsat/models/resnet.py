"""ResNet-10/18/34/50 (He et al. 2016), PreActResNet-18 (He et al. 2016b) and WideResNets.

All take pixel-space input (B, in_channels, H, W) in [0, 1], normalise it with their own
:class:`~fastsat.models.layers.Normalize` and return logits (B, num_classes). Global average
pooling makes them work at any input size (8x8 for tests, 32x32, 224x224).

``norm="none"`` removes the normalisation layers; with ``bias=False`` (no bias in the classifier)
such a network is built from bias-free convolutions, ReLUs, sums and average pooling, so it is
positively one-homogeneous: Ψ(λx) = λΨ(x) for λ > 0. It then refuses an input ``mean`` (a bias;
``std`` alone is allowed), see :func:`~fastsat.models.layers.check_homogeneous_input`.

ReLUs are never in-place, so module backward hooks (guided backprop) and double backprop work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastsat._checks import choice, integer, positive_int

from .layers import Normalize, check_homogeneous_input, init_weights

__all__ = ["PreActResNet", "ResNet", "WideResNet"]


_NORMS = ("batch", "none")
_BIAS_FREE = 'bias=False, norm="none"'


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.Identity()


def _check_common(norm: str, bias: bool, mean: Sequence[float] | None) -> None:
    """The checks every residual network shares: the norm kind and the bias-free mean rule."""
    choice(norm, "norm", _NORMS)
    check_homogeneous_input(mean, norm == "none" and not bias, _BIAS_FREE)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (post-activation)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, norm: str) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv3x3(cin, width, stride), _norm(norm, width)
        self.conv2, self.bn2 = _conv3x3(width, cout), _norm(norm, cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4), residual connection; stride on the 3x3."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, norm: str) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), _norm(norm, width)
        self.conv2, self.bn2 = _conv3x3(width, width, stride), _norm(norm, width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), _norm(norm, cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


# depth -> (block, blocks per stage)
_LAYOUTS = {10: (BasicBlock, (1, 1, 1, 1)), 18: (BasicBlock, (2, 2, 2, 2)),
            34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}  # fmt: skip


class ResNet(nn.Module):
    """ResNet with a CIFAR or ImageNet stem.

    Args:
        depth: 10, 18, 34 (basic blocks) or 50 (bottlenecks).
        num_classes: K, the number of logits.
        in_channels: C of the input.
        stem: "cifar" (3x3 conv, stride 1, no max-pool: for 32x32 inputs) or "imagenet"
            (7x7 conv stride 2 + 3x3 max-pool stride 2: for 224x224 inputs).
        width: channels of the first stage (64 in the paper; stages use width x 1, 2, 4, 8).
        norm: "batch" or "none" (see the module docstring).
        bias: whether the final linear layer has a bias.
        mean, std: input normalisation (pixel units), see :class:`Normalize`.

    Shapes: (B, C, H, W) in [0, 1] -> logits (B, K). ``cam_layer = "layer4"``.
    """

    cam_layer = "layer4"

    def __init__(
        self,
        depth: int = 18,
        *,
        num_classes: int,
        in_channels: int = 3,
        stem: str = "cifar",
        width: int = 64,
        norm: str = "batch",
        bias: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        choice(depth, "depth", sorted(_LAYOUTS))
        choice(stem, "stem", ("cifar", "imagenet"))
        _check_common(norm, bias, mean)
        block, counts = _LAYOUTS[depth]
        self.normalize = Normalize(mean, std, in_channels)
        if stem == "cifar":
            self.stem = nn.Sequential(_conv3x3(in_channels, width), _norm(norm, width), nn.ReLU())
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                _norm(norm, width),
                nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        cin, stages = width, []
        for i, count in enumerate(counts):
            blocks = []
            for j in range(count):
                blocks.append(block(cin, width * 2**i, 2 if (i > 0 and j == 0) else 1, norm))
                cin = width * 2**i * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes, bias=bias)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class PreActBlock(nn.Module):
    """Pre-activation block: norm-ReLU-conv twice; a projection shortcut sees the activated input."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1, self.conv1 = _norm(norm, cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = _norm(norm, cout), _conv3x3(cout, cout)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + shortcut


def _preact_stage(cin: int, cout: int, count: int, stride: int, norm: str, dropout: float = 0.0) -> nn.Sequential:
    """``count`` pre-activation blocks; the first changes channels and applies the stride."""
    blocks = [PreActBlock(cin, cout, stride, norm, dropout)]
    blocks += [PreActBlock(cout, cout, 1, norm, dropout) for _ in range(count - 1)]
    return nn.Sequential(*blocks)


class PreActResNet(nn.Module):
    """PreActResNet-18, the usual fast-adversarial-training model for 32x32 inputs.

    Args:
        num_classes: K. in_channels: C. width: channels of the first stage (64).
        blocks: blocks per stage, default (2, 2, 2, 2) = PreActResNet-18.
        norm, bias, mean, std: as :class:`ResNet`.

    Shapes: (B, C, H, W) in [0, 1] -> logits (B, K). ``cam_layer = "layer4"``.
    """

    cam_layer = "layer4"

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        blocks: Sequence[int] = (2, 2, 2, 2),
        norm: str = "batch",
        bias: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"blocks: expected 4 positive counts, got {tuple(blocks)}")
        blocks = [positive_int(count, "blocks") for count in blocks]
        _check_common(norm, bias, mean)
        self.normalize = Normalize(mean, std, in_channels)
        self.stem = _conv3x3(in_channels, width)
        cin, stages = width, []
        for i, count in enumerate(blocks):
            cout, stride = width * 2**i, 1 if i == 0 else 2
            stages.append(_preact_stage(cin, cout, count, stride, norm))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.final = nn.Sequential(_norm(norm, cin), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes, bias=bias)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(self.final(x)), 1))


class WideResNet(nn.Module):
    """Wide residual network WRN-depth-widen (Zagoruyko & Komodakis 2016), pre-activation blocks.

    Args:
        depth: 6n + 4 (28 -> n = 4, 34 -> n = 5; 10 -> n = 1 for tests).
        widen: widening factor k; the three stages have 16k, 32k, 64k channels.
        num_classes, in_channels, norm, bias, mean, std: as :class:`ResNet`.
        dropout: dropout probability between the two convolutions of a block.

    Shapes: (B, C, H, W) in [0, 1] -> logits (B, K). ``cam_layer = "block3"``.
    """

    cam_layer = "block3"

    def __init__(
        self,
        depth: int = 28,
        widen: int = 10,
        *,
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.0,
        norm: str = "batch",
        bias: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if integer(depth, "depth", minimum=10) % 6 != 4:
            raise ValueError(f"depth: expected 6n + 4 with n >= 1 (e.g. 28, 34), got {depth!r}")
        positive_int(widen, "widen")
        _check_common(norm, bias, mean)
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.normalize = Normalize(mean, std, in_channels)
        self.stem = _conv3x3(in_channels, widths[0])
        stages = []
        for i in range(3):
            cin, cout = widths[i], widths[i + 1]
            stages.append(_preact_stage(cin, cout, n, 1 if i == 0 else 2, norm, dropout))
        self.block1, self.block2, self.block3 = stages
        self.final = nn.Sequential(_norm(norm, widths[3]), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes, bias=bias)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(x))
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(torch.flatten(self.pool(self.final(x)), 1))
