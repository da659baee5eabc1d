"""The TRADES inner attack (Zhang et al. 2019): maximise KL(f(x) ‖ f(x')) over the L∞ ball.

x' starts at x + 0.001·N(0, I) (as in the authors' code) and takes K sign-gradient steps, each one
:func:`fastsat.ops.pgd_step` (projection around the clean x, clip to the box). ε and step size are
in pixel space; models that normalise inputs do it inside ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastsat._checks import number, positive_int
from fastsat.attacks.base import Attack, AttackResult

__all__ = ["TradesAttack", "trades_attack"]


class TradesAttack(Attack):
    """``TradesAttack(model, eps=0.031, step_size=0.007, steps=10)(x, y=None) -> AttackResult``.

    Args:
        model: (B, ...) pixel-space input → (B, K) logits.
        eps: L∞ radius in pixel units (default 0.031, TRADES' CIFAR-10 setting).
        step_size: sign-step size in pixel units (default 0.007).
        steps: number of steps K (default 10).
        init_std: standard deviation of the Gaussian start around x (default 0.001, pixel units).
        mode: model mode during the attack ("eval" default, as TRADES does; None = as found);
            always restored.
        clip: valid input box (lo, hi), default (0, 1). backend: fastsat.ops backend.

    y is optional and only used for ``success`` (prediction ≠ y); without it success means the
    prediction moved away from the clean one. The clean logits come from one extra forward pass.
    """

    label_required = False

    def __init__(
        self,
        model: nn.Module,
        eps: float = 0.031,
        step_size: float = 0.007,
        steps: int = 10,
        *,
        init_std: float = 0.001,
        mode: str | None = "eval",
        clip: tuple[float, float] = (0.0, 1.0),
        backend: str | None = None,
    ):
        super().__init__(model, eps=eps, norm="linf", mode=mode, clip=clip, backend=backend)
        self.step_size = number(step_size, "step_size", minimum=0)
        self.steps = positive_int(steps, "steps")
        self.init_std = number(init_std, "init_std", minimum=0)

    def _run(self, x: torch.Tensor, y: torch.Tensor | None, *, need_success: bool) -> AttackResult:
        with torch.no_grad():
            clean_logits = self.model(x)
        # Not clipped, as in TRADES: the first pgd_step projects and clips.
        x_adv = x + self.init_std * torch.randn_like(x)
        # The statistics belong to the last step's gradient: computed there only, and not at all
        # when nothing reads them (a training loop).
        stats_step, stats = (self.steps - 1 if need_success else -1), None
        for step in range(self.steps):
            x_adv, step_stats = self._ascend(
                x_adv, x, "kl", first=step == 0, return_stats=step == stats_step,
                clean_logits=clean_logits, y=y,
            )
            stats = step_stats if step == stats_step else stats
        if not need_success:
            return AttackResult(x_adv=x_adv, success=None, delta_norm=None, stats=stats)
        reference = clean_logits.argmax(dim=1) if y is None else y
        success, _ = self._final(x_adv, reference, "kl", clean_logits=clean_logits)
        return AttackResult(x_adv=x_adv, success=success, delta_norm=None, stats=stats)


def trades_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> AttackResult:
    """Functional form of :class:`TradesAttack`."""
    return TradesAttack(model, **kwargs)(x, y)
