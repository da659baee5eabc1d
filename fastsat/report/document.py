"""The Markdown and HTML report of a set of runs (used by ``fastsat demo``).

Both files are written atomically; the HTML file is self-contained (figures embedded as base64
PNG), the Markdown file links the PNG files next to it.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from fastsat._io import atomic_write_text

__all__ = ["markdown_table", "write_report"]


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[dict]) -> str:
    """A Markdown table: one column per name in ``columns``, one line per row (floats to 3
    decimals; None, NaN and missing values as "–")."""
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

