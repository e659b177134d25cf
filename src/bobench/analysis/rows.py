"""Reading the long results table: the rows the analysis scores, their task configs, backbone cards.

The table is :meth:`bobench.store.ResultStore.results` (or its CSV / Parquet export, or
:func:`~bobench.analysis.load_reference`): one row per (backbone, task, seed, metric) attempt, with the
task config and backbone card as JSON text. Every other analysis module reads it through these helpers,
so "which rows count" is decided in one place.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "CELL_KEY",
    "ROW_KEY",
    "error_headline",
    "newest_cards",
    "newest_config",
    "parse_config",
    "select_rows",
]

#: What identifies one score: a cell's seed and metric. Rows sharing it under several ``config_hash``
#: are older and newer runs of a changed task; only the newest counts (:func:`select_rows`).
ROW_KEY = ["backbone", "task", "seed", "metric"]
#: One cell whatever its config: its newest ``config_hash`` is the current one (:func:`newest_config`).
CELL_KEY = ["backbone", "task", "seed"]


@lru_cache(maxsize=4096)
def _json(text: str) -> dict[str, Any]:
    # A big table repeats the same few config and card texts on every row: parse each once.
    return json.loads(text)


def parse_config(text: Any) -> dict[str, Any]:
    """A row's ``config_json`` (or ``card_json``) as a dict; ``{}`` for NULL or empty text.

    The dict is cached and shared between calls: read it, never modify it.

    >>> parse_config('{"task": {"primary": "top1"}}')["task"]["primary"], parse_config(None)
    ('top1', {})
    """
    return _json(text) if isinstance(text, str) and text else {}


def newest_config(results: pd.DataFrame) -> np.ndarray:
    """True for the rows (ok or failed) of each (backbone, task, seed) cell's newest ``config_hash``: the
    config of its newest row (largest ``id``, else last). Rows of an older config are runs of a task
    changed since (a version bump): kept in the database, never the cell's current result. All True
    for a table without ``config_hash`` (e.g. BoB's reference numbers)."""
    if results.empty or not {"config_hash", *CELL_KEY} <= set(results.columns):
        return np.ones(len(results), dtype=bool)
    # Positions, not index labels: a table may repeat its index (e.g. two exports concatenated).
    n = len(results)
    order = np.argsort(results["id"].to_numpy(), kind="stable") if "id" in results else np.arange(n)
    df = results.iloc[order].reset_index(drop=True)
    hashes = df["config_hash"].astype(object).fillna("")
    last = hashes.groupby([df[c] for c in CELL_KEY], dropna=False, sort=False).transform("last")
    current = np.empty(n, dtype=bool)
    current[order] = (hashes == last).to_numpy()
    return current


def select_rows(results: pd.DataFrame, metric: str | Sequence[str] = "primary") -> pd.DataFrame:
    """The ok rows :func:`~bobench.analysis.score_matrix` averages, with a ``setting`` column.

    A (backbone, task, seed) cell recorded under several ``config_hash`` (the task changed since) keeps
    only the rows of its newest config (:func:`newest_config`), so stale scores never mix with current
    ones, nor stand in for a current run that failed (the cell is then missing, as a failed cell is).

    Args:
        results: the long results table; rows whose ``status`` is not ``ok``, whose ``value`` is NULL or
            whose ``metric`` is empty (failed cells) are dropped.
        metric: ``"primary"`` (each row's ``config_json["task"]["primary"]``), ``"all"``, or metric names.

    Returns:
        The kept rows plus ``setting`` (``"<task>:<metric>"``); ``attrs["superseded"]`` lists the
        ``(backbone, setting, seed)`` keys whose older-config rows were dropped.

    Raises:
        ValueError: ``metric="primary"`` on a table without ``config_json``.
    """
    df = results.assign(_current=newest_config(results))
    if "status" in df:
        df = df[(df["status"].astype(object) == "ok").to_numpy()]
    df = df[df["value"].notna().to_numpy() & (df["metric"].astype(object).fillna("") != "").to_numpy()]
    if isinstance(metric, str) and metric == "primary":
        if "config_json" not in df:
            raise ValueError("metric='primary' reads each task's primary from config_json; pass metric names")
        tasks = [parse_config(c).get("task", {}) for c in df["config_json"]]
        primary = np.array([t.get("primary") for t in tasks], object)
        df = df[df["metric"].astype(object).to_numpy() == primary]
    elif not (isinstance(metric, str) and metric == "all"):
        df = df[df["metric"].isin([metric] if isinstance(metric, str) else list(metric)).to_numpy()]
    df = df.sort_values("id", kind="stable") if "id" in df else df
    current = df.pop("_current").to_numpy()
    dup = ~current  # older configs' rows, then repeats of a current row (e.g. a table exported twice)
    dup[current] = df[current].duplicated(ROW_KEY, keep="last").to_numpy()
    superseded = sorted({(r.backbone, f"{r.task}:{r.metric}", int(r.seed)) for r in df[dup].itertuples()})
    df = df[~dup].copy()
    df["setting"] = df["task"].astype(str) + ":" + df["metric"].astype(str)
    df.attrs = {"superseded": superseded}
    return df


def newest_cards(results: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """``{backbone: card}`` from the newest row of each backbone that has a ``card_json`` (else absent).

    The cards are cached and shared between calls: read them, never modify them.
    """
    df = results.sort_values("id", kind="stable") if "id" in results else results
    cards: dict[str, dict[str, Any]] = {}
    for backbone, text in zip(df["backbone"], df.get("card_json", [None] * len(df)), strict=True):
        if isinstance(text, str) and text:
            cards[str(backbone)] = _json(text)
    return cards


def error_headline(error: Any) -> str:
    """The one line of a failed row's ``error`` that says what went wrong, for lists of failures.

    That is the first non-blank line (the runner stores ``"<Type>: <message>"`` first, then the
    traceback), except for a bare traceback (an exception given to ``ResultStore.record_failure``),
    whose first line is boilerplate and whose last line names the exception.

    >>> error_headline("OSError: disk full\\n\\nTraceback ..."), error_headline(None)
    ('OSError: disk full', '(no error text)')
    """
    text = error if isinstance(error, str) else ""  # NULL reads as None, NaN or pd.NA
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "(no error text)"
    return lines[-1] if lines[0].startswith("Traceback (most recent call last)") else lines[0]
