"""Building blocks shared by the model zoo."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastsat._checks import describe, number

__all__ = ["Normalize", "check_dtype", "check_homogeneous_input", "check_images", "default_cam_layer", "init_weights"]


class Normalize(nn.Module):
    """Per-channel input normalisation ``(x - mean) / std``, the first layer of every zoo model.

    Keeping it inside the model lets attacks, ε and saliency maps live in pixel space ([0, 1]).
    With ``mean=None`` and ``std=None`` it is the identity (no arithmetic at all), which keeps a
    bias-free network positively homogeneous; ``mean=None`` alone means zero mean, ``std=None``
    alone unit std.

    Args:
        mean: per-channel means, length ``channels`` (pixel units), or None.
        std: per-channel standard deviations, length ``channels``, all > 0, or None.
        channels: number of input channels C.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None, channels: int) -> None:
        super().__init__()
        for name, value in (("mean", mean), ("std", std)):
            if value is not None and len(value) != channels:
                raise ValueError(f"{name}: expected {channels} values (one per input channel), got {describe(value)}")
        mean = None if mean is None else [number(m, "mean") for m in mean]
        std = None if std is None else [number(s, "std", minimum=0, exclusive_min=True) for s in std]
        self.enabled = mean is not None or std is not None
        mean_t = torch.zeros(channels) if mean is None else torch.tensor(mean, dtype=torch.float32)
        std_t = torch.ones(channels) if std is None else torch.tensor(std, dtype=torch.float32)
        self.register_buffer("mean", mean_t.view(1, channels, 1, 1))
        self.register_buffer("std", std_t.view(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, channels=self.mean.shape[1], dtype=self.mean.dtype)
        if not self.enabled:
            return x
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        if not self.enabled:
            return "identity"
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def check_images(x: torch.Tensor, *, channels: int | None = None, dtype: torch.dtype | None = None) -> None:
    """Raise unless ``x`` is a batch of images (B, C, H, W) with ``channels`` C (ValueError; None:
    any C) of the model's ``dtype`` (:func:`check_dtype`). Shapes and dtypes only: no host sync."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a (B, C, H, W) image tensor, got {describe(x)}")
    if x.dim() != 4 or (channels is not None and x.shape[1] != channels):
        want = f"(B, {channels if channels is not None else 'C'}, H, W)"
        hint = "; a single image needs its batch dimension: x[None]" if x.dim() == 3 else ""
        raise ValueError(f"x: expected a batch of images {want}, got shape {tuple(x.shape)}{hint}")
    check_dtype(x, dtype)


def check_dtype(x: torch.Tensor, dtype: torch.dtype | None) -> None:
    """TypeError unless ``x`` has the dtype of the model's weights (None: any), or is a 16- or
    32-bit float under autocast, which casts it."""
    autocast = x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type)
    if dtype is not None and x.dtype != dtype and not autocast:
        raise TypeError(f"x: expected {dtype} input (the dtype of the model's weights), got {x.dtype}; convert the "
                        f"input (x.to({dtype})) or the model (model.to({x.dtype}))")


def check_homogeneous_input(mean: Sequence[float] | None, bias_free: bool, why: str) -> None:
    """Refuse an input mean for a network built to be bias-free.

    A bias-free ReLU network is positively one-homogeneous, Ψ(λx) = λΨ(x) for λ > 0, which is
    what makes Euler's identity and Etmann et al.'s Theorem 1 (ρ̃ = α_bin) exact. Subtracting a
    mean before the first layer is a bias, so it silently breaks that; dividing by ``std`` alone is
    linear and allowed.

    Args:
        mean: the model's ``mean`` argument.
        bias_free: whether the model's other arguments make it bias-free.
        why: those arguments, for the message, e.g. ``'bias=False, norm="none"'``.

    Raises:
        ValueError: ``bias_free`` and ``mean`` is not None.
    """
    if bias_free and mean is not None:
        raise ValueError(
            f"mean: expected None for a bias-free network ({why}): subtracting a mean is a bias and breaks "
            f"positive homogeneity (Etmann et al., Theorem 1); pass std alone, got {describe(mean)}"
        )


def init_weights(model: nn.Module) -> None:
    """He (fan-out) init for convolutions, unit/zero for norm layers, zero linear biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def default_cam_layer(model: nn.Module) -> nn.Module:
    """The module whose output Grad-CAM(++) should use: the last convolutional stage.

    Zoo models name it in their ``cam_layer`` attribute (e.g. ``"layer4"``). For any other model
    the last ``nn.Conv2d`` in module order is returned.

    Raises:
        ValueError: the model has neither a ``cam_layer`` nor any ``nn.Conv2d``.
    """
    name = getattr(model, "cam_layer", None)
    if isinstance(name, str):
        return model.get_submodule(name)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"model: {type(model).__name__} has no cam_layer attribute and no Conv2d layer")
    return convs[-1]
