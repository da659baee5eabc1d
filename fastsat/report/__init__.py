"""The report layer: the analysis files, the figures and the Markdown/HTML report.

- :func:`analyze` (:mod:`fastsat.report.analysis`): Etmann's per-sample table of a model on some
  data (computed by :mod:`fastsat.alignment`), written as CSV/JSON and plotted;
- figures (:mod:`fastsat.report.figures`): :func:`saliency_grid`, :func:`alignment_scatter`,
  :func:`robustness_curves`, each a PNG written atomically; the only place fastsat imports
  matplotlib;
- :func:`markdown_table`, :func:`write_report` (:mod:`fastsat.report.document`): ``report.md`` and
  a self-contained ``report.html``.
"""

from fastsat.report.analysis import Analysis, analyze
from fastsat.report.document import markdown_table, write_report
from fastsat.report.figures import DPI, alignment_scatter, robustness_curves, saliency_grid

__all__ = [
    "DPI",
    "Analysis",
    "alignment_scatter",
    "analyze",
    "markdown_table",
    "robustness_curves",
    "saliency_grid",
    "write_report",
]
