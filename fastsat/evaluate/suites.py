"""The evaluation suites of :func:`fastsat.evaluate.evaluate` and their gradient-masking checks.

A suite is a frozen dataclass of settings (a subclass of :class:`Suite`) whose methods build its
attacks, do its work on each batch, name its result keys and write its part of the report;
``evaluate()`` keeps the loop over the data, the sharding over ranks and the all-reduce. To add a
suite: a :class:`Suite` subclass and a row in :data:`SUITES`.

- ``quick`` (:class:`QuickSuite`): nothing beyond ``evaluate()``'s own attack rows;
- ``standard`` (:class:`StandardSuite`): AutoAttack's standard protocol;
- ``paper`` (:class:`PaperSuite`): the SAT authors' PGD-5 and Carlini–Wagner L2;
- ``rapid`` (:class:`RapidSuite`): a short APGD-CE, APGD-T on a few targets chosen per point by
  MALT's linearised margin, Square only where a gradient-masking check calls for it.

Every suite but quick runs the checks of :class:`MaskingChecks` (Croce & Hein's ``checks.py``;
Carlini et al. 2019). All radii are in pixel units (the space of x, box ``clip``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fastsat import _dist
from fastsat._checks import describe, number, positive_int
from fastsat._stats import binomial_lower_bound
from fastsat.attacks import APGD, APGDT, CW, FAB, PGD, Square
from fastsat.attacks.base import top_other_classes

__all__ = ["MEANINGS", "SUITES", "MaskingChecks", "PaperSuite", "QuickSuite", "RapidSuite", "StandardSuite", "Suite",
           "SuiteRun", "malt_scores"]

Add = Callable[[str, torch.Tensor], None]  # evaluate()'s accumulator: adds a tensor's sum under a key

MEANINGS = {
    "gradient_free": "Square, which uses no gradients, broke points the gradient attacks left robust: the gradients "
                     "mislead the attacks (gradient masking), so gradient-based robust accuracy overstates robustness.",
    "large_eps": "At a radius where any image can be turned into another class the main attack does not bring the "
                 "accuracy to ~0: the attack is not working on this model (gradient masking or a broken attack).",
    "convergence": "More steps or more restarts of the main attack break points the suite left robust: the attacks "
                   "have not converged, so the reported robust accuracy is an overestimate.",
    "zero_gradients": "Many points have an all-zero input gradient (saturated or quantised model): gradient attacks "
                      "cannot move from them, so their robust accuracy there means nothing.",
}
#: The checks that say the gradients mislead the attacks (not merely that they have not converged).
GRADIENT_MASKING = ("gradient_free", "large_eps", "zero_gradients")


def distinct(values: object, name: str, what: str, check: Callable[[object, str], object], *,
             allow_empty: bool = False) -> list:
    """``values`` checked one by one with ``check(value, name)``: a list without repeats (a repeat
    would be counted twice into the same row), non-empty unless ``allow_empty``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name}: expected a list of {what}, got {describe(values)}")
    checked = [check(v, name) for v in values]
    if (not checked and not allow_empty) or len(set(checked)) != len(checked):
        raise ValueError(f"{name}: expected a non-empty list of distinct {what}, got {describe(checked)}")
    return checked


def _require_masking_checks(checks: object) -> None:
    if not isinstance(checks, MaskingChecks):
        raise TypeError(f"checks: expected a MaskingChecks, got {describe(checks)}")


def _require_four_classes(suite: str, logits: torch.Tensor) -> None:
    if logits.shape[1] < 4:
        raise ValueError(f"suite: {suite!r} runs APGD-T, whose targeted DLR loss needs at least 4 classes; the model "
                         f"has {logits.shape[1]}")


def _in_turn(attacks: dict | None, names: Sequence[str], x: torch.Tensor, y: torch.Tensor, robust: torch.Tensor,
             prefix: str, add: Add) -> None:
    """The attacks ``names`` of ``attacks`` (None: ε = 0, no attack) one after the other, each on
    the points still ``robust`` ((B,) bool, updated in place), adding its count after each under
    ``f"{prefix}:{name}"``."""
    for name in names:
        todo = robust.nonzero().squeeze(1)
        if attacks is not None and todo.numel():
            robust[todo] = ~attacks[name](x[todo], y[todo]).success
        add(f"{prefix}:{name}", robust)


@dataclass
class SuiteRun:
    """One ``evaluate()`` call's state of a suite, shared by its methods across batches.

    eps, norm, clip, batch_size: ``evaluate()``'s arguments (radii in pixel units); device: the
    model's. main_eps,
    main_norm: radius and norm of the suite's main attack, where the masking checks run.
    attacks: the suite's attacks, built before any data is read. kept: what the suite keeps
    across batches (paper: CW's norms; rapid: the points left robust)."""

    model: nn.Module
    eps: list[float]
    norm: str
    clip: tuple[float, float]
    batch_size: int
    device: torch.device
    main_eps: float
    main_norm: str
    attacks: dict = field(default_factory=dict)
    kept: list = field(default_factory=list)


class Suite:
    """An evaluation protocol. ``evaluate()`` calls, in order:

    1. :meth:`start` once, before any data is read (builds the attacks: their argument checks run
       first);
    2. :meth:`batch` on each batch of this rank;
    3. :meth:`keys`: the counts to all-reduce; then, with ``checks``, the masking checks;
    4. :meth:`finish` with the raised flags (extra work that depends on them);
    5. :meth:`report`: the suite's part of the report, under its ``name``.

    A suite with ``checks`` (a :class:`MaskingChecks`) also defines
    ``main_attack(run, eps, *, steps_factor=1, restarts=1) -> Attack``: its main gradient attack at
    ``eps`` with ``steps_factor``× its steps and ``restarts`` random starts (with the defaults at
    ``run.main_eps``, exactly the suite's own run of it). The checks also read its gradient-free
    evidence (:meth:`probe_gradient_free`, :meth:`gradient_free`)."""

    name: ClassVar[str]
    checks: MaskingChecks | None = None

    def start(self, model: nn.Module, eps: list[float], norm: str, clip: tuple[float, float], batch_size: int,
              device: torch.device) -> SuiteRun:
        """The run's state; the main attack at the largest ε of ``eps``, in ``norm``."""
        return SuiteRun(model, eps, norm, clip, batch_size, device, max(eps), norm, self.attacks(model, eps, norm, clip))

    def attacks(self, model: nn.Module, eps: list[float], norm: str, clip: tuple[float, float]) -> dict:
        """The suite's attacks, keyed as its :meth:`batch` reads them."""
        return {}

    def batch(self, run: SuiteRun, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, correct: torch.Tensor,
              offset: int, add: Add) -> torch.Tensor | None:
        """The suite's work on one batch: x (B, C, H, W) pixels, y (B,), the clean ``logits`` (B, K),
        ``correct`` (B,) bool, ``offset`` the index of x[0] in the whole data. Adds its counts under
        its :meth:`keys` and returns (B,) bool: robust under the suite at ``run.main_eps`` (None
        without checks)."""
        return None

    def keys(self, run: SuiteRun) -> list[str]:
        """The keys :meth:`batch` adds to, the same on every rank and in the same order."""
        return []

    def finish(self, run: SuiteRun, flags: list[str], add: Add) -> list[str]:
        """Work after the masking checks, given their raised ``flags`` (the same on every rank);
        returns the keys it added to (all-reduced once more), none by default."""
        return []

    def report(self, run: SuiteRun, totals: dict[str, float], n: int) -> object | None:
        """The suite's part of the report from the all-reduced ``totals`` over ``n`` samples (None:
        no part)."""
        return None


    def probe_gradient_free(self, run: SuiteRun, x: torch.Tensor, y: torch.Tensor, add: Add) -> None:
        """The gradient-free check's attack on the check subset's points ``x``, ``y`` the suite left
        robust: Square with ``checks.square_queries`` queries, counted under ``check:square_broke``."""
        square = Square(run.model, eps=run.main_eps, n_queries=self.checks.square_queries, norm=run.main_norm,
                        clip=run.clip)
        add("check:square_broke", square(x, y).success)

    def gradient_free(self, run: SuiteRun, totals: dict[str, float], n: int, points: int) -> tuple[dict, float, int]:
        """The gradient-free check's evidence, the share of points it broke and over how many."""
        broke = totals["check:square_broke"] / max(points, 1)
        return ({"eps": run.main_eps, "points": points, "square_queries": self.checks.square_queries,
                 "square_broke": broke}, broke, points)


@dataclass(frozen=True)
class MaskingChecks:
    """Settings of the gradient-masking checks run with every suite but ``quick``.

    subset: the first N points of the data (default 100) on which the extra attacks run.
    large_eps: L∞ radius in pixel units of the ε-growth check (default 0.5: half the [0, 1] box);
        in L2 the radius is large_eps·√d (d input elements), the norm of a large_eps shift of
        every element.
    factor: the convergence check runs the suite's main attack with factor× the steps and,
        separately, factor× the restarts (default 4).
    square_queries: queries of the gradient-free check's Square on the check subset (default
        1000; the standard suite's own Square run serves there instead).
    tolerance: share of the points (default 0.01) a check's count must exceed to raise a flag:
        its one-sided 95% Clopper–Pearson lower bound must, so that one odd point among a few
        dozen raises nothing (1 of 20 has a bound of 0.003) while 3 of 20 does (0.042).

    What each check reuses of the suite's own runs (where the check means the same with it):
    zero_gradients is read from ``evaluate()``'s alignment pass at the clean x; convergence's
    ``factor`` restarts count the suite's own run of its main attack as the first (every point
    the suite left robust is one that run failed on, and restarts are independent draws), so
    only factor − 1 more run; gradient_free is the standard suite's own Square and the rapid
    suite's own probe. The factor× steps run cannot reuse one (a longer run has another
    step-size schedule), nor can the large-ε run (another radius).
    """

    subset: int = 100
    large_eps: float = 0.5
    factor: int = 4
    square_queries: int = 1000
    tolerance: float = 0.01

    KEYS: ClassVar[tuple[str, ...]] = tuple(f"check:{name}" for name in (
        "n", "main", "more_steps", "more_restarts", "large_eps", "square_broke"))

    def __post_init__(self):
        positive_int(self.subset, "subset")
        number(self.large_eps, "large_eps", minimum=0, exclusive_min=True)
        positive_int(self.factor, "factor")
        positive_int(self.square_queries, "square_queries")
        number(self.tolerance, "tolerance", minimum=0, maximum=1)

    def large_radius(self, run: SuiteRun, subset: list) -> float:
        """The large-ε check's radius: ``large_eps``, ×√d in L2 (the same on every rank)."""
        radius = self.large_eps
        if run.main_norm == "l2" and subset:
            radius *= math.sqrt(subset[0][0][0].numel())
        return max(_dist.all_gather_objects(radius))  # a rank without check points has no d

    def count_evidence(self, suite: Suite, run: SuiteRun, subset: list, large_eps: float, add: Add) -> None:
        """Run the checks' extra attacks on this rank's part of the check subset (``subset``: (x, y,
        correct on x, robust under the suite at ``run.main_eps``) per batch) and add their counts
        under :attr:`KEYS`."""
        if not subset:
            return
        x, y, correct, robust = (torch.cat(parts) for parts in zip(*subset, strict=True))
        add("check:n", correct)
        add("check:main", robust)
        # Convergence and the gradient-free check: do a stronger or a gradient-free attack break
        # points the suite left robust?
        left = robust.nonzero().squeeze(1)
        if left.numel():
            xl, yl = x[left], y[left]
            more_steps = suite.main_attack(run, run.main_eps, steps_factor=self.factor)(xl, yl).success
            add("check:more_steps", ~more_steps)
            # The suite's own run was the first restart and failed on all of these points.
            if self.factor > 1:
                more_restarts = suite.main_attack(run, run.main_eps, restarts=self.factor - 1)(xl, yl).success
                add("check:more_restarts", ~more_restarts)
            else:
                add("check:more_restarts", torch.ones_like(yl, dtype=torch.bool))
            suite.probe_gradient_free(run, xl, yl, add)
        todo = correct.nonzero().squeeze(1)
        if todo.numel():
            add("check:large_eps", ~suite.main_attack(run, large_eps)(x[todo], y[todo]).success)

    def report(self, suite: Suite, run: SuiteRun, totals: dict[str, float], n: int, large_eps: float) -> dict:
        """``{"flags": [names raised], "checks": {name: {"flagged", "meaning", ...evidence}}}``.
        Shares of the check subset are of its correctly classified points (``points``)."""
        points = int(totals["check:n"])

        def share(key: str) -> float:
            return totals[key] / max(points, 1)

        def beyond(fraction: float, total: int) -> bool:
            """Whether ``fraction`` of ``total`` points is beyond the tolerance (its 95% lower bound)."""
            return binomial_lower_bound(round(fraction * total), total) > self.tolerance

        gradient_free, broke, over = suite.gradient_free(run, totals, n, points)
        acc = share("check:main")
        more_steps, more_restarts = share("check:more_steps"), share("check:more_restarts")
        zero = totals["zero_gradients"] / n
        results = {
            "gradient_free": {**gradient_free, "flagged": beyond(broke, over)},
            "large_eps": {"eps": large_eps, "points": points, "acc": share("check:large_eps"),
                          "flagged": beyond(share("check:large_eps"), points)},
            "convergence": {"eps": run.main_eps, "points": points, "acc": acc, "acc_more_steps": more_steps,
                            "acc_more_restarts": more_restarts, "factor": self.factor,
                            "flagged": beyond(acc - min(more_steps, more_restarts), points)},
            "zero_gradients": {"share": zero, "flagged": beyond(zero, n)},
        }
        for name, result in results.items():
            result["meaning"] = MEANINGS[name]
        return {"flags": [name for name, result in results.items() if result["flagged"]], "checks": results}


@dataclass(frozen=True)
class QuickSuite(Suite):
    """Only ``evaluate()``'s own attack rows (PGD-10 by default, the trainer's per-epoch number)."""

    name: ClassVar[str] = "quick"



def _apgd_ce(suite: Suite, run: SuiteRun, eps: float, steps_factor: int, restarts: int) -> APGD:
    """The main attack of the suites that open with APGD-CE (standard, rapid): the checks rerun it."""
    return APGD(run.model, eps=eps, steps=suite.steps * steps_factor, restarts=restarts, norm=run.norm, clip=run.clip)

@dataclass(frozen=True)
class StandardSuite(Suite):
    """AutoAttack's standard protocol (Croce & Hein 2020; RobustBench): APGD-CE (``steps``
    iterations, 1 restart), APGD-T (targeted DLR, ``n_target_classes`` targets, 1 restart each),
    FAB-T (``n_target_classes`` targets, ``fab_steps`` iterations) and Square
    (``square_queries`` queries), in that order, each on the points still robust, at each ε > 0
    of ``evaluate()``'s eps, in its norm. The defaults (100, 9, 100, 5000) are the protocol's;
    K ≥ 4 classes (APGD-T's loss)."""

    name: ClassVar[str] = "standard"
    ORDER: ClassVar[tuple[str, ...]] = ("apgd-ce", "apgd-t", "fab-t", "square")

    steps: int = 100
    n_target_classes: int = 9
    fab_steps: int = 100
    square_queries: int = 5000
    checks: MaskingChecks = MaskingChecks()

    def __post_init__(self):
        for name in ("steps", "n_target_classes", "fab_steps", "square_queries"):
            positive_int(getattr(self, name), name)
        _require_masking_checks(self.checks)

    def attacks(self, model: nn.Module, eps: list[float], norm: str, clip: tuple[float, float]) -> dict:
        """Per ε > 0 the four attacks in protocol order: ``{eps: {"apgd-ce": APGD, ...}}``."""
        return {e: {
            "apgd-ce": APGD(model, eps=e, steps=self.steps, norm=norm, loss="ce", clip=clip),
            "apgd-t": APGDT(model, eps=e, steps=self.steps, norm=norm, n_target_classes=self.n_target_classes,
                            clip=clip),
            "fab-t": FAB(model, eps=e, steps=self.fab_steps, norm=norm, n_target_classes=self.n_target_classes,
                         clip=clip),
            "square": Square(model, eps=e, n_queries=self.square_queries, norm=norm, clip=clip),
        } for e in eps if e > 0}

    def batch(self, run, x, y, logits, correct, offset, add):
        _require_four_classes(self.name, logits)
        for e in run.eps:
            robust = correct.clone()
            _in_turn(run.attacks.get(e), self.ORDER, x, y, robust, f"standard@{e}", add)
            if e == run.main_eps:
                main_robust = robust
        return main_robust

    def keys(self, run):
        return [f"standard@{e}:{name}" for e in run.eps for name in self.ORDER]

    def report(self, run, totals, n):
        """``[{"eps", "acc", "cumulative": {"apgd-ce", "apgd-t", "fab-t", "square"}}]``: per ε the
        robust accuracy after each attack in turn (``acc``: after all four)."""
        return [{"eps": e, "acc": totals[f"standard@{e}:square"] / n,
                 "cumulative": {name: totals[f"standard@{e}:{name}"] / n for name in self.ORDER}}
                for e in run.eps]

    def main_attack(self, run, eps, *, steps_factor=1, restarts=1):
        return _apgd_ce(self, run, eps, steps_factor, restarts)

    def probe_gradient_free(self, run, x, y, add):
        """Nothing: the suite's own Square, on all points, is the gradient-free check."""

    def gradient_free(self, run, totals, n, points):
        """What the suite's own Square broke after the three gradient attacks, as a share of all points."""
        gradient, square = (totals[f"standard@{run.main_eps}:{name}"] / n for name in ("fab-t", "square"))
        return {"eps": run.main_eps, "gradient_acc": gradient, "square_acc": square}, gradient - square, n


@dataclass(frozen=True)
class PaperSuite(Suite):
    """The SAT authors' protocol (Mangla et al. 2020): L∞ PGD with ``steps`` (5) steps of fixed size
    ``step_size`` (2/255), random start, at each ε of ``eps`` ({1, …, 8}/255, pixel units), and
    Carlini–Wagner L2 (``cw_steps`` Adam steps, ``cw_binary_search_steps`` rounds over c;
    defaults 1000 and 9, the authors') reporting the minimal L2 norms and the robust accuracy at
    the L2 radius ``cw_eps`` (default 0.5, RobustBench's CIFAR-10 L2 radius). Its masking checks
    run at the largest of ``eps``, in L∞."""

    name: ClassVar[str] = "paper"

    eps: tuple[float, ...] = tuple(k / 255 for k in range(1, 9))
    steps: int = 5
    step_size: float = 2 / 255
    cw_eps: float = 0.5
    cw_steps: int = 1000
    cw_binary_search_steps: int = 9
    checks: MaskingChecks = MaskingChecks()

    def __post_init__(self):
        radii = distinct(self.eps, "eps", "radii (pixel units)", lambda e, name: number(e, name, minimum=0, exclusive_min=True))
        object.__setattr__(self, "eps", tuple(radii))
        positive_int(self.steps, "steps")
        number(self.step_size, "step_size", minimum=0, exclusive_min=True)
        number(self.cw_eps, "cw_eps", minimum=0, exclusive_min=True)
        positive_int(self.cw_steps, "cw_steps")
        positive_int(self.cw_binary_search_steps, "cw_binary_search_steps")
        _require_masking_checks(self.checks)

    def start(self, model, eps, norm, clip, batch_size, device):
        """The main attack is PGD-5 at the largest of the suite's own radii, in L∞."""
        return SuiteRun(model, eps, norm, clip, batch_size, device, max(self.eps), "linf",
                        self.attacks(model, eps, norm, clip))

    def attacks(self, model, eps, norm, clip):
        """``{"pgd": {eps: PGD}, "cw": CW}``."""
        return {"pgd": {e: PGD(model, eps=e, step_size=self.step_size, steps=self.steps, random_start=True, clip=clip)
                        for e in self.eps},
                "cw": CW(model, eps=self.cw_eps, steps=self.cw_steps, binary_search_steps=self.cw_binary_search_steps,
                         clip=clip)}

    def batch(self, run, x, y, logits, correct, offset, add):
        for e in self.eps:
            robust = correct & ~run.attacks["pgd"][e](x, y).success
            add(f"paper@{e}", robust)
            if e == run.main_eps:
                main_robust = robust
        result = run.attacks["cw"](x, y)
        add("cw", correct & ~result.success)
        run.kept.append(result.delta_norm.double().cpu()[correct.cpu()])
        return main_robust

    def keys(self, run):
        return [f"paper@{e}" for e in self.eps] + ["cw"]

    def report(self, run, totals, n):
        """``{"pgd": [{"eps", "acc"}, ...], "cw": {"eps", "acc", "points", "median_l2", "mean_l2",
        "found"}}``, CW's minimal norms over the correctly classified points (see ``evaluate()``)."""
        # Over the correctly classified points only: a misclassified point has no boundary to reach.
        norms = torch.cat([t for part in _dist.all_gather_objects(run.kept) for t in part])
        found = norms[torch.isfinite(norms)]
        # torch's lower median: the smaller middle value for an even count
        median = norms.median().item() if norms.numel() else math.inf
        return {
            "pgd": [{"eps": e, "acc": totals[f"paper@{e}"] / n} for e in self.eps],
            "cw": {"eps": self.cw_eps, "acc": totals["cw"] / n, "points": norms.numel(),
                   "median_l2": median if math.isfinite(median) else None,
                   "mean_l2": found.mean().item() if found.numel() else None,
                   "found": found.numel() / norms.numel() if norms.numel() else None},
        }

    def main_attack(self, run, eps, *, steps_factor=1, restarts=1):
        """PGD with its step scaled by eps / max(self.eps), so the check at a large ε moves as far
        relative to ε."""
        step = self.step_size * eps / max(self.eps)
        return PGD(run.model, eps=eps, step_size=step, steps=self.steps * steps_factor, restarts=restarts,
                   random_start=True, norm="linf", clip=run.clip)


def malt_scores(norm: str, candidates: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """MALT's target ranking (Melamed et al. 2024, arXiv 2407.02240) as an APGD-T ``target_score``:
    ``score(x_in, y, logits) -> (B, K)`` (``logits = model(x_in)`` with its graph, ``x_in``
    requiring grad: APGD-T's own clean forward), for the ``candidates`` highest other logits the
    linearised signed distance to that class's boundary, (z_t − z_y)/‖∇ₓ(z_t − z_y)‖_* (the dual
    norm of ``norm``: L1 for L∞, L2 for L2; ≤ 0 for a correctly classified x, nearest highest),
    and −inf for the other classes. Costs ``candidates`` backward passes through the given
    forward's graph (retained); on a linear model it is the exact distance."""
    dual = 1 if norm == "linf" else 2

    def score(x_in: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        classes = top_other_classes(logits.detach(), y, candidates)
        z_y = logits.gather(1, y[:, None])
        scores = torch.full_like(logits, -math.inf)
        for j in range(classes.shape[1]):
            t = classes[:, j : j + 1]
            gap = logits.gather(1, t) - z_y
            # The sum's gradient is each sample's own: no sample couples to another.
            (grad,) = torch.autograd.grad(gap.sum(), x_in, retain_graph=True)
            size = grad.flatten(1).norm(p=dual, dim=1)
            gap = gap.detach().squeeze(1)
            scores.scatter_(1, t, (gap / size.clamp_min(torch.finfo(size.dtype).tiny)).to(scores.dtype)[:, None])
        return scores

    return score


@dataclass(frozen=True)
class RapidSuite(Suite):
    """A cheap protocol for model selection, per-epoch tracking and sweeps, at each ε > 0 of
    ``evaluate()``'s eps in its norm, each attack on the points still robust:

    1. APGD-CE, ``steps`` iterations (default 50), 1 restart;
    2. APGD-T, ``target_steps`` iterations (default 100) per target, on the ``n_target_classes``
       targets (default 3) per point that MALT's linearised margin ranks nearest among the
       ``candidates`` (default 9) highest other logits at x (:func:`malt_scores`);
    3. Square: at the masking checks' radius, its gradient-free probe (``checks.square_queries``
       queries) on the check subset; on all points left robust, at every ε, only when a
       gradient-masking check (:data:`GRADIENT_MASKING`: gradient_free, large_eps,
       zero_gradients) flags, with ``square_queries`` queries (default 5000, AutoAttack's).

    Why this is enough where gradients work (Croce & Hein 2020's ablations; MALT): APGD-T does
    almost all of AutoAttack's breaking beyond APGD-CE, and MALT reaches AutoAttack's successes
    with a few targets ranked by the linearised distance (z_y − z_t)/‖∇(z_y − z_t)‖ instead of
    all nine ranked by logit, at about a fifth of its time; FAB-T adds next to nothing after
    APGD-T, and Square matters where gradients mislead, which the checks test. K ≥ 4 classes.
    Keeps the points left robust (on the CPU) until the checks have run.
    """

    name: ClassVar[str] = "rapid"

    steps: int = 50
    n_target_classes: int = 3
    candidates: int = 9
    target_steps: int = 100
    square_queries: int = 5000
    checks: MaskingChecks = MaskingChecks()

    def __post_init__(self):
        for name in ("steps", "n_target_classes", "candidates", "target_steps", "square_queries"):
            positive_int(getattr(self, name), name)
        if self.candidates < self.n_target_classes:
            raise ValueError(f"candidates: expected at least n_target_classes={self.n_target_classes}, got "
                             f"{self.candidates}")
        _require_masking_checks(self.checks)

    def attacks(self, model, eps, norm, clip):
        """Per ε > 0 ``{"apgd-ce": APGD, "apgd-t": APGDT, "square": Square}`` and the probe
        (``{"probe": Square}`` at the main ε)."""
        ranking = malt_scores(norm, self.candidates)
        built = {e: {
            "apgd-ce": APGD(model, eps=e, steps=self.steps, norm=norm, loss="ce", clip=clip),
            "apgd-t": APGDT(model, eps=e, steps=self.target_steps, norm=norm, n_target_classes=self.n_target_classes,
                            target_score=ranking, clip=clip),
            "square": Square(model, eps=e, n_queries=self.square_queries, norm=norm, clip=clip),
        } for e in eps if e > 0}
        built["probe"] = Square(model, eps=max(eps), n_queries=self.checks.square_queries, norm=norm, clip=clip)
        return built

    def batch(self, run, x, y, logits, correct, offset, add):
        _require_four_classes(self.name, logits)
        in_subset = torch.arange(x.shape[0], device=x.device) + offset < self.checks.subset
        robust_at = {}
        for e in run.eps:
            robust = correct.clone()
            _in_turn(run.attacks.get(e), ("apgd-ce", "apgd-t"), x, y, robust, f"rapid@{e}", add)
            if e == run.main_eps:
                # The gradient-free check's probe, part of the suite: what it breaks is broken.
                todo = (robust & in_subset).nonzero().squeeze(1)
                if e > 0 and todo.numel():
                    broke = run.attacks["probe"](x[todo], y[todo]).success
                    add("check:square_broke", broke)
                    robust[todo] = ~broke
            add(f"rapid@{e}:probe", robust)
            robust_at[e] = robust
        radii = [e for e in run.eps if e > 0]
        if radii:  # kept for the Square run the checks may call for; on the CPU, as that is rare
            left = torch.stack([robust_at[e] for e in radii], 1)
            rows = left.any(1).nonzero().squeeze(1)
            run.kept.append((x[rows].cpu(), y[rows].cpu(), left[rows].cpu()))
        return robust_at[run.main_eps]

    def keys(self, run):
        return [f"rapid@{e}:{stage}" for e in run.eps for stage in ("apgd-ce", "apgd-t", "probe")]

    def finish(self, run, flags, add):
        """Square on every point left robust, at every ε > 0, if a gradient-masking check flagged."""
        if not set(flags) & set(GRADIENT_MASKING):
            return []
        radii = [e for e in run.eps if e > 0]
        for x, y, left in run.kept:
            for start in range(0, x.shape[0], run.batch_size):
                xs, ys = x[start : start + run.batch_size].to(run.device), y[start : start + run.batch_size].to(run.device)
                for i, e in enumerate(radii):
                    todo = left[start : start + run.batch_size, i].to(run.device).nonzero().squeeze(1)
                    if todo.numel():
                        add(f"rapid@{e}:square_broke", run.attacks[e]["square"](xs[todo], ys[todo]).success)
        return [f"rapid@{e}:square_broke" for e in radii]

    def report(self, run, totals, n):
        """``[{"eps", "acc", "cumulative": {"apgd-ce", "apgd-t", "square"}, "square_on"}]``: per ε the
        robust accuracy after each stage (``acc``: after all); ``square_on`` says where Square ran:
        "all" (every point left robust: a gradient-masking flag was raised), "subset" (only the
        probe on the check subset, at the checks' radius) or "none"."""
        ran_all = f"rapid@{run.main_eps}:square_broke" in totals
        rows = []
        for e in run.eps:
            square = totals[f"rapid@{e}:probe"] - totals.get(f"rapid@{e}:square_broke", 0.0)
            rows.append({"eps": e, "acc": square / n,
                         "cumulative": {"apgd-ce": totals[f"rapid@{e}:apgd-ce"] / n,
                                        "apgd-t": totals[f"rapid@{e}:apgd-t"] / n, "square": square / n},
                         "square_on": "all" if ran_all and e > 0 else "subset" if e == run.main_eps and e > 0
                         else "none"})
        return rows

    def main_attack(self, run, eps, *, steps_factor=1, restarts=1):
        return _apgd_ce(self, run, eps, steps_factor, restarts)

    def probe_gradient_free(self, run, x, y, add):
        """Nothing: the suite's own probe (in :meth:`batch`) is the gradient-free check."""


#: name → suite class; ``evaluate(suite=name)`` runs the class's defaults.
SUITES: dict[str, type[Suite]] = {cls.name: cls for cls in (QuickSuite, StandardSuite, PaperSuite, RapidSuite)}
