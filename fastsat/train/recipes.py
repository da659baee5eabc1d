"""Training recipes: each computes one batch's training loss (METHODS.md §2–3).

A recipe is a small dataclass whose fields are its hyper-parameters (declared with
:func:`fastsat._options.option`: default, units, allowed values). ``recipe.loss(model, batch,
epoch=e)`` returns the loss of one batch (the single-step helper for people who keep their own
loop), and ``recipe.train_step(model, batch, optimizer, ...)`` does one optimisation step with it —
the trainer (:class:`fastsat.train.Trainer`) calls nothing else, so a recipe's math lives in exactly
one place. What the trainer needs to know about a recipe it reads from declared attributes:
``early_stop``, ``batch_keys`` (the batch entries it reads) and ``from_run`` (the options whose
value is the run's: the input box ``clip`` of :class:`PerturbationRecipe`).

All ε and step sizes are in pixel units (inputs in the box ``clip``, default [0, 1]; models
normalise internally). ``attack_mode`` is the train/eval mode of the model while an attack runs
("eval": batch-norm uses running statistics and they are not updated by adversarial batches;
"train": as in Madry's and Wong's code); the model's own mode is restored afterwards.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastsat import _dist
from fastsat._checks import choice, clip_box, integer, nearest, number, positive_int, positive_number
from fastsat._dist import unwrap  # the module attacks run on: see _perturbed
from fastsat._options import document, option, validate
from fastsat.attacks import FGSM, PGD, TradesAttack
from fastsat.data import as_batch
from fastsat.ops import pgd_step, random_start, sat_perturb

__all__ = [
    "MART",
    "NFGSM",
    "PRECISIONS",
    "RECIPES",
    "SAT",
    "Fast",
    "Free",
    "GradAlign",
    "GradNorm",
    "NonFiniteLossError",
    "PGDTraining",
    "PerturbationRecipe",
    "Recipe",
    "RecipeOutput",
    "SATPlusPGD",
    "SATPlusTrades",
    "Standard",
    "StepGuard",
    "Trades",
    "awp_perturbation",
    "gradalign_lambda",
    "gradient_misalignment",
    "make_recipe",
    "mart_loss",
    "recipe_loss",
    "sat_probability",
    "trades_loss",
]

ATTACK_MODES = ("eval", "train")
SAT_MAPS = ("boxes", "masks", "saliency")
_MAP_KEYS = {"boxes": "box", "masks": "mask", "saliency": "saliency"}
PRECISIONS = ("fp32", "bf16", "fp16")

_non_negative = functools.partial(number, minimum=0)


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
    epoch = integer(epoch, "epoch", minimum=0)
    a = number(a, "a", minimum=0, exclusive_min=True, maximum=1)
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
    choice(precision, "precision", PRECISIONS)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _check_finite_loss(loss: Tensor, recipe: str) -> None:
    if not bool(torch.isfinite(loss.detach())):
        raise NonFiniteLossError(f"recipe {recipe!r}: the training loss is {loss.item()} (not finite)")


class StepGuard(torch.amp.GradScaler):
    """A ``GradScaler`` that also skips, on the device, every update whose loss is NaN/inf and
    counts those in :attr:`skipped` (int64 scalar on the device: read it where the host looks
    anyway, e.g. at the end of an epoch) — no host sync per step. It also skips the updates while
    :attr:`refused` (a bool scalar on the device) is set: the trainer sets it for a batch it found
    invalid on the device (those are not counted in ``skipped``).

    fp16: the usual dynamic loss scale. fp32/bf16 need no scaling: the scale starts at 1 and never
    grows (after a skipped step it halves, which is exact in binary floating point). With an
    optimizer that takes the scaler's found-inf flag (fused SGD/Adam) the skip happens inside its
    kernel; with any other, ``GradScaler.step`` reads the flag on the host (one sync per step).

    Args:
        device: where the loss is computed. precision: "fp32" | "bf16" | "fp16".
    """

    def __init__(self, device: torch.device | str, precision: str = "fp32") -> None:
        fp16 = choice(precision, "precision", PRECISIONS) == "fp16"
        device = torch.device(device)
        super().__init__(device.type, **({} if fp16 else {"init_scale": 1.0, "growth_interval": 2**30}))
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.refused = torch.zeros((), dtype=torch.bool, device=device)

    def scale(self, outputs: Tensor) -> Tensor:
        """``outputs`` (the scalar loss) times the scale; times NaN if it is not finite or the step
        is :attr:`refused`, so that every gradient is NaN and the step is skipped (a non-finite loss
        can have finite gradients)."""
        finite = torch.isfinite(outputs.detach())
        self.skipped += ~finite
        return super().scale(outputs * torch.where(finite & ~self.refused, 1.0, float("nan")))


@dataclass
class Recipe:
    """Base class. Subclasses set ``name``, declare their hyper-parameters as :func:`option`
    fields and implement :meth:`loss` (or :meth:`train_step`, for recipes that own the optimizer
    step). Fields are checked on construction."""

    name: ClassVar[str] = ""
    #: Whether the trainer should stop on catastrophic overfitting (a collapse of PGD accuracy).
    early_stop: ClassVar[bool] = False
    #: The options whose value is the run's, not the recipe's: a TrainConfig sets them from its
    #: fields of the same names (and refuses them among its recipe_options).
    from_run: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        validate(self)

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """The batch entries the recipe reads (the trainer checks the data has them)."""
        return ("image", "label")

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
        backward and optimizer step — through ``scaler`` if given (a :class:`StepGuard`, needed for
        fp16: a NaN/inf loss skips the step on the device and is counted, no host sync), else
        checked on the host.

        Raises:
            NonFiniteLossError: without a scaler, the loss is NaN/inf; the step is not taken.
        """
        batch = as_batch(batch)
        with _autocast(batch["image"].device, precision):
            out = self.loss(model, batch, epoch=epoch)
        _backward_and_step(out.loss, optimizer, scaler, self.name)
        return out

    def options(self) -> dict:
        """The recipe's hyper-parameters (what ``make_recipe(name, **options)`` takes)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def state_dict(self) -> dict:
        """State carried across batches (saved in checkpoints); most recipes have none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""


def _backward_and_step(loss: Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                       recipe: str) -> None:
    _backward(loss, optimizer, scaler, recipe)
    _step(optimizer, scaler)


def _backward(loss: Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, recipe: str) -> None:
    """The parameters' fresh gradients of ``loss`` (scaled by ``scaler``; without one, a NaN/inf loss raises first)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        _check_finite_loss(loss, recipe)
        loss.backward()
    else:
        scaler.scale(loss).backward()


def _step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


def _ce(model: nn.Module, x: Tensor, y: Tensor) -> RecipeOutput:
    logits = model(x)
    return RecipeOutput(F.cross_entropy(_upcast(logits), y), logits.detach())


# Options several recipes share, declared once (each recipe picks its own default).
def _eps(default: float = 8 / 255) -> dataclasses.Field:
    return option(default, "radius ε of the training perturbation (L∞, pixels)", check=positive_number)


def _step_size(default: float) -> dataclasses.Field:
    return option(default, "attack step size (pixels)", check=positive_number)


def _steps(default: int) -> dataclasses.Field:
    return option(default, "attack iterations", check=positive_int)


def _beta(default: float) -> dataclasses.Field:
    return option(default, "weight β of TRADES' KL term", check=_non_negative)


def _attack_mode() -> dataclasses.Field:
    return option("eval", "model mode while the recipe's attack runs (batch-norm statistics)", choices=ATTACK_MODES)


@document
@dataclass
class Standard(Recipe):
    """Plain cross-entropy on the clean batch."""

    name: ClassVar[str] = "standard"

    def loss(self, model, batch, *, epoch=0):
        batch = as_batch(batch)
        return _ce(model, batch["image"], batch["label"])


@dataclass
class PerturbationRecipe(Recipe):
    """Base of the recipes that train on perturbed inputs: within ``eps`` of the clean input and
    inside the valid input box ``clip``."""

    from_run: ClassVar[tuple[str, ...]] = ("clip",)
    eps: float = _eps()
    clip: tuple[float, float] = option((0.0, 1.0), "valid input box (lo, hi), pixels; in a run, the run's "
                                       "(TrainConfig.clip)", check=clip_box)
    eps_warmup: int = option(0, "epochs of a linear ε warm-up: epoch e < eps_warmup trains at ε·(e+1)/(eps_warmup+1); "
                             "0: full ε from the start", check=functools.partial(integer, minimum=0))

    def eps_at(self, epoch: int) -> float:
        """The radius used at (0-based) ``epoch``: ε·min(1, (epoch + 1)/(eps_warmup + 1)), pixels.

        A linear warm-up (as in Wong et al.'s and many PGD-AT codes' ε schedules) lets a small
        network learn the clean task before the full-radius attack; without it, PGD training of a
        small network from scratch can stall at chance (the constant predictor is a saddle the
        full-ε attack keeps it in)."""
        return self.eps * min(1.0, (epoch + 1) / (self.eps_warmup + 1))


def awp_perturbation(model: nn.Module, loss_at: Callable[[nn.Module], Tensor], gamma: float) -> tuple[list[Tensor], list[Tensor]]:
    """AWP's weight perturbation (Wu, Xia & Wang 2020): per weight tensor l, v_l = γ·‖w_l‖·g_l/‖g_l‖,
    g the gradient of ``loss_at(module)`` at the current weights w (one ascent step, relative to
    each layer's norm; a zero g_l gives v_l = 0). Nothing is changed: the weights and the buffers
    (batch-norm statistics that the train-mode forward updates) are as they were on return.

    AWP perturbs the weights with more than one dimension (convolution kernels, linear matrices),
    as the authors' code does; biases and normalisation scales stay. Under DDP the forward runs on
    the module inside the wrapper (no gradient hook fires) and g is averaged over the ranks, so N
    processes perturb as one process with the global batch does.

    Args:
        model: the training model (DDP-wrapped or not). loss_at: the recipe's adversarial loss of
            a module (its attacked batch fixed). gamma: γ, default of the recipes 5e-3.

    Returns:
        (weights, v): the perturbed parameters of the module and their perturbations.
    """
    module = unwrap(model)
    weights = [p for p in module.parameters() if p.dim() > 1 and p.requires_grad]
    buffers = list(module.buffers())
    kept = [b.clone() for b in buffers]
    grads = torch.autograd.grad(loss_at(module), weights, allow_unused=True)
    if buffers:
        torch._foreach_copy_(buffers, kept)
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]
    if _dist.world_size() > 1:
        flat = _dist.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / _dist.world_size()
        grads = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
    w_norms, g_norms = torch._foreach_norm(weights), torch._foreach_norm(grads)
    v = [g * (gamma * wn / gn.clamp_min(torch.finfo(gn.dtype).tiny)) for g, wn, gn in zip(grads, w_norms, g_norms)]
    return weights, v


@contextlib.contextmanager
def _moved(weights: list[Tensor], v: list[Tensor]) -> Iterator[None]:
    """Within the block the weights are w + v; on leaving it (also on error) they are w again, bit for bit."""
    kept = [w.detach().clone() for w in weights]
    with torch.no_grad():
        torch._foreach_add_(weights, v)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(weights, kept)


def _awp_gamma() -> dataclasses.Field:
    return option(0.0, "AWP (adversarial weight perturbation): relative size γ of the weight ascent step after the "
                  "attack (Wu et al.: 5e-3); 0: off", check=_non_negative)


@dataclass
class _AdversarialPair(PerturbationRecipe, abc.ABC):
    """A recipe whose loss is ``objective(model, x, x_adv, y)`` on the attacked batch ``adversarial(...)``,
    with AWP as an option (``awp_gamma`` > 0): after the attack the weights move to w + v
    (:func:`awp_perturbation`), the gradient of the loss is taken there and applied to w, which is
    restored bit for bit first. No host sync; the optimiser, fused or not, steps as usual."""

    awp_gamma: float = _awp_gamma()

    @abc.abstractmethod
    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor, epoch: int) -> Tensor:
        """The attacked batch x_adv (B, ...) for the clean batch ``x`` at ``epoch``."""

    @abc.abstractmethod
    def objective(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> RecipeOutput:
        """The loss on the clean and attacked batches."""

    def loss(self, model, batch, *, epoch=0):
        if self.awp_gamma:
            raise TypeError(f"recipe {self.name!r} with awp_gamma > 0 takes its gradient at perturbed weights and "
                            f"restores them before the update; call {type(self).__name__}.train_step(model, batch, optimizer)")
        batch = as_batch(batch)
        x, y = batch["image"], batch["label"]
        return self.objective(model, x, self.adversarial(model, x, y, epoch), y)

    def train_step(self, model, batch, optimizer, *, epoch=0, precision="fp32", scaler=None):
        if not self.awp_gamma:
            return super().train_step(model, batch, optimizer, epoch=epoch, precision=precision, scaler=scaler)
        batch = as_batch(batch)
        x, y = batch["image"], batch["label"]
        with _autocast(x.device, precision):
            x_adv = self.adversarial(model, x, y, epoch)
            weights, v = awp_perturbation(model, lambda module: self.objective(module, x, x_adv, y).loss, self.awp_gamma)
        with _moved(weights, v):
            with _autocast(x.device, precision):
                out = self.objective(model, x, x_adv, y)
            _backward(out.loss, optimizer, scaler, self.name)
        _step(optimizer, scaler)
        return out


@document
@dataclass
class PGDTraining(_AdversarialPair):
    """Madry et al. PGD adversarial training: CE on an L∞ PGD attack from a random start; with
    ``awp_gamma`` > 0, AWP-AT (Wu et al. 2020)."""

    name: ClassVar[str] = "pgd"
    step_size: float = _step_size(2 / 255)
    steps: int = _steps(10)
    attack_mode: str = _attack_mode()

    def adversarial(self, model, x, y, epoch):
        return _pgd_attack(self, model, x, y, epoch)

    def objective(self, model, x, x_adv, y):
        return _ce(model, x_adv, y)


def _perturbed(attack: type, model: nn.Module, x: Tensor, y: Tensor, **settings) -> Tensor:
    """The detached adversarial batch of a training-time attack on ``model``.

    The attack runs on the module inside a DDP wrapper (``unwrap``): through the wrapper its forward
    passes would prepare the gradient reducer for a backward that never comes and re-broadcast
    batch-norm buffers. ``perturb``, not ``run``: no success pass, audit or warnings (an all-zero
    input gradient is routine for a few samples of a training batch)."""
    return attack(unwrap(model), **settings).perturb(x, y)


def _pgd_attack(recipe: PerturbationRecipe, model: nn.Module, x: Tensor, y: Tensor, epoch: int) -> Tensor:
    """The L∞ PGD adversarial batch (random start) with ``recipe``'s eps (at ``epoch``)/step_size/steps/attack_mode/clip."""
    return _perturbed(PGD, model, x, y, eps=recipe.eps_at(epoch), step_size=recipe.step_size, steps=recipe.steps,
                      random_start=True, mode=recipe.attack_mode, clip=recipe.clip)


def _trades_attack(recipe: PerturbationRecipe, model: nn.Module, x: Tensor, y: Tensor, epoch: int) -> Tensor:
    """TRADES' KL attack batch with ``recipe``'s eps (at ``epoch``)/step_size/steps/attack_mode/clip."""
    return _perturbed(TradesAttack, model, x, y, eps=recipe.eps_at(epoch), step_size=recipe.step_size,
                      steps=recipe.steps, mode=recipe.attack_mode, clip=recipe.clip)


@document
@dataclass
class Trades(_AdversarialPair):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + β·KL(f(x) ‖ f(x')), x' from the KL attack; with
    ``awp_gamma`` > 0, TRADES-AWP (Wu et al. 2020). The defaults are TRADES' own."""

    name: ClassVar[str] = "trades"
    eps: float = _eps(0.031)
    step_size: float = _step_size(0.007)
    steps: int = _steps(10)
    beta: float = _beta(6.0)
    attack_mode: str = _attack_mode()

    def adversarial(self, model, x, y, epoch):
        return _trades_attack(self, model, x, y, epoch)

    def objective(self, model, x, x_adv, y):
        return _trades_output(model, x, x_adv, y, self.beta)


def _trades_output(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, beta: float) -> RecipeOutput:
    logits_nat = model(x)
    return RecipeOutput(trades_loss(logits_nat, model(x_adv), y, beta), logits_nat.detach())


@document
@dataclass
class Fast(PerturbationRecipe):
    """Fast AT (Wong, Rice & Kolter 2020): CE on one FGSM step of size 1.25ε from a uniform start.
    The trainer stops early (``early_stop``) and restores the best epoch if PGD accuracy collapses
    (catastrophic overfitting)."""

    name: ClassVar[str] = "fast"
    early_stop: ClassVar[bool] = True
    step_size: float | None = option(None, "FGSM step size (pixels); None: 1.25·eps",
                                     check=functools.partial(positive_number, allow_none=True))
    attack_mode: str = _attack_mode()

    def loss(self, model, batch, *, epoch=0):
        batch = as_batch(batch)
        x, y = batch["image"], batch["label"]
        eps = self.eps_at(epoch)
        step = 1.25 * eps if self.step_size is None else self.step_size
        x_adv = _perturbed(FGSM, model, x, y, eps=eps, step_size=step, random_start=True, mode=self.attack_mode,
                           clip=self.clip)
        return _ce(model, x_adv, y)


@document
@dataclass
class NFGSM(PerturbationRecipe):
    """N-FGSM (de Jorge et al., NeurIPS 2022): CE at x' = clip(x + η + α·sign(∇ₓCE(x + η))) with
    η ~ U(−kε, kε) (x + η clipped to the box first) and no projection back to the ε-ball, so
    ‖x' − x‖∞ ≤ kε + α (3ε at the defaults). Single-step cost; the trainer's catastrophic-
    overfitting guard watches it like ``fast`` (``early_stop``)."""

    name: ClassVar[str] = "nfgsm"
    early_stop: ClassVar[bool] = True
    noise_scale: float = option(2.0, "N-FGSM noise radius k in multiples of eps: η ~ U(−kε, kε)", check=_non_negative)
    step_size: float | None = option(None, "N-FGSM step size α (pixels); None: eps",
                                     check=functools.partial(positive_number, allow_none=True))
    attack_mode: str = _attack_mode()

    def loss(self, model, batch, *, epoch=0):
        batch = as_batch(batch)
        x, y = batch["image"], batch["label"]
        eps = self.eps_at(epoch)
        step = eps if self.step_size is None else self.step_size
        noisy = random_start(x, eps=self.noise_scale * eps, clip=self.clip) if self.noise_scale else x
        # One sign step from x + η and no projection: an FGSM around x + η whose ball is the step itself.
        return _ce(model, _perturbed(FGSM, model, noisy, y, eps=step, step_size=step, mode=self.attack_mode,
                                     clip=self.clip), y)


_GRADALIGN_RULE_MAX_EPS = 16 / 255


def gradalign_lambda(eps: float) -> float:
    """GradAlign's weight λ at radius ``eps`` (pixels of [0, 1] images): the authors' log-linear
    rule 0.02·10^(255·ε/8), which gives their CIFAR-10 values (0.2 at 8/255, 2 at 16/255, 0.027 at
    1/255). The rule interpolates their runs at 1/255–16/255 and grows tenfold per 8/255, so beyond
    16/255 (λ = 2e7 at ε = 0.3) it is refused: set λ yourself there.

    Raises:
        ValueError: ``eps`` above 16/255.
    """
    eps = number(eps, "eps", minimum=0)
    if eps > _GRADALIGN_RULE_MAX_EPS * (1 + 1e-12):
        raise ValueError(f"lam: GradAlign's rule for λ covers eps <= 16/255 (the authors' CIFAR-10 range); at eps = "
                         f"{eps:.4g} set lam explicitly (the rule gives 2 at 16/255)")
    return 0.02 * 10 ** (eps * 255 / 8)


def gradient_misalignment(model: Callable[[Tensor], Tensor], x: Tensor, x_noisy: Tensor, y: Tensor) -> Tensor:
    """GradAlign's regulariser without λ: the mean over samples of 1 − cos(∇ₓCE(x), ∇ₓCE(x_noisy)),
    each sample's own input gradients, differentiable in the model's parameters (double backprop
    through both gradients). A sample with an all-zero gradient at either point has no direction;
    it is left out of the mean, as in the authors' code (but without their boolean indexing, a host
    sync). Scalar; 0 when every pair of gradients points the same way.

    Args:
        model: (B, ...) → (B, K) logits, in the mode it trains in. x, x_noisy: (B, ...) pixel-space
            inputs (GradAlign: x_noisy = clip(x + U(−ε, ε))). y: (B,) int64 labels.
    """
    grads = []
    for point in (x, x_noisy):
        point = point.detach().requires_grad_(True)
        ce = F.cross_entropy(_upcast(model(point)), y, reduction="sum")  # the sum: each sample's own gradient
        (grad,) = torch.autograd.grad(ce, point, create_graph=True)
        grads.append(_upcast(grad).flatten(1))
    g1, g2 = grads
    norms = g1.norm(dim=1) * g2.norm(dim=1)
    valid = norms > 0
    cosine = (g1 * g2).sum(1) / torch.where(valid, norms, 1.0)
    return torch.where(valid, 1.0 - cosine, 0.0).sum() / valid.sum().clamp_min(1)


@document
@dataclass
class GradAlign(PerturbationRecipe):
    """GradAlign (Andriushchenko & Flammarion, NeurIPS 2020): CE at the FGSM point (one step of
    ε from x, no random start) + λ·(1 − cos(∇ₓCE(x), ∇ₓCE(x + η))), η ~ U(−ε, ε) (x + η clipped to
    the box), see :func:`gradient_misalignment`; the two input gradients in train mode, as the
    FGSM step's ``attack_mode`` says for the attack. About three single-step passes per batch;
    λ = None follows :func:`gradalign_lambda` of the radius trained at."""

    name: ClassVar[str] = "gradalign"
    early_stop: ClassVar[bool] = True
    lam: float | None = option(None, "weight λ of GradAlign's gradient-misalignment term; None: the authors' rule "
                               "0.02·10^(255·eps/8) (0.2 at 8/255; up to eps 16/255)",
                               check=functools.partial(number, minimum=0, allow_none=True))
    attack_mode: str = _attack_mode()

    def __post_init__(self):
        super().__post_init__()
        if self.lam is None:
            gradalign_lambda(self.eps)  # the rule covers this radius (else: a ValueError naming lam)

    def loss(self, model, batch, *, epoch=0):
        batch = as_batch(batch)
        x, y = batch["image"], batch["label"]
        eps = self.eps_at(epoch)
        lam = gradalign_lambda(eps) if self.lam is None else self.lam
        out = _ce(model, _perturbed(FGSM, model, x, y, eps=eps, step_size=eps, mode=self.attack_mode, clip=self.clip), y)
        penalty = gradient_misalignment(model, x, random_start(x, eps=eps, clip=self.clip), y)
        return RecipeOutput(out.loss + lam * penalty, out.logits)


def mart_loss(logits_nat: Tensor, logits_adv: Tensor, labels: Tensor, beta: float) -> Tensor:
    """MART's objective (Wang et al., ICLR 2020), averaged over the batch:
    BCE(f(x'), y) + β·KL(f(x) ‖ f(x'))·(1 − p_y(x)), BCE = −log p_y(x') − log(1 − max_{k≠y} p_k(x')).

    log(1 − max_{k≠y} p_k) is computed as the log-sum-exp of the other classes' log-probabilities,
    exact and finite where the authors' code adds 1e-4 inside the log.

    Args:
        logits_nat: (B, K) logits of the clean batch. logits_adv: (B, K) of the attacked batch.
        labels: (B,) int64. beta: weight β (λ in the paper) of the KL term, MART's default 6.
    """
    log_adv, log_nat = F.log_softmax(_upcast(logits_adv), 1), F.log_softmax(_upcast(logits_nat), 1)
    true = labels[:, None]
    strongest_wrong = log_adv.scatter(1, true, float("-inf")).argmax(1, keepdim=True)
    log_rest = log_adv.scatter(1, strongest_wrong, float("-inf")).logsumexp(1)  # log(1 − p_{k*}(x'))
    bce = -log_adv.gather(1, true).squeeze(1) - log_rest
    kl = F.kl_div(log_adv, log_nat, reduction="none", log_target=True).sum(1)
    return (bce + beta * kl * (1.0 - log_nat.gather(1, true).squeeze(1).exp())).mean()


@document
@dataclass
class MART(PerturbationRecipe):
    """MART (Wang et al., ICLR 2020): :func:`mart_loss` on the clean batch and an L∞ PGD attack on
    CE from a random start.

    The authors start the attack at x + 0.001·N(0, I); fastsat's PGD starts uniformly in the ε-ball
    (as ``pgd`` does). The training accuracy is that of the attacked batch.
    """

    name: ClassVar[str] = "mart"
    step_size: float = _step_size(2 / 255)
    steps: int = _steps(10)
    beta: float = option(6.0, "weight β of MART's misclassification-weighted KL term", check=_non_negative)
    attack_mode: str = _attack_mode()

    def loss(self, model, batch, *, epoch=0):
        batch = as_batch(batch)
        x, y = batch["image"], batch["label"]
        x_adv = _pgd_attack(self, model, x, y, epoch)
        logits_nat, logits_adv = model(x), model(x_adv)
        return RecipeOutput(mart_loss(logits_nat, logits_adv, y, self.beta), logits_adv.detach())


@document
@dataclass
class Free(PerturbationRecipe):
    """Free AT (Shafahi et al. 2019): each batch is replayed ``replays`` times; the input gradient
    of every weight update advances δ by an L∞ step of ``eps`` (projected onto the ε-ball, clipped
    to ``clip``). δ carries over from batch to batch: it is kept at the largest batch seen, and a
    batch of B samples starts from (and advances) its first B rows, so a smaller last batch does
    not reset it. One epoch costs ``replays`` forward/backward passes per batch, so divide the
    epochs by ``replays`` for Free AT's budget."""

    name: ClassVar[str] = "free"
    replays: int = option(8, "replays m of each batch (weight updates per batch)", check=positive_int)
    _delta: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def loss(self, model, batch, *, epoch=0):
        raise TypeError("the 'free' recipe updates the weights `replays` times per batch; call Free.train_step(model, batch, optimizer)")

    def train_step(self, model, batch, optimizer, *, epoch=0, precision="fp32", scaler=None):
        batch = as_batch(batch)
        x, y = batch["image"], batch["label"]
        delta = self._carried(x)
        lo, hi = self.clip
        for _ in range(self.replays):
            x_adv = (x + delta).clamp_(lo, hi).requires_grad_(True)
            with _autocast(x.device, precision):
                out = _ce(model, x_adv, y)
            _backward_and_step(out.loss, optimizer, scaler, self.name)
            # A scaled fp16 gradient can overflow; its sign is all the step needs.
            grad = x_adv.grad.nan_to_num(nan=0.0)
            delta = pgd_step(x_adv.detach(), grad, x, step_size=self.eps_at(epoch), eps=self.eps_at(epoch), clip=self.clip) - x
        self._keep(delta.detach())
        return out

    def _carried(self, x: Tensor) -> Tensor:
        """The first B rows of the kept δ, on x's device and dtype (a resumed δ was loaded on the
        CPU); zeros for rows never seen, or when the image shape changed."""
        kept = self._delta
        if kept is None or kept.shape[1:] != x.shape[1:]:
            return torch.zeros_like(x)
        kept = kept[: x.shape[0]].to(x)
        if kept.shape[0] < x.shape[0]:
            kept = torch.cat([kept, torch.zeros_like(x[kept.shape[0] :])])
        return kept

    def _keep(self, delta: Tensor) -> None:
        """Store δ of a batch of B samples as the first B rows, keeping the rows beyond B."""
        kept = self._delta
        if kept is not None and kept.shape[1:] == delta.shape[1:] and kept.shape[0] > delta.shape[0]:
            delta = torch.cat([delta, kept[delta.shape[0] :].to(delta)])
        self._delta = delta

    def state_dict(self):
        return {"delta": self._delta}

    def load_state_dict(self, state):
        self._delta = state.get("delta")


@document
@dataclass
class SAT(PerturbationRecipe):
    """Saliency-based adversarial training (Mangla et al. 2020, METHODS.md §2):
    CE(f(clip(x − ε·s)), y), s = (1 − w)·n + w·S, w ~ Bernoulli(p_e), p_e = 1 − a^(e/10).

    ``maps`` names the batch entry S comes from: "boxes" → batch["box"], "masks" → batch["mask"],
    "saliency" → batch["saliency"] (e.g. teacher maps from :func:`fastsat.train.teacher_saliency`).
    """

    name: ClassVar[str] = "sat"
    maps: str = option("boxes", "where SAT's saliency map S comes from: the data's boxes or masks, or saliency "
                       "maps (a teacher's) in the batch", choices=SAT_MAPS)
    a: float = option(0.6, "SAT curriculum base a in p_e = 1 − a^(e/10), 0 < a <= 1",
                      check=functools.partial(number, minimum=0, exclusive_min=True, maximum=1))

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return ("image", "label", _MAP_KEYS[self.maps])

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
        return sat_perturb(x, eps=self.eps_at(epoch), p=sat_probability(epoch, self.a), clip=self.clip, **{self.maps: batch[key]})

    def loss(self, model, batch, *, epoch=0):
        batch = as_batch(batch)
        return _ce(model, self.perturb(batch, epoch=epoch), batch["label"])


def _coin() -> bool:
    """A fair coin from Python's generator: drawn on the host, so no device value is read back
    (the trainer seeds it and its checkpoints carry its state)."""
    return random.random() < 0.5


@document
@dataclass
class SATPlusPGD(SAT):
    """SAT + PGD (METHODS.md §2): per batch a fair coin picks either the SAT input around an
    unclipped uniform random start x₀ = x + U(−ε, ε), clip(x₀ − ε·s), or an L∞ PGD attack from a random
    start; loss CE on the result."""

    name: ClassVar[str] = "sat+pgd"
    step_size: float = _step_size(2 / 255)
    steps: int = _steps(5)
    attack_mode: str = _attack_mode()

    def loss(self, model, batch, *, epoch=0):
        batch = as_batch(batch)
        x, y = batch["image"], batch["label"]
        if _coin():
            # clip(x₀ − ε·s), clipped once (METHODS.md §2): x₀ = x + U(−ε, ε) stays unclipped, since a
            # box one ε wider than the run's never clips it.
            eps, (lo, hi) = self.eps_at(epoch), self.clip
            x_train = self.perturb(batch, epoch=epoch, start=random_start(x, eps=eps, clip=(lo - eps, hi + eps)))
        else:
            x_train = _pgd_attack(self, model, x, y, epoch)
        return _ce(model, x_train, y)


@document
@dataclass
class SATPlusTrades(SAT):
    """SAT + TRADES (METHODS.md §2): a fair coin per batch picks x' = clip(x − ε·s) or the TRADES
    KL attack; loss CE(f(x), y) + β·KL(f(x) ‖ f(x')), β = 1 by default as in SAT's code."""

    name: ClassVar[str] = "sat+trades"
    step_size: float = _step_size(2 / 255)
    steps: int = _steps(10)
    beta: float = _beta(1.0)
    attack_mode: str = _attack_mode()

    def loss(self, model, batch, *, epoch=0):
        batch = as_batch(batch)
        x, y = batch["image"], batch["label"]
        x_adv = self.perturb(batch, epoch=epoch) if _coin() else _trades_attack(self, model, x, y, epoch)
        return _trades_output(model, x, x_adv, y, self.beta)


@document
@dataclass
class GradNorm(Recipe):
    """Input-gradient-norm regularisation (double backprop, as in Etmann et al.):
    mean_i [CE_i + λ·‖∇_{x_i} CE_i‖²], the gradient per sample in pixel space.

    Etmann et al.'s code penalises the squared gradient norm of the batch-mean loss, λ_theirs/B²
    per sample: their MNIST setting (λ = 10, B = 100) is the default λ = 1e-3, and the λ_theirs =
    1000 at which they saw the model "start to degenerate" is λ = 0.1 here.
    """

    name: ClassVar[str] = "gradnorm"
    lam: float = option(1e-3, "weight λ of the squared input-gradient norm ‖∇ₓCE‖² (per pixel-space sample)",
                        check=_non_negative)

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
    cls.name: cls for cls in (Standard, PGDTraining, Trades, Fast, NFGSM, GradAlign, MART, Free, SAT, SATPlusPGD,
                               SATPlusTrades, GradNorm)
}


def make_recipe(recipe: str | Recipe, **options) -> Recipe:
    """A recipe object from its name (one of :data:`RECIPES`) and options, or ``recipe`` itself."""
    if isinstance(recipe, Recipe):
        if options:
            raise ValueError(f"recipe: options {sorted(options)} given with a Recipe object; set them on the object")
        return recipe
    cls = RECIPES[choice(recipe, "recipe", tuple(RECIPES))]
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [key for key in options if key not in known]
    if unknown:
        hints = "".join(nearest(key, known) for key in unknown)
        raise ValueError(f"recipe {recipe!r}: unknown options {unknown}{hints}; it takes {known}")
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
