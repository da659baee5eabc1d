"""FGSM and PGD (Madry et al. 2018) in L∞ and L2, with random start, restarts, CE/CW/DLR losses.

Every step is one :func:`fastsat.ops.pgd_step` (projection around the *clean* input, clip to the
box, alignment statistics of the gradient for free); random starts come from
:func:`fastsat.ops.random_start`. ε and step sizes are in pixel space (the space of x, box
``clip`` = [0, 1] by default); models that normalise inputs do it inside ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastsat import ops
from fastsat._checks import choice, number, positive_int
from fastsat.attacks.base import Attack, AttackResult, Candidate

__all__ = ["FGSM", "LOSSES", "PGD", "fgsm", "pgd"]

LOSSES = ("ce", "cw", "dlr")


class PGD(Attack):
    """Projected gradient descent, ``PGD(model, eps=8/255, ...)(x, y) -> AttackResult``.

    Args:
        model: (B, ...) pixel-space input → (B, K) logits.
        eps: radius ε of the ball around the clean x, pixel units (default 8/255, L∞).
        step_size: step α, pixel units (default 2/255); L∞ per element, L2 per sample.
        steps: gradient steps per restart (default 10).
        norm: "linf" (default) or "l2".
        random_start: start uniformly in the ε-ball (default True) instead of at x.
        restarts: independent runs (default 1); per sample the result of the best run is kept —
            a successful one first, then the highest loss — so more restarts never do worse.
        loss: "ce" (default), "cw" (margin max_{j≠y} z_j − z_y) or "dlr" (Croce & Hein; K ≥ 3;
            untargeted only).
        targeted: if True, y holds the target classes and the loss is minimised towards them.
        mode: train/eval mode of the model during the attack ("eval" default; None = as found);
            always restored, as are the parameters' ``requires_grad`` flags.
        clip: valid input box (lo, hi), default (0, 1).
        backend: fastsat.ops backend (None: $FASTSAT_BACKEND or "auto").

    Returns :class:`AttackResult`; ``stats`` are those of the last step of the kept run, for the
    ascent direction the step took (the loss gradient, negated when ``targeted``: ``dot`` changes
    sign, ``alignment`` and ``cosine`` do not).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 8 / 255,
        step_size: float = 2 / 255,
        steps: int = 10,
        norm: str = "linf",
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        targeted: bool = False,
        mode: str | None = "eval",
        clip: tuple[float, float] = (0.0, 1.0),
        backend: str | None = None,
    ):
        super().__init__(model, eps=eps, norm=norm, mode=mode, clip=clip, backend=backend)
        self.step_size = number(step_size, "step_size", minimum=0)
        self.steps = positive_int(steps, "steps")
        self.random_start = bool(random_start)
        self.restarts = positive_int(restarts, "restarts")
        if self.restarts > 1 and not self.random_start:
            raise ValueError("restarts > 1 needs random_start=True (otherwise every run is the same)")
        choice(loss, "loss", LOSSES)
        self.targeted = bool(targeted)
        if self.targeted and loss == "dlr":
            # Negated DLR towards the target is constant (−1) whenever the target ranks third.
            raise ValueError("loss: 'dlr' is untargeted only; use 'ce' or 'cw' with targeted=True")
        self.loss = loss

    def _run(self, x: torch.Tensor, y: torch.Tensor, *, need_success: bool) -> AttackResult:
        best = None
        # The statistics belong to the last step's gradient: computed there only, and not at all
        # when nothing reads them (a training loop's single run).
        stats_step = self.steps - 1 if need_success or self.restarts > 1 else -1
        stats = None
        for restart in range(self.restarts):
            if self.random_start:
                x_adv = ops.random_start(x, eps=self.eps, norm=self.norm, clip=self.clip, backend=self.backend)
            else:
                x_adv = x.clone()
            for step in range(self.steps):
                x_adv, step_stats = self._ascend(
                    x_adv, x, self.loss, first=restart == 0 and step == 0, negate=self.targeted,
                    return_stats=step == stats_step, y=y,
                )
                stats = step_stats if step == stats_step else stats
            if self.restarts == 1 and not need_success:
                return AttackResult(x_adv=x_adv, success=None, delta_norm=None, stats=stats)
            success, value = self._final(x_adv, y, self.loss, self.targeted)
            candidate = Candidate(x_adv, success, value, stats)
            best = candidate if best is None else best.merge(candidate)
        return AttackResult(x_adv=best.x_adv, success=best.success, delta_norm=None, stats=best.stats)


class FGSM(PGD):
    """Fast gradient sign method: one projected step, ``FGSM(model, eps=8/255)(x, y)``.

    Same arguments as :class:`PGD` with steps = restarts = 1. step_size defaults to ε (the
    classic FGSM); ``random_start=True, step_size=1.25 * eps`` is Fast-AT (Wong et al. 2020):
    uniform start in the ε-ball, one step, projection back onto the ball and the box.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 8 / 255,
        step_size: float | None = None,
        random_start: bool = False,
        norm: str = "linf",
        loss: str = "ce",
        targeted: bool = False,
        mode: str | None = "eval",
        clip: tuple[float, float] = (0.0, 1.0),
        backend: str | None = None,
    ):
        super().__init__(
            model, eps=eps, step_size=eps if step_size is None else step_size, steps=1, norm=norm,
            random_start=random_start, restarts=1, loss=loss, targeted=targeted, mode=mode, clip=clip,
            backend=backend,
        )


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> AttackResult:
    """Functional form of :class:`PGD`: ``pgd(model, x, y, eps=..., ...)``."""
    return PGD(model, **kwargs)(x, y)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> AttackResult:
    """Functional form of :class:`FGSM`: ``fgsm(model, x, y, eps=..., ...)``."""
    return FGSM(model, **kwargs)(x, y)
