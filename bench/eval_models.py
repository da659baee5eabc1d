"""The models the evaluation benchmarks attack, and the counter of their work.

:class:`Counted` wraps a classifier and counts the images it sees: every forward image, and the
ones whose input gradient is wanted (the input requires grad under autograd). That is the work an
evaluation spends, whichever library runs it. It also times the network's own passes (CPU time):
what is left of an evaluation's time is the library's.

:func:`zoo` trains the validation zoo of ``suite="rapid"`` (issue "Evaluation at a fraction of
AutoAttack's cost"): digits and shapes x standard, gradnorm, pgd, trades, fast, sat+pgd, each
evaluated at two radii, plus two gradient-masking models built from the digits standard model
(quantised input, saturated softmax output), on which the masking checks must fire.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastsat import data, models
from fastsat.train import fit

RECIPES = ("standard", "gradnorm", "pgd", "trades", "fast", "sat+pgd")


class Counted(nn.Module):
    """``net`` counting its forward images and the input-gradient images among them, and the
    process CPU time (seconds) spent in its forward passes and in the backward passes through it
    (from the gradient reaching its output to the gradient reaching its input, timed by tensor
    hooks, so any library's backward call is timed alike)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.reset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forward_images += x.shape[0]
        started = time.process_time()
        out = self.net(x)
        self.network_seconds += time.process_time() - started
        if torch.is_grad_enabled() and x.requires_grad:
            self.gradient_images += x.shape[0]
            backward_started = []
            out.register_hook(lambda grad: backward_started.append(time.process_time()))
            x.register_hook(lambda grad: self._backward_done(backward_started))
        return out

    def _backward_done(self, started: list) -> None:
        if started:  # the gradient reached the input through this forward's output
            self.network_seconds += time.process_time() - started.pop()

    def reset(self) -> None:
        self.forward_images = self.gradient_images = 0
        self.network_seconds = 0.0


class Quantised(nn.Module):
    """``inner`` on its input rounded to 1/64: a zero input gradient everywhere (masking)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 64) / 64)


class Saturated(nn.Module):
    """softmax(10⁴·logits) as the output: saturated, the gradient vanishes on most points (masking)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.softmax(self.inner(x) * 1e4, dim=1)


@dataclass(frozen=True)
class Testbed:
    """A data set, its model and the two radii (pixel units) the zoo's models are evaluated at."""

    name: str
    radii: tuple[float, float]
    train_eps: float
    epochs: int

    def load(self) -> tuple[data.AnnotatedDataset, data.AnnotatedDataset]:
        if self.name == "digits":
            return data.digits(seed=0), data.digits(train=False, seed=0)
        look = {"size": 16, "num_classes": 4, "clutter": False, "polarity": "light"}
        return data.shapes(2000, seed=0, **look), data.shapes(500, seed=1000, **look)

    def build(self, train: data.AnnotatedDataset) -> nn.Module:
        return models.create("madrycnn", num_classes=len(train.classes), in_channels=train.images.shape[1], width=16,
                             hidden=128, mean=train.mean, std=train.std)


TESTBEDS = {
    "digits": Testbed("digits", radii=(0.03, 0.1), train_eps=0.1, epochs=10),
    "shapes": Testbed("shapes", radii=(4 / 255, 8 / 255), train_eps=8 / 255, epochs=10),
}


def train_model(testbed: Testbed, recipe: str, seed: int = 0) -> nn.Module:
    """``recipe`` trained on ``testbed`` (SGD, one-cycle; the recipes at the testbed's radius)."""
    train, _ = testbed.load()
    torch.manual_seed(seed)
    model = testbed.build(train)
    options = {} if recipe in ("standard", "gradnorm") else {"eps": testbed.train_eps}
    if recipe in ("pgd", "trades", "sat+pgd"):
        options.update(steps=7, step_size=testbed.train_eps / 4)
    fit(model, train, recipe=recipe, recipe_options=options, epochs=testbed.epochs, batch_size=128, seed=seed,
        optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="onecycle", augment=False,
        progress=False, early_stop_drop=None)
    return model.eval()


def cached_model(testbed: Testbed, recipe: str, folder: Path) -> nn.Module:
    """:func:`train_model`, its weights kept in ``folder`` (a benchmark's own cache, never user files)."""
    path = folder / f"{testbed.name}-{recipe.replace('+', '_')}.pt"
    train, _ = testbed.load()
    model = testbed.build(train)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = train_model(testbed, recipe)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model


def zoo(folder: Path) -> list[tuple[str, Testbed, nn.Module, bool]]:
    """(name, testbed, model, masked) of every zoo model, trained once into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(f"{t.name}/{r}", t, cached_model(t, r, folder), False) for t in TESTBEDS.values() for r in RECIPES]
    digits_standard = rows[0][2]
    rows += [("digits/standard-quantised", TESTBEDS["digits"], Quantised(digits_standard).eval(), True),
             ("digits/standard-saturated", TESTBEDS["digits"], Saturated(digits_standard).eval(), True)]
    return rows
