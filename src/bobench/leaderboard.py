"""The end-of-battle leaderboard: each task's headline metric per backbone, and their mean.

This is a plain table of raw scores. Rankings with z-scores and confidence intervals belong to the
analysis module; the mean here is only over tasks a backbone has (missing cells are shown as blanks
and counted in the ``tasks`` column, never silently averaged as if present).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from bobench.store import ResultStore


def leaderboard(store: ResultStore, backbones: Sequence[str], tasks: Sequence[Any]) -> pd.DataFrame:
    """Backbones × tasks table of each task's ``primary`` metric, sorted by the mean over tasks.

    Args:
        store: results store.
        backbones: rows, in battle order.
        tasks: :class:`~bobench.task.TaskConfig` objects (their ``primary`` metric is shown).

    Returns:
        DataFrame indexed by backbone with one column per task, ``mean`` and ``tasks`` (``have/total``).
    """
    df = store.results(status="ok", backbone=list(backbones), task=[t.name for t in tasks])
    table = pd.DataFrame(index=pd.Index(list(backbones), name="backbone"))
    for t in tasks:
        sub = df[(df["task"] == t.name) & (df["metric"] == t.primary)]
        # several seeds: their mean (seed spread is the analysis module's business)
        table[t.name] = sub.groupby("backbone")["value"].mean().reindex(table.index).astype(float)
    cols = [t.name for t in tasks]
    table["mean"] = table[cols].mean(axis=1, skipna=True)
    table["tasks"] = [f"{int(n)}/{len(cols)}" for n in table[cols].notna().sum(axis=1)]
    return table.sort_values("mean", ascending=False, na_position="last")


def format_leaderboard(table: pd.DataFrame, title: str = "leaderboard") -> str:
    """Render with rich as text (scores as percentages where they are accuracies in [0, 1])."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    out = Table(title=title)
    out.add_column("#", justify="right")
    out.add_column("backbone", overflow="fold")
    for c in table.columns:
        out.add_column(str(c), justify="right", overflow="fold")
    for rank, (name, row) in enumerate(table.iterrows(), start=1):
        cells = []
        for c in table.columns:
            v = row[c]
            cells.append(v if isinstance(v, str) else ("" if pd.isna(v) else f"{100 * v:.1f}"))
        out.add_row(str(rank), str(name), *cells)
    buf = StringIO()
    Console(file=buf, width=200).print(out)
    return buf.getvalue()
