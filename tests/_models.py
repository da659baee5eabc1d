"""Small models shared by several test files (imported as a plain module: pytest puts
tests/ on sys.path)."""

import torch
import torch.nn.functional as F
from torch import nn


def template_cnn(classes: int = 4, held_out: int = 64):
    """A small CNN trained for 40 Adam steps on ``classes`` separable synthetic classes of 1×8×8
    images (a random template per class plus noise), and a held-out batch ``(x, y)`` of
    ``held_out`` images. Clean accuracy is about 0.9; at ε = 0.06 FGSM leaves about 30% robust
    accuracy, so the strength ordering of attacks is visible. Returns ``(model, x, y)``, the model in
    eval mode with no parameter ``.grad``."""
    gen = torch.Generator().manual_seed(0)
    templates = torch.rand(classes, 1, 8, 8, generator=gen)

    def sample(n):
        y = torch.randint(0, classes, (n,), generator=gen)
        x = 0.5 + 0.3 * (templates[y] - 0.5) + 0.15 * torch.randn(n, 1, 8, 8, generator=gen)
        return x.clamp(0, 1), y

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(128, classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        x, y = sample(64)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return (model, *sample(held_out))


def linear_model(num_classes: int, d: int, *, bias: bool = True, seed: int = 1) -> nn.Module:
    """A float64 linear classifier of flattened inputs with ``d`` values, initialised after
    ``torch.manual_seed(seed)``. Float64 because the tests compare attacks and gradients with
    analytic answers on it (boundary distances, optimal corners, hand gradients): the library and
    the formulas then agree to a few ulps, not to float32's rounding."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, num_classes, bias=bias)).double()


def tiny_cnn(num_classes: int = 3, seed: int = 0) -> nn.Module:
    """A float32 CNN of 3-channel images of any size (adaptive pooling), initialised after
    ``torch.manual_seed(seed)``. Small enough that a training step costs milliseconds, yet with the
    layers whose handling the recipes and the trainer must get right: a convolution and batch norm
    (running statistics that train-mode attacks update and eval mode freezes)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, num_classes))
