"""Carlini–Wagner L2 (Carlini & Wagner, IEEE S&P 2017), untargeted: a minimal-L2 attack.

The point is written x' = m + r·tanh(w) with m, r the centre and half-width of the box ``clip``,
so x' never leaves the box and w is unconstrained. Starting from x (w₀ = atanh((x − m)/r·(1 −
1e-6))), Adam (lr 0.01) minimises, per sample,

    ‖x' − x‖₂² + c·max(Ψ^y(x') − max_{j≠y} Ψ^j(x') + κ, 0)

for ``steps`` iterations, and a binary search over c (``binary_search_steps`` rounds from c =
``initial_const``; ×10 until a round succeeds, then bisection) finds, per sample, the smallest c
that still gives an adversarial point. Over all rounds the adversarial point (prediction ≠ y
with y's logit raised by κ) of smallest ‖x' − x‖₂ is kept. As in the authors' code, a round
stops early once the total loss has not fallen by 0.01% over a tenth of its steps. Units are
pixel space; models that normalise inputs do it inside ``forward``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastsat import ops
from fastsat._checks import flag, number, positive_int
from fastsat.attacks.base import Attack, AttackResult, per_sample
from fastsat.grad import objective_value

__all__ = ["CW", "cw"]

_UPPER = 1e10  # "no successful c yet" in the binary search
_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8  # Adam's defaults


class CW(Attack):
    """``CW(model, steps=1000, binary_search_steps=9)(x, y) -> AttackResult``.

    Args:
        model: (B, ...) pixel-space input → (B, K) logits.
        eps: None (default: unbounded, like DeepFool) or an L2 radius in pixel units at which
            success is reported: a point counts as broken if the smallest perturbation found has
            ‖δ‖₂ ≤ ε.
        confidence: κ ≥ 0, the logit margin by which the point must be misclassified (default 0).
        initial_const: the first c (default 1e-3). binary_search_steps: rounds of the search over
            c (default 9). steps: Adam iterations per round (default 1000). lr: Adam's step
            (default 0.01, in tanh space).
        abort_early: stop a round once its loss stalls (default True; one host sync per tenth of
            the steps).
        mode: model mode during the attack ("eval" default; None = as found); always restored.
        clip: valid input box (lo, hi) with lo < hi, default (0, 1).

    Returns :class:`AttackResult`: ``x_adv`` is the smallest adversarial point found where
    (with ε) its norm is at most ε, else x; ``success`` marks those points (and the points
    misclassified at x, returned unchanged and not attacked); ``delta_norm`` is the L2 norm of
    the smallest adversarial perturbation found, inf where none was — it may exceed ε; ``stats``
    None.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float | None = None,
        confidence: float = 0.0,
        initial_const: float = 1e-3,
        binary_search_steps: int = 9,
        steps: int = 1000,
        lr: float = 0.01,
        abort_early: bool = True,
        mode: str | None = "eval",
        clip: tuple[float, float] = (0.0, 1.0),
    ):
        super().__init__(model, eps=eps, norm="l2", mode=mode, clip=clip)
        if self.clip[0] == self.clip[1]:
            raise ValueError(f"clip: CW needs lo < hi, got {clip!r}")
        self.confidence = number(confidence, "confidence", minimum=0)
        self.initial_const = number(initial_const, "initial_const", minimum=0, exclusive_min=True)
        self.binary_search_steps = positive_int(binary_search_steps, "binary_search_steps")
        self.steps = positive_int(steps, "steps")
        self.lr = number(lr, "lr", minimum=0, exclusive_min=True)
        self.abort_early = flag(abort_early, "abort_early")

    def _attack_round(
        self, x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, const: torch.Tensor, first: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One round at constants ``const`` (B,): (smallest adversarial point, its squared L2
        norm, inf where none)."""
        lo, hi = self.clip
        centre, half = (hi + lo) / 2, (hi - lo) / 2
        acc = w0.dtype
        x_acc = x.to(acc)
        modifier = torch.zeros_like(w0)
        moment1, moment2 = torch.zeros_like(w0), torch.zeros_like(w0)
        best = x.clone()
        best_sq = torch.full((x.shape[0],), torch.inf, dtype=acc, device=x.device)
        check_every = max(self.steps // 10, 1)
        previous = math.inf
        for step in range(self.steps):
            modifier.requires_grad_(True)
            x_new = (centre + half * torch.tanh(w0 + modifier)).to(x.dtype)
            logits = self.model(x_new)
            dist_sq = (x_new.to(acc) - x_acc).flatten(1).square().sum(1)
            # objective "cw" is max_{j≠y} Ψ^j − Ψ^y: the margin to push below −κ.
            margin = -objective_value(logits, "cw", y=y)
            loss = (dist_sq + const * (margin + self.confidence).clamp_min(0)).sum()
            (grad,) = torch.autograd.grad(loss, modifier)
            modifier = modifier.detach()
            if first and step == 0:
                self._warn_suspicious(logits.detach(), grad)
            with torch.no_grad():
                adversarial = margin < -self.confidence if self.confidence > 0 else self._misclassified(logits, y)
                better = adversarial & (dist_sq < best_sq)
                best = torch.where(per_sample(better, x), x_new, best)
                best_sq = torch.where(better, dist_sq, best_sq)
                # Adam (torch.optim.Adam's update, written out: its step counter would cost a
                # host sync per step).
                moment1.lerp_(grad, 1 - _BETA1)
                moment2.mul_(_BETA2).addcmul_(grad, grad, value=1 - _BETA2)
                correction1, correction2 = 1 - _BETA1 ** (step + 1), 1 - _BETA2 ** (step + 1)
                denom = (moment2 / correction2).sqrt_().add_(_ADAM_EPS)
                modifier.addcdiv_(moment1, denom, value=-self.lr / correction1)
            if self.abort_early and (step + 1) % check_every == 0:
                total = loss.item()  # host sync, once per tenth of the steps
                if total > previous * 0.9999:
                    break
                previous = total
        return best, best_sq

    def _run(self, x: torch.Tensor, y: torch.Tensor, *, need_success: bool) -> AttackResult:
        logits = self._clean_logits(x, y)
        acc = ops.accumulation_dtype(x.dtype)
        misclassified = self._misclassified(logits, y)
        min_norm = torch.where(misclassified, 0.0, torch.inf).to(acc)
        x_best = x.clone()
        todo = (~misclassified).nonzero().squeeze(1)  # host sync
        if todo.numel() > 0:
            found, found_norm = self._search(x[todo], y[todo])
            x_best[todo] = found
            min_norm[todo] = found_norm
        success = torch.isfinite(min_norm) if self.eps is None else min_norm <= self.eps
        x_adv = torch.where(per_sample(success, x), x_best, x)
        return AttackResult(x_adv=x_adv, success=success, delta_norm=min_norm, stats=None)

    def _search(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The binary search over c on points correctly classified at x: (smallest adversarial
        point, its L2 norm, inf where none)."""
        lo, hi = self.clip
        acc = ops.accumulation_dtype(x.dtype)
        centre, half = (hi + lo) / 2, (hi - lo) / 2
        w0 = torch.atanh(((x.to(acc) - centre) / half) * (1 - 1e-6))
        const = torch.full((x.shape[0],), self.initial_const, dtype=acc, device=x.device)
        lower, upper = torch.zeros_like(const), torch.full_like(const, _UPPER)
        best, best_sq = x.clone(), torch.full_like(const, torch.inf)
        for search in range(self.binary_search_steps):
            found, found_sq = self._attack_round(x, y, w0, const, first=search == 0)
            succeeded = torch.isfinite(found_sq)
            better = found_sq < best_sq
            best = torch.where(per_sample(better, x), found, best)
            best_sq = torch.where(better, found_sq, best_sq)
            # Success: c can shrink (bisect down); failure: c must grow (×10 until a success, then bisect up).
            upper = torch.where(succeeded, torch.minimum(upper, const), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, const))
            bracketed = upper < _UPPER
            const = torch.where(bracketed, (lower + upper) / 2, const * 10)
        return best, best_sq.sqrt()


def cw(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> AttackResult:
    """Functional form of :class:`CW`."""
    return CW(model, **kwargs)(x, y)
