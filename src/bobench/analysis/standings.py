"""The end-of-battle leaderboard the CLI prints: raw headline scores, ordered by BoB's ranking.

One ranking everywhere: the order and the rank numbers come from :func:`~bobench.analysis.rank` (mean
z-score per task type, then over task types), the same function the HTML report ranks with, never from
a mean of raw scores. A raw mean would let one task with a wide spread of scores (retrieval MRR from 0.1
to 0.9) outvote several with a narrow one (linear top-1 from 0.90 to 0.95), and the terminal and the
report would then disagree on who won. The raw per-task numbers stay in the table because they are
what a user recognises; missing cells are blanks, counted in ``tasks``, never averaged as if present.
"""

from __future__ import annotations

from collections.abc import Sequence
from io import StringIO
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bobench.analysis.rows import newest_config
from bobench.analysis.scores import rank, score_matrix, zscores

if TYPE_CHECKING:
    from bobench.store import ResultStore

__all__ = ["format_leaderboard", "leaderboard"]

#: Columns :func:`leaderboard` adds after the per-task ones; :func:`format_leaderboard` prints them as is.
_SUMMARY = ("score", "rank", "tasks")


def leaderboard(store: ResultStore, backbones: Sequence[str], tasks: Sequence[Any]) -> pd.DataFrame:
    """Backbones × tasks table of each task's ``primary`` metric, in the order of :func:`rank`.

    The ranking is computed over exactly ``backbones`` and ``tasks`` (z-scores are relative to these
    backbones only, whatever else the store holds), one setting per task: ``"<task>:<primary>"``.
    Several seeds of a cell are averaged, and a cell recorded under several task configs counts only
    its newest rows, as in :func:`~bobench.analysis.score_matrix`.

    Args:
        store: results store.
        backbones: the battle's backbones, in battle order.
        tasks: :class:`~bobench.task.TaskConfig` objects (their ``name`` and ``primary`` metric).

    Returns:
        DataFrame indexed by ``backbone`` with one column per task (raw primary score, NaN where
        missing), then ``score`` (overall mean z-score, :func:`rank`'s ``overall``), ``rank`` (``Int64``,
        1 = best, ties share the min; ``<NA>`` where there is no z-score: a single backbone, or no
        setting shared with another) and ``tasks`` (``"have/total"``). Rows: ranked backbones by rank,
        then unranked backbones that have scores, then backbones without any result, the last two in
        battle order. ``attrs["tasks"]`` lists the per-task columns.

    Example:
        >>> leaderboard(store, ["a", "b", "c"], [retrieval_task, linear_task]).round(2)
                  toy-retrieval  toy-linear  score  rank tasks
        backbone
        c                   0.5        0.70   0.69     1   2/2
        a                   0.9        0.60   0.15     2   2/2
        b                   0.1        0.62  -0.84     3   2/2

        ``a`` has the best raw mean (0.75) but leads only retrieval, whose wide spread a raw mean would
        let outvote linear's narrow one (the case of ``tests/test_leaderboard.py``).
    """
    names = [t.name for t in tasks]
    backbones = list(dict.fromkeys(backbones))
    settings = {f"{t.name}:{t.primary}": t.name for t in tasks}
    # Failed rows too: a cell whose newest config failed has no score, not its older config's score.
    results = store.results(status=None, backbone=backbones, task=names)
    results = results[newest_config(results)]
    table = pd.DataFrame(index=pd.Index(backbones, name="backbone"), columns=names, dtype="float64")
    ranking = None
    # One setting per task, its primary as the battle's TaskConfig names it: the columns shown are the
    # numbers ranked, even if config_json of older rows named another primary.
    primary = (results["task"].astype(str) + ":" + results["metric"].astype(str)).isin(list(settings))
    if primary.any():
        matrix = score_matrix(results[primary.to_numpy()], metric="all")
        for setting, task in settings.items():
            if setting in matrix.columns:
                table[task] = matrix[setting].reindex(table.index)
        ranking = rank(zscores(matrix))
    table["score"] = np.nan if ranking is None else ranking["overall"].reindex(table.index)
    ranks = pd.Series(pd.NA, index=table.index, dtype="Int64")
    if ranking is not None:
        ranks = ranking["rank"].reindex(table.index)
    table["rank"] = ranks.astype("Int64")
    have = table[names].notna().sum(axis=1)
    table["tasks"] = [f"{int(n)}/{len(names)}" for n in have]
    ranked = [b for b in (ranking.index if ranking is not None else []) if not pd.isna(ranks[b])]
    unranked = [b for b in backbones if b not in set(ranked) and have[b] > 0]
    empty = [b for b in backbones if have[b] == 0]
    table = table.loc[ranked + unranked + empty]
    table.attrs = {"tasks": names}
    return table


def format_leaderboard(table: pd.DataFrame, title: str = "leaderboard") -> str:
    """Render :func:`leaderboard` output with rich, as text.

    Per-task scores are printed x100 with one decimal (they are fractions in [0, 1]), ``score`` (mean
    z) with two signed decimals, ``rank`` in the ``#`` column (blank where there is none).

    Args:
        table: :func:`leaderboard` output, in its row order (printed as is).
        title: the table's title.

    Returns:
        The table as plain text, 200 columns wide at most.
    """
    from rich.console import Console
    from rich.table import Table

    tasks = list(table.attrs.get("tasks") or [c for c in table.columns if c not in _SUMMARY])
    out = Table(title=title)
    out.add_column("#", justify="right")
    out.add_column("backbone", overflow="fold")
    for c in tasks:
        out.add_column(str(c), justify="right", overflow="fold")
    out.add_column("score (mean z)", justify="right")
    out.add_column("tasks", justify="right")
    for name, row in table.iterrows():
        cells = ["" if pd.isna(row[c]) else f"{100 * row[c]:.1f}" for c in tasks]
        score = "" if pd.isna(row["score"]) else f"{row['score']:+.2f}"
        number = "" if pd.isna(row["rank"]) else str(int(row["rank"]))
        out.add_row(number, str(name), *cells, score, row["tasks"])
    buf = StringIO()
    Console(file=buf, width=200).print(out)
    return buf.getvalue()
