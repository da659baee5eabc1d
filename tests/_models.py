"""Small trained models shared by several test files (imported as a plain module: pytest puts
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
