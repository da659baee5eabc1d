"""Etmann et al.'s saliency–robustness metrics, per sample, and the table and summary that relate them.

"On the Connection Between Adversarial Robustness and Saliency Map Interpretability" (ICML 2019);
definitions in METHODS.md §1. Notation: Ψ^k is logit k, i* the predicted class at x.

Input space: every quantity is computed in the space of the model's input — pixel space for
fastsat models, which normalise inside ``forward`` — so α, ρ̃, ρ are L2 distances in pixel units
and depend on the pixel range (alignment is not translation-invariant). Feed the model
un-normalised images to measure in pixel space.

- alignment α = |⟨x, g⟩| / ‖g‖ and its cosine |⟨x, g⟩| / (‖x‖‖g‖), g = ∇ₓ of the chosen target
  (:func:`saliency_alignment`).
- linearized robustness ρ̃ = min_{j≠i*} (Ψ^{i*} − Ψ^j) / ‖∇Ψ^{i*} − ∇Ψ^j‖ with minimiser j*;
  binarized alignment α_bin = |⟨x, ∇Ψ^{i*j*}⟩| / ‖∇Ψ^{i*j*}‖ with Ψ^{i*j*} = Ψ^{i*} − Ψ^{j*};
  homogeneity defect β = Ψ^{i*j*}(x) − ⟨∇Ψ^{i*j*}(x), x⟩ (:func:`linearization` gives all
  three from one Jacobian; :func:`linearized_robustness`, :func:`binarized_alignment`,
  :func:`homogeneity_defect` pick one).
  Since Ψ^{i*j*} ≥ 0: ρ̃·‖∇Ψ^{i*j*}‖ = ⟨x, ∇Ψ^{i*j*}⟩ + β, hence
  |ρ̃ − α_bin| ≤ |β| / ‖∇Ψ^{i*j*}‖ (reverse triangle inequality), with ρ̃ = α_bin when β = 0
  (positively one-homogeneous networks, Theorem 1).
- boundary distance ρ: the L2 norm of the minimal perturbation found by DeepFool + bisection
  (:func:`boundary_distance`).

- the per-sample table of all of these (:func:`analysis_rows`) and its medians and correlations
  (:func:`analysis_summary`, :func:`pearson`, :func:`spearman`). Writing them to files and plotting
  them is the report layer's job (:func:`fastsat.report.analyze`); this module imports no plotting
  library.

The per-sample statistics go through :func:`fastsat.ops.alignment_stats`. Every function runs the
model in ``mode`` (default "eval") and restores its modes and ``requires_grad`` flags afterwards;
no parameter ``.grad`` is written.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from fastsat._checks import choice, describe, integer
from fastsat.attacks import DeepFool
from fastsat.grad import check_input, frozen, input_grad, logit_jacobian
from fastsat.ops import AlignmentStats, alignment_stats

__all__ = [
    "ALIGNMENT_TARGETS",
    "CORRELATED_PAIRS",
    "TABLE_COLUMNS",
    "BinarizedAlignment",
    "HomogeneityDefect",
    "Linearization",
    "LinearizedRobustness",
    "analysis_rows",
    "analysis_summary",
    "binarized_alignment",
    "boundary_distance",
    "finite_pairs",
    "homogeneity_defect",
    "linearization",
    "linearized_robustness",
    "pearson",
    "saliency_alignment",
    "spearman",
]

ALIGNMENT_TARGETS = ("predicted", "label", "loss")


def saliency_alignment(
    model: nn.Module,
    x: torch.Tensor,
    *,
    target: str = "predicted",
    y: torch.Tensor | None = None,
    mode: str | None = "eval",
) -> AlignmentStats:
    """Alignment of x with its saliency map g, per sample, in the model's input (pixel) space.

    target: which gradient is the saliency map — "predicted" (default): g = ∇ₓΨ^{i*}(x);
    "label": g = ∇ₓΨ^y(x); "loss": g = ∇ₓ CE(Ψ(x), y). y: (B,) int64 labels, needed for
    "label" and "loss". Returns :class:`fastsat.ops.AlignmentStats` with (B,) ``dot`` = ⟨x, g⟩
    (its sign is the signed alignment the authors' code logs), ``grad_norm``, ``x_norm`` and the
    properties ``.alignment`` = α (pixel units) and ``.cosine`` ∈ [0, 1].
    """
    check_input(model, x)
    choice(target, "target", ALIGNMENT_TARGETS)
    if target != "predicted" and y is None:
        raise ValueError(f"y: target {target!r} needs the labels y, got None")
    if target == "predicted":
        grad = input_grad(model, x, objective="logit", mode=mode).grad
    elif target == "label":
        grad = input_grad(model, x, objective="logit", target=y, mode=mode).grad
    else:
        grad = input_grad(model, x, objective="ce", y=y, mode=mode).grad
    # The float32 gradient of a float16/bfloat16 x goes in as it is (alignment_stats accepts it).
    stats = alignment_stats(x.detach(), grad)
    zero = int((stats.grad_norm == 0).sum())
    if zero:
        warnings.warn(
            f"alignment: {zero} of {x.shape[0]} samples have an all-zero saliency map (saturated or "
            "gradient-masking model); their alignment and cosine are reported as 0",
            UserWarning,
            stacklevel=2,
        )
    return stats


class Linearization(NamedTuple):
    """The binary linearisation of the classifier at x (all (B,) tensors; see the module docstring).

    prediction: i* (int64). j_star: the runner-up class j* minimising ρ̃ (int64).
    rho_tilde: ρ̃ (pixel units; +inf when every ∇Ψ^{i*} − ∇Ψ^j is zero). alpha_bin: α_bin
    (pixel units). cosine_bin: |⟨x, ∇Ψ^{i*j*}⟩| / (‖x‖‖∇Ψ^{i*j*}‖). beta: β for Ψ^{i*j*}.
    margin: Ψ^{i*j*}(x) ≥ 0. grad_norm: ‖∇Ψ^{i*j*}(x)‖. Floating fields have x's accumulation
    dtype (float64 for float64 inputs, else float32).
    """

    prediction: torch.Tensor
    j_star: torch.Tensor
    rho_tilde: torch.Tensor
    alpha_bin: torch.Tensor
    cosine_bin: torch.Tensor
    beta: torch.Tensor
    margin: torch.Tensor
    grad_norm: torch.Tensor


def linearization(
    model: nn.Module, x: torch.Tensor, *, chunk_size: int | None = None, mode: str | None = "eval"
) -> Linearization:
    """ρ̃, j*, α_bin and β of every sample from one full logit Jacobian.

    x: (B, ...) in the model's input (pixel) space. Needs K ≥ 2 classes. Memory: about three
    arrays of B·K samples (the Jacobian, its differences to row i*, x repeated for the fused
    statistics); the Jacobian is computed ``chunk_size`` classes per backward pass (see
    :func:`fastsat.grad.logit_jacobian`). For many classes, call it on smaller batches.
    """
    check_input(model, x)
    x = x.detach()
    with frozen(model, mode), torch.no_grad():
        logits = model(x)
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"model output: expected (B, K) logits with K >= 2, got shape {tuple(logits.shape)}")
    batch, num_classes = logits.shape
    # The Jacobian comes in x's accumulation dtype (float32 for float16/bfloat16 x) and stays in
    # it: differences of its rows and of the logits rounded to float16/bfloat16 would lose digits.
    jac = logit_jacobian(model, x, chunk_size=chunk_size, mode=mode)
    logits = logits.to(jac.dtype)
    rows = torch.arange(batch, device=x.device)
    prediction = logits.argmax(dim=1)
    # Row (b, j) holds ∇(Ψ^{i*} − Ψ^j); one alignment_stats call gives every ⟨x, ·⟩ and norm.
    grad_diffs = jac[rows, prediction].unsqueeze(1) - jac
    x_rep = x.unsqueeze(1).expand_as(grad_diffs)
    stats = alignment_stats(x_rep.reshape(batch * num_classes, *x.shape[1:]),
                            grad_diffs.reshape(batch * num_classes, *x.shape[1:]))
    grad_norm = stats.grad_norm.reshape(batch, num_classes)
    margins = logits[rows, prediction].unsqueeze(1) - logits
    ratios = torch.where(grad_norm > 0, margins / torch.where(grad_norm > 0, grad_norm, 1.0), math.inf)
    ratios[rows, prediction] = math.inf
    # When every ratio is +inf argmin could return i* itself; any j ≠ i* is then a minimiser.
    j_star = torch.where(torch.isinf(ratios).all(dim=1), (prediction + 1) % num_classes, ratios.argmin(dim=1))
    flat = rows * num_classes + j_star
    dot = stats.dot[flat]
    margin = margins[rows, j_star]
    return Linearization(
        prediction=prediction,
        j_star=j_star,
        rho_tilde=ratios[rows, j_star],
        alpha_bin=stats.alignment[flat],
        cosine_bin=stats.cosine[flat],
        beta=margin - dot,
        margin=margin,
        grad_norm=stats.grad_norm[flat],
    )


class LinearizedRobustness(NamedTuple):
    """rho_tilde: (B,) ρ̃ in pixel units; j_star: (B,) int64 minimising class."""

    rho_tilde: torch.Tensor
    j_star: torch.Tensor


class BinarizedAlignment(NamedTuple):
    """alpha_bin: (B,) α_bin in pixel units; cosine: (B,) its cosine form; j_star: (B,) int64."""

    alpha_bin: torch.Tensor
    cosine: torch.Tensor
    j_star: torch.Tensor


class HomogeneityDefect(NamedTuple):
    """beta: (B,) β = Ψ^{i*j*}(x) − ⟨∇Ψ^{i*j*}(x), x⟩ (logit units); j_star: (B,) int64."""

    beta: torch.Tensor
    j_star: torch.Tensor


def linearized_robustness(
    model: nn.Module, x: torch.Tensor, *, chunk_size: int | None = None, mode: str | None = "eval"
) -> LinearizedRobustness:
    """Linearized robustness ρ̃ and j* (see :func:`linearization` for the arguments)."""
    lin = linearization(model, x, chunk_size=chunk_size, mode=mode)
    return LinearizedRobustness(lin.rho_tilde, lin.j_star)


def binarized_alignment(
    model: nn.Module, x: torch.Tensor, *, chunk_size: int | None = None, mode: str | None = "eval"
) -> BinarizedAlignment:
    """Binarized alignment α_bin for the pair (i*, j*) of ρ̃ (see :func:`linearization`)."""
    lin = linearization(model, x, chunk_size=chunk_size, mode=mode)
    return BinarizedAlignment(lin.alpha_bin, lin.cosine_bin, lin.j_star)


def homogeneity_defect(
    model: nn.Module, x: torch.Tensor, *, chunk_size: int | None = None, mode: str | None = "eval"
) -> HomogeneityDefect:
    """β(x) for the logit difference Ψ^{i*j*} = Ψ^{i*} − Ψ^{j*} of ρ̃'s minimiser j*.

    Zero for positively one-homogeneous networks (bias-free ReLU/max-pool nets); bounds
    |ρ̃ − α_bin| ≤ |β| / ‖∇Ψ^{i*j*}‖ (see :func:`linearization` for the arguments).
    """
    lin = linearization(model, x, chunk_size=chunk_size, mode=mode)
    return HomogeneityDefect(lin.beta, lin.j_star)


def boundary_distance(
    model: nn.Module, x: torch.Tensor, *, mode: str | None = "eval", **deepfool_kwargs: Any
) -> torch.Tensor:
    """Empirical distance ρ to the decision boundary: (B,) L2 norms in pixel units.

    Runs :class:`fastsat.attacks.DeepFool` (L2, followed by bisection along the found direction)
    against the predicted class i*(x), in ``mode``; ``deepfool_kwargs`` (steps, overshoot,
    candidates, bisection_steps, chunk_size, clip — the valid box, default (0, 1)) go to its
    constructor. float32 (float64 for float64 x). Samples where DeepFool found no boundary get
    NaN — unknown, not "infinitely robust" — so medians and correlations skip them.
    """
    check_input(model, x)
    result = DeepFool(model, mode=mode, **deepfool_kwargs)(x.detach())
    return torch.where(result.success, result.delta_norm, math.nan)


# --- correlations ------------------------------------------------------------------------------

def finite_pairs(a: Iterable[float], b: Iterable[float]) -> tuple[list[float], list[float]]:
    """The pairs (a_i, b_i) where both are finite, as two lists (the samples a correlation uses)."""
    pairs = [(float(u), float(v)) for u, v in zip(a, b, strict=True) if math.isfinite(u) and math.isfinite(v)]
    return [u for u, _ in pairs], [v for _, v in pairs]


def pearson(a: Iterable[float], b: Iterable[float]) -> float:
    """Pearson correlation of the pairs where both values are finite; NaN if < 2 pairs or constant."""
    xs, ys = finite_pairs(a, b)
    n = len(xs)
    if n < 2:
        return math.nan
    mx, my = math.fsum(xs) / n, math.fsum(ys) / n
    sxy = math.fsum((u - mx) * (v - my) for u, v in zip(xs, ys, strict=True))
    sxx = math.fsum((u - mx) ** 2 for u in xs)
    syy = math.fsum((v - my) ** 2 for v in ys)
    if sxx == 0 or syy == 0:
        return math.nan
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a: Iterable[float], b: Iterable[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks) of the pairs where both are finite."""
    xs, ys = finite_pairs(a, b)
    return pearson(_ranks(xs), _ranks(ys))


# --- the per-sample table and its summary ------------------------------------------------------

TABLE_COLUMNS = ("index", "label", "prediction", "alpha", "cosine", "alpha_bin", "rho_tilde", "rho", "beta", "j_star")
_FLOAT_COLUMNS = ("alpha", "cosine", "alpha_bin", "rho_tilde", "rho", "beta")
#: The (x, y) column pairs whose correlations the summary reports: α against ρ (Etmann's claim)
#: and α_bin against ρ̃ (equal for positively one-homogeneous networks, Theorem 1).
CORRELATED_PAIRS = (("alpha", "rho"), ("alpha_bin", "rho_tilde"))


def analysis_rows(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    target: str = "predicted",
    measure_rho: bool = True,
    deepfool_kwargs: Mapping[str, Any] | None = None,
    chunk_size: int | None = None,
    mode: str | None = "eval",
    start: int = 0,
) -> list[dict[str, Any]]:
    """One table row per sample of the batch: α, cosine, α_bin, ρ̃, ρ, β, i*, j* and the label.

    x: (B, ...) images in the model's input (pixel) space, on the model's device. y: (B,) integer
    labels (recorded, and the labels of target "label"/"loss"). target: the saliency map of α
    (see :func:`saliency_alignment`). measure_rho: run DeepFool for ρ (``deepfool_kwargs`` go to
    :class:`fastsat.attacks.DeepFool`); if False ρ is NaN. chunk_size: classes per backward pass
    of the Jacobian. start: the ``index`` of the first row (the sample's position in the data).

    Returns B dicts with the keys :data:`TABLE_COLUMNS`, in that order: ints for index / label /
    prediction / j_star, floats (pixel units; β in logit units) for the rest.
    """
    choice(target, "target", ALIGNMENT_TARGETS)
    start = integer(start, "start", minimum=0)
    check_input(model, x)
    expected = f"({x.shape[0]},) integer labels for images of shape {tuple(x.shape)}"
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y: expected {expected}, got {describe(y)}")
    if y.shape != x.shape[:1]:
        raise ValueError(f"y: expected {expected}, got {describe(y)}")
    y = y.to(device=x.device, dtype=torch.long)
    lin = linearization(model, x, chunk_size=chunk_size, mode=mode)
    stats = saliency_alignment(model, x, target=target, y=y, mode=mode)
    if measure_rho:
        rho = boundary_distance(model, x, mode=mode, **dict(deepfool_kwargs or {}))
    else:
        rho = torch.full((x.shape[0],), math.nan)
    columns = {
        "label": y, "prediction": lin.prediction, "alpha": stats.alignment, "cosine": stats.cosine,
        "alpha_bin": lin.alpha_bin, "rho_tilde": lin.rho_tilde, "rho": rho, "beta": lin.beta,
        "j_star": lin.j_star,
    }
    lists = {k: v.detach().cpu().tolist() for k, v in columns.items()}
    rows = []
    for i in range(x.shape[0]):
        row = {"index": start + i}
        row.update({k: (float(v[i]) if k in _FLOAT_COLUMNS else int(v[i])) for k, v in lists.items()})
        rows.append({k: row[k] for k in TABLE_COLUMNS})
    return rows


def _median(values: list[float]) -> float:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return math.nan
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2


def analysis_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Sample count, accuracy and the relations of a table from :func:`analysis_rows`.

    Keys: ``n``, ``accuracy`` (label == prediction), ``median_<column>`` for every float column
    (over its finite values; NaN when none), and for each pair (a, b) of :data:`CORRELATED_PAIRS`
    ``pearson_a_b``, ``spearman_a_b`` (over the finite pairs; NaN when undefined) and
    ``n_pairs_a_b`` (how many finite pairs they used).
    """
    if not rows:
        raise ValueError("rows: expected at least one table row, got none")
    summary: dict[str, Any] = {
        "n": len(rows),
        "accuracy": sum(r["label"] == r["prediction"] for r in rows) / len(rows),
    }
    for name in _FLOAT_COLUMNS:
        summary[f"median_{name}"] = _median([r[name] for r in rows])
    for a, b in CORRELATED_PAIRS:
        xs, ys = [r[a] for r in rows], [r[b] for r in rows]
        summary[f"pearson_{a}_{b}"] = pearson(xs, ys)
        summary[f"spearman_{a}_{b}"] = spearman(xs, ys)
        summary[f"n_pairs_{a}_{b}"] = len(finite_pairs(xs, ys)[0])
    return summary
