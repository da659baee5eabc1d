"""The report's figures, each a PNG written atomically (through :func:`fastsat._io.atomic_write`).

Every figure is drawn with matplotlib's object-oriented API on the Agg canvas: no pyplot state, no
display, safe from any thread. This is the only layer of fastsat that imports matplotlib.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fastsat._checks import describe
from fastsat._io import atomic_write
from fastsat.alignment import CORRELATED_PAIRS, finite_pairs
from fastsat.saliency import minmax_scale

__all__ = ["DPI", "alignment_scatter", "robustness_curves", "saliency_grid"]

#: Resolution of every figure: a figure of w × h inches is 100·w × 100·h pixels.
DPI = 100

_AXIS_LABELS = {
    "alpha": "alignment α",
    "rho": "boundary distance ρ",
    "alpha_bin": "binarized alignment α_bin",
    "rho_tilde": "linearized robustness ρ̃",
}


def _figure(size: tuple[float, float]) -> Figure:
    """A figure of ``size`` inches on its own Agg canvas."""
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=DPI))


def _display_image(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) image → an array imshow can show: RGB for 3 channels, else their mean; scaled to [0, 1]."""
    img = x.detach().float().cpu()
    img = img.permute(1, 2, 0) if img.shape[0] == 3 else img.mean(dim=0)
    return minmax_scale(img.unsqueeze(0))[0].numpy()


def saliency_grid(path: str | os.PathLike, x: torch.Tensor, maps: Mapping[str, torch.Tensor]) -> Path:
    """Draw a grid of images and their saliency maps; save it as a PNG at ``path``. Returns ``path``.

    x: (N, C, H, W) images in pixel space, one row each (3 channels shown as RGB, otherwise their
    mean as grey; min–max scaled per image). maps: column title → (N, C, H, W) or (N, 1, H, W)
    map for those images (e.g. from :mod:`fastsat.saliency`); each is shown as its magnitude
    summed over channels, min–max scaled per image. Columns: "input", then ``maps`` in order;
    every cell is 2 × 2 inches (200 × 200 px).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected (N, C, H, W) images, got {describe(x)}")
    if x.dim() != 4:
        raise ValueError(f"x: expected (N, C, H, W) images, got {describe(x)}")
    for name, m in maps.items():
        expected = f"({x.shape[0]}, C, {x.shape[2]}, {x.shape[3]})"
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"maps[{name!r}]: expected {expected}, got {describe(m)}")
        if m.dim() != 4 or m.shape[0] != x.shape[0] or m.shape[2:] != x.shape[2:]:
            raise ValueError(f"maps[{name!r}]: expected {expected}, got {describe(m)}")
    n = x.shape[0]
    columns = ["input", *maps]
    fig = _figure((2 * len(columns), 2 * n))
    axes = fig.subplots(n, len(columns), squeeze=False)
    for i in range(n):
        for c, name in enumerate(columns):
            ax = axes[i][c]
            if name == "input":
                ax.imshow(_display_image(x[i]), cmap="gray")
            else:
                # Magnitude summed over channels, scaled per image: where the map is large.
                magnitude = maps[name][i].detach().float().abs().sum(dim=0, keepdim=True)
                ax.imshow(minmax_scale(magnitude.unsqueeze(0))[0, 0].cpu().numpy(), cmap="inferno")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name)
    fig.tight_layout()
    return _save(fig, path)


def alignment_scatter(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> Path:
    """α against ρ and α_bin against ρ̃ (pixel units), one panel per pair of
    :data:`fastsat.alignment.CORRELATED_PAIRS`, titled with the correlations of ``summary``.

    rows / summary: from :func:`fastsat.alignment.analysis_rows` / :func:`~fastsat.alignment.analysis_summary`;
    non-finite pairs are left out. 10 × 4.5 inches. Returns ``path``.
    """
    fig = _figure((10, 4.5))
    axes = fig.subplots(1, len(CORRELATED_PAIRS))
    for ax, (a, b) in zip(axes, CORRELATED_PAIRS, strict=True):
        xs, ys = finite_pairs([r[a] for r in rows], [r[b] for r in rows])
        ax.scatter(xs, ys, s=12, alpha=0.7)
        ax.set_xlabel(f"{_AXIS_LABELS[a]} (pixel units)")
        ax.set_ylabel(f"{_AXIS_LABELS[b]} (pixel units)")
        ax.set_title(
            f"Pearson {summary[f'pearson_{a}_{b}']:.3f}, Spearman {summary[f'spearman_{a}_{b}']:.3f} (n={len(xs)})"
        )
    fig.tight_layout()
    return _save(fig, path)


def robustness_curves(path: str | os.PathLike, curves: Mapping[str, Sequence[tuple[float, float]]],
                      bands: Mapping[str, Sequence[tuple[float, float, float]]] | None = None, *,
                      title: str | None = None, attack: str = "PGD") -> Path:
    """Robust accuracy against ε: ``curves`` maps a run name to (ε in pixel units, accuracy) points;
    ``bands`` optionally maps a name to (ε, low, high) points drawn as a shaded band (e.g. the range
    over seeds). 6 × 4 inches. Returns ``path``."""
    fig = _figure((6, 4))
    ax = fig.subplots()
    for name, points in curves.items():
        eps, acc = zip(*sorted(points), strict=True)
        line, = ax.plot([e * 255 for e in eps], acc, marker="o", markersize=3, label=name)
        if bands and name in bands:
            band_eps, low, high = zip(*sorted(bands[name]), strict=True)
            ax.fill_between([e * 255 for e in band_eps], low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("ε (pixel units × 255)")
    ax.set_ylabel(f"accuracy under {attack}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
