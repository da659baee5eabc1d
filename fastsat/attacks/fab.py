"""FAB-T (Croce & Hein, ICML 2020, "Minimally distorted adversarial examples with a fast adaptive
boundary attack"), targeted, L∞ and L2: the version AutoAttack runs.

Per target class t, each iteration linearises the decision function Ψ^t − Ψ^y at the iterate
x₁, projects both x₁ and the clean x₀ onto that hyperplane within the box (the minimal-norm
point of the box on it, :func:`project_onto_hyperplane`), and moves to the convex combination
(1 − α)(x₁ + η·d₁) + α(x₀ + η·d₂), α = min(‖d₁‖/(‖d₁‖ + ‖d₂‖), α_max), clipped to the box. An
adversarial iterate is recorded if it is the smallest found, then pulled back towards x₀
(x₀ + β(x₁ − x₀)), so the iterates close in on the boundary from both sides.

ε is the acceptance threshold of the evaluation, not a constraint on the search: the result is
the smallest adversarial point found where its norm is at most ε (or any, with ε None). Units
are pixel space; models that normalise inputs do it inside ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastsat import ops
from fastsat._checks import number, positive_int
from fastsat.attacks.base import (
    Attack,
    AttackResult,
    Compaction,
    per_sample,
    sample_norms,
    take_rows,
    top_other_classes,
)

__all__ = ["FAB", "fab", "project_onto_hyperplane"]


def project_onto_hyperplane(
    t: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str, clip: tuple[float, float]
) -> torch.Tensor:
    """Per row, the minimal-norm d (L∞ or L2) with ⟨w, t + d⟩ = b and t + d inside the box.

    t, w: (B, d) points inside the box [lo, hi] and hyperplane normals; b: (B,) offsets. Where
    the hyperplane cannot be reached inside the box, d goes to the corner of the box that gets
    closest to it. Returns d (B, d) in the dtype of t.

    Exact, by sorting rather than bisection: moving each coordinate only in the direction that
    helps, d_i = sign(w'_i)·min(λ·s_i, u_i) for the smallest λ that closes the gap, with w' = w
    oriented towards the hyperplane, u_i the room to the box in that direction and s_i = 1 (L∞:
    all coordinates move by the same amount until they hit the box) or |w_i| (L2: the KKT point
    d ∝ w, clipped to the box). The gap closed, Σ|w'_i|·min(λ·s_i, u_i), is piecewise linear in
    λ with breakpoints u_i/s_i; a cumulative sum over the sorted breakpoints finds the segment.
    """
    lo, hi = clip
    gap = b - (w * t).sum(1)
    w_dir = w * torch.where(gap < 0, -1.0, 1.0).to(w.dtype)[:, None]  # ⟨w_dir, d⟩ must grow by |gap|
    need = gap.abs()
    room = torch.where(w_dir > 0, hi - t, t - lo).clamp_min(0)
    rate = torch.ones_like(w_dir) if norm == "linf" else w_dir.abs()
    breaks = torch.where(rate > 0, room / rate.clamp_min(torch.finfo(rate.dtype).tiny), torch.inf)
    order = breaks.argsort(dim=1)
    breaks_sorted = breaks.gather(1, order)
    full = (w_dir.abs() * room).gather(1, order)  # what each coordinate closes once saturated
    slope = (w_dir.abs() * rate).gather(1, order)  # d(closed)/dλ while it is not
    saturated_before = full.cumsum(1) - full  # Σ_{j<k} full_j
    slope_from = slope.flip(1).cumsum(1).flip(1)  # Σ_{j≥k} slope_j
    closed_at = torch.where(
        torch.isinf(breaks_sorted), saturated_before, saturated_before + breaks_sorted.nan_to_num(posinf=0) * slope_from
    )
    k = (closed_at < need[:, None]).sum(1, keepdim=True)  # first breakpoint at which the gap is closed
    reachable = k.squeeze(1) < t.shape[1]
    k = k.clamp_max(t.shape[1] - 1)
    lam = (need[:, None] - saturated_before.gather(1, k)) / slope_from.gather(1, k).clamp_min(torch.finfo(t.dtype).tiny)
    lam = torch.where(reachable[:, None], lam, torch.inf)
    # A coordinate with rate 0 (L2: w_i = 0) never moves; guarding it keeps inf·0 out.
    step = torch.where(rate > 0, torch.minimum(lam * rate.clamp_min(torch.finfo(rate.dtype).tiny), room), 0.0)
    return torch.sign(w_dir) * step


class FAB(Attack):
    """FAB-T, ``FAB(model, eps=8/255, steps=100, n_target_classes=9)(x, y) -> AttackResult``.

    Args:
        model: (B, ...) pixel-space input → (B, K) logits.
        eps: acceptance threshold ε in pixel units (default 8/255): a point counts as broken if
            the smallest adversarial perturbation found has norm ≤ ε. None: unbounded (every
            target runs on every point and the smallest perturbation is kept).
        norm: "linf" (default) or "l2", the norm minimised.
        steps: iterations per target and restart (default 100, as in AutoAttack).
        n_target_classes: the highest-scoring classes other than y at x to target, best first
            (default 9, at most K − 1).
        restarts: runs per target (default 1); runs after the first start uniformly in the
            ε/2-ball (needs eps).
        alpha_max: largest weight α of the clean point's projection (default 0.1).
        eta: overshoot of each projection (default 1.05). beta: pull-back factor towards x after
            an adversarial iterate (default 0.9).
        compact_every: with ε, every this many steps (default 5) the points with an adversarial
            point within ε leave the run, at one host sync (their ‖δ‖ is then the smallest found
            so far); None runs every point for all ``steps``.
        max_rows: the runs (targets × restarts) go in batches of (points not yet broken) × (runs)
            rows, at most ``max_rows`` (default 1024; at least one run at a time), with the result
            of the runs one after another: per point the first run in order that found a point
            within ε, else the smallest found. Batching saves the per-call overheads of small
            batches (GPU); on the CPU, where the work is proportional to the rows, it gains little.
        mode: model mode during the attack ("eval" default; None = as found); always restored.
        clip: valid input box (lo, hi) with lo < hi, default (0, 1). backend: fastsat.ops backend
            (random starts).

    Returns :class:`AttackResult`: ``x_adv`` is the smallest adversarial point found where its
    norm is at most ε, else x; ``success`` marks those points (and the points misclassified at
    x, returned unchanged); ``delta_norm`` is the norm of the smallest adversarial perturbation
    found, inf where none was — it may exceed ε, the minimal-norm attack's measurement; ``stats``
    None. Only points not yet broken are attacked, target after target. Each iteration costs one
    gradient (of Ψ^t − Ψ^y) and one forward per point still running; one host sync per batch of
    runs and per compaction.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float | None = 8 / 255,
        norm: str = "linf",
        steps: int = 100,
        n_target_classes: int = 9,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        compact_every: int | None = 5,
        max_rows: int = 1024,
        mode: str | None = "eval",
        clip: tuple[float, float] = (0.0, 1.0),
        backend: str | None = None,
    ):
        super().__init__(model, eps=eps, norm=norm, mode=mode, clip=clip, backend=backend)
        if self.clip[0] == self.clip[1]:
            raise ValueError(f"clip: FAB needs lo < hi, got {clip!r}")
        self.steps = positive_int(steps, "steps")
        self.n_target_classes = positive_int(n_target_classes, "n_target_classes")
        self.restarts = positive_int(restarts, "restarts")
        if self.restarts > 1 and self.eps is None:
            raise ValueError("restarts > 1 needs eps: later runs start at random in the eps/2-ball")
        self.alpha_max = number(alpha_max, "alpha_max", minimum=0, maximum=1)
        self.eta = number(eta, "eta", minimum=1)
        self.beta = number(beta, "beta", minimum=0, maximum=1, exclusive_max=True)
        self.compact_every = None if compact_every is None else positive_int(compact_every, "compact_every")
        self.max_rows = positive_int(max_rows, "max_rows")

    def _single_run(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, start: torch.Tensor, *, first: bool, groups: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(smallest adversarial point, its norm (inf where none)) of one run towards ``target``
        from ``start`` (B, ...). With ε, every ``compact_every`` steps the points with one within ε
        leave the batch (:class:`Compaction`, ``groups`` as there)."""
        lo, hi = self.clip
        acc = ops.accumulation_dtype(x.dtype)
        every = None if self.eps is None else self.compact_every  # unbounded: every point minimises to the end
        compaction = Compaction(x.shape[0], every, x.device, groups)
        x0, x1 = x.to(acc).flatten(1), start
        best, best_norm = x.clone(), torch.full((x.shape[0],), torch.inf, dtype=acc, device=x.device)
        best_a, best_norm_a = best, best_norm
        for step in range(self.steps):
            g = self._grad(x1, "logit_diff", first=first and step == 0, checked=True, target=target, other=y)
            x1a, w = x1.to(acc).flatten(1), g.grad.flatten(1)
            b = (w * x1a).sum(1) - g.value  # the linearised boundary Ψ^t − Ψ^y = 0: ⟨w, z⟩ = b
            d1 = project_onto_hyperplane(x1a, w, b, self.norm, self.clip)
            d2 = project_onto_hyperplane(x0, w, b, self.norm, self.clip)
            a1, a2 = sample_norms(d1, self.norm).clamp_min(1e-8), sample_norms(d2, self.norm).clamp_min(1e-8)
            alpha = (a1 / (a1 + a2)).clamp(0, self.alpha_max)[:, None]
            moved = ((x1a + self.eta * d1) * (1 - alpha) + (x0 + self.eta * d2) * alpha).clamp(lo, hi)
            x1 = moved.reshape(x.shape).to(x.dtype)
            with torch.no_grad():
                adversarial = self._misclassified(self.model(x1), y)
            delta = x1.to(acc) - x.to(acc)
            dist = sample_norms(delta, self.norm)
            better = adversarial & (dist < best_norm_a)
            best_a = torch.where(per_sample(better, x), x1, best_a)
            best_norm_a = torch.where(better, dist, best_norm_a)
            pulled = (x + self.beta * delta).to(x.dtype)
            x1 = torch.where(per_sample(adversarial, x), pulled, x1)
            if compaction.due(step + 1, self.steps):
                best.index_copy_(0, compaction.rows, best_a)
                best_norm.index_copy_(0, compaction.rows, best_norm_a)
                keep = compaction.keep(best_norm_a <= self.eps)
                if keep.numel() == 0:
                    return best, best_norm
                if keep.numel() < x.shape[0]:
                    x, y, target, x0, x1, best_a, best_norm_a = take_rows(keep, x, y, target, x0, x1, best_a, best_norm_a)
        best.index_copy_(0, compaction.rows, best_a)
        best_norm.index_copy_(0, compaction.rows, best_norm_a)
        return best, best_norm

    def _run(self, x: torch.Tensor, y: torch.Tensor, *, need_success: bool) -> AttackResult:
        logits = self._clean_logits(x, y)
        targets = top_other_classes(logits, y, self.n_target_classes)
        acc = ops.accumulation_dtype(x.dtype)
        misclassified = self._misclassified(logits, y)
        min_norm = torch.where(misclassified, 0.0, torch.inf).to(acc)
        x_best = x.clone()
        runs = [(k, restart) for k in range(targets.shape[1]) for restart in range(self.restarts)]
        done = 0
        while done < len(runs):
            broken = misclassified if self.eps is None else min_norm <= self.eps
            todo = (~broken).nonzero().squeeze(1)  # host sync
            if todo.numel() == 0:
                break
            batch = runs[done : done + max(1, self.max_rows // todo.numel())]
            # Random starts drawn over the whole batch, run by run: the same however runs are batched.
            starts = [x if restart == 0 else
                      ops.random_start(x, eps=self.eps / 2, norm=self.norm, clip=self.clip, backend=self.backend)
                      for _, restart in batch]
            repeat = (len(batch),) + (1,) * (x.dim() - 1)
            found, norms = self._single_run(
                x[todo].repeat(repeat), y[todo].repeat(len(batch)), torch.cat([targets[todo, k] for k, _ in batch]),
                torch.cat([s[todo] for s in starts]), first=done == 0, groups=len(batch),
            )
            done += len(batch)
            # Per point, what the runs one after another keep: the first within ε, else the
            # smallest (argmax/argmin: the first of ties, as the strict < below keeps the earlier).
            norms = norms.view(len(batch), -1)
            within = torch.zeros_like(norms, dtype=torch.bool) if self.eps is None else norms <= self.eps
            pick = torch.where(within.any(0), within.to(torch.uint8).argmax(0), norms.argmin(0))
            index = pick * todo.numel() + torch.arange(todo.numel(), device=x.device)
            found, norms = found.index_select(0, index), norms.flatten().index_select(0, index)
            better = norms < min_norm[todo]
            # torch.where, not a boolean index: no second host sync per batch of runs.
            x_best.index_copy_(0, todo, torch.where(per_sample(better, found), found, x_best[todo]))
            min_norm[todo] = torch.minimum(norms, min_norm[todo])
        success = torch.isfinite(min_norm) if self.eps is None else min_norm <= self.eps
        x_adv = torch.where(per_sample(success, x), x_best, x)
        return AttackResult(x_adv=x_adv, success=success, delta_norm=min_norm, stats=None)


def fab(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> AttackResult:
    """Functional form of :class:`FAB`."""
    return FAB(model, **kwargs)(x, y)
