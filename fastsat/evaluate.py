"""Clean and adversarial accuracy of a classifier at a list of ε (pixel units), and its alignment.

``evaluate(model, data, eps=[2/255, 4/255, 8/255], attacks=("pgd",))`` returns plain numbers
(JSON-ready):

- the clean accuracy;
- Etmann's alignment at the clean input: α = |⟨x, g⟩|/‖g‖ (pixel units) and its cosine
  |⟨x, g⟩|/(‖x‖‖g‖), with g = ∇ₓΨ^{i*}(x) the gradient of the predicted class's logit at the clean
  test image x (:func:`fastsat.alignment.saliency_alignment`; one extra forward and backward pass
  per batch), averaged over the samples;
- per attack and ε the robust accuracy and the *last-iterate* alignment: the same two quantities
  for the clean x and the attack's loss gradient at its last iterate, read from the fused step's
  statistics (no extra pass). That describes the attack's trajectory, not the saliency map at x,
  and is reported under its own name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fastsat._checks import choice, describe, number, positive_int
from fastsat.alignment import saliency_alignment
from fastsat.attacks import APGD, PGD
from fastsat.data import as_batch, make_loader
from fastsat.grad import frozen
from fastsat.ops import NORMS

__all__ = ["ATTACKS", "evaluate"]

ATTACKS = ("pgd", "apgd-ce", "apgd-dlr")


def _distinct(values: object, name: str, what: str, check: Callable[[object, str], object]) -> list:
    """``values`` checked one by one with ``check(value, name)``: a non-empty list without repeats
    (a repeat would be counted twice into the same row)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name}: expected a list of {what}, got {describe(values)}")
    checked = [check(v, name) for v in values]
    if not checked or len(set(checked)) != len(checked):
        raise ValueError(f"{name}: expected a non-empty list of distinct {what}, got {describe(checked)}")
    return checked


def _attack(name: str, model: nn.Module, eps: float, steps: int, step_size: float | None, restarts: int, norm: str):
    if name == "pgd":
        step = eps / 4 if step_size is None else step_size
        return PGD(model, eps=eps, step_size=step, steps=steps, norm=norm, random_start=True, restarts=restarts, mode="eval")
    return APGD(model, eps=eps, steps=steps, norm=norm, loss=name.split("-")[1], restarts=restarts, mode="eval")


def evaluate(
    model: nn.Module,
    data: object,
    *,
    eps: Sequence[float] = (2 / 255, 4 / 255, 8 / 255),
    attacks: Sequence[str] = ("pgd",),
    steps: int = 10,
    step_size: float | None = None,
    restarts: int = 1,
    norm: str = "linf",
    batch_size: int = 256,
    max_samples: int | None = None,
) -> dict:
    """Clean accuracy, clean-input alignment, and robust accuracy under each attack at each ε,
    model in eval mode.

    Args:
        model: classifier on pixel-space (B, C, H, W) input in [0, 1], returning (B, K) logits.
        data: a map-style dataset (batched by ``batch_size``, in order) or an iterable of batches
            (dicts with "image"/"label" or (x, y) pairs).
        eps: distinct radii in pixel units (e.g. 8/255), default (2, 4, 8)/255; 0 gives clean accuracy.
        attacks: distinct names from "pgd" (L∞/L2 PGD, random start), "apgd-ce", "apgd-dlr"
            (Croce & Hein).
        steps: iterations per attack (default 10). step_size: PGD step in pixels, default ε/4.
        restarts: random restarts (per-sample best kept). norm: "linf" (default) or "l2".
        max_samples: stop after this many samples (None: all).

    A sample counts as robust when it is classified correctly both clean and at the attack's output.

    Returns:
        ``{"n": samples, "clean_acc": float, "alignment": float, "cosine": float,
        "attacks": {name: [{"eps", "acc", "last_iterate_alignment", "last_iterate_cosine"}, ...]}}``.
        ``alignment`` / ``cosine``: means over samples of α (pixel units) and its cosine at the
        clean x for the predicted logit's gradient (a sample with a zero gradient counts as 0).
        ``last_iterate_*``: means over samples of the same quantities for the attack's loss
        gradient at its last iterate; None at ε = 0 (no attack is run) and for attacks that
        report none (APGD).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    attacks = _distinct(attacks, "attacks", "attack names", lambda a, name: choice(a, name, ATTACKS))
    eps = _distinct(eps, "eps", "radii (pixel units)", lambda e, name: number(e, name, minimum=0))
    steps = positive_int(steps, "steps")
    step_size = number(step_size, "step_size", minimum=0, exclusive_min=True, allow_none=True)
    restarts = positive_int(restarts, "restarts")
    norm = choice(norm, "norm", NORMS)
    batch_size = positive_int(batch_size, "batch_size")
    max_samples = positive_int(max_samples, "max_samples", allow_none=True)
    # Built once, before any data is read: their own argument checks run first.
    runs = {(name, e): _attack(name, model, e, steps, step_size, restarts, norm) for name in attacks for e in eps if e > 0}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    batches = make_loader(data, batch_size=batch_size, shuffle=False, seed=0, device=device)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    clean, align, cos = zero.clone(), zero.clone(), zero.clone()
    robust = {key: zero.clone() for key in [(name, e) for name in attacks for e in eps]}
    last = {key: [zero.clone(), zero.clone()] for key in runs}
    reported = dict.fromkeys(runs, False)
    seen = 0
    for item in batches:
        batch = as_batch(item, device)
        x, y = batch["image"], batch["label"]
        if max_samples is not None:
            x, y = x[: max_samples - seen], y[: max_samples - seen]
        with frozen(model, "eval"), torch.no_grad():
            correct = model(x).argmax(1) == y
        clean += correct.sum()
        stats = saliency_alignment(model, x, target="predicted", mode="eval")
        align += stats.alignment.double().sum()
        cos += stats.cosine.double().sum()
        for (name, e), acc in robust.items():
            if e == 0:
                acc += correct.sum()
                continue
            result = runs[(name, e)](x, y)
            # Robust = correct on the clean input and still correct at the attack's output (a
            # weak attack can land a misclassified input on the right class; that is no robustness).
            acc += (correct & ~result.success).sum()
            if result.stats is not None:
                reported[(name, e)] = True
                last[(name, e)][0] += result.stats.alignment.double().sum()
                last[(name, e)][1] += result.stats.cosine.double().sum()
        seen += x.shape[0]
        if max_samples is not None and seen >= max_samples:
            break
    if seen == 0:
        raise ValueError("data: yields no samples")
    report = {"n": seen, "clean_acc": clean.item() / seen, "alignment": align.item() / seen,
              "cosine": cos.item() / seen, "attacks": {name: [] for name in attacks}}
    for (name, e), acc in robust.items():
        has_stats = reported.get((name, e), False)
        report["attacks"][name].append({
            "eps": e, "acc": acc.item() / seen,
            "last_iterate_alignment": last[(name, e)][0].item() / seen if has_stats else None,
            "last_iterate_cosine": last[(name, e)][1].item() / seen if has_stats else None,
        })
    return report
