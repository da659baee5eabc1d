"""Figures and the Markdown/HTML report of a set of runs (used by ``fastsat demo``).

Everything is written atomically; the HTML file is self-contained (figures embedded as base64
PNG), the Markdown file links the PNG files next to it.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from fastsat.train.checkpoint import atomic_write_text

__all__ = ["markdown_table", "robustness_curves", "saliency_grid", "write_report"]


def _figure(size):
    # The object-oriented API with the Agg canvas: no pyplot state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def saliency_grid(path: str | os.PathLike, images: torch.Tensor, maps: dict[str, torch.Tensor]) -> Path:
    """PNG grid: one row per image, columns input | each map (per-pixel magnitude summed over
    channels, min–max scaled per image). images: (N, C, H, W) in [0, 1]; maps: name → (N, C|1, H, W)."""
    from fastsat.alignment import _plot_saliency_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _plot_saliency_grid(path, images, maps)
    return path


def robustness_curves(path: str | os.PathLike, curves: dict[str, Sequence[tuple[float, float]]]) -> Path:
    """Robust accuracy against ε: ``curves`` maps a run name to (ε in pixel units, accuracy) points."""
    fig = _figure((6, 4))
    ax = fig.subplots()
    for name, points in curves.items():
        eps, acc = zip(*sorted(points))
        ax.plot([e * 255 for e in eps], acc, marker="o", label=name)
    ax.set_xlabel("ε (pixel units × 255)")
    ax.set_ylabel("accuracy under PGD")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _markdown_to_html(markdown: str, base: Path) -> str:
    """The small Markdown subset this report uses (headings, tables, images, paragraphs, lists)."""
    out, table = [], []

    def flush_table():
        if table:
            head, *body = [[c.strip() for c in line.strip("|").split("|")] for line in table if not set(line) <= set("|-: ")]
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
            out.append("</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        image = re.fullmatch(r"!\[(.*)\]\((.*)\)", line.strip())
        if image:
            data = base64.b64encode((base / image.group(2)).read_bytes()).decode()
            out.append(f'<p><img alt="{html.escape(image.group(1))}" src="data:image/png;base64,{data}" style="max-width:100%"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}" \
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>fastsat report</title><style>{style}</style></head>" \
           f"<body>{''.join(out)}</body></html>\n"


def write_report(out_dir: str | os.PathLike, markdown: str) -> tuple[Path, Path]:
    """Write ``report.md`` (images referenced relative to ``out_dir``) and a self-contained
    ``report.html`` with the same content. Returns both paths."""
    out_dir = Path(out_dir)
    md = atomic_write_text(out_dir / "report.md", markdown)
    page = atomic_write_text(out_dir / "report.html", _markdown_to_html(markdown, out_dir))
    return md, page

