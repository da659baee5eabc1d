"""``analyze``: the Etmann table of a model on some data, written to CSV/JSON and plotted.

The numbers come from :mod:`fastsat.alignment` (:func:`~fastsat.alignment.analysis_rows`,
:func:`~fastsat.alignment.analysis_summary`); this module reads the data, writes the files and
draws the figures.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastsat import saliency
from fastsat._checks import choice, describe, positive_int
from fastsat._io import atomic_write_text
from fastsat.alignment import ALIGNMENT_TARGETS, TABLE_COLUMNS, analysis_rows, analysis_summary
from fastsat.report.figures import alignment_scatter, saliency_grid

__all__ = ["Analysis", "analyze"]


@dataclass
class Analysis:
    """Result of :func:`analyze`.

    rows: one dict per sample with the keys :data:`fastsat.alignment.TABLE_COLUMNS` (see
    :func:`fastsat.alignment.analysis_rows`). summary: :func:`fastsat.alignment.analysis_summary`
    of the rows. files: what was written, name → path (empty without ``out_dir``).
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
        raise TypeError(f"data: expected an (x, y) tensor pair or an iterable of batches, got {describe(data)}")
    for batch in data:
        if isinstance(batch, Mapping):
            if "image" not in batch or "label" not in batch:
                raise ValueError(f"data: batch dicts need 'image' and 'label' keys, got {sorted(batch)}")
            yield batch["image"], batch["label"]
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            yield batch[0], batch[1]
        else:
            raise TypeError(f"data: expected batches as dicts or (x, y) pairs, got {describe(batch)}")


def _json_safe(value: Any) -> Any:
    """Non-finite floats → None (strict JSON has no NaN/Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=TABLE_COLUMNS)
    writer.writeheader()
    # repr round-trips floats exactly (and writes nan / inf, which float() reads back).
    writer.writerows({k: repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    return atomic_write_text(path, text.getvalue())


def _write_json(path: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
    payload = {
        "summary": {k: _json_safe(v) for k, v in summary.items()},
        "rows": [{k: _json_safe(v) for k, v in r.items()} for r in rows],
    }
    return atomic_write_text(path, json.dumps(payload, indent=1, allow_nan=False))


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
    pairs; batches are moved to the model's device. target, measure_rho, deepfool_kwargs,
    chunk_size, mode: see :func:`fastsat.alignment.analysis_rows`. out_dir: if given, writes
    atomically ``alignment.csv`` (the table), ``alignment.json`` (summary + table; non-finite
    numbers as null), ``alignment_scatter.png`` (α vs ρ and α_bin vs ρ̃) and ``saliency_grid.png``
    (input | gradient | SmoothGrad | IG of the predicted class for the first ``grid_samples``
    samples, see :func:`fastsat.report.saliency_grid`; ``smoothgrad_kwargs`` / ``ig_kwargs`` go
    to :func:`fastsat.saliency.smoothgrad` (seed 0 unless given) /
    :func:`fastsat.saliency.integrated_gradients`).
    Returns :class:`Analysis`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    choice(target, "target", ALIGNMENT_TARGETS)
    positive_int(grid_samples, "grid_samples")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    rows: list[dict[str, Any]] = []
    grid_x: torch.Tensor | None = None
    for x, y in _batches(data):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"data: images and labels must be tensors, got {describe(x)} and {describe(y)}")
        x, y = x.to(device), y.to(device)
        rows += analysis_rows(model, x, y, target=target, measure_rho=measure_rho, deepfool_kwargs=deepfool_kwargs,
                              chunk_size=chunk_size, mode=mode, start=len(rows))
        if grid_x is None:
            grid_x = x[:grid_samples]
        elif grid_x.shape[0] < grid_samples:
            grid_x = torch.cat([grid_x, x[: grid_samples - grid_x.shape[0]]])
    if not rows:
        raise ValueError("data: no samples")
    summary = analysis_summary(rows)
    files: dict[str, Path] = {}
    if out_dir is not None:
        out = Path(out_dir)
        files = {
            "csv": _write_csv(out / "alignment.csv", rows),
            "json": _write_json(out / "alignment.json", rows, summary),
            "scatter": alignment_scatter(out / "alignment_scatter.png", rows, summary),
        }
        maps = {
            "gradient": saliency.gradient(model, grid_x, mode=mode),
            "SmoothGrad": saliency.smoothgrad(model, grid_x, mode=mode, **{"seed": 0, **(smoothgrad_kwargs or {})}),
            "IG": saliency.integrated_gradients(model, grid_x, mode=mode, **dict(ig_kwargs or {})),
        }
        files["saliency_grid"] = saliency_grid(out / "saliency_grid.png", grid_x, maps)
    return Analysis(rows=rows, summary=summary, files=files)
