"""Static HTML report of a results database: ``build_report(db, out)`` or ``bobench report``.

See :mod:`bobench.report.render` for the page's contract (self-contained, script-free, every stored
string escaped) and :mod:`bobench.report.plots` for the figures.
"""

from __future__ import annotations

from bobench.report.render import build_report, render_html, report_context

__all__ = ["build_report", "render_html", "report_context"]
