"""Model zoo: output shapes, reference parameter counts, homogeneity, normalisation inside the model."""

import copy

import pytest
import torch
from torch import nn

from fastsat.data import generate_shapes
from fastsat.models import (
    EtmannCNN,
    MadryCNN,
    Normalize,
    PreActResNet,
    ResNet,
    WideResNet,
    create,
    default_cam_layer,
    names,
)

# Tiny configurations of every registered name (keeps each forward to milliseconds).
TINY = {
    "madrycnn": {"width": 4, "hidden": 16},
    "etmanncnn": {"width": 4, "hidden": 16, "image_size": 8},
    "preactresnet18": {"width": 4},
    "resnet10": {"width": 4},
    "resnet18": {"width": 4},
    "resnet34": {"width": 4},
    "resnet50": {"width": 4},
    "wrn-28-10": {"depth": 10, "widen": 1},
    "wrn-34-10": {"depth": 10, "widen": 1},
}


def test_every_name_has_a_tiny_config():
    assert sorted(names()) == sorted(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_shape_and_backward(name):
    torch.manual_seed(0)
    model = create(name, num_classes=7, in_channels=2, **TINY[name])
    x = torch.rand(3, 2, 8, 8, requires_grad=True)
    out = model(x)
    assert out.shape == (3, 7) and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_imagenet_stem_and_eval_mode():
    model = create("resnet18", num_classes=5, width=4, stem="imagenet").eval()
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 5)
    # layer4 maps layer3's 4 * 4 channels to 8 * 4, halving the spatial size.
    assert default_cam_layer(model)(torch.rand(1, 16, 4, 4)).shape == (1, 32, 2, 2)


@pytest.mark.parametrize(
    "name, kwargs, count",
    [
        # Reference counts of the standard architectures: torchvision's resnet18/50 for ImageNet,
        # WRN-28-10 of the robust-training literature, and the common CIFAR PreActResNet-18
        # (11,171,146) plus the final BatchNorm(512) that Wong et al.'s fast-AT version adds.
        ("resnet18", {"stem": "imagenet", "num_classes": 1000}, 11_689_512),
        ("resnet50", {"stem": "imagenet", "num_classes": 1000}, 25_557_032),
        ("preactresnet18", {"num_classes": 10}, 11_171_146 + 2 * 512),
        ("wrn-28-10", {"num_classes": 10}, 36_479_194),
    ],
)
def test_full_size_parameter_counts(name, kwargs, count):
    with torch.device("meta"):  # no memory, no init cost
        model = create(name, **kwargs)
    assert sum(p.numel() for p in model.parameters()) == count


def _homogeneous_models():
    return {
        "madrycnn": MadryCNN(num_classes=5, width=4, hidden=16, bias=False),
        "etmanncnn": EtmannCNN(num_classes=5, in_channels=3, image_size=12, width=4, hidden=16, bias=False),
        "resnet": ResNet(10, num_classes=5, width=4, norm="none", bias=False),
        "preact": PreActResNet(num_classes=5, width=4, blocks=(1, 1, 1, 1), norm="none", bias=False),
        "wrn": WideResNet(10, 1, num_classes=5, norm="none", bias=False),
    }


@pytest.mark.parametrize("name", ["madrycnn", "etmanncnn", "resnet", "preact", "wrn"])
def test_bias_free_models_are_positively_homogeneous(name):
    torch.manual_seed(1)
    model = _homogeneous_models()[name].eval()
    x = torch.rand(4, 3, 12, 12) + 0.1
    out = model(x)
    # Scaling by a power of two is exact in floating point and commutes with every rounding
    # (no overflow/underflow here), so Ψ(λx) = λΨ(x) must hold bit for bit.
    for lam in (0.25, 4.0):
        assert torch.equal(model(lam * x), lam * out), (
            f"{name}: lambda={lam}, max diff {(model(lam * x) - lam * out).abs().max():.3g}"
        )
    # Any λ > 0, and Euler's identity Ψ(x) = <∇Ψ(x), x>, in float64: only rounding remains,
    # relative error ~1e-15 per operation; 1e-10 leaves room for accumulation.
    model = model.double()
    xd = x.double().requires_grad_(True)
    outd = model(xd)
    torch.testing.assert_close(model(3.7 * xd), 3.7 * outd, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(outd[:, 2].sum(), xd)
    torch.testing.assert_close((grad * xd).flatten(1).sum(1), outd[:, 2].detach(), rtol=1e-10, atol=1e-12)


def test_biased_model_is_not_homogeneous():
    torch.manual_seed(2)
    model = MadryCNN(num_classes=5, width=4, hidden=16).eval()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.uniform_(m.bias, 0.1, 0.2)
    x = torch.rand(2, 3, 12, 12)
    assert (model(2 * x) - 2 * model(x)).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["madrycnn", "etmanncnn", "resnet", "preact", "wrn"])
def test_bias_free_models_refuse_an_input_mean(name):
    """Subtracting a mean is a bias: every bias-free family refuses it with the one shared message
    (the residual networks used to accept it and silently stop being homogeneous)."""
    build = {
        "madrycnn": lambda **kw: MadryCNN(num_classes=5, width=4, hidden=16, bias=False, **kw),
        "etmanncnn": lambda **kw: EtmannCNN(num_classes=5, in_channels=3, image_size=12, width=4, hidden=16,
                                            bias=False, **kw),
        "resnet": lambda **kw: ResNet(10, num_classes=5, width=4, norm="none", bias=False, **kw),
        "preact": lambda **kw: PreActResNet(num_classes=5, width=4, blocks=(1, 1, 1, 1), norm="none", bias=False, **kw),
        "wrn": lambda **kw: WideResNet(10, 1, num_classes=5, norm="none", bias=False, **kw),
    }[name]
    with pytest.raises(ValueError, match=r"mean: expected None for a bias-free network .*Theorem 1.*got tuple \(0\.5,"):
        build(mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    # Dividing by std alone is linear: the network stays exactly homogeneous (powers of two are exact).
    torch.manual_seed(4)
    model = build(std=(0.25, 0.5, 2.0)).eval()
    x = torch.rand(3, 3, 12, 12) + 0.1
    assert torch.equal(model(4.0 * x), 4.0 * model(x))


def test_mean_allowed_where_the_network_has_biases_anyway():
    """Batch norm (a shift) or a classifier bias already make the network inhomogeneous."""
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
    ResNet(10, num_classes=5, width=4, bias=False, mean=mean, std=std)  # norm="batch"
    WideResNet(10, 1, num_classes=5, norm="none", bias=True, mean=mean, std=std)
    MadryCNN(num_classes=5, width=4, hidden=16, mean=mean, std=std)


@pytest.mark.parametrize("name", ["madrycnn", "resnet10", "wrn-28-10"])
def test_normalisation_inside_model(name):
    torch.manual_seed(3)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    model = create(name, num_classes=4, mean=mean, std=std, **TINY[name]).eval()
    plain = copy.deepcopy(model)
    plain.normalize = Normalize(None, None, 3)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    z = ((x - m) / s).detach().requires_grad_(True)
    torch.testing.assert_close(model(x), plain(z), rtol=0, atol=0)  # the same float ops
    # The pixel-space gradient is the normalised-space gradient divided by std (chain rule).
    (gx,) = torch.autograd.grad(model(x)[:, 1].sum(), x)
    (gz,) = torch.autograd.grad(plain(z)[:, 1].sum(), z)
    torch.testing.assert_close(gx, gz / s, rtol=1e-6, atol=1e-7)
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())


def test_normalize_validation_and_identity():
    x = torch.rand(2, 3, 4, 4)
    assert Normalize(None, None, 3)(x) is x
    torch.testing.assert_close(
        Normalize(None, (2.0, 4.0, 8.0), 3)(x), x / torch.tensor([2.0, 4.0, 8.0]).view(1, 3, 1, 1)
    )
    with pytest.raises(ValueError, match="mean: expected 3 values"):
        Normalize((0.5,), None, 3)
    with pytest.raises(ValueError, match="std: expected a finite number > 0, got 0.0"):
        Normalize(None, (1.0, 0.0, 1.0), 3)


@pytest.mark.parametrize("name", ["madrycnn", "preactresnet18", "wrn-28-10"])
def test_create_with_a_data_sets_statistics_normalises(name):
    """``create(..., mean=ds.mean, std=ds.std)`` standardises that data set's pixels per channel,
    and the default does no arithmetic at all."""
    data = generate_shapes(64, size=16, seed=5)
    x = data.images.float() / 255
    default = create(name, num_classes=data.num_classes, **TINY[name])
    assert not default.normalize.enabled and default.normalize(x) is x
    model = create(name, num_classes=data.num_classes, mean=data.mean, std=data.std, **TINY[name])
    z = model.normalize(x).double()
    # The statistics are those of these very images, so the result has mean 0 and std 1 per
    # channel up to float32 rounding of (x - m) / s (|z| < 5 here: error ~ 5 * 2^-24 per pixel).
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(z.std((0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)
    # And the model's first layer is exactly that map: a model without it, fed z, agrees bit for bit.
    plain = copy.deepcopy(model).eval()
    plain.normalize = Normalize(None, None, 3)
    torch.testing.assert_close(model.eval()(x), plain(model.normalize(x)), rtol=0, atol=0)


def test_cam_layer():
    resnet = create("resnet10", num_classes=3, width=4)
    assert default_cam_layer(resnet) is resnet.layer4
    model = create("preactresnet18", num_classes=3, width=4)
    assert default_cam_layer(model) is model.layer4
    wrn = create("wrn-28-10", num_classes=3, depth=10, widen=1)
    assert default_cam_layer(wrn) is wrn.block3
    small = create("madrycnn", num_classes=3)
    assert default_cam_layer(small) is small.features
    foreign = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten())
    assert default_cam_layer(foreign) is foreign[2]
    with pytest.raises(ValueError, match="no cam_layer"):
        default_cam_layer(nn.Linear(3, 3))


def test_relu_backward_hooks_work():
    """Guided backprop hooks ReLU modules; in-place ReLUs would break full backward hooks."""
    model = create("resnet10", num_classes=3, width=4)
    forwards, backwards = [], []
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(lambda *_: forwards.append(1))
            m.register_full_backward_hook(lambda mod, gin, gout: backwards.append(1))
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    assert forwards and len(backwards) == len(forwards), "every ReLU call must reach its backward hook"


def test_create_errors():
    with pytest.raises(ValueError, match=r"name: expected one of .*'resnet18'.*, got 'vgg'"):
        create("vgg", num_classes=3)
    with pytest.raises(TypeError, match="name: expected a model name"):
        create(18, num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        create("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="depth"):
        create("resnet18", num_classes=3, depth=20)
    with pytest.raises(ValueError, match="stem"):
        create("resnet18", num_classes=3, stem="tiny")
    with pytest.raises(ValueError, match="depth"):
        create("wrn-28-10", num_classes=3, depth=12)
    assert isinstance(create("ResNet18", num_classes=3, width=4), ResNet)


def test_etmanncnn_is_the_authors_mnist_network():
    """conv3x3 32/64/128 (each ReLU + maxpool2), FC 128, dropout 0.5, FC K: the parameter count of
    smallnet.py at 28x28 (3x3 feature map after three poolings), computed by hand."""
    model = create("etmanncnn", num_classes=10, in_channels=1)
    convs = (9 * 1 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 128 + 128)
    dense = (128 * 3 * 3 * 128 + 128) + (128 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == convs + dense
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1 and dropouts[0].p == 0.5
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    digits = create("etmanncnn", num_classes=10, in_channels=1, image_size=8)
    assert digits(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="image_size"):
        digits(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="image_size"):
        create("etmanncnn", num_classes=10, image_size=4)


def test_madrycnn_replaces_smallcnn():
    """The Madry et al. MNIST network is registered under its own name only."""
    assert "madrycnn" in names() and "smallcnn" not in names()
    with pytest.raises(ValueError, match="name"):
        create("smallcnn", num_classes=3)
