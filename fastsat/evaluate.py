"""Clean and adversarial accuracy of a classifier at a list of ε (pixel units).

``evaluate(model, data, eps=[2/255, 4/255, 8/255], attacks=("pgd",))`` returns plain numbers
(JSON-ready): clean accuracy, and for each attack and ε the robust accuracy and the mean Etmann
alignment α = |⟨x, g⟩|/‖g‖ and cosine of the attack's last-step loss gradient g at the clean x
(taken from the fused step's statistics: no extra pass).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastsat._checks import positive_int
from fastsat.attacks import PGD
from fastsat.data import as_batch, make_loader
from fastsat.grad import frozen

__all__ = ["ATTACKS", "evaluate"]

ATTACKS = ("pgd", "apgd-ce", "apgd-dlr")


def _attack(name: str, model: nn.Module, eps: float, steps: int, step_size: float | None, restarts: int, norm: str):
    if name == "pgd":
        step = eps / 4 if step_size is None else step_size
        return PGD(model, eps=eps, step_size=step, steps=steps, norm=norm, random_start=True, restarts=restarts, mode="eval")
    from fastsat.attacks import APGD

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
    """Clean accuracy and robust accuracy under each attack at each ε, model in eval mode.

    Args:
        model: classifier on pixel-space (B, C, H, W) input in [0, 1], returning (B, K) logits.
        data: a map-style dataset (batched by ``batch_size``, in order) or an iterable of batches
            (dicts with "image"/"label" or (x, y) pairs).
        eps: radii in pixel units (e.g. 8/255), default (2, 4, 8)/255; 0 gives clean accuracy.
        attacks: any of "pgd" (L∞/L2 PGD, random start), "apgd-ce", "apgd-dlr" (Croce & Hein).
        steps: iterations per attack (default 10). step_size: PGD step in pixels, default ε/4.
        restarts: random restarts (per-sample best kept). norm: "linf" (default) or "l2".
        max_samples: stop after this many samples (None: all).

    A sample counts as robust when it is classified correctly both clean and at the attack's output.

    Returns:
        ``{"n": samples, "clean_acc": float, "attacks": {name: [{"eps", "acc", "alignment",
        "cosine"}, ...]}}``; alignment/cosine are means over samples (pixel units / unitless), None
        for attacks that do not report them (APGD).
    """
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"attacks: expected a non-empty list from {ATTACKS}, got {list(attacks)}")
    eps = [float(e) for e in eps]
    if not eps or any(not e >= 0 for e in eps):
        raise ValueError(f"eps: expected a non-empty list of radii >= 0 (pixel units), got {eps}")
    positive_int(steps, "steps")
    positive_int(max_samples, "max_samples", allow_none=True)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    batches = make_loader(data, batch_size=batch_size, shuffle=False, seed=0, device=device)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    clean = zero.clone()
    sums = {(name, e): [zero.clone(), zero.clone(), zero.clone()] for name in attacks for e in eps}
    seen = 0
    for item in batches:
        batch = as_batch(item, device)
        x, y = batch["image"], batch["label"]
        if max_samples is not None:
            x, y = x[: max_samples - seen], y[: max_samples - seen]
        with frozen(model, "eval"), torch.no_grad():
            correct = model(x).argmax(1) == y
        clean += correct.sum()
        for name in attacks:
            for e in eps:
                acc, align, cos = sums[(name, e)]
                if e == 0:
                    acc += correct.sum()
                    continue
                result = _attack(name, model, e, steps, step_size, restarts, norm)(x, y)
                # Robust = correct on the clean input and still correct at the attack's output (a
                # weak attack can land a misclassified input on the right class; that is no robustness).
                acc += (correct & ~result.success).sum()
                if result.stats is not None:
                    align += result.stats.alignment.double().sum()
                    cos += result.stats.cosine.double().sum()
        seen += x.shape[0]
        if max_samples is not None and seen >= max_samples:
            break
    if seen == 0:
        raise ValueError("data: yields no samples")
    report = {"n": seen, "clean_acc": clean.item() / seen, "attacks": {}}
    for name in attacks:
        rows = []
        for e in eps:
            acc, align, cos = sums[(name, e)]
            has_stats = name == "pgd" and e > 0
            rows.append({
                "eps": e, "acc": acc.item() / seen,
                "alignment": align.item() / seen if has_stats else None,
                "cosine": cos.item() / seen if has_stats else None,
            })
        report["attacks"][name] = rows
    return report
