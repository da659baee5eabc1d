"""Square attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): gradient-free random search
in L∞ and L2, as in the authors' code (the version AutoAttack runs).

Each query changes the perturbation on one random square window of side s (the same window for
the whole batch, random signs per sample and channel) and keeps the change for the samples whose
margin Ψ^y − max_{j≠y} Ψ^j it lowered. The window shrinks with the paper's schedule of p, the
fraction of pixels changed: p_init halves at queries 10, 50, 200, 500, 1000, 2000, 4000, 6000 and
8000 of a 10,000-query budget (rescaled to ``n_queries``), s = round(√(p·H·W)).

L∞: start from vertical stripes x ± ε (a random sign per sample, channel and column); a query sets
the window to x ± ε. L2: start from a grid of the paper's centred "square" patterns; a query moves
the perturbation mass of a second window into the first (total norm ε). Only points not yet
misclassified are queried; a point stops at its first misclassification. ε is in pixel space; the
L∞ projection and clip go through :func:`fastsat.ops.pgd_step`. Random numbers come from torch's
global generators (``torch.manual_seed`` makes a run reproducible).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastsat._checks import number, positive_int
from fastsat.attacks.base import Attack, AttackResult, per_sample
from fastsat.grad import objective_value

__all__ = ["Square", "p_schedule", "square"]

# Queries (out of 10,000) after which p halves once more (the authors' p_selection).
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(query: int, n_queries: int, p_init: float) -> float:
    """The fraction p of pixels changed at 0-based ``query`` of ``n_queries`` (paper, Section 3;
    the schedule is written for 10,000 queries and rescaled as in the authors' code)."""
    scaled = int(query / n_queries * 10000)
    return p_init / 2 ** sum(scaled > q for q in _HALVINGS)


def _square_pattern(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The L2 update pattern of the paper (s × s, unit L2 norm): nested centred squares with
    weights 1/(k+1)² on each half, the halves of opposite sign; transposed with probability 1/2."""

    def rectangles(rows: int, cols: int) -> torch.Tensor:
        pattern = torch.zeros(rows, cols, dtype=dtype, device=device)
        r, c = rows // 2, cols // 2
        for k in range(max(rows // 2 + 1, cols // 2 + 1)):
            pattern[max(r, 0) : min(r + 2 * k + 1, rows), max(c, 0) : min(c + 2 * k + 1, cols)] += 1.0 / (k + 1) ** 2
            r, c = r - 1, c - 1
        return pattern / pattern.norm()

    pattern = torch.cat([rectangles(size // 2, size), -rectangles(size - size // 2, size)])
    pattern = pattern / pattern.norm()
    return pattern.t() if torch.rand(()) > 0.5 else pattern


class Square(Attack):
    """``Square(model, eps=8/255, n_queries=5000)(x, y) -> AttackResult``.

    Args:
        model: (B, C, H, W) pixel-space images → (B, K) logits. Only forward passes are used.
        eps: ball radius in pixel units (default 8/255). norm: "linf" (default) or "l2".
        n_queries: forward passes per point and restart (default 5000, as in AutoAttack), the
            start included.
        p_init: initial fraction of pixels per window (default 0.8, the paper's L∞ setting for
            5000 queries on CIFAR-10; 0.1 is theirs for L2 on ImageNet).
        restarts: runs, each on the points still correctly classified (default 1).
        mode: model mode during the attack ("eval" default; None = as found); always restored.
        clip: valid input box (lo, hi), default (0, 1). backend: fastsat.ops backend.

    Returns :class:`AttackResult` with ``stats`` None (no gradient). Points misclassified at x
    are returned unchanged, successful; the others get their first misclassified point, or the
    lowest-margin point found (x if no query lowered the clean margin). Each query
    costs one forward pass on the points still correctly classified and one host sync (to select
    them and to stop once none is left).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 8 / 255,
        n_queries: int = 5000,
        norm: str = "linf",
        p_init: float = 0.8,
        restarts: int = 1,
        mode: str | None = "eval",
        clip: tuple[float, float] = (0.0, 1.0),
        backend: str | None = None,
    ):
        super().__init__(model, eps=eps, norm=norm, mode=mode, clip=clip, backend=backend)
        self.n_queries = positive_int(n_queries, "n_queries")
        self.p_init = number(p_init, "p_init", minimum=0, maximum=1, exclusive_min=True)
        self.restarts = positive_int(restarts, "restarts")

    def _check_inputs(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        super()._check_inputs(x, y)
        if x.dim() != 4:
            raise ValueError(f"x: Square needs images (B, C, H, W), got shape {tuple(x.shape)}")

    def _margin(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(margin Ψ^y − max_{j≠y} Ψ^j, misclassified) at x, one forward."""
        with torch.no_grad():
            logits = self.model(x)
        return -objective_value(logits, "cw", y=y), self._misclassified(logits, y)

    def _random_signs(self, batch: int, channels: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """(batch, channels, 1, width) uniform ±1 in the dtype of ``like``."""
        bits = torch.randint(0, 2, (batch, channels, 1, width), device=like.device)
        return (2 * bits - 1).to(like.dtype)

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        if self.norm == "linf":
            return self._project_onto_ball(x + self.eps * self._random_signs(batch, channels, width, x), x)
        size = max(height // 5, 1)
        offset = (height - 5 * size) // 2
        delta = torch.zeros_like(x)
        for row in range(offset, height - size + 1, size):
            for col in range(offset, width - size + 1, size):
                signs = self._random_signs(batch, channels, 1, x)
                delta[:, :, row : row + size, col : col + size] += _square_pattern(size, x.dtype, x.device) * signs
        return self._l2_point(x, delta)

    def _l2_point(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x + ε·δ/‖δ‖₂ per sample, clipped (δ = 0 stays at x)."""
        lo, hi = self.clip
        norm = delta.flatten(1).norm(dim=1)
        scale = torch.where(norm > 0, self.eps / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
        return (x + per_sample(scale, x) * delta).clamp(lo, hi)

    def _window(self, query: int, x: torch.Tensor) -> tuple[int, int, int]:
        """Side s and top-left corner of this query's window (drawn on the CPU: no sync)."""
        height, width = x.shape[2:]
        p = p_schedule(query, self.n_queries, self.p_init)
        size = max(round(math.sqrt(p * height * width)), 1)
        if self.norm == "l2":
            size = max(size, 3)
            size += 1 - size % 2  # odd, so the pattern has a centre
        size = min(size, height, width)
        row = int(torch.randint(0, height - size + 1, ()))
        col = int(torch.randint(0, width - size + 1, ()))
        return size, row, col

    def _propose(self, query: int, x: torch.Tensor, x_best: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        size, row, col = self._window(query, x)
        window = (slice(None), slice(None), slice(row, row + size), slice(col, col + size))
        if self.norm == "linf":
            step = torch.zeros_like(x_best)
            step[window] = 2 * self.eps * self._random_signs(batch, channels, 1, x)
            return self._project_onto_ball(x_best + step, x)
        # L2: the mass of window 1 and of a second window 2 is redistributed into window 1 along a
        # fresh pattern added to window 1's normalised old perturbation; window 2 is emptied.
        _, row2, col2 = self._window(query, x)
        window2 = (slice(None), slice(None), slice(row2, row2 + size), slice(col2, col2 + size))
        delta = x_best - x
        old = delta[window]
        old_norm = old.flatten(2).norm(dim=2)[..., None, None]
        mask = torch.zeros_like(delta)
        mask[window] = 1
        mask[window2] = 1
        windows_norm = (delta * mask).flatten(2).norm(dim=2)[..., None, None]
        total_norm = delta.flatten(1).norm(dim=1)
        spare = (self.eps**2 - total_norm**2).clamp_min(0) / channels
        new = _square_pattern(size, x.dtype, x.device) * self._random_signs(batch, channels, 1, x)
        new = new + old / (old_norm + 1e-12)
        new_norm = new.flatten(2).norm(dim=2)[..., None, None]
        new = new / (new_norm + 1e-12) * (per_sample(spare, new) + windows_norm**2).sqrt()
        delta = delta.clone()
        delta[window2] = 0
        delta[window] = new
        return self._l2_point(x, delta)

    def _single_run(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_best, its margin, fooled) after ``n_queries`` queries on points correctly classified at x."""
        x_best = self._start(x)
        margin, fooled = self._margin(x_best, y)
        for query in range(self.n_queries - 1):
            active = (~fooled).nonzero().squeeze(1)  # host sync
            if active.numel() == 0:
                break
            x_a, x_best_a = x[active], x_best[active]
            x_new = self._propose(query, x_a, x_best_a)
            margin_new, fooled_new = self._margin(x_new, y[active])
            improved = (margin_new < margin[active]) | fooled_new
            x_best[active] = torch.where(per_sample(improved, x_new), x_new, x_best_a)
            margin[active] = torch.where(improved, margin_new, margin[active])
            fooled[active] = torch.where(improved, fooled_new, False)
        return x_best, margin, fooled

    def _run(self, x: torch.Tensor, y: torch.Tensor, *, need_success: bool) -> AttackResult:
        logits = self._clean_logits(x, y)
        success = self._misclassified(logits, y)
        margin = -objective_value(logits, "cw", y=y)
        x_adv = x.clone()
        for _ in range(self.restarts):
            robust = (~success).nonzero().squeeze(1)  # host sync
            if robust.numel() == 0:
                break
            x_run, margin_run, fooled = self._single_run(x[robust], y[robust])
            # Per point the run's result if it broke the point or lowered its margin further.
            keep = fooled | (margin_run < margin[robust])
            take = robust[keep]
            x_adv[take] = x_run[keep]
            margin[take] = margin_run[keep]
            success[robust[fooled]] = True
        return AttackResult(x_adv=x_adv, success=success, delta_norm=None, stats=None)


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> AttackResult:
    """Functional form of :class:`Square`."""
    return Square(model, **kwargs)(x, y)
