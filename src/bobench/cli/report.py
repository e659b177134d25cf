"""``bobench report``: render a results database as one static, offline HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bobench.cli.results import default_db

DEFAULT_OUT = Path("bobench-results/report")


def report_cmd(
    db: Annotated[
        Path | None,
        typer.Option(help="Results database (default: $BOBENCH_DB or bobench-results/results.db)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output directory; index.html is written there.")] = DEFAULT_OUT,
    n_boot: Annotated[
        int, typer.Option(min=1, help="Bootstrap resamples for the confidence intervals.")
    ] = 200,
    title: Annotated[str | None, typer.Option(help="Page title (default: from the database name).")] = None,
) -> None:
    """Write a static HTML report (leaderboard with CIs, heat maps, correlations, cards, failures).

    The page is one self-contained file: open it from disk, no network needed. Prints its path.
    """
    from bobench.report import build_report

    # Resolved here, not as the option default: $BOBENCH_DB must be read when the command runs.
    path = build_report(db or default_db(), out, n_boot=n_boot, title=title)
    typer.echo(str(path))
