"""Clean and adversarial accuracy of a classifier, its alignment, and three evaluation suites with
gradient-masking checks.

``evaluate(model, data, suite="quick", eps=[2/255, 4/255, 8/255], attacks=("pgd",))`` returns plain
numbers (JSON-ready). Every suite reports:

- the clean accuracy;
- Etmann's alignment at the clean input: α = |⟨x, g⟩|/‖g‖ (pixel units) and its cosine
  |⟨x, g⟩|/(‖x‖‖g‖), with g = ∇ₓΨ^{i*}(x) the gradient of the predicted class's logit at the clean
  test image x (:func:`fastsat.alignment.saliency_alignment`; one extra forward and backward pass
  per batch), averaged over the samples;
- per attack of ``attacks`` and ε of ``eps`` the robust accuracy and the *last-iterate*
  alignment: the same two quantities for the clean x and the attack's loss gradient at its last
  iterate, read from the fused step's statistics (no extra pass). That describes the attack's
  trajectory, not the saliency map at x, and is reported under its own name. This is the
  ``quick`` suite (PGD-10 by default, the trainer's per-epoch number).

``suite="standard"`` adds AutoAttack's standard protocol at each ε > 0 of ``eps`` (APGD-CE,
APGD-T, FAB-T, Square, each on the points still robust; :class:`StandardSuite`) and
``suite="paper"`` the SAT authors' protocol (PGD-5, fixed step 2/255, ε ∈ {1, …, 8}/255, and
Carlini–Wagner L2; :class:`PaperSuite`), each with the gradient-masking checks of
:class:`MaskingChecks` (Croce & Hein's ``checks.py``; Carlini et al. 2019).

Under torch.distributed (e.g. torchrun) every rank attacks its contiguous share of the data
(:func:`fastsat._dist.shard`) and the counts and sums are all-reduced, so every rank returns the
numbers of a single-process evaluation of the same data (up to the attacks' random draws).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastsat import _dist
from fastsat._checks import choice, clip_box, describe, number, positive_int
from fastsat._stats import binomial_lower_bound
from fastsat.alignment import saliency_alignment
from fastsat.attacks import APGD, APGDT, CW, FAB, PGD, Square
from fastsat.data import AnnotatedDataset, as_batch, as_batches, data_kind, dataset_loader
from fastsat.grad import check_finite, check_logits, frozen
from fastsat.ops import NORMS

__all__ = ["ATTACKS", "MEANINGS", "SUITES", "MaskingChecks", "PaperSuite", "StandardSuite", "evaluate"]

ATTACKS = ("pgd", "apgd-ce", "apgd-dlr")
SUITES = ("quick", "standard", "paper")
STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")


@dataclass(frozen=True)
class MaskingChecks:
    """Settings of the gradient-masking checks run with the ``standard`` and ``paper`` suites.

    subset: the first N points of the data (default 100) on which the extra attacks run.
    large_eps: L∞ radius in pixel units of the ε-growth check (default 0.5: half the [0, 1] box);
        in L2 the radius is large_eps·√d (d input elements), the norm of a large_eps shift of
        every element.
    factor: the convergence check runs the suite's main attack with factor× the steps and,
        separately, factor× the restarts (default 4).
    square_queries: queries of the paper suite's gradient-free check (default 1000; the standard
        suite's own Square run serves there).
    tolerance: share of the points (default 0.01) a check's count must exceed to raise a flag:
        its one-sided 95% Clopper–Pearson lower bound must, so that one odd point among a few
        dozen raises nothing (1 of 20 has a bound of 0.003) while 3 of 20 does (0.042).
    """

    subset: int = 100
    large_eps: float = 0.5
    factor: int = 4
    square_queries: int = 1000
    tolerance: float = 0.01

    def __post_init__(self):
        positive_int(self.subset, "subset")
        number(self.large_eps, "large_eps", minimum=0, exclusive_min=True)
        positive_int(self.factor, "factor")
        positive_int(self.square_queries, "square_queries")
        number(self.tolerance, "tolerance", minimum=0, maximum=1)


@dataclass(frozen=True)
class StandardSuite:
    """AutoAttack's standard protocol (Croce & Hein 2020; RobustBench): APGD-CE (``steps``
    iterations, 1 restart), APGD-T (targeted DLR, ``n_target_classes`` targets, 1 restart each),
    FAB-T (``n_target_classes`` targets, ``fab_steps`` iterations) and Square
    (``square_queries`` queries), in that order, each on the points still robust. The defaults
    (100, 9, 100, 5000) are the protocol's; K ≥ 4 classes (APGD-T's loss)."""

    steps: int = 100
    n_target_classes: int = 9
    fab_steps: int = 100
    square_queries: int = 5000
    checks: MaskingChecks = MaskingChecks()

    def __post_init__(self):
        for name in ("steps", "n_target_classes", "fab_steps", "square_queries"):
            positive_int(getattr(self, name), name)
        _check_checks(self.checks)


@dataclass(frozen=True)
class PaperSuite:
    """The SAT authors' protocol (Mangla et al. 2020): L∞ PGD with ``steps`` (5) steps of fixed size
    ``step_size`` (2/255), random start, at each ε of ``eps`` ({1, …, 8}/255, pixel units), and
    Carlini–Wagner L2 (``cw_steps`` Adam steps, ``cw_binary_search_steps`` rounds over c;
    defaults 1000 and 9, the authors') reporting the minimal L2 norms and the robust accuracy at
    the L2 radius ``cw_eps`` (default 0.5, RobustBench's CIFAR-10 L2 radius)."""

    eps: tuple[float, ...] = tuple(k / 255 for k in range(1, 9))
    steps: int = 5
    step_size: float = 2 / 255
    cw_eps: float = 0.5
    cw_steps: int = 1000
    cw_binary_search_steps: int = 9
    checks: MaskingChecks = MaskingChecks()

    def __post_init__(self):
        radii = _distinct(self.eps, "eps", "radii (pixel units)", lambda e, name: number(e, name, minimum=0, exclusive_min=True))
        object.__setattr__(self, "eps", tuple(radii))
        positive_int(self.steps, "steps")
        number(self.step_size, "step_size", minimum=0, exclusive_min=True)
        number(self.cw_eps, "cw_eps", minimum=0, exclusive_min=True)
        positive_int(self.cw_steps, "cw_steps")
        positive_int(self.cw_binary_search_steps, "cw_binary_search_steps")
        _check_checks(self.checks)


def _check_checks(checks: object) -> None:
    if not isinstance(checks, MaskingChecks):
        raise TypeError(f"checks: expected a MaskingChecks, got {describe(checks)}")


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


def _distinct(values: object, name: str, what: str, check: Callable[[object, str], object]) -> list:
    """``values`` checked one by one with ``check(value, name)``: a non-empty list without repeats
    (a repeat would be counted twice into the same row)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name}: expected a list of {what}, got {describe(values)}")
    checked = [check(v, name) for v in values]
    if not checked or len(set(checked)) != len(checked):
        raise ValueError(f"{name}: expected a non-empty list of distinct {what}, got {describe(checked)}")
    return checked


def _suite(suite: object) -> StandardSuite | PaperSuite | None:
    """The suite's settings (None for quick) from a name or a settings object."""
    if isinstance(suite, (StandardSuite, PaperSuite)):
        return suite
    if not isinstance(suite, str):
        raise TypeError(f"suite: expected one of {SUITES} or a StandardSuite/PaperSuite, got {describe(suite)}")
    return {"quick": None, "standard": StandardSuite(), "paper": PaperSuite()}[choice(suite, "suite", SUITES)]


def _attack(name: str, model: nn.Module, eps: float, steps: int, step_size: float | None, restarts: int, norm: str,
            clip: tuple[float, float]):
    if name == "pgd":
        step = eps / 4 if step_size is None else step_size
        return PGD(model, eps=eps, step_size=step, steps=steps, norm=norm, random_start=True, restarts=restarts, mode="eval",
                   clip=clip)
    return APGD(model, eps=eps, steps=steps, norm=norm, loss=name.split("-")[1], restarts=restarts, mode="eval", clip=clip)


def _standard_attacks(model: nn.Module, settings: StandardSuite, eps: float, norm: str, clip: tuple[float, float]) -> dict:
    return {
        "apgd-ce": APGD(model, eps=eps, steps=settings.steps, norm=norm, loss="ce", clip=clip),
        "apgd-t": APGDT(model, eps=eps, steps=settings.steps, norm=norm, n_target_classes=settings.n_target_classes,
                         clip=clip),
        "fab-t": FAB(model, eps=eps, steps=settings.fab_steps, norm=norm, n_target_classes=settings.n_target_classes,
                     clip=clip),
        "square": Square(model, eps=eps, n_queries=settings.square_queries, norm=norm, clip=clip),
    }


def _main_attack(model: nn.Module, settings: StandardSuite | PaperSuite, eps: float, norm: str, clip: tuple[float, float], *,
                 factor_steps: int = 1, factor_restarts: int = 1):
    """The suite's main gradient attack at ``eps`` (APGD-CE; the paper suite's PGD with its step
    scaled by eps / max(settings.eps), so the check at a large ε moves as far relative to ε)."""
    if isinstance(settings, StandardSuite):
        return APGD(model, eps=eps, steps=settings.steps * factor_steps, restarts=factor_restarts, norm=norm, clip=clip)
    step = settings.step_size * eps / max(settings.eps)
    return PGD(model, eps=eps, step_size=step, steps=settings.steps * factor_steps, restarts=factor_restarts,
               random_start=True, norm="linf", clip=clip)


def _local_batches(data: object, batch_size: int, max_samples: int | None, device: torch.device
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """This rank's samples as (x, y, index of x[0] in the whole data), in order.

    An (x, y) pair and a map-style dataset of known length are cut into contiguous rank shares
    first (:func:`fastsat._dist.shard` of the first ``max_samples``), so each rank reads only its
    share; any other source (a user's DataLoader, a list of batches, tar shards) is read whole by
    every rank, which keeps the contiguous share of each batch."""
    limit = math.inf if max_samples is None else max_samples
    kind = data_kind(data)
    if kind in ("pair", "dataset"):
        n = min(len(data[0]) if kind == "pair" else len(data), limit)
        mine = _dist.shard(n)
        if kind == "pair":
            x, y = data[0][mine.start : mine.stop], data[1][mine.start : mine.stop]
            batches = [(x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, len(mine), batch_size)]
        else:
            part = (data.subset(slice(mine.start, mine.stop)) if isinstance(data, AnnotatedDataset)
                    else torch.utils.data.Subset(data, mine))
            batches = dataset_loader(part, batch_size=batch_size, shuffle=False, device=device, rank=0, world_size=1)
        offset = mine.start
        for item in batches:
            batch = as_batch(item, device)
            yield batch["image"], batch["label"], offset
            offset += batch["image"].shape[0]
        return
    if kind == "shards":
        batches = dataset_loader(data, batch_size=batch_size, shuffle=False, device=device, rank=0, world_size=1)
    else:
        batches = as_batches(data, batch_size=batch_size, shuffle=False, seed=0, device=device)
    seen = 0
    for item in batches:
        batch = as_batch(item, device)
        take = None if limit == math.inf else max(limit - seen, 0)  # a slice bound must be an int
        x, y = batch["image"][:take], batch["label"][:take]
        mine = _dist.shard(x.shape[0])
        if len(mine):
            yield x[mine.start : mine.stop], y[mine.start : mine.stop], seen + mine.start
        seen += x.shape[0]
        if seen >= limit:
            return


def evaluate(
    model: nn.Module,
    data: object,
    *,
    suite: str | StandardSuite | PaperSuite = "quick",
    eps: Sequence[float] = (2 / 255, 4 / 255, 8 / 255),
    attacks: Sequence[str] = ("pgd",),
    steps: int = 10,
    step_size: float | None = None,
    restarts: int = 1,
    norm: str = "linf",
    batch_size: int = 256,
    max_samples: int | None = None,
    clip: tuple[float, float] = (0.0, 1.0),
) -> dict:
    """Clean accuracy, clean-input alignment, robust accuracy under each attack at each ε, and the
    suite's protocol with its gradient-masking checks; model in eval mode.

    Args:
        model: classifier on pixel-space (B, C, H, W) input in ``clip``, returning (B, K) logits.
        data: a map-style dataset (batched by ``batch_size``, in order), an (x, y) pair of tensors,
            or an iterable of batches (dicts with "image"/"label" or (x, y) pairs).
        suite: "quick" (default: only the rows of ``attacks``), "standard" (AutoAttack at each ε >
            0 of ``eps``, :class:`StandardSuite`) or "paper" (the SAT authors' PGD-5 and CW at
            their own radii, :class:`PaperSuite`), or a StandardSuite/PaperSuite with other
            settings (fewer iterations for a smoke test).
        eps: distinct radii in pixel units (e.g. 8/255), default (2, 4, 8)/255; 0 gives clean
            accuracy. The radii of ``attacks`` and of the standard suite.
        attacks: distinct names from "pgd" (L∞/L2 PGD, random start), "apgd-ce", "apgd-dlr"
            (Croce & Hein), run at every ε of ``eps`` with every suite.
        steps: iterations per attack of ``attacks`` (default 10). step_size: PGD step in pixels,
            default ε/4. restarts: random restarts (per-sample best kept).
        norm: "linf" (default) or "l2", of ``attacks`` and of the standard suite (the paper suite
            is L∞ PGD and L2 CW).
        batch_size: points per batch (per rank). max_samples: stop after this many samples (None: all).
        clip: the valid input box (lo, hi) in pixel units (default (0, 1)); every attack stays inside it.

    A sample counts as robust when it is classified correctly both clean and at the attack's output.

    Returns:
        ``{"n": samples, "suite": name, "clean_acc": float, "alignment": float, "cosine": float,
        "attacks": {name: [{"eps", "acc", "last_iterate_alignment", "last_iterate_cosine"}, ...]},
        "seconds": float, "points_per_s": float}`` and, for the standard and paper suites,
        ``"standard"`` / ``"paper"`` and ``"masking"``:

        - ``standard``: ``[{"eps", "acc", "cumulative": {"apgd-ce", "apgd-t", "fab-t", "square"}}]``,
          per ε the robust accuracy after each attack in turn (``acc``: after all four);
        - ``paper``: ``{"pgd": [{"eps", "acc"}, ...], "cw": {"eps", "acc", "points", "median_l2",
          "mean_l2", "found"}}``: CW's robust accuracy at the L2 radius ``eps``; over the ``points``
          correctly classified clean points, the median of the smallest L2 perturbation found
          (pixel units; inf where CW found none; None if that median is inf or there are no such
          points), its mean over the points with one (None if none) and the share of those;
        - ``masking``: ``{"flags": [names raised], "checks": {name: {"flagged", "meaning",
          ...evidence}}}`` for the checks (:data:`MEANINGS`, :class:`MaskingChecks`), run at the
          suite's main ε (standard: the largest of ``eps``; paper: 8/255), each flagged when its
          count of points is beyond ``tolerance`` (see :class:`MaskingChecks`):
          "gradient_free" — the share of all points the standard suite's Square broke after the
          gradient attacks (``gradient_acc`` − ``square_acc``), or the share of the check
          subset the paper suite's PGD-5 left robust and Square breaks (``square_broke``);
          "large_eps" — robust accuracy of the main attack (APGD-CE; paper: PGD-5 with its step
          scaled to the radius) at ``eps`` = large_eps (L2: ×√d) on the check subset;
          "convergence" — the suite's robust accuracy ``acc`` on the check subset and what is
          left when the main attack with ``factor``× the steps (``acc_more_steps``) or restarts
          (``acc_more_restarts``) is run on the points it left robust;
          "zero_gradients" — the share of all points whose predicted logit has an all-zero
          input gradient. Shares of the check subset are of its correctly classified ``points``.

        ``alignment`` / ``cosine``: means over samples of α (pixel units) and its cosine at the
        clean x for the predicted logit's gradient (a sample with a zero gradient counts as 0).
        ``last_iterate_*``: means over samples of the same quantities for the attack's loss
        gradient at its last iterate; None at ε = 0 (no attack is run) and for attacks that
        report none. ``points_per_s``: samples over the wall time of the slowest rank.
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    settings = _suite(suite)
    attacks = _distinct(attacks, "attacks", "attack names", lambda a, name: choice(a, name, ATTACKS))
    eps = _distinct(eps, "eps", "radii (pixel units)", lambda e, name: number(e, name, minimum=0))
    steps = positive_int(steps, "steps")
    step_size = number(step_size, "step_size", minimum=0, exclusive_min=True, allow_none=True)
    restarts = positive_int(restarts, "restarts")
    norm = choice(norm, "norm", NORMS)
    batch_size = positive_int(batch_size, "batch_size")
    max_samples = positive_int(max_samples, "max_samples", allow_none=True)
    clip = clip_box(clip)
    # Built once, before any data is read: their own argument checks run first.
    runs = {(name, e): _attack(name, model, e, steps, step_size, restarts, norm, clip) for name in attacks for e in eps if e > 0}
    chains = {}
    if isinstance(settings, StandardSuite):
        chains = {e: _standard_attacks(model, settings, e, norm, clip) for e in eps if e > 0}
    elif isinstance(settings, PaperSuite):
        paper_pgd = {e: PGD(model, eps=e, step_size=settings.step_size, steps=settings.steps, random_start=True, clip=clip)
                     for e in settings.eps}
        cw = CW(model, eps=settings.cw_eps, steps=settings.cw_steps,
                binary_search_steps=settings.cw_binary_search_steps, clip=clip)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    # Every count and sum lives in one float64 vector per name, all-reduced once at the end.
    sums: dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor) -> None:
        value = value.detach().double().sum()
        sums[key] = sums[key] + value if key in sums else value

    # The check subset: its points, labels, which of them are classified correctly and which the
    # suite left robust at its main ε.
    subset: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    cw_norms = []
    main_eps = (max(settings.eps) if isinstance(settings, PaperSuite) else max(eps)) if settings is not None else 0.0
    for x, y, offset in _local_batches(data, batch_size, max_samples, device):
        check_finite(x, "data", "finite pixel values in the images")
        with frozen(model, "eval"), torch.no_grad():
            logits = model(x)
        check_logits(logits, x.shape[0], classes=2, finite=True)  # NaN logits would count as made-up accuracies
        if isinstance(settings, StandardSuite) and logits.shape[1] < 4:
            raise ValueError(f"suite: 'standard' runs APGD-T, whose targeted DLR loss needs at least 4 classes; the model "
                             f"has {logits.shape[1]}")
        correct = logits.argmax(1) == y
        add("n", torch.ones_like(y))
        add("clean", correct)
        stats = saliency_alignment(model, x, target="predicted", mode="eval")
        add("alignment", stats.alignment)
        add("cosine", stats.cosine)
        add("zero_gradients", stats.grad_norm == 0)
        for name in attacks:
            for e in eps:
                if e == 0:
                    add(f"{name}@{e}", correct)
                    continue
                result = runs[(name, e)](x, y)
                # Robust = correct on the clean input and still correct at the attack's output (a
                # weak attack can land a misclassified input on the right class; that is no robustness).
                add(f"{name}@{e}", correct & ~result.success)
                if result.stats is not None:
                    add(f"{name}@{e}:reported", torch.ones((), device=x.device))
                    add(f"{name}@{e}:alignment", result.stats.alignment)
                    add(f"{name}@{e}:cosine", result.stats.cosine)
        if isinstance(settings, StandardSuite):
            for e in eps:
                robust = correct.clone()
                for name in STANDARD_ATTACKS:
                    todo = robust.nonzero().squeeze(1)
                    if e > 0 and todo.numel():
                        robust[todo] = ~chains[e][name](x[todo], y[todo]).success
                    add(f"standard@{e}:{name}", robust)
                if e == main_eps:
                    main_robust = robust
        elif isinstance(settings, PaperSuite):
            for e in settings.eps:
                robust = correct & ~paper_pgd[e](x, y).success
                add(f"paper@{e}", robust)
                if e == main_eps:
                    main_robust = robust
            result = cw(x, y)
            add("cw", correct & ~result.success)
            cw_norms.append(result.delta_norm.double().cpu()[correct.cpu()])
        if settings is not None and offset < settings.checks.subset:
            take = min(x.shape[0], settings.checks.subset - offset)
            subset.append((x[:take], y[:take], correct[:take], main_robust[:take]))
    if settings is not None:
        large_eps = settings.checks.large_eps
        if norm == "l2" and isinstance(settings, StandardSuite) and subset:
            large_eps *= math.sqrt(subset[0][0][0].numel())
        large_eps = max(_dist.all_gather_objects(large_eps))  # a rank without check points has no d
        _checks_sums(model, settings, subset, main_eps, large_eps, norm, clip, add)
    # The same keys in the same order on every rank (a rank without data or without check points
    # contributes zeros), so one all-reduce sums them all.
    keys = ["n", "clean", "alignment", "cosine", "zero_gradients"]
    keys += [f"{name}@{e}{part}" for name in attacks for e in eps for part in ("", ":alignment", ":cosine", ":reported")]
    if isinstance(settings, StandardSuite):
        keys += [f"standard@{e}:{name}" for e in eps for name in STANDARD_ATTACKS]
    elif isinstance(settings, PaperSuite):
        keys += [f"paper@{e}" for e in settings.eps] + ["cw"]
    if settings is not None:
        keys += [f"check:{name}" for name in ("n", "main", "more_steps", "more_restarts", "large_eps", "square_broke")]
    zero = torch.zeros((), dtype=torch.float64, device=device)
    total = _dist.all_reduce_sum(torch.stack([sums.get(k, zero) for k in keys]))
    totals = dict(zip(keys, total.tolist(), strict=True))
    n = int(totals["n"])
    if n == 0:
        raise ValueError("data: yields no samples")
    seconds = max(_dist.all_gather_objects(time.perf_counter() - started))

    def share(key: str) -> float:
        return totals[key] / n

    suite_name = {type(None): "quick", StandardSuite: "standard", PaperSuite: "paper"}[type(settings)]
    report = {"n": n, "suite": suite_name, "clean_acc": share("clean"), "alignment": share("alignment"), "cosine": share("cosine"),
              "attacks": {name: [] for name in attacks}}
    for name in attacks:
        for e in eps:
            has_stats = totals[f"{name}@{e}:reported"] > 0
            report["attacks"][name].append({
                "eps": e, "acc": share(f"{name}@{e}"),
                "last_iterate_alignment": share(f"{name}@{e}:alignment") if has_stats else None,
                "last_iterate_cosine": share(f"{name}@{e}:cosine") if has_stats else None,
            })
    if isinstance(settings, StandardSuite):
        report["standard"] = [
            {"eps": e, "acc": share(f"standard@{e}:square"),
             "cumulative": {name: share(f"standard@{e}:{name}") for name in STANDARD_ATTACKS}}
            for e in eps
        ]
    elif isinstance(settings, PaperSuite):
        # Over the correctly classified points only: a misclassified point has no boundary to reach.
        norms = torch.cat([t for part in _dist.all_gather_objects(cw_norms) for t in part])
        found = norms[torch.isfinite(norms)]
        # torch's lower median: the smaller middle value for an even count
        median = norms.median().item() if norms.numel() else math.inf
        report["paper"] = {
            "pgd": [{"eps": e, "acc": share(f"paper@{e}")} for e in settings.eps],
            "cw": {"eps": settings.cw_eps, "acc": share("cw"), "points": norms.numel(),
                   "median_l2": median if math.isfinite(median) else None,
                   "mean_l2": found.mean().item() if found.numel() else None,
                   "found": found.numel() / norms.numel() if norms.numel() else None},
        }
    if settings is not None:
        report["masking"] = _masking_report(settings, totals, n, report, main_eps, large_eps)
    report["seconds"] = seconds
    report["points_per_s"] = n / seconds
    return report


def _checks_sums(model: nn.Module, settings: StandardSuite | PaperSuite, subset: list, main_eps: float,
                 large_eps: float, norm: str, clip: tuple[float, float], add: Callable) -> None:
    """Run the masking checks' extra attacks on this rank's part of the check subset (``subset``:
    (x, y, correct on x, robust under the suite at ``main_eps``) per batch) and add their counts
    (``check:*``)."""
    checks = settings.checks
    if not subset:
        return
    x, y, correct, robust = (torch.cat(parts) for parts in zip(*subset, strict=True))
    add("check:n", correct)
    add("check:main", robust)
    # Convergence and the gradient-free check: do a stronger or a gradient-free attack break points
    # the suite left robust?
    left = robust.nonzero().squeeze(1)
    if left.numel():
        xl, yl = x[left], y[left]
        more_steps = _main_attack(model, settings, main_eps, norm, clip, factor_steps=checks.factor)(xl, yl).success
        more_restarts = _main_attack(model, settings, main_eps, norm, clip, factor_restarts=checks.factor)(xl, yl).success
        add("check:more_steps", ~more_steps)
        add("check:more_restarts", ~more_restarts)
        if isinstance(settings, PaperSuite):
            add("check:square_broke", Square(model, eps=main_eps, n_queries=checks.square_queries, clip=clip)(xl, yl).success)
    todo = correct.nonzero().squeeze(1)
    if todo.numel():
        add("check:large_eps", ~_main_attack(model, settings, large_eps, norm, clip)(x[todo], y[todo]).success)


def _masking_report(settings: StandardSuite | PaperSuite, totals: dict, n: int, report: dict, main_eps: float,
                    large_eps: float) -> dict:
    """The four checks, each with its evidence, ``flagged`` and ``meaning``. Shares of the check
    subset are of its correctly classified points (``points``)."""
    tol = settings.checks.tolerance
    points = int(totals["check:n"])

    def share(key: str) -> float:
        return totals[key] / max(points, 1)

    def beyond(fraction: float, total: int) -> bool:
        """Whether ``fraction`` of ``total`` points is beyond the tolerance (its 95% lower bound)."""
        return binomial_lower_bound(round(fraction * total), total) > tol

    if isinstance(settings, StandardSuite):
        # The suite's own Square run, on all points: what it broke after the three gradient attacks.
        row = next(row for row in report["standard"] if row["eps"] == main_eps)
        gradient, square = row["cumulative"]["fab-t"], row["cumulative"]["square"]
        gradient_free = {"eps": main_eps, "gradient_acc": gradient, "square_acc": square,
                         "flagged": beyond(gradient - square, n)}
    else:
        broke = share("check:square_broke")
        gradient_free = {"eps": main_eps, "points": points, "square_queries": settings.checks.square_queries,
                         "square_broke": broke, "flagged": beyond(broke, points)}
    acc = share("check:main")
    more_steps, more_restarts = share("check:more_steps"), share("check:more_restarts")
    zero = totals["zero_gradients"] / n
    results = {
        "gradient_free": gradient_free,
        "large_eps": {"eps": large_eps, "points": points, "acc": share("check:large_eps"),
                      "flagged": beyond(share("check:large_eps"), points)},
        "convergence": {"eps": main_eps, "points": points, "acc": acc, "acc_more_steps": more_steps,
                        "acc_more_restarts": more_restarts, "factor": settings.checks.factor,
                        "flagged": beyond(acc - min(more_steps, more_restarts), points)},
        "zero_gradients": {"share": zero, "flagged": beyond(zero, n)},
    }
    for name, result in results.items():
        result["meaning"] = MEANINGS[name]
    return {"flags": [name for name, result in results.items() if result["flagged"]], "checks": results}
