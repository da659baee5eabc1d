"""Etmann et al.'s saliency–robustness metrics, per sample, and the analysis that relates them.

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

The per-sample statistics go through :func:`fastsat.ops.alignment_stats`. Every function runs the
model in ``mode`` (default "eval") and restores its modes and ``requires_grad`` flags afterwards;
no parameter ``.grad`` is written.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from fastsat import saliency
from fastsat._checks import positive_int
from fastsat.attacks import DeepFool
from fastsat.grad import check_input, frozen, input_grad, logit_jacobian
from fastsat.ops import AlignmentStats, alignment_stats

__all__ = [
    "ALIGNMENT_TARGETS",
    "TABLE_COLUMNS",
    "Analysis",
    "BinarizedAlignment",
    "HomogeneityDefect",
    "Linearization",
    "LinearizedRobustness",
    "analyze",
    "binarized_alignment",
    "boundary_distance",
    "homogeneity_defect",
    "linearization",
    "linearized_robustness",
    "pearson",
    "plot_saliency_grid",
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
    if target not in ALIGNMENT_TARGETS:
        raise ValueError(f"target: expected one of {ALIGNMENT_TARGETS}, got {target!r}")
    if target != "predicted" and y is None:
        raise ValueError(f"y: target {target!r} needs the labels y, got None")
    if target == "predicted":
        grad = input_grad(model, x, objective="logit", mode=mode).grad
    elif target == "label":
        grad = input_grad(model, x, objective="logit", target=y, mode=mode).grad
    else:
        grad = input_grad(model, x, objective="ce", y=y, mode=mode).grad
    stats = alignment_stats(x.detach(), grad.to(x.dtype))
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
    jac = logit_jacobian(model, x, chunk_size=chunk_size, mode=mode).to(x.dtype)
    rows = torch.arange(batch, device=x.device)
    prediction = logits.argmax(dim=1)
    # Row (b, j) holds ∇(Ψ^{i*} − Ψ^j); one alignment_stats call gives every ⟨x, ·⟩ and norm.
    grad_diffs = jac[rows, prediction].unsqueeze(1) - jac
    x_rep = x.unsqueeze(1).expand_as(grad_diffs)
    stats = alignment_stats(x_rep.reshape(batch * num_classes, *x.shape[1:]),
                            grad_diffs.reshape(batch * num_classes, *x.shape[1:]))
    grad_norm = stats.grad_norm.reshape(batch, num_classes)
    margins = (logits[rows, prediction].unsqueeze(1) - logits).to(grad_norm.dtype)
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

def _finite_pairs(a: Iterable[float], b: Iterable[float]) -> tuple[list[float], list[float]]:
    pairs = [(float(u), float(v)) for u, v in zip(a, b, strict=True) if math.isfinite(u) and math.isfinite(v)]
    return [u for u, _ in pairs], [v for _, v in pairs]


def pearson(a: Iterable[float], b: Iterable[float]) -> float:
    """Pearson correlation of the pairs where both values are finite; NaN if < 2 pairs or constant."""
    xs, ys = _finite_pairs(a, b)
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
    xs, ys = _finite_pairs(a, b)
    return pearson(_ranks(xs), _ranks(ys))


# --- analysis ----------------------------------------------------------------------------------

TABLE_COLUMNS = ("index", "label", "prediction", "alpha", "cosine", "alpha_bin", "rho_tilde", "rho", "beta", "j_star")
_FLOAT_COLUMNS = ("alpha", "cosine", "alpha_bin", "rho_tilde", "rho", "beta")
_CORRELATIONS = (("alpha", "rho"), ("alpha_bin", "rho_tilde"))


@dataclass
class Analysis:
    """Result of :func:`analyze`.

    rows: one dict per sample with the keys :data:`TABLE_COLUMNS` (ints for index / label /
    prediction / j_star, floats otherwise; rho is NaN where not measured). summary: sample count,
    accuracy, the median of every float column (over its finite values) and
    ``pearson_alpha_rho``, ``spearman_alpha_rho``, ``pearson_alpha_bin_rho_tilde``,
    ``spearman_alpha_bin_rho_tilde`` (over the finite pairs; NaN when undefined).
    files: what was written, name → path (empty without ``out_dir``).
    """

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def _batches(data: Any) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches from a tensor pair, or from an iterable of dicts / (x, y) pairs."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        yield data[0], data[1]
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"data: expected an (x, y) tensor pair or an iterable of batches, got {type(data).__name__}")
    for batch in data:
        if isinstance(batch, Mapping):
            if "image" not in batch or "label" not in batch:
                raise ValueError(f"data: batch dicts need 'image' and 'label' keys, got {sorted(batch)}")
            yield batch["image"], batch["label"]
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            yield batch[0], batch[1]
        else:
            raise TypeError(f"data: expected batches as dicts or (x, y) pairs, got {type(batch).__name__}")


def _median(values: list[float]) -> float:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return math.nan
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2


def _summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "n": len(rows),
        "accuracy": sum(r["label"] == r["prediction"] for r in rows) / len(rows),
    }
    for name in _FLOAT_COLUMNS:
        summary[f"median_{name}"] = _median([r[name] for r in rows])
    for a, b in _CORRELATIONS:
        xs, ys = [r[a] for r in rows], [r[b] for r in rows]
        summary[f"pearson_{a}_{b}"] = pearson(xs, ys)
        summary[f"spearman_{a}_{b}"] = spearman(xs, ys)
        summary[f"n_pairs_{a}_{b}"] = len(_finite_pairs(xs, ys)[0])
    return summary


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``, so a reader
    never sees a half-written file. (The temporary file is created with the usual permissions,
    unlike tempfile.mkstemp's 0600.)"""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_safe(value: Any) -> Any:
    """Non-finite floats → None (strict JSON has no NaN/Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=TABLE_COLUMNS)
            writer.writeheader()
            # repr round-trips floats exactly (and writes nan / inf, which float() reads back).
            writer.writerows({k: repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows)

    _write_atomic(path, write)


def _write_json(path: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    payload = {
        "summary": {k: _json_safe(v) for k, v in summary.items()},
        "rows": [{k: _json_safe(v) for k, v in r.items()} for r in rows],
    }

    def write(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            json.dump(payload, fh, indent=1, allow_nan=False)

    _write_atomic(path, write)


def _new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure drawn by the Agg canvas directly: no pyplot state, no display, any thread."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Figure, path: Path) -> None:
    _write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _plot_scatter(path: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    fig = _new_figure((10, 4.5))
    axes = fig.subplots(1, 2)
    labels = (("alignment α", "boundary distance ρ"), ("binarized alignment α_bin", "linearized robustness ρ̃"))
    for ax, (a, b), (xlabel, ylabel) in zip(axes, _CORRELATIONS, labels, strict=True):
        xs, ys = _finite_pairs([r[a] for r in rows], [r[b] for r in rows])
        ax.scatter(xs, ys, s=12, alpha=0.7)
        ax.set_xlabel(f"{xlabel} (pixel units)")
        ax.set_ylabel(f"{ylabel} (pixel units)")
        ax.set_title(
            f"Pearson {summary[f'pearson_{a}_{b}']:.3f}, Spearman {summary[f'spearman_{a}_{b}']:.3f} (n={len(xs)})"
        )
    fig.tight_layout()
    _save_figure(fig, path)


def _display_image(x: torch.Tensor) -> Any:
    """(C, H, W) image → an array imshow can show: RGB for 3 channels, else their mean; scaled to [0, 1]."""
    img = x.detach().float().cpu()
    img = img.permute(1, 2, 0) if img.shape[0] == 3 else img.mean(dim=0)
    return saliency.minmax_scale(img.unsqueeze(0))[0].numpy()


def plot_saliency_grid(path: str | os.PathLike[str], x: torch.Tensor, maps: Mapping[str, torch.Tensor]) -> None:
    """Draw a grid of images and their saliency maps and save it as a PNG at ``path`` (atomically).

    x: (N, C, H, W) images in pixel space, one row each (3 channels shown as RGB, otherwise their
    mean as grey; min–max scaled per image). maps: column title → (N, C, H, W) or (N, 1, H, W)
    map for those images (e.g. from :mod:`fastsat.saliency`); each is shown as its magnitude
    summed over channels, min–max scaled per image. Columns: "input", then ``maps`` in order.
    Drawn on matplotlib's Agg canvas (no display, no pyplot state).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x: expected (N, C, H, W) images, got {getattr(x, 'shape', type(x).__name__)}")
    for name, m in maps.items():
        if not isinstance(m, torch.Tensor) or m.dim() != 4 or m.shape[0] != x.shape[0] or m.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"maps[{name!r}]: expected ({x.shape[0]}, C, {x.shape[2]}, {x.shape[3]}), "
                f"got {getattr(m, 'shape', type(m).__name__)}"
            )
    path = Path(path)
    n = x.shape[0]
    columns = ["input", *maps]
    fig = _new_figure((2 * len(columns), 2 * n))
    axes = fig.subplots(n, len(columns), squeeze=False)
    for i in range(n):
        for c, name in enumerate(columns):
            ax = axes[i][c]
            if name == "input":
                ax.imshow(_display_image(x[i]), cmap="gray")
            else:
                # Magnitude summed over channels, scaled per image: where the map is large.
                magnitude = maps[name][i].abs().sum(dim=0, keepdim=True)
                ax.imshow(saliency.minmax_scale(magnitude.unsqueeze(0))[0, 0].cpu().numpy(), cmap="inferno")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name)
    fig.tight_layout()
    _save_figure(fig, path)


# Deprecated private name, still imported by fastsat/report.py; remove once it uses the public one.
_plot_saliency_grid = plot_saliency_grid


def analyze(
    model: nn.Module,
    data: Any,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    target: str = "predicted",
    measure_rho: bool = True,
    deepfool_kwargs: Mapping[str, Any] | None = None,
    chunk_size: int | None = None,
    grid_samples: int = 8,
    smoothgrad_kwargs: Mapping[str, Any] | None = None,
    ig_kwargs: Mapping[str, Any] | None = None,
    mode: str | None = "eval",
) -> Analysis:
    """Measure α, cosine, α_bin, ρ̃, ρ and β for every sample of ``data`` and relate them.

    model: classifier on pixel-space inputs (it normalises inside). data: an (x, y) tensor pair,
    or an iterable of batches — dicts with "image" and "label" (extra keys ignored) or (x, y)
    pairs; batches are moved to the model's device. target: the saliency map of α ("predicted",
    "label" or "loss", see :func:`alignment`). measure_rho: run DeepFool for ρ (``deepfool_kwargs``
    go to :class:`fastsat.attacks.DeepFool`); if False ρ is NaN. chunk_size: classes per backward
    pass of the Jacobian. out_dir: if given, writes atomically ``alignment.csv`` (the table),
    ``alignment.json`` (summary + table; non-finite numbers as null), ``alignment_scatter.png``
    (α vs ρ and α_bin vs ρ̃) and ``saliency_grid.png`` (input | gradient | SmoothGrad | IG of
    the predicted class for the first ``grid_samples`` samples; maps as per-pixel magnitude summed
    over channels, min–max scaled per image; ``smoothgrad_kwargs`` / ``ig_kwargs`` go to
    :func:`fastsat.saliency.smoothgrad` (seed 0 unless given) /
    :func:`fastsat.saliency.integrated_gradients`). Figures are drawn on matplotlib's Agg canvas:
    no display and no pyplot state are touched.
    Returns :class:`Analysis`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if target not in ALIGNMENT_TARGETS:
        raise ValueError(f"target: expected one of {ALIGNMENT_TARGETS}, got {target!r}")
    positive_int(grid_samples, "grid_samples")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    rows: list[dict[str, Any]] = []
    grid_x: torch.Tensor | None = None
    for x, y in _batches(data):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("data: images and labels must be tensors")
        x, y = x.to(device), y.to(device=device, dtype=torch.long)
        if y.shape != x.shape[:1]:
            raise ValueError(f"data: labels of shape {tuple(y.shape)} do not match images of shape {tuple(x.shape)}")
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
        for i in range(x.shape[0]):
            row = {"index": len(rows)}
            row.update({k: (float(v[i]) if k in _FLOAT_COLUMNS else int(v[i])) for k, v in lists.items()})
            rows.append({k: row[k] for k in TABLE_COLUMNS})
        if grid_x is None:
            grid_x = x[:grid_samples]
        elif grid_x.shape[0] < grid_samples:
            grid_x = torch.cat([grid_x, x[: grid_samples - grid_x.shape[0]]])
    if not rows:
        raise ValueError("data: no samples")
    summary = _summarize(rows)
    files: dict[str, Path] = {}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {
            "csv": out / "alignment.csv",
            "json": out / "alignment.json",
            "scatter": out / "alignment_scatter.png",
            "saliency_grid": out / "saliency_grid.png",
        }
        _write_csv(files["csv"], rows)
        _write_json(files["json"], rows, summary)
        _plot_scatter(files["scatter"], rows, summary)
        maps = {
            "gradient": saliency.gradient(model, grid_x, mode=mode),
            "SmoothGrad": saliency.smoothgrad(model, grid_x, mode=mode, **{"seed": 0, **(smoothgrad_kwargs or {})}),
            "IG": saliency.integrated_gradients(model, grid_x, mode=mode, **dict(ig_kwargs or {})),
        }
        plot_saliency_grid(files["saliency_grid"], grid_x, maps)
    return Analysis(rows=rows, summary=summary, files=files)
