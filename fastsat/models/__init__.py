"""Model zoo: pixel-space classifiers with input normalisation inside the model.

Every model takes images (B, C, H, W) in [0, 1] (pixel space, so ε and saliency maps stay in
pixel units), applies its own :class:`Normalize` first and returns logits (B, num_classes).
No torchvision needed. Example::

    model = create("preactresnet18", num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    layer = default_cam_layer(model)     # model.layer4, for Grad-CAM++
    names()                              # what create() accepts
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .layers import Normalize, default_cam_layer, init_weights
from .resnet import PreActResNet, ResNet, WideResNet
from .small import SmallCNN

__all__ = [
    "Normalize",
    "PreActResNet",
    "ResNet",
    "SmallCNN",
    "WideResNet",
    "create",
    "default_cam_layer",
    "init_weights",
    "names",
]

# name -> (class, default keyword arguments); create(**kw) overrides the defaults.
_REGISTRY: dict[str, tuple[type[nn.Module], dict]] = {
    "smallcnn": (SmallCNN, {}),
    "preactresnet18": (PreActResNet, {}),
    "resnet10": (ResNet, {"depth": 10}),
    "resnet18": (ResNet, {"depth": 18}),
    "resnet34": (ResNet, {"depth": 34}),
    "resnet50": (ResNet, {"depth": 50}),
    "wrn-28-10": (WideResNet, {"depth": 28, "widen": 10}),
    "wrn-34-10": (WideResNet, {"depth": 34, "widen": 10}),
}


def names() -> list[str]:
    """The model names :func:`create` accepts."""
    return list(_REGISTRY)


def create(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kw,
) -> nn.Module:
    """Build a zoo model by name.

    Args:
        name: one of :func:`names` (case-insensitive), e.g. "preactresnet18", "resnet50",
            "wrn-28-10", "smallcnn".
        num_classes: K, the number of logits.
        in_channels: C of the input images.
        mean, std: per-channel input normalisation in pixel units (None: none), see
            :class:`Normalize`.
        **kw: passed to the model class, overriding the name's defaults, e.g. ``stem="imagenet"``
            or ``width=8`` for ResNets, ``depth=10, widen=1`` for WRNs, ``bias=False`` for
            SmallCNN, ``norm="none"`` for the residual networks.

    Returns:
        The model (in training mode), with a ``cam_layer`` attribute naming its last conv stage.
    """
    if not isinstance(name, str) or name.lower() not in _REGISTRY:
        raise ValueError(f"name: unknown model {name!r}; expected one of {names()}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels: expected a positive int, got {in_channels!r}")
    cls, defaults = _REGISTRY[name.lower()]
    return cls(**{**defaults, **kw}, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
