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
L∞ start's projection and clip go through :func:`fastsat.ops.pgd_step`, a query's window is x ± ε
clipped, as that projection gives it. Random numbers come from torch's global generators
(``torch.manual_seed`` makes a run reproducible).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import nn

from fastsat import ops
from fastsat._checks import number, positive_int
from fastsat.attacks.base import Attack, AttackResult, Compaction, per_sample, take_rows
from fastsat.grad import objective_value

__all__ = ["Square", "p_schedule", "square"]

# Queries (out of 10,000) after which p halves once more (the authors' p_selection).
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
# Queries whose signs are drawn in one call: the same numbers as one draw per query (the generator
# fills a tensor in order), for a fraction of the per-call cost.
_SIGN_BLOCK = 64


class _Window(NamedTuple):
    """One query's windows, shared by the batch: side, top-left corner, the L2 second window's
    corner and whether the L2 pattern is transposed."""

    size: int
    row: int
    col: int
    row2: int
    col2: int
    transposed: bool


def p_schedule(query: int, n_queries: int, p_init: float) -> float:
    """The fraction p of pixels changed at 0-based ``query`` of ``n_queries`` (paper, Section 3;
    the schedule is written for 10,000 queries and rescaled as in the authors' code)."""
    scaled = int(query / n_queries * 10000)
    return p_init / 2 ** sum(scaled > q for q in _HALVINGS)


@functools.lru_cache(maxsize=64)
def _square_pattern(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The L2 update pattern of the paper (s × s, unit L2 norm): nested centred squares with
    weights 1/(k+1)² on each half, the halves of opposite sign. Cached per size (a query
    transposes it with probability 1/2); read-only."""

    def rectangles(rows: int, cols: int) -> torch.Tensor:
        pattern = torch.zeros(rows, cols, dtype=dtype, device=device)
        r, c = rows // 2, cols // 2
        for k in range(max(rows // 2 + 1, cols // 2 + 1)):
            pattern[max(r, 0) : min(r + 2 * k + 1, rows), max(c, 0) : min(c + 2 * k + 1, cols)] += 1.0 / (k + 1) ** 2
            r, c = r - 1, c - 1
        return pattern / pattern.norm()

    pattern = torch.cat([rectangles(size // 2, size), -rectangles(size - size // 2, size)])
    return pattern / pattern.norm()


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
        compact_every: every this many queries (default 20) the points already misclassified
            leave the batch, at one host sync; None queries every point to the end (a fooled
            point's queries then change nothing). The result is the same either way.
        mode: model mode during the attack ("eval" default; None = as found); always restored.
        clip: valid input box (lo, hi), default (0, 1). backend: fastsat.ops backend.

    Returns :class:`AttackResult` with ``stats`` None (no gradient). Points misclassified at x
    are returned unchanged, successful; the others get their first misclassified point, or the
    lowest-margin point found (x if no query lowered the clean margin). Each query costs one
    forward pass on the points still in the batch; host syncs: one per restart and per compaction
    (the windows are drawn on the CPU, one read per run).
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
        compact_every: int | None = 20,
        mode: str | None = "eval",
        clip: tuple[float, float] = (0.0, 1.0),
        backend: str | None = None,
    ):
        super().__init__(model, eps=eps, norm=norm, mode=mode, clip=clip, backend=backend)
        self.n_queries = positive_int(n_queries, "n_queries")
        self.p_init = number(p_init, "p_init", minimum=0, maximum=1, exclusive_min=True)
        self.restarts = positive_int(restarts, "restarts")
        self.compact_every = None if compact_every is None else positive_int(compact_every, "compact_every")

    def _check_inputs(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        super()._check_inputs(x, y)
        if x.dim() != 4:
            raise ValueError(f"x: Square needs images (B, C, H, W), got shape {tuple(x.shape)}")

    def _margin(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(margin Ψ^y − max_{j≠y} Ψ^j, misclassified) at x, one forward."""
        with torch.no_grad():
            logits = self.model(x)
        return objective_value(logits, "logit_diff", target=y), self._misclassified(logits, y)

    def _random_signs(self, batch: int | tuple, channels: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """(*batch, channels, 1, width) uniform ±1 in the dtype of ``like``."""
        leading = batch if isinstance(batch, tuple) else (batch,)
        bits = torch.randint(0, 2, (*leading, channels, 1, width), device=like.device)
        return (2 * bits - 1).to(like.dtype)

    def _cells(self, height: int, width: int) -> tuple[int, list[tuple[int, int]]]:
        """Side s = ⌊H/5⌋ (at least 1) and top-left corners of the L2 start's grid of s × s cells."""
        size = max(height // 5, 1)
        offset = (height - 5 * size) // 2
        rows, cols = range(offset, height - size + 1, size), range(offset, width - size + 1, size)
        return size, [(row, col) for row in rows for col in cols]

    def _plan(self, x: torch.Tensor) -> tuple[list[bool], list[_Window]]:
        """The run's shared random choices, drawn at once on the CPU and read in one go (no device
        sync): the L2 start's transpositions per cell and every query's windows."""
        height, width = x.shape[2:]
        cells = len(self._cells(height, width)[1]) if self.norm == "l2" else 0
        draws = torch.rand(cells + 5 * (self.n_queries - 1)).tolist()
        coins, draws = [u > 0.5 for u in draws[:cells]], draws[cells:]
        windows = []
        for query in range(self.n_queries - 1):
            p = p_schedule(query, self.n_queries, self.p_init)
            size = max(round(math.sqrt(p * height * width)), 1)
            if self.norm == "l2":
                size = max(size, 3)
                size += 1 - size % 2  # odd, so the pattern has a centre
            size = min(size, height, width)
            u = draws[5 * query : 5 * query + 5]
            rows, cols = height - size + 1, width - size + 1
            windows.append(_Window(size, int(u[0] * rows), int(u[1] * cols), int(u[2] * rows), int(u[3] * cols), u[4] > 0.5))
        return coins, windows

    def _start(self, x: torch.Tensor, coins: list[bool]) -> torch.Tensor:
        batch, channels, height, width = x.shape
        if self.norm == "linf":
            return self._project_onto_ball(x + self.eps * self._random_signs(batch, channels, width, x), x)
        size, cells = self._cells(height, width)
        delta = torch.zeros_like(x)
        for (row, col), transposed in zip(cells, coins, strict=True):
            pattern = _square_pattern(size, x.dtype, x.device)
            signs = self._random_signs(batch, channels, 1, x)
            delta[:, :, row : row + size, col : col + size] += (pattern.t() if transposed else pattern) * signs
        return self._l2_point(x, delta)

    def _l2_point(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x + ε·δ/‖δ‖₂ per sample, clipped (δ = 0 stays at x)."""
        lo, hi = self.clip
        norm = delta.flatten(1).norm(dim=1)
        scale = torch.where(norm > 0, self.eps / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
        return (x + per_sample(scale, x) * delta).clamp(lo, hi)

    def _propose_linf(self, x: torch.Tensor, window: tuple, steps: torch.Tensor) -> torch.Tensor:
        """The new values of the window: x + ``steps`` (±ε, in the accumulation dtype) there, the
        corner of the ball, clipped, computed as :func:`fastsat.ops.pgd_step`'s projection would."""
        lo, hi = self.clip
        acc = ops.accumulation_dtype(x.dtype)
        return (x[window].to(acc) + steps).clamp_(lo, hi).to(x.dtype)

    def _propose_l2(self, x: torch.Tensor, x_best: torch.Tensor, plan: _Window, signs: torch.Tensor) -> torch.Tensor:
        # The mass of window 1 and of a second window 2 is redistributed into window 1 along a
        # fresh pattern added to window 1's normalised old perturbation; window 2 is emptied.
        channels = x.shape[1]
        size = plan.size
        window = (slice(None), slice(None), slice(plan.row, plan.row + size), slice(plan.col, plan.col + size))
        window2 = (slice(None), slice(None), slice(plan.row2, plan.row2 + size), slice(plan.col2, plan.col2 + size))
        delta = x_best - x
        old = delta[window]
        old_norm = old.flatten(2).norm(dim=2)[..., None, None]
        mask = torch.zeros_like(delta)
        mask[window] = 1
        mask[window2] = 1
        windows_norm = (delta * mask).flatten(2).norm(dim=2)[..., None, None]
        total_norm = delta.flatten(1).norm(dim=1)
        spare = (self.eps**2 - total_norm**2).clamp_min(0) / channels
        pattern = _square_pattern(size, x.dtype, x.device)
        new = (pattern.t() if plan.transposed else pattern) * signs
        new = new + old / (old_norm + 1e-12)
        new_norm = new.flatten(2).norm(dim=2)[..., None, None]
        new = new / (new_norm + 1e-12) * (per_sample(spare, new) + windows_norm**2).sqrt()
        delta[window2] = 0
        delta[window] = new
        return self._l2_point(x, delta)

    def _single_run(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_best, its margin, fooled) after ``n_queries`` queries on points correctly classified
        at x. Every ``compact_every`` queries the fooled points leave the batch (one host sync);
        until then their queries change nothing. Each query draws its signs for the whole batch,
        so a point's draws do not depend on which points are still running."""
        batch, channels = x.shape[:2]
        coins, windows = self._plan(x)
        compaction = Compaction(batch, self.compact_every, x.device)
        x_best = self._start(x, coins)
        margin, fooled = self._margin(x_best, y)
        x_out, margin_out, fooled_out = torch.empty_like(x_best), torch.empty_like(margin), torch.empty_like(fooled)

        def settle() -> None:
            x_out.index_copy_(0, compaction.rows, x_best)
            margin_out.index_copy_(0, compaction.rows, margin)
            fooled_out.index_copy_(0, compaction.rows, fooled)

        acc = ops.accumulation_dtype(x.dtype)
        for query, plan in enumerate(windows):
            if compaction.due(query + 1, self.n_queries):
                settle()
                keep = compaction.keep(fooled)
                if keep.numel() == 0:
                    return x_out, margin_out, fooled_out
                if keep.numel() < x.shape[0]:
                    x, y, x_best, margin, fooled = take_rows(keep, x, y, x_best, margin, fooled)
            if query % _SIGN_BLOCK == 0:  # signs for the whole batch, so a point's draws never depend on the others
                block = self._random_signs((min(_SIGN_BLOCK, len(windows) - query), batch), channels, 1, x)
                if self.norm == "linf":
                    block = self.eps * block.to(acc)  # the ±ε steps
            signs = block[query % _SIGN_BLOCK]
            if x.shape[0] < batch:
                signs = signs[compaction.rows]
            if self.norm == "linf":
                window = (slice(None), slice(None), slice(plan.row, plan.row + plan.size),
                          slice(plan.col, plan.col + plan.size))
                patch = self._propose_linf(x, window, signs)
                x_new = x_best.clone()
                x_new[window] = patch
            else:
                x_new = self._propose_l2(x, x_best, plan, signs)
            margin_new, fooled_new = self._margin(x_new, y)
            improved = ((margin_new < margin) | fooled_new) & ~fooled  # a fooled point is finished
            if self.norm == "linf":  # only the window changed
                x_best[window] = torch.where(per_sample(improved, patch), patch, x_best[window])
            else:
                x_best = torch.where(per_sample(improved, x_new), x_new, x_best)
            margin = torch.where(improved, margin_new, margin)
            fooled = fooled | (improved & fooled_new)
        settle()
        return x_out, margin_out, fooled_out

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
            # Per point the run's result if it broke the point or lowered its margin further
            # (torch.where and index_copy_, not boolean indexing: no more host syncs).
            keep = fooled | (margin_run < margin[robust])
            x_adv.index_copy_(0, robust, torch.where(per_sample(keep, x_run), x_run, x_adv[robust]))
            margin.index_copy_(0, robust, torch.where(keep, margin_run, margin[robust]))
            success.index_copy_(0, robust, fooled)
        return AttackResult(x_adv=x_adv, success=success, delta_norm=None, stats=None)


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> AttackResult:
    """Functional form of :class:`Square`."""
    return Square(model, **kwargs)(x, y)
