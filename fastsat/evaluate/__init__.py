"""Clean and adversarial accuracy of a classifier, its alignment, and the evaluation suites of
:mod:`fastsat.evaluate.suites` with their gradient-masking checks.

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
APGD-T, FAB-T, Square, each on the points still robust; :class:`StandardSuite`),
``suite="rapid"`` a cheaper one for model selection and sweeps (a short APGD-CE, APGD-T on three
targets per point ranked by MALT's linearised margin, Square only where the masking checks call
for it; :class:`RapidSuite`) and ``suite="paper"`` the SAT authors' protocol (PGD-5, fixed step
2/255, ε ∈ {1, …, 8}/255, and Carlini–Wagner L2; :class:`PaperSuite`), each with the
gradient-masking checks of :class:`MaskingChecks` (Croce & Hein's ``checks.py``; Carlini et al.
2019). The suites are objects (:class:`fastsat.evaluate.suites.Suite`; names in :data:`SUITES`);
the attacks of ``attacks`` come from :data:`fastsat.attacks.ATTACKS`.

Under torch.distributed (e.g. torchrun) every rank attacks its contiguous share of the data
(:func:`fastsat._dist.shard`) and the counts and sums are all-reduced, so every rank returns the
numbers of a single-process evaluation of the same data (up to the attacks' random draws).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from fastsat import _dist
from fastsat._checks import choice, clip_box, describe, number, positive_int
from fastsat.alignment import saliency_alignment
from fastsat.attacks import ATTACKS
from fastsat.data import AnnotatedDataset, as_batch, as_batches, data_kind, dataset_loader
from fastsat.evaluate.suites import (
    MEANINGS,
    SUITES,
    MaskingChecks,
    PaperSuite,
    RapidSuite,
    StandardSuite,
    Suite,
    distinct,
)
from fastsat.grad import check_finite, check_logits, frozen
from fastsat.ops import NORMS

__all__ = ["ATTACKS", "MEANINGS", "SUITES", "MaskingChecks", "PaperSuite", "RapidSuite", "StandardSuite", "Suite",
           "evaluate"]


def _suite(suite: object) -> Suite:
    """The suite's settings object from a name (its defaults) or a :class:`Suite`."""
    if isinstance(suite, Suite):
        if suite.checks is not None and not callable(getattr(suite, "main_attack", None)):
            raise TypeError(f"suite: {type(suite).__name__} has masking checks but no main_attack(run, eps, *, "
                            "steps_factor, restarts), the attack they rerun; define it or set checks=None")
        return suite
    if not isinstance(suite, str):
        raise TypeError(f"suite: expected one of {tuple(SUITES)} or a Suite (e.g. StandardSuite), got {describe(suite)}")
    return SUITES[choice(suite, "suite", tuple(SUITES))]()


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
    suite: str | Suite = "quick",
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
            0 of ``eps``, :class:`StandardSuite`), "rapid" (the cheap protocol at each ε > 0 of
            ``eps``, :class:`RapidSuite`) or "paper" (the SAT authors' PGD-5 and CW at their own
            radii, :class:`PaperSuite`), or a suite object with other settings (fewer iterations
            for a smoke test).
        eps: distinct radii in pixel units (e.g. 8/255), default (2, 4, 8)/255; 0 gives clean
            accuracy. The radii of ``attacks`` and of the standard and rapid suites.
        attacks: distinct names from :data:`ATTACKS`: "pgd" (L∞/L2 PGD, random start), "apgd-ce",
            "apgd-dlr" (Croce & Hein), run at every ε of ``eps`` with every suite; empty (``()``)
            with a suite other than quick runs that suite alone.
        steps: iterations per attack of ``attacks`` (default 10). step_size: PGD step in pixels,
            default ε/4. restarts: random restarts (per-sample best kept).
        norm: "linf" (default) or "l2", of ``attacks`` and of the standard and rapid suites (the
            paper suite is L∞ PGD and L2 CW).
        batch_size: points per batch (per rank). max_samples: stop after this many samples (None: all).
        clip: the valid input box (lo, hi) in pixel units (default (0, 1)); every attack stays inside it.

    A sample counts as robust when it is classified correctly both clean and at the attack's output.

    Returns:
        ``{"n": samples, "suite": name, "clean_acc": float, "alignment": float, "cosine": float,
        "attacks": {name: [{"eps", "acc", "last_iterate_alignment", "last_iterate_cosine"}, ...]},
        "seconds": float, "points_per_s": float}`` and, for the standard, rapid and paper suites,
        ``"standard"`` / ``"rapid"`` / ``"paper"`` and ``"masking"``:

        - ``standard``: ``[{"eps", "acc", "cumulative": {"apgd-ce", "apgd-t", "fab-t", "square"}}]``,
          per ε the robust accuracy after each attack in turn (``acc``: after all four);
        - ``rapid``: ``[{"eps", "acc", "cumulative": {"apgd-ce", "apgd-t", "square"}, "square_on"}]``,
          likewise, with ``square_on`` where Square ran: "all" (every point left robust, because a
          gradient-masking check flagged), "subset" (only the gradient-free check's probe on the
          check subset, at the main ε) or "none";
        - ``paper``: ``{"pgd": [{"eps", "acc"}, ...], "cw": {"eps", "acc", "points", "median_l2",
          "mean_l2", "found"}}``: CW's robust accuracy at the L2 radius ``eps``; over the ``points``
          correctly classified clean points, the median of the smallest L2 perturbation found
          (pixel units; inf where CW found none; None if that median is inf or there are no such
          points), its mean over the points with one (None if none) and the share of those;
        - ``masking``: ``{"flags": [names raised], "checks": {name: {"flagged", "meaning",
          ...evidence}}}`` for the checks (:data:`MEANINGS`, :class:`MaskingChecks`), run at the
          suite's main ε (standard, rapid: the largest of ``eps``; paper: 8/255), each flagged when
          its count of points is beyond ``tolerance`` (see :class:`MaskingChecks`):
          "gradient_free" — the share of all points the standard suite's Square broke after the
          gradient attacks (``gradient_acc`` − ``square_acc``), or the share of the check
          subset the paper (rapid) suite's PGD-5 (APGD-CE and APGD-T) left robust and Square
          breaks (``square_broke``);
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
    suite = _suite(suite)
    # With a suite other than quick, attacks=() runs the suite alone.
    attacks = distinct(attacks, "attacks", "attack names", lambda a, name: choice(a, name, tuple(ATTACKS)),
                       allow_empty=suite.name != "quick")
    eps = distinct(eps, "eps", "radii (pixel units)", lambda e, name: number(e, name, minimum=0))
    steps = positive_int(steps, "steps")
    step_size = number(step_size, "step_size", minimum=0, exclusive_min=True, allow_none=True)
    restarts = positive_int(restarts, "restarts")
    norm = choice(norm, "norm", NORMS)
    batch_size = positive_int(batch_size, "batch_size")
    max_samples = positive_int(max_samples, "max_samples", allow_none=True)
    clip = clip_box(clip)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    # Built once, before any data is read: their own argument checks run first.
    rows = {(name, e): ATTACKS[name](model, eps=e, steps=steps, step_size=step_size, restarts=restarts, norm=norm,
                                     clip=clip)
            for name in attacks for e in eps if e > 0}
    run = suite.start(model, eps, norm, clip, batch_size, device)
    checks = suite.checks
    # Every count and sum lives in one float64 vector per name, all-reduced once at the end.
    sums: dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor) -> None:
        value = value.detach().double().sum()
        sums[key] = sums[key] + value if key in sums else value

    # The check subset: its points, labels, which of them are classified correctly and which the
    # suite left robust at its main ε.
    subset: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for x, y, offset in _local_batches(data, batch_size, max_samples, device):
        check_finite(x, "data", "finite pixel values in the images")
        with frozen(model, "eval"), torch.no_grad():
            logits = model(x)
        check_logits(logits, x.shape[0], classes=2, finite=True)  # NaN logits would count as made-up accuracies
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
                result = rows[(name, e)](x, y)
                # Robust = correct on the clean input and still correct at the attack's output (a
                # weak attack can land a misclassified input on the right class; that is no robustness).
                add(f"{name}@{e}", correct & ~result.success)
                if result.stats is not None:
                    add(f"{name}@{e}:reported", torch.ones((), device=x.device))
                    add(f"{name}@{e}:alignment", result.stats.alignment)
                    add(f"{name}@{e}:cosine", result.stats.cosine)
        main_robust = suite.batch(run, x, y, logits, correct, offset, add)
        if checks is not None and offset < checks.subset:
            take = min(x.shape[0], checks.subset - offset)
            subset.append((x[:take], y[:take], correct[:take], main_robust[:take]))
    if checks is not None:
        large_eps = checks.large_radius(run, subset)
        checks.count_evidence(suite, run, subset, large_eps, add)
    # The same keys in the same order on every rank (a rank without data or without check points
    # contributes zeros), so one all-reduce sums them all.
    keys = ["n", "clean", "alignment", "cosine", "zero_gradients"]
    keys += [f"{name}@{e}{part}" for name in attacks for e in eps for part in ("", ":alignment", ":cosine", ":reported")]
    keys += suite.keys(run) + (list(checks.KEYS) if checks is not None else [])
    totals = _all_reduced(sums, keys, device)
    n = int(totals["n"])
    if n == 0:
        raise ValueError("data: yields no samples")
    if checks is not None:
        masking = checks.report(suite, run, totals, n, large_eps)
        # Work that depends on the flags (rapid's Square) and its own all-reduce; the flags are the
        # same on every rank, so every rank takes part.
        sums.clear()
        late = suite.finish(run, masking["flags"], add)
        if late:
            totals |= _all_reduced(sums, late, device)

    def share(key: str) -> float:
        return totals[key] / n

    report = {"n": n, "suite": suite.name, "clean_acc": share("clean"), "alignment": share("alignment"),
              "cosine": share("cosine"), "attacks": {name: [] for name in attacks}}
    for name in attacks:
        for e in eps:
            has_stats = totals[f"{name}@{e}:reported"] > 0
            report["attacks"][name].append({
                "eps": e, "acc": share(f"{name}@{e}"),
                "last_iterate_alignment": share(f"{name}@{e}:alignment") if has_stats else None,
                "last_iterate_cosine": share(f"{name}@{e}:cosine") if has_stats else None,
            })
    part = suite.report(run, totals, n)
    if part is not None:
        report[suite.name] = part
    if checks is not None:
        report["masking"] = masking
    seconds = max(_dist.all_gather_objects(time.perf_counter() - started))
    report["seconds"] = seconds
    report["points_per_s"] = n / seconds
    return report


def _all_reduced(sums: dict[str, torch.Tensor], keys: list[str], device: torch.device) -> dict[str, float]:
    """``sums`` at ``keys`` (zero where absent) summed over ranks in one all-reduce."""
    zero = torch.zeros((), dtype=torch.float64, device=device)
    total = _dist.all_reduce_sum(torch.stack([sums.get(k, zero) for k in keys]))
    return dict(zip(keys, total.tolist(), strict=True))
