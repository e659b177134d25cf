"""Output helpers shared by the CLI's command modules: JSON or a rich table, one format per flag."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer


def echo_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON (non-JSON values as strings)."""
    typer.echo(json.dumps(obj, indent=2, default=str))


def emit(rows: list[dict[str, Any]], columns: list[str], title: str, as_json: bool) -> None:
    """Print ``rows`` as JSON or as a table of ``columns``."""
    if as_json:
        echo_json(rows)
    else:
        table(rows, columns, title)


def table(rows: list[dict[str, Any]], columns: list[str], title: str) -> None:
    """Print ``rows`` as a rich table of ``columns``."""
    from rich.console import Console
    from rich.table import Table

    out = Table(title=title)
    for c in columns:
        out.add_column(c, overflow="fold")
    for r in rows:
        out.add_row(*(str(r.get(c, "")) for c in columns))
    # pipes and CI logs get a wide table instead of rich's 80-column default with truncated names
    Console(width=None if sys.stdout.isatty() else 160).print(out)
