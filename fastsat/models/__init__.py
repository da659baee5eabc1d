"""Model zoo: pixel-space classifiers with input normalisation inside the model.

Every model takes images (B, C, H, W) in [0, 1] (pixel space, so ε and saliency maps stay in
pixel units), applies its own :class:`Normalize` first and returns logits (B, num_classes).
The normalisation constants come from the data: every :mod:`fastsat.data` data set has ``.mean``
and ``.std``; without them :class:`Normalize` is the identity. No torchvision needed. Example::

    train = fastsat.data.cifar10("cifar-10-batches-py")
    model = create("preactresnet18", num_classes=10, mean=train.mean, std=train.std)
    layer = default_cam_layer(model)     # model.layer4, for Grad-CAM++
    names()                              # the zoo's names

Models from elsewhere go through the same :func:`create`, behind the same normalisation
(:class:`Normalized`): ``"package.module:factory"`` builds your own classifier with
``factory(num_classes=K, **kw)``, and ``"timm:NAME"`` a timm model (``pip install 'fastsat[timm]'``;
timm is imported only then).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence

import torch
from torch import nn

from fastsat._checks import choice, describe, nearest, path, positive_int

from .layers import Normalize, check_dtype, check_homogeneous_input, check_images, default_cam_layer, init_weights
from .resnet import PreActResNet, ResNet, WideResNet
from .small import EtmannCNN, MadryCNN

__all__ = [
    "EtmannCNN",
    "MadryCNN",
    "Normalize",
    "Normalized",
    "PreActResNet",
    "ResNet",
    "WideResNet",
    "check_dtype",
    "check_homogeneous_input",
    "check_images",
    "check_name",
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


TIMM_PREFIX = "timm:"


def names() -> list[str]:
    """The zoo's model names (:func:`create` also takes ``package.module:factory`` and ``timm:NAME``)."""
    return list(_REGISTRY)


def check_name(value: object, name: str = "name") -> str:
    """A model name :func:`create` accepts, without building anything: a zoo name (any case),
    ``"package.module:factory"`` or ``"timm:NAME"``."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a model name (str), got {describe(value)}")
    if ":" not in value:
        choice(value.lower(), name, names())
        return value
    module, _, attribute = value.partition(":")
    if not module or not attribute or ":" in attribute or (module != TIMM_PREFIX[:-1] and not attribute.isidentifier()):
        raise ValueError(f"{name}: expected a zoo name ({', '.join(names())}), 'package.module:factory' or "
                         f"'timm:NAME', got {describe(value)}")
    return value


class Normalized(nn.Module):
    """A classifier from outside the zoo behind fastsat's pixel-space input normalisation:
    ``forward(x) = net(normalize(x))``, x (B, C, H, W) in pixel space, logits (B, K) out.

    Args:
        net: the classifier, taking normalised input. mean, std, channels: see :class:`Normalize`.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None, channels: int) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std, channels)
        self.net = net

    def forward(self, x):
        return self.net(self.normalize(x))


def create(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pretrained: bool | str = False,
    **kw,
) -> nn.Module:
    """Build a model by name.

    Args:
        name: one of :func:`names` (case-insensitive), e.g. "preactresnet18", "resnet50",
            "wrn-28-10", "madrycnn", "etmanncnn"; or ``"package.module:factory"``: your own
            classifier, ``factory(num_classes=num_classes, **kw)`` returning an ``nn.Module`` of
            normalised (B, in_channels, H, W) input (the module must be importable: on
            ``sys.path``); or ``"timm:NAME"``: ``timm.create_model(NAME, num_classes=num_classes,
            in_chans=in_channels, **kw)`` (``pip install 'fastsat[timm]'``). Those two are wrapped in
            :class:`Normalized`; zoo models normalise themselves.
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
        pretrained: timm models only: True loads timm's pretrained weights for NAME (from its
            cache or the Hugging Face hub), a path loads that local weights file (a state dict; the classifier head is
            re-initialised for ``num_classes`` when its shape differs, as timm does). Default False.
        **kw: passed to the model class (zoo), the factory or ``timm.create_model``, overriding the
            zoo name's defaults, e.g. ``stem="imagenet"`` or ``width=8`` for ResNets, ``depth=10,
            widen=1`` for WRNs, ``bias=False`` for MadryCNN and EtmannCNN, ``image_size=8`` for
            EtmannCNN on 8x8 digits, ``norm="none"`` for the residual networks.

    Returns:
        The model (in training mode); zoo models have a ``cam_layer`` attribute naming their last
        conv stage (others: :func:`default_cam_layer` takes the last ``Conv2d``).
    """
    check_name(name)
    num_classes = positive_int(num_classes, "num_classes")
    in_channels = positive_int(in_channels, "in_channels")
    if not isinstance(pretrained, bool):
        pretrained = path(pretrained, "pretrained")
    if pretrained is not False and not name.startswith(TIMM_PREFIX):
        raise ValueError(f"pretrained: only timm models load pretrained weights here, got it with {name!r} "
                         "(load your own weights in your factory, or with load_state_dict)")
    if ":" not in name:
        cls, defaults = _REGISTRY[name.lower()]
        options = [p for p in inspect.signature(cls).parameters if p not in ("num_classes", "in_channels", "mean", "std")]
        for key in kw:
            if key not in options:
                raise TypeError(f"{key}: model {name!r} has no option {key!r}; expected one of {', '.join(options)}"
                                f"{nearest(key, options)}")
        return cls(**{**defaults, **kw}, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
    if name.startswith(TIMM_PREFIX):
        net = _timm_model(name[len(TIMM_PREFIX) :], num_classes, in_channels, pretrained, kw)
    else:
        net = _factory(name)(num_classes=num_classes, **kw)
        if not isinstance(net, nn.Module):
            raise TypeError(f"name: the factory {name!r} returned {describe(net)}, expected a torch.nn.Module")
    return Normalized(net, mean, std, in_channels)


def _factory(name: str):
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"name: cannot import {module_name!r} for the model {name!r} ({err}); the module must be on "
                         "sys.path (installed, or its folder in PYTHONPATH)") from err
    if not hasattr(module, attribute):
        raise ValueError(f"name: {module_name!r} has no {attribute!r} for the model {name!r}")
    factory = getattr(module, attribute)
    if not callable(factory):
        raise TypeError(f"name: {name!r} is {describe(factory)}, expected a callable factory")
    return factory


def _timm_model(arch: str, num_classes: int, in_channels: int, pretrained: bool | str, kw: dict) -> nn.Module:
    try:
        import timm
    except (ImportError, RuntimeError) as err:  # RuntimeError: a torchvision built for another torch
        raise ImportError(f"name: 'timm:{arch}' needs timm, which did not import ({type(err).__name__}: {err}); "
                          "install it with pip install 'fastsat[timm]' (timm and a torchvision matching your "
                          "torch)") from err
    # A run's config.yaml carries model_args: none of them may make timm open a file with its own loader.
    reads_files = sorted(set(kw) & {"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained"})
    if reads_files:
        raise ValueError(f"model_args: {reads_files} would make timm read weights files itself; pass pretrained=PATH "
                         "(--pretrained), which fastsat reads as tensors only")
    net = timm.create_model(arch, pretrained=pretrained is True, num_classes=num_classes, in_chans=in_channels, **kw)
    if isinstance(pretrained, str):
        _load_local_weights(net, pretrained)
    return net


def _load_local_weights(net: nn.Module, file: str) -> None:
    """Load a local weights file (a state dict: safetensors, or torch.save'd tensors, read with
    ``weights_only``) into the timm model ``net``. Its classifier (``net.pretrained_cfg["classifier"]``)
    is kept as built, freshly initialised, where the file's differs in shape (ImageNet weights for
    another class count), as timm does; every other weight must match."""
    try:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"pretrained: cannot read {file!r} as a weights file ({type(err).__name__}: {err})") from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pretrained: {file!r} holds {describe(state)}, expected a state dict of tensors")
    own = net.state_dict()
    classifiers = net.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    reset = [k for k in state if k.rpartition(".")[0] in classifiers and k in own and state[k].shape != own[k].shape]
    for key in reset:
        del state[key]
    missing = sorted(set(own) - set(state) - set(reset))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"pretrained: {file!r} does not fit timm's {type(net).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, other shapes {wrong[:5]} (first 5 of each)")
    net.load_state_dict(state, strict=not reset)
