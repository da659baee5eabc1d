"""DeepFool (Moosavi-Dezfooli et al. 2016), L2, multi-class, refined by bisection.

Measures the empirical boundary distance ρ(x) = min ‖e‖₂ such that the predicted class of
x + e differs from that of x (METHODS.md §1, Etmann et al.): DeepFool's linearised steps find an
adversarial point x_df; a bisection along the segment x → x_df then finds the boundary crossing,
and ρ = t*·‖x_df − x‖. ρ is in pixel units (the space of x); models that normalise inputs do it
inside ``forward``. There is no ε: DeepFool is a minimal-norm attack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastsat._checks import integer, number, positive_int
from fastsat.attacks.base import Attack, AttackResult, per_sample
from fastsat.grad import batched_logit_grads
from fastsat.ops import accumulation_dtype

__all__ = ["DeepFool", "DeepFoolResult", "deepfool"]


@dataclass
class DeepFoolResult(AttackResult):
    """:class:`AttackResult` plus ``iterations`` (B,) int64: DeepFool steps each sample took.

    ``delta_norm`` is the boundary distance ρ (pixel units; float32, float64 for float64 x), inf
    where DeepFool failed (``success`` False); ``x_adv`` is then DeepFool's last iterate.
    """

    iterations: torch.Tensor | None = None


class DeepFool(Attack):
    """``DeepFool(model, steps=50, overshoot=0.02)(x, y=None) -> DeepFoolResult``.

    Args:
        model: (B, ...) pixel-space input → (B, K) logits, K ≥ 2.
        steps: maximum DeepFool iterations (default 50).
        overshoot: each iterate is x + (1 + overshoot)·r_total (default 0.02), clipped to the box;
            each step r goes 1e-4 pixel units past the linearised boundary, as in the original code.
        candidates: classes considered per sample, the top ones of the clean logits including the
            predicted class (default 10, at most K), as in foolbox.
        bisection_steps: halvings of the segment x → x_df (default 20: ρ to within 2⁻²⁰ of
            ‖x_df − x‖, about 1e-6 relative).
        chunk_size: candidate gradients computed per batched backward (None: all at once).
        mode: model mode during the attack ("eval" default; None = as found); always restored.
        clip: valid input box (lo, hi), default (0, 1).

    y is optional and only validated: ρ is measured to the nearest change of the *predicted*
    class (Etmann's definition), also for samples that are misclassified at x. Each DeepFool
    iteration runs on the whole batch (finished samples stay put) and costs one forward, one
    batched backward over the candidates and one host sync (to stop once every sample crossed);
    the bisection costs one forward per halving.
    """

    label_required = False

    def __init__(
        self,
        model: nn.Module,
        *,
        steps: int = 50,
        overshoot: float = 0.02,
        candidates: int = 10,
        bisection_steps: int = 20,
        chunk_size: int | None = None,
        mode: str | None = "eval",
        clip: tuple[float, float] = (0.0, 1.0),
    ):
        super().__init__(model, eps=None, norm="l2", mode=mode, clip=clip)
        self.steps = positive_int(steps, "steps")
        self.overshoot = number(overshoot, "overshoot", minimum=0)
        self.candidates = integer(candidates, "candidates", minimum=2)
        self.bisection_steps = positive_int(bisection_steps, "bisection_steps")
        self.chunk_size = positive_int(chunk_size, "chunk_size", allow_none=True)

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x).argmax(dim=1)

    def _run(self, x: torch.Tensor, y: torch.Tensor | None, *, need_success: bool) -> DeepFoolResult:
        lo, hi = self.clip
        clean_logits = self._clean_logits(x, y)
        num_classes = clean_logits.shape[1]
        ranked = clean_logits.topk(min(self.candidates, num_classes), dim=1).indices
        orig, others = ranked[:, 0], ranked[:, 1:]
        # seeds[c, b] = e_{others[b, c]} − e_{orig[b]}: one batched backward gives ∇(Ψ^k − Ψ^{i*}) for all k.
        seeds = F.one_hot(others.t(), num_classes) - F.one_hot(orig, num_classes)[None]

        r_total = torch.zeros_like(x)
        x_i = x.clone()
        active = torch.ones_like(orig, dtype=torch.bool)
        iterations = torch.zeros_like(orig)
        for it in range(self.steps):
            x_in = x_i.detach().requires_grad_(True)
            logits = self.model(x_in)
            active &= logits.argmax(dim=1) == orig
            if not bool(active.any()):
                break
            w = batched_logit_grads(logits, x_in, seeds, self.chunk_size).to(x.dtype)  # (B, n-1, ...)
            if it == 0:
                self._warn_suspicious(clean_logits, w)
            logits = logits.detach()
            f = logits.gather(1, others) - logits.gather(1, orig[:, None])  # < 0 while orig is predicted
            w_norm = w.flatten(2).norm(dim=2)
            distance = torch.where(w_norm > 0, f.abs() / w_norm.clamp_min(torch.finfo(w_norm.dtype).tiny), torch.inf)
            nearest = distance.argmin(dim=1)
            w_l = w[torch.arange(x.shape[0], device=x.device), nearest]
            w_l_norm = w_norm.gather(1, nearest[:, None]).squeeze(1)
            # Step onto the linearised boundary of the nearest class and 1e-4 pixel units beyond it,
            # r = (|f|/‖w‖ + 1e-4)·w/‖w‖ as in the original code: the step is then invariant to a
            # rescaling of the logits (a margin in logit units would not be).
            safe_norm = w_l_norm.clamp_min(torch.finfo(w_l_norm.dtype).tiny)
            coef = (distance.gather(1, nearest[:, None]).squeeze(1) + 1e-4) / safe_norm
            movable = active & (w_l_norm > 0)
            r_total = r_total + per_sample(torch.where(movable, coef, 0.0), x) * w_l
            iterations += movable
            x_i = (x + (1 + self.overshoot) * r_total).clamp(lo, hi)

        found = self._predict(x_i) != orig
        direction = x_i - x
        t_lo = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        t_hi = torch.ones_like(t_lo)
        # x + t·d stays in the box for t ∈ [0, 1] (the box is convex and holds both ends).
        for _ in range(self.bisection_steps):
            t_mid = (t_lo + t_hi) / 2
            crossed = self._predict(x + per_sample(t_mid, x) * direction) != orig
            t_hi = torch.where(crossed, t_mid, t_hi)
            t_lo = torch.where(crossed, t_lo, t_mid)
        x_boundary = x + per_sample(t_hi, x) * direction
        success = found & (self._predict(x_boundary) != orig)
        x_adv = torch.where(per_sample(success, x), x_boundary, x_i)
        rho = (x_adv - x).flatten(1).norm(dim=1)
        rho = torch.where(success, rho, torch.inf).to(accumulation_dtype(x.dtype))
        return DeepFoolResult(x_adv=x_adv, success=success, delta_norm=rho, stats=None, iterations=iterations)


def deepfool(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> DeepFoolResult:
    """Functional form of :class:`DeepFool`."""
    return DeepFool(model, **kwargs)(x, y)
