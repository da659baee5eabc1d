"""APGD (Croce & Hein, ICML 2020): step-size-free PGD with momentum, CE and DLR losses, and APGD-T
(targeted DLR over the top non-true classes).

Follows the paper (Algorithm 1, as in the authors' auto-attack code): initial step 2ε, momentum
0.75 (none on the first step), checkpoints w_j = ⌈p_j·N⌉ with p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06) (for N = 100: 22, 41, 57, 70, 80, 87, 93, 99;
auto-attack's integer rounding gives the same there and differs only for small N). At a
checkpoint a sample's step size halves and it restarts from its best point if its loss increased
in at most ρ = 75% of the steps since the previous checkpoint, or if its step was not halved at
the previous checkpoint and its best loss has not improved since. Step sizes are per sample.

All projections and clips go through :func:`fastsat.ops.pgd_step` (with a zero gradient and step
0 it is exactly the projection onto the ε-ball around the clean x followed by the clip); random
starts come from :func:`fastsat.ops.random_start` (uniform in the ball, where auto-attack starts
on its boundary). ε is in pixel space; models that normalise inputs do it inside ``forward``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn

from fastsat import ops
from fastsat._checks import choice, no_host_checks, number, positive_int
from fastsat.attacks.base import Attack, AttackResult, Candidate, Compaction, per_sample, take_rows, top_other_classes
from fastsat.grad import check_objective_args, objective_value

__all__ = ["APGD", "APGDT", "apgd", "apgdt", "checkpoints", "halve_step"]

_MOMENTUM = 0.75


def checkpoints(steps: int) -> list[int]:
    """Iteration counts w_j ≤ steps after which APGD checks its progress (paper, Section 3.2).

    Computed in whole percent so that ⌈p_j·N⌉ has no floating-point rounding."""
    percents = [0, 22]
    while percents[-1] < 100:
        percents.append(percents[-1] + max(percents[-1] - percents[-2] - 3, 6))
    marks = sorted({-(-p * steps // 100) for p in percents[1:]})
    return [w for w in marks if 0 < w <= steps]


def halve_step(
    losses: list[torch.Tensor],
    loss_best: torch.Tensor,
    loss_best_at_check: torch.Tensor,
    reduced_at_check: torch.Tensor,
    rho: float,
) -> torch.Tensor:
    """(B,) bool: the samples whose step size halves at this checkpoint (paper, Section 3.2).

    losses: the (B,) losses at the previous checkpoint and after each step since (window + 1
    tensors). A sample halves if (1) its loss increased in at most ρ·window of those steps, or
    (2) it did not halve at the previous checkpoint (``reduced_at_check`` False) and its best loss
    ``loss_best`` has not risen above ``loss_best_at_check``, the best loss then.
    """
    window = len(losses) - 1
    increases = sum((after > before).to(torch.int64) for before, after in itertools.pairwise(losses))
    oscillating = increases <= window * rho
    stalled = ~reduced_at_check & (loss_best_at_check >= loss_best)
    return oscillating | stalled


class APGD(Attack):
    """``APGD(model, eps=8/255, steps=100, loss="ce")(x, y) -> AttackResult``.

    Args:
        model: (B, ...) pixel-space input → (B, K) logits.
        eps: ball radius in pixel units (default 8/255). norm: "linf" (default) or "l2".
        steps: iterations N per restart (default 100, as in AutoAttack).
        restarts: independent random starts (default 1); per sample the best is kept (success
            first, then the highest loss).
        loss: "ce" (APGD-CE, default) or "dlr" (APGD-DLR, needs K ≥ 3).
        rho: oscillation threshold ρ for halving the step size (default 0.75).
        compact_every: every this many steps (default 5) the points already misclassified leave
            the batch, at one host sync; None runs every point for all ``steps``. Later restarts
            then run on the points still robust only (as in AutoAttack). :meth:`perturb`
            (training) never compacts: it stays free of host syncs.
        mode: model mode during the attack ("eval" default; None = as found); always restored.
        clip: valid input box (lo, hi), default (0, 1). backend: fastsat.ops backend.

    Per sample the result is the last misclassified iterate if there was one (up to the step at
    which the point left the batch), else the iterate of highest loss. The points still robust
    get exactly what ``compact_every=None`` gives them. ``stats`` is a
    :class:`fastsat.ops.StepStats`: the alignment statistics of the clean x and the gradient of
    the point's last step (⟨x, g⟩, ‖g‖, ‖x‖) and ‖δ‖ of the returned point.
    """

    losses: tuple[str, ...] = ("ce", "dlr")

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 8 / 255,
        steps: int = 100,
        norm: str = "linf",
        restarts: int = 1,
        loss: str = "ce",
        rho: float = 0.75,
        compact_every: int | None = 5,
        mode: str | None = "eval",
        clip: tuple[float, float] = (0.0, 1.0),
        backend: str | None = None,
    ):
        super().__init__(model, eps=eps, norm=norm, mode=mode, clip=clip, backend=backend)
        self.steps = positive_int(steps, "steps")
        self.restarts = positive_int(restarts, "restarts")
        self.loss = choice(loss, "loss", self.losses)
        self.rho = number(rho, "rho", minimum=0, maximum=1)
        self.compact_every = None if compact_every is None else positive_int(compact_every, "compact_every")

    def _direction(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Unit step direction in the dtype of x: sign(g) for L∞, g/‖g‖₂ per sample for L2 (zero
        where g = 0), computed from the gradient as given (float32 for float16/bfloat16 x), so a
        low-precision x steps as a float32 one would, up to the rounding of the direction."""
        if self.norm == "linf":
            return grad.sign().to(x.dtype)
        grad_norm = ops.alignment_stats(x, grad, backend=self.backend).grad_norm
        scale = torch.where(grad_norm > 0, 1.0 / grad_norm.clamp_min(torch.finfo(grad_norm.dtype).tiny), 0.0)
        return (grad * per_sample(scale.to(grad.dtype), grad)).to(x.dtype)

    def _run(self, x: torch.Tensor, y: torch.Tensor, *, need_success: bool) -> AttackResult:
        every = self.compact_every if need_success else None
        best = None
        for restart in range(self.restarts):
            start = ops.random_start(x, eps=self.eps, norm=self.norm, clip=self.clip, backend=self.backend)
            if best is None:
                best = self._single_run(x, y, start, first=True, every=every)
            elif every is None:
                best = best.merge(self._single_run(x, y, start, first=False, every=every))
            else:
                # Later restarts run on the points still robust only (as AutoAttack's): one host sync.
                rows = (~best.success).nonzero().squeeze(1)
                if rows.numel() == 0:
                    break
                best = best.merge_rows(rows, self._single_run(x[rows], y[rows], start[rows], first=False, every=every))
        return AttackResult(x_adv=best.x_adv, success=best.success, delta_norm=None, stats=best.stats)

    def _single_run(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        start: torch.Tensor,
        *,
        first: bool,
        every: int | None,
        target: torch.Tensor | None = None,
        groups: int = 1,
    ) -> Candidate:
        """One run from ``start`` (B, ...), a point of the ε-ball around x; ``target`` (B,) are the
        target classes of the targeted loss. Every ``every`` steps the points already misclassified
        leave the batch (:class:`Compaction`; ``groups`` as there); their result is then the
        iterate they reached."""
        marks = set(checkpoints(self.steps))
        compaction = Compaction(x.shape[0], every, x.device, groups)
        x_all, y_all, target_all = x, y, target

        x_adv = start
        result = self._grad(x_adv, self.loss, first=first, y=y, target=target)
        grad = result.grad  # float32 for float16/bfloat16 x: its small entries keep their sign
        ever_adv = self._misclassified(result.logits, y)
        x_last_adv = x_adv.clone()
        x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), result.value.clone()
        losses = [result.value]
        step = torch.full((x.shape[0],), 2 * self.eps, dtype=x.dtype, device=x.device)
        x_prev = x_adv.clone()
        loss_best_at_check = loss_best.clone()
        reduced_at_check = torch.ones_like(ever_adv)
        last_grad = grad
        zeros = torch.zeros_like(x)
        # Per row of the whole batch: the point returned and the gradient of its last step.
        x_out, grad_out = torch.empty_like(x), torch.empty_like(grad)

        def settle() -> None:
            x_out.index_copy_(0, compaction.rows, torch.where(per_sample(ever_adv, x_best), x_last_adv, x_best))
            grad_out.index_copy_(0, compaction.rows, last_grad)

        for i in range(self.steps):
            z = self._project_onto_ball(x_adv + per_sample(step, x) * self._direction(x, grad), x, zeros)
            last_grad = grad
            if i == 0:
                x_new = z
            else:
                x_new = self._project_onto_ball(x_adv + _MOMENTUM * (z - x_adv) + (1 - _MOMENTUM) * (x_adv - x_prev), x, zeros)
            x_prev, x_adv = x_adv, x_new

            result = self._grad(x_adv, self.loss, first=False, y=y, target=target)
            grad, value = result.grad, result.value
            now_adv = self._misclassified(result.logits, y)
            ever_adv |= now_adv
            x_last_adv = torch.where(per_sample(now_adv, x), x_adv, x_last_adv)
            improved = value > loss_best
            x_best = torch.where(per_sample(improved, x), x_adv, x_best)
            grad_best = torch.where(per_sample(improved, x), grad, grad_best)
            loss_best = torch.where(improved, value, loss_best)
            losses.append(value)

            if i + 1 in marks:
                reduce = halve_step(losses, loss_best, loss_best_at_check, reduced_at_check, self.rho)
                reduced_at_check, loss_best_at_check = reduce, loss_best.clone()
                step = torch.where(reduce, step / 2, step)
                x_adv = torch.where(per_sample(reduce, x), x_best, x_adv)
                grad = torch.where(per_sample(reduce, x), grad_best, grad)
                losses = [value]

            if compaction.due(i + 1, self.steps):
                settle()
                keep = compaction.keep(ever_adv)
                if keep.numel() == 0:
                    break
                if keep.numel() < x.shape[0]:
                    (x, y, target, zeros, x_adv, x_prev, grad, last_grad, ever_adv, x_last_adv, x_best, grad_best,
                     loss_best, step, loss_best_at_check, reduced_at_check) = take_rows(
                        keep, x, y, target, zeros, x_adv, x_prev, grad, last_grad, ever_adv, x_last_adv, x_best,
                        grad_best, loss_best, step, loss_best_at_check, reduced_at_check)
                    losses = list(take_rows(keep, *losses))
        else:  # ran to the end (a break has settled already)
            settle()

        success, value = self._final(x_out, y_all, self.loss, target=target_all)
        align = ops.alignment_stats(x_all, grad_out, backend=self.backend)
        delta_norm = self._distance(x_all, x_out).to(align.dot.dtype)
        stats = ops.StepStats(dot=align.dot, grad_norm=align.grad_norm, x_norm=align.x_norm, delta_norm=delta_norm)
        return Candidate(x_out, success, value, stats)


class APGDT(APGD):
    """APGD-T, ``APGDT(model, eps=8/255, steps=100, n_target_classes=9)(x, y) -> AttackResult``:
    APGD on the targeted DLR loss (Croce & Hein 2020, as in AutoAttack).

    For each of the ``n_target_classes`` highest-scoring classes other than y at the clean x
    (default 9, at most K − 1; K ≥ 4), best first, ``restarts`` APGD runs (default 1) ascend
    −(Ψ^y − Ψ^t) / (Ψ^{π1} − (Ψ^{π3} + Ψ^{π4})/2), each only on the points not yet misclassified.
    ``success`` is untargeted, as in AutoAttack: the prediction differs from y (whichever class
    it moved to). Points misclassified at x are returned unchanged, successful.

    Arguments as :class:`APGD` (no ``loss``), and ``max_rows``: the runs (targets × restarts)
    go in batches of (points still robust) × (runs) rows, at most ``max_rows`` (default 1024;
    at least one run at a time). A batch returns what the runs one after another would: a point
    counts as broken if any run breaks it, with the point of the first run in order that did, and
    a point broken by one run stops in the later ones at the next compaction. Batching saves the
    per-call overheads of small batches (GPU: fuller kernels); on the CPU, where the work is
    proportional to the rows, it gains little.

    Per sample the result is the first successful run's point, else the highest-loss point over
    all runs (the clean x if no run beat it), with the :class:`fastsat.ops.StepStats` of that
    run's last step (of the first target's gradient at x for the clean x). Costs one forward and
    one gradient at x, then ``steps`` gradients per run and point still running; one host sync
    per batch of runs (to select the points still robust) and per compaction. Each run starts
    from its own random draw over the whole batch, so the draws do not depend on the batching.

    target_score: (x_in, y, logits) → (B, K) scores that rank the targets instead of the clean
    logits, highest first (e.g. MALT's linearised margins,
    :func:`fastsat.evaluate.suites.malt_scores`); ``x_in`` is the clean x requiring grad and
    ``logits`` its forward with the graph, which the score may differentiate (retaining the graph).
    """

    losses = ("dlr_targeted",)

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 8 / 255,
        steps: int = 100,
        norm: str = "linf",
        restarts: int = 1,
        n_target_classes: int = 9,
        target_score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        rho: float = 0.75,
        compact_every: int | None = 5,
        max_rows: int = 1024,
        mode: str | None = "eval",
        clip: tuple[float, float] = (0.0, 1.0),
        backend: str | None = None,
    ):
        super().__init__(
            model, eps=eps, steps=steps, norm=norm, restarts=restarts, loss="dlr_targeted", rho=rho,
            compact_every=compact_every, mode=mode, clip=clip, backend=backend,
        )
        self.n_target_classes = positive_int(n_target_classes, "n_target_classes")
        self.target_score = target_score
        self.max_rows = positive_int(max_rows, "max_rows")

    def _clean_start(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Candidate]:
        """(targets (B, T), the clean x as a candidate) from one forward and one backward at x: the
        targets come from the logits, the first target's loss and gradient from the same graph."""
        x_in = x.detach().requires_grad_(True)
        logits = self.model(x_in)
        self._check_clean_logits(logits, y, x.shape[0])
        score = logits.detach() if self.target_score is None else self.target_score(x_in, y, logits)
        targets = top_other_classes(score, y, self.n_target_classes)
        with no_host_checks():  # y's range was just checked; the targets are in range by construction
            check_objective_args(self.loss, tuple(logits.shape), y=y, target=targets[:, 0])
        value = objective_value(logits, self.loss, y=y, target=targets[:, 0])
        (grad,) = torch.autograd.grad(value.sum(), x_in)
        grad = grad.to(ops.accumulation_dtype(x.dtype))
        self._warn_suspicious(logits.detach(), grad)
        align = ops.alignment_stats(x, grad, backend=self.backend)
        stats = ops.StepStats(
            dot=align.dot, grad_norm=align.grad_norm, x_norm=align.x_norm, delta_norm=torch.zeros_like(align.dot)
        )
        return targets, Candidate(x.clone(), self._misclassified(logits.detach(), y), value.detach(), stats)

    def _run(self, x: torch.Tensor, y: torch.Tensor, *, need_success: bool) -> AttackResult:
        targets, best = self._clean_start(x, y)
        runs = [k for k in range(targets.shape[1]) for _ in range(self.restarts)]  # each run's target
        done = 0
        while done < len(runs):
            robust = (~best.success).nonzero().squeeze(1)  # host sync
            if robust.numel() == 0:
                break
            batch = runs[done : done + max(1, self.max_rows // robust.numel())]
            done += len(batch)
            # Drawn over the whole batch, run by run: the same draws however the runs are batched.
            starts = [ops.random_start(x, eps=self.eps, norm=self.norm, clip=self.clip, backend=self.backend)[robust]
                      for _ in batch]
            repeat = (len(batch),) + (1,) * (x.dim() - 1)
            run = self._single_run(
                x[robust].repeat(repeat), y[robust].repeat(len(batch)), torch.cat(starts), first=False,
                every=self.compact_every if need_success else None,  # perturb() never compacts, as in APGD
                target=torch.cat([targets[robust, k] for k in batch]), groups=len(batch),
            )
            best = best.merge_rows(robust, run.first_of(len(batch)))
        return AttackResult(x_adv=best.x_adv, success=best.success, delta_norm=None, stats=best.stats)


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> AttackResult:
    """Functional form of :class:`APGD`."""
    return APGD(model, **kwargs)(x, y)


def apgdt(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> AttackResult:
    """Functional form of :class:`APGDT`."""
    return APGDT(model, **kwargs)(x, y)
