"""Training recipes: each computes one batch's training loss (METHODS.md §2–3).

A recipe is a small dataclass. ``recipe.loss(model, batch, epoch=e)`` returns the loss of one
batch (the single-step helper for people who keep their own loop), and
``recipe.train_step(model, batch, optimizer, ...)`` does one optimisation step with it — the trainer
(:func:`fastsat.train.fit`) calls nothing else, so a recipe's math lives in exactly one place.

All ε and step sizes are in pixel units (inputs in [0, 1]; models normalise internally).
``attack_mode`` is the train/eval mode of the model while an attack runs ("eval": batch-norm uses
running statistics and they are not updated by adversarial batches; "train": as in Madry's and
Wong's code); the model's own mode is restored afterwards.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastsat._checks import positive_int
from fastsat.attacks import FGSM, PGD, TradesAttack
from fastsat.data import as_batch
from fastsat.ops import pgd_step, random_start, sat_perturb

__all__ = [
    "RECIPES",
    "SAT",
    "Fast",
    "Free",
    "GradNorm",
    "NonFiniteLossError",
    "PGDTraining",
    "Recipe",
    "RecipeOutput",
    "SATPlusPGD",
    "SATPlusTrades",
    "Standard",
    "Trades",
    "make_recipe",
    "recipe_loss",
    "sat_probability",
    "trades_loss",
]

_ATTACK_MODES = ("eval", "train")
_SAT_MAPS = ("boxes", "masks", "saliency")
_MAP_KEYS = {"boxes": "box", "masks": "mask", "saliency": "saliency"}
PRECISIONS = ("fp32", "bf16", "fp16")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; training must stop."""


class RecipeOutput(NamedTuple):
    """loss: scalar tensor to backpropagate (attached to the graph).
    logits: detached (B, K) logits of the input the loss was computed on (for training accuracy)."""

    loss: Tensor
    logits: Tensor


def sat_probability(epoch: int, a: float = 0.6) -> float:
    """SAT curriculum p_e = 1 − a^(e/10): the probability of taking the saliency map instead of
    random-sign noise at (0-based) epoch ``e``; 0 at the first epoch, → 1 as training goes on."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch: expected an int >= 0, got {epoch!r}")
    if not 0.0 < a <= 1.0:
        raise ValueError(f"a: expected 0 < a <= 1, got {a!r}")
    return 1.0 - a ** (epoch / 10)


def trades_loss(logits_nat: Tensor, logits_adv: Tensor, labels: Tensor, beta: float) -> Tensor:
    """TRADES objective CE(f(x), y) + β·KL(f(x) ‖ f(x')), KL averaged over the batch.

    Args:
        logits_nat: (B, K) logits of the clean batch. logits_adv: (B, K) of the attacked batch.
        labels: (B,) int64. beta: weight β of the KL term (TRADES: 6; SAT's code: 1).
    """
    kl = F.kl_div(F.log_softmax(_upcast(logits_adv), 1), F.softmax(_upcast(logits_nat), 1), reduction="batchmean")
    return F.cross_entropy(_upcast(logits_nat), labels) + beta * kl


def _upcast(t: Tensor) -> Tensor:
    """fp16/bf16 logits and gradients → float32 for the loss; float32/float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _check_positive(value: object, name: str, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")


def _check_finite_loss(loss: Tensor, recipe: str) -> None:
    if not bool(torch.isfinite(loss.detach())):
        raise NonFiniteLossError(f"recipe {recipe!r}: the training loss is {loss.item()} (not finite)")


@dataclass
class Recipe:
    """Base class. Subclasses set ``name`` and implement :meth:`loss`."""

    name: ClassVar[str] = ""
    #: Whether the trainer should stop on catastrophic overfitting (a collapse of PGD accuracy).
    early_stop: ClassVar[bool] = False

    def loss(self, model: nn.Module, batch: object, *, epoch: int = 0) -> RecipeOutput:
        """The training loss of one batch (model in train mode, the caller's autocast applies).

        Args:
            model: classifier taking pixel-space (B, C, H, W) input, returning (B, K) logits.
            batch: dict (``image``, ``label``, optional ``box``/``mask``/``saliency``) or (x, y).
            epoch: 0-based epoch (used by SAT's curriculum).
        """
        raise TypeError(f"{type(self).__name__} does not define a loss")

    def train_step(
        self,
        model: nn.Module,
        batch: object,
        optimizer: torch.optim.Optimizer,
        *,
        epoch: int = 0,
        precision: str = "fp32",
        scaler: torch.amp.GradScaler | None = None,
    ) -> RecipeOutput:
        """One optimisation step: loss under autocast (``precision`` "fp32" | "bf16" | "fp16"),
        backward (through ``scaler`` if given, for fp16), optimizer step.

        Raises:
            NonFiniteLossError: the loss is NaN/inf; the step is not taken.
        """
        batch = as_batch(batch)
        with _autocast(batch["image"].device, precision):
            out = self.loss(model, batch, epoch=epoch)
        _check_finite_loss(out.loss, self.name)
        optimizer.zero_grad(set_to_none=True)
        _backward_and_step(out.loss, optimizer, scaler)
        return out

    def options(self) -> dict:
        """The recipe's hyper-parameters (what ``make_recipe(name, **options)`` takes)."""
        return asdict(self)

    def state_dict(self) -> dict:
        """State carried across batches (saved in checkpoints); most recipes have none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""


def _backward_and_step(loss: Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def _ce(model: nn.Module, x: Tensor, y: Tensor) -> RecipeOutput:
    logits = model(x)
    return RecipeOutput(F.cross_entropy(_upcast(logits), y), logits.detach())


def _check_attack_mode(mode: str) -> None:
    if mode not in _ATTACK_MODES:
        raise ValueError(f"attack_mode: expected one of {_ATTACK_MODES}, got {mode!r}")


@dataclass
class Standard(Recipe):
    """Plain cross-entropy on the clean batch."""

    name: ClassVar[str] = "standard"

    def loss(self, model, batch, *, epoch=0):
        batch = as_batch(batch)
        return _ce(model, batch["image"], batch["label"])


@dataclass
class PGDTraining(Recipe):
    """Madry et al. PGD adversarial training: CE on an L∞ PGD attack from a random start.

    eps: radius (pixels, default 8/255). step_size: per step (default 2/255). steps: default 10.
    """

    name: ClassVar[str] = "pgd"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    attack_mode: str = "eval"

    def __post_init__(self):
        _check_positive(self.eps, "eps")
        _check_iterative_attack(self)

    def loss(self, model, batch, *, epoch=0):
        batch = as_batch(batch)
        x, y = batch["image"], batch["label"]
        return _ce(model, _pgd_attack(self, model, x, y), y)


def _check_iterative_attack(recipe: Recipe) -> None:
    """Checks shared by the recipes with an iterative attack (step_size, steps, attack_mode; beta
    where the recipe has one)."""
    _check_positive(recipe.step_size, "step_size")
    positive_int(recipe.steps, "steps")
    if hasattr(recipe, "beta"):
        _check_positive(recipe.beta, "beta", allow_zero=True)
    _check_attack_mode(recipe.attack_mode)


def _pgd_attack(recipe: Recipe, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The L∞ PGD adversarial batch (random start) with ``recipe``'s eps/step_size/steps/attack_mode."""
    attack = PGD(model, eps=recipe.eps, step_size=recipe.step_size, steps=recipe.steps, random_start=True, mode=recipe.attack_mode)
    return _attack(attack, x, y)


def _trades_attack(recipe: Recipe, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """TRADES' KL attack batch with ``recipe``'s eps/step_size/steps/attack_mode."""
    attack = TradesAttack(model, eps=recipe.eps, step_size=recipe.step_size, steps=recipe.steps, mode=recipe.attack_mode)
    return _attack(attack, x, y)


@dataclass
class Trades(Recipe):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + β·KL(f(x) ‖ f(x')), x' from the KL attack.

    eps 0.031, step_size 0.007, steps 10 (pixels), beta 6, attack in eval mode (TRADES' defaults).
    """

    name: ClassVar[str] = "trades"
    eps: float = 0.031
    step_size: float = 0.007
    steps: int = 10
    beta: float = 6.0
    attack_mode: str = "eval"

    def __post_init__(self):
        _check_positive(self.eps, "eps")
        _check_iterative_attack(self)

    def loss(self, model, batch, *, epoch=0):
        batch = as_batch(batch)
        x, y = batch["image"], batch["label"]
        return _trades_output(model, x, _trades_attack(self, model, x, y), y, self.beta)


def _trades_output(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, beta: float) -> RecipeOutput:
    logits_nat = model(x)
    return RecipeOutput(trades_loss(logits_nat, model(x_adv), y, beta), logits_nat.detach())


@dataclass
class Fast(Recipe):
    """Fast AT (Wong, Rice & Kolter 2020): CE on one FGSM step of size 1.25ε from a uniform start.

    eps: default 8/255 (pixels). step_size: default None = 1.25·eps. The trainer's early stop
    (``early_stop``) restores the best epoch if PGD accuracy collapses (catastrophic overfitting).
    """

    name: ClassVar[str] = "fast"
    early_stop: bool = True
    eps: float = 8 / 255
    step_size: float | None = None
    attack_mode: str = "eval"

    def __post_init__(self):
        _check_positive(self.eps, "eps")
        if self.step_size is not None:
            _check_positive(self.step_size, "step_size")
        _check_attack_mode(self.attack_mode)

    def loss(self, model, batch, *, epoch=0):
        batch = as_batch(batch)
        x, y = batch["image"], batch["label"]
        step = 1.25 * self.eps if self.step_size is None else self.step_size
        attack = FGSM(model, eps=self.eps, step_size=step, random_start=True, mode=self.attack_mode)
        return _ce(model, _attack(attack, x, y), y)


@dataclass
class Free(Recipe):
    """Free AT (Shafahi et al. 2019): each batch is replayed ``replays`` times; the input gradient
    of every weight update advances δ by an L∞ step of ``eps`` (projected onto the ε-ball, clipped
    to [0, 1]); δ carries over to the next batch of the same shape. One epoch costs ``replays``
    forward/backward passes per batch, so divide the epochs by ``replays`` for Free AT's budget.

    eps: default 8/255 (pixels). replays: m, default 8.
    """

    name: ClassVar[str] = "free"
    eps: float = 8 / 255
    replays: int = 8
    _delta: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        _check_positive(self.eps, "eps")
        positive_int(self.replays, "replays")

    def options(self):
        return {"eps": self.eps, "replays": self.replays}

    def loss(self, model, batch, *, epoch=0):
        raise TypeError("the 'free' recipe updates the weights `replays` times per batch; call Free.train_step(model, batch, optimizer)")

    def train_step(self, model, batch, optimizer, *, epoch=0, precision="fp32", scaler=None):
        batch = as_batch(batch)
        x, y = batch["image"], batch["label"]
        # A resumed δ was loaded on the CPU: it follows x to its device and dtype.
        delta = self._delta.to(x) if self._delta is not None and self._delta.shape == x.shape else torch.zeros_like(x)
        for _ in range(self.replays):
            x_adv = (x + delta).clamp_(0.0, 1.0).requires_grad_(True)
            with _autocast(x.device, precision):
                out = _ce(model, x_adv, y)
            _check_finite_loss(out.loss, self.name)
            optimizer.zero_grad(set_to_none=True)
            _backward_and_step(out.loss, optimizer, scaler)
            # A scaled fp16 gradient can overflow; its sign is all the step needs.
            grad = x_adv.grad.nan_to_num(nan=0.0)
            delta = pgd_step(x_adv.detach(), grad, x, step_size=self.eps, eps=self.eps) - x
        self._delta = delta.detach()
        return out

    def state_dict(self):
        return {"delta": self._delta}

    def load_state_dict(self, state):
        self._delta = state.get("delta")


@dataclass
class SAT(Recipe):
    """Saliency-based adversarial training (Mangla et al. 2020, METHODS.md §2):
    CE(f(clip(x − ε·s)), y), s = (1 − w)·n + w·S, w ~ Bernoulli(p_e), p_e = 1 − a^(e/10).

    eps: default 8/255 (pixels). maps: where S comes from — "boxes" (batch["box"]), "masks"
    (batch["mask"]) or "saliency" (batch["saliency"], e.g. teacher maps from
    :func:`fastsat.train.teacher_saliency`). a: curriculum base, default 0.6.
    """

    name: ClassVar[str] = "sat"
    eps: float = 8 / 255
    maps: str = "boxes"
    a: float = 0.6

    def __post_init__(self):
        _check_positive(self.eps, "eps")
        if self.maps not in _SAT_MAPS:
            raise ValueError(f"maps: expected one of {_SAT_MAPS}, got {self.maps!r}")
        sat_probability(0, self.a)

    def perturb(self, batch: object, *, epoch: int = 0, start: Tensor | None = None) -> Tensor:
        """The SAT input clip(x − ε·s) for ``batch`` at ``epoch`` (or around ``start`` instead of x).

        Randomness is drawn from torch's global generator (through :func:`fastsat.ops.sat_perturb`).
        """
        batch = as_batch(batch)
        key = _MAP_KEYS[self.maps]
        if key not in batch:
            raise ValueError(f"recipe {self.name!r} with maps={self.maps!r} needs batches with a {key!r} entry; "
                             "the data has none (use a dataset with these annotations or another maps source)")
        x = batch["image"] if start is None else start
        return sat_perturb(x, eps=self.eps, p=sat_probability(epoch, self.a), **{self.maps: batch[key]})

    def loss(self, model, batch, *, epoch=0):
        batch = as_batch(batch)
        return _ce(model, self.perturb(batch, epoch=epoch), batch["label"])


def _attack(attack, x: Tensor, y: Tensor) -> Tensor:
    """Run a training-time attack and return its detached adversarial batch.

    Attacks warn when a sample's input gradient is all zero (dead ReLUs, saturated softmax). That
    is a useful warning when evaluating a model, but routine for a few samples of a training batch,
    where it would repeat every step; it is silenced here only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*all-zero input gradient.*", category=UserWarning)
        return attack.perturb(x, y).detach()


def _coin() -> bool:
    """A fair coin from torch's global generator (so seeds make runs reproducible)."""
    return bool(torch.rand(()) < 0.5)


@dataclass
class SATPlusPGD(SAT):
    """SAT + PGD (METHODS.md §2): per batch a fair coin picks either the SAT input around a
    uniform random start x₀ = x + U(−ε, ε), clip(x₀ − ε·s), or an L∞ PGD attack from a random
    start (eps 8/255, ``steps`` 5 of ``step_size`` 2/255); loss CE on the result."""

    name: ClassVar[str] = "sat+pgd"
    step_size: float = 2 / 255
    steps: int = 5
    attack_mode: str = "eval"

    def __post_init__(self):
        super().__post_init__()
        _check_iterative_attack(self)

    def loss(self, model, batch, *, epoch=0):
        batch = as_batch(batch)
        x, y = batch["image"], batch["label"]
        if _coin():
            x_train = self.perturb(batch, epoch=epoch, start=random_start(x, eps=self.eps))
        else:
            x_train = _pgd_attack(self, model, x, y)
        return _ce(model, x_train, y)


@dataclass
class SATPlusTrades(SAT):
    """SAT + TRADES (METHODS.md §2): a fair coin per batch picks x' = clip(x − ε·s) or the TRADES
    KL attack (eps, ``step_size`` 2/255, ``steps`` 10); loss CE(f(x), y) + β·KL(f(x) ‖ f(x')),
    β = 1 as in SAT's code."""

    name: ClassVar[str] = "sat+trades"
    step_size: float = 2 / 255
    steps: int = 10
    beta: float = 1.0
    attack_mode: str = "eval"

    def __post_init__(self):
        super().__post_init__()
        _check_iterative_attack(self)

    def loss(self, model, batch, *, epoch=0):
        batch = as_batch(batch)
        x, y = batch["image"], batch["label"]
        x_adv = self.perturb(batch, epoch=epoch) if _coin() else _trades_attack(self, model, x, y)
        return _trades_output(model, x, x_adv, y, self.beta)


@dataclass
class GradNorm(Recipe):
    """Input-gradient-norm regularisation (double backprop, as in Etmann et al.):
    mean_i [CE_i + λ·‖∇_{x_i} CE_i‖²], the gradient per sample in pixel space.

    lam: λ, default 0.1 (it multiplies the per-sample squared L2 norm of a pixel-space gradient;
    λ = 1 already stalls learning of a small ResNet on 16 px shapes).
    """

    name: ClassVar[str] = "gradnorm"
    lam: float = 0.1

    def __post_init__(self):
        _check_positive(self.lam, "lam", allow_zero=True)

    def loss(self, model, batch, *, epoch=0):
        batch = as_batch(batch)
        x = batch["image"].detach().requires_grad_(True)
        logits = model(x)
        ce = F.cross_entropy(_upcast(logits), batch["label"], reduction="none")
        # The gradient of the summed loss is each sample's own ∇ₓCE_i (samples are independent
        # given the model; train-mode batch norm couples them, as it does in every recipe).
        (grad,) = torch.autograd.grad(ce.sum(), x, create_graph=True)
        penalty = _upcast(grad).pow(2).flatten(1).sum(1)
        return RecipeOutput((ce + self.lam * penalty).mean(), logits.detach())


RECIPES: dict[str, type[Recipe]] = {
    cls.name: cls for cls in (Standard, PGDTraining, Trades, Fast, Free, SAT, SATPlusPGD, SATPlusTrades, GradNorm)
}


def make_recipe(recipe: str | Recipe, **options) -> Recipe:
    """A recipe object from its name (one of :data:`RECIPES`) and options, or ``recipe`` itself."""
    if isinstance(recipe, Recipe):
        if options:
            raise ValueError(f"recipe: options {sorted(options)} given with a Recipe object; set them on the object")
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"recipe: expected one of {sorted(RECIPES)} or a Recipe, got {recipe!r}")
    cls = RECIPES[recipe]
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"recipe {recipe!r}: unknown options {unknown}; it takes {sorted(known)}")
    return cls(**options)


def recipe_loss(model: nn.Module, batch: object, *, recipe: str | Recipe = "sat", epoch: int = 0, **options) -> Tensor:
    """The single-step helper: the training loss of one batch under ``recipe``, for your own loop.

    Example::

        for x, y in loader:
            loss = fastsat.train.recipe_loss(model, (x, y), recipe="pgd", eps=8/255)
            opt.zero_grad(); loss.backward(); opt.step()

    Args:
        model: classifier (pixel-space input, logits out), in train mode.
        batch: dict or (x, y) (see :func:`fastsat.data.as_batch`).
        recipe: a name from :data:`RECIPES` or a :class:`Recipe` (then no ``options``).
        epoch: 0-based epoch (SAT curriculum). options: the recipe's hyper-parameters.

    Returns:
        Scalar loss tensor attached to the graph.
    """
    return make_recipe(recipe, **options).loss(model, batch, epoch=epoch).loss
