"""Model zoo: pixel-space classifiers with input normalisation inside the model.

Every model takes images (B, C, H, W) in [0, 1] (pixel space, so ε and saliency maps stay in
pixel units), applies its own :class:`Normalize` first and returns logits (B, num_classes).
The normalisation constants come from the data: every :mod:`fastsat.data` data set has ``.mean``
and ``.std``; without them :class:`Normalize` is the identity. No torchvision needed. Example::

    train = fastsat.data.cifar10("cifar-10-batches-py")
    model = create("preactresnet18", num_classes=10, mean=train.mean, std=train.std)
    layer = default_cam_layer(model)     # model.layer4, for Grad-CAM++
    names()                              # what create() accepts
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from torch import nn

from fastsat._checks import choice, describe, nearest, positive_int

from .layers import Normalize, check_dtype, check_homogeneous_input, check_images, default_cam_layer, init_weights
from .resnet import PreActResNet, ResNet, WideResNet
from .small import EtmannCNN, MadryCNN

__all__ = [
    "EtmannCNN",
    "MadryCNN",
    "Normalize",
    "PreActResNet",
    "ResNet",
    "WideResNet",
    "check_dtype",
    "check_homogeneous_input",
    "check_images",
    "create",
    "default_cam_layer",
    "init_weights",
    "names",
]

# name -> (class, default keyword arguments); create(**kw) overrides the defaults.
_REGISTRY: dict[str, tuple[type[nn.Module], dict]] = {
    "madrycnn": (MadryCNN, {}),
    "etmanncnn": (EtmannCNN, {}),
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
            "wrn-28-10", "madrycnn", "etmanncnn".
        num_classes: K, the number of logits.
        in_channels: C of the input images.
        mean, std: per-channel input normalisation ``(x - mean) / std`` in pixel units of [0, 1]
            images, length ``in_channels``, see :class:`Normalize`. The default (None, None)
            does no normalisation at all: the model sees the [0, 1] pixels as they are (what
            Etmann et al. and Mangla et al. train on, and what a bias-free network needs). To
            normalise with a data set's statistics, pass them:
            ``create(name, num_classes=ds.num_classes, mean=ds.mean, std=ds.std)``; every
            :mod:`fastsat.data` data set has them (the published values for CIFAR-10/100 and
            ImageNet-style data, measured ones for shapes). Bias-free networks (``bias=False``,
            and ``norm="none"`` for the residual ones) refuse a ``mean``: see
            :func:`check_homogeneous_input`.
        **kw: passed to the model class, overriding the name's defaults, e.g. ``stem="imagenet"``
            or ``width=8`` for ResNets, ``depth=10, widen=1`` for WRNs, ``bias=False`` for
            MadryCNN and EtmannCNN, ``image_size=8`` for EtmannCNN on 8x8 digits, ``norm="none"`` for the residual networks.

    Returns:
        The model (in training mode), with a ``cam_layer`` attribute naming its last conv stage.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a model name (str), got {describe(name)}")
    choice(name.lower(), "name", names())
    num_classes = positive_int(num_classes, "num_classes")
    in_channels = positive_int(in_channels, "in_channels")
    cls, defaults = _REGISTRY[name.lower()]
    options = [p for p in inspect.signature(cls).parameters if p not in ("num_classes", "in_channels", "mean", "std")]
    for key in kw:
        if key not in options:
            raise TypeError(f"{key}: model {name!r} has no option {key!r}; expected one of {', '.join(options)}"
                            f"{nearest(key, options)}")
    return cls(**{**defaults, **kw}, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
