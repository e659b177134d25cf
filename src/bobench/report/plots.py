"""Report figures: each function draws one matplotlib figure and returns it as a PNG ``data:`` URI.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through ``pyplot``: no global
figure registry to leak into, no GUI backend to pick, safe in a process that already uses pyplot. PNGs
are rendered at a modest dpi so a report with dozens of backbones stays a few hundred kB.

Every function takes plain DataFrames (index = backbone names, possibly very long, possibly with HTML in
them: matplotlib draws them as pixels, so nothing here needs escaping) and tolerates NaN cells.
"""

from __future__ import annotations

import base64
import io
import itertools
import math

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

__all__ = ["correlations", "cost", "heatmap", "leaderboard", "pairs_of", "scatter", "short", "to_data_uri"]

DPI = 80
_MISSING = "#d9d9d9"  # grey of a missing cell, with a hatch so it reads without colour too
_LABEL_CHARS = 40
_MAX_INCHES = 60.0  # no figure side grows past this, however many backbones or settings


def short(name: object, limit: int = _LABEL_CHARS) -> str:
    """``name`` as text of at most ``limit`` characters (middle elided), for axis labels.

    The middle goes, not the end: backbone specs differ in their tails (``..._in1k`` vs ``..._in22k``).
    """
    text = str(name)
    if len(text) <= limit:
        return text
    keep = limit - 1
    return f"{text[: keep - keep // 2]}…{text[len(text) - keep // 2 :]}"


def to_data_uri(fig: Figure) -> str:
    """Render ``fig`` to PNG and return ``data:image/png;base64,...`` (works from file://, offline)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pil_kwargs={"optimize": True})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(min(width, _MAX_INCHES), min(height, _MAX_INCHES)), layout="constrained")


def leaderboard(board: pd.DataFrame) -> str:
    """Overall score of each backbone with its bootstrap CI as horizontal error bars, best on top.

    Args:
        board: index backbone, in rank order; columns ``overall``, ``overall_low``, ``overall_high``
            (NaN bounds draw a bare point).
    """
    n = len(board)
    fig = _figure(7.5, 1.2 + 0.32 * n)
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]  # rank 1 at the top
    x = board["overall"].to_numpy(float)
    low = np.nan_to_num(x - board["overall_low"].to_numpy(float), nan=0.0)
    high = np.nan_to_num(board["overall_high"].to_numpy(float) - x, nan=0.0)
    # CIs of a percentile bootstrap need not contain the point estimate: clip so matplotlib accepts them
    ax.errorbar(
        x, y, xerr=[np.clip(low, 0, None), np.clip(high, 0, None)], fmt="o", color="#1f4e79", capsize=3
    )
    ax.axvline(0.0, color="#999999", lw=0.8, ls="--")
    ax.set_yticks(y, [short(b) for b in board.index])
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("overall score (mean z-score, higher is better) with bootstrap CI")
    ax.grid(axis="x", alpha=0.3)
    return to_data_uri(fig)


def heatmap(values: pd.DataFrame, *, label: str, center: bool = True, annotate: bool = True) -> str:
    """Backbones × settings matrix as colours; NaN cells grey and hatched, with a legend entry.

    Args:
        values: index backbones (rows), columns settings; NaN = missing.
        label: colour bar label.
        center: a diverging colour map centred on 0 (z-scores, correlations) rather than sequential.
        annotate: write each value in its cell when the matrix is small enough to read them.
    """
    data = values.to_numpy(float)
    n_rows, n_cols = data.shape
    labels = max(len(short(r)) for r in values.index)
    fig = _figure(max(7.0, 2.5 + 0.7 * n_cols + 0.07 * labels), max(3.5, 1.8 + 0.4 * n_rows))
    ax = fig.add_subplot()
    finite = data[np.isfinite(data)]
    bound = float(np.max(np.abs(finite))) if finite.size else 1.0
    bound = bound or 1.0
    cmap = colormaps["RdBu" if center else "viridis"].with_extremes(bad=_MISSING)
    vmin, vmax = (-bound, bound) if center else (float(finite.min(initial=0)), float(finite.max(initial=1)))
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    for r, c in zip(*np.where(~np.isfinite(data)), strict=True):
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, hatch="///", ec="#888888", lw=0))
    if annotate and n_rows * n_cols <= 400:
        for r, c in zip(*np.where(np.isfinite(data)), strict=True):
            v = data[r, c]
            dark = center and abs(v) > 0.6 * bound
            ax.text(
                c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black"
            )
    ax.set_xticks(range(n_cols), [short(c, 32) for c in values.columns], rotation=45, ha="right")
    ax.set_yticks(range(n_rows), [short(r) for r in values.index])
    fig.colorbar(image, ax=ax, label=label, shrink=0.8)
    if np.isnan(data).any():
        missing = Patch(facecolor=_MISSING, hatch="///", edgecolor="#888888", label="missing")
        ax.legend(handles=[missing], loc="upper left", bbox_to_anchor=(1.0, -0.02), frameon=False)
    return to_data_uri(fig)


def correlations(corr: pd.DataFrame) -> str:
    """Square Spearman correlation matrix, -1..1 diverging; NaN (undefined) cells grey and hatched."""
    return heatmap(corr, label="Spearman ρ", center=True, annotate=True)


def scatter(frame: pd.DataFrame, pairs: list[tuple[str, str]], *, unit: str) -> str:
    """One panel per column pair: each backbone a point, with its Spearman ρ in the title.

    Args:
        frame: index backbone; the columns named in ``pairs`` (NaN rows of a pair are left out).
        pairs: (x column, y column) pairs, one panel each.
        unit: axis-label suffix, e.g. ``"z-score"``.
    """
    n = len(pairs)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _figure(4.0 * cols, 3.6 * rows)
    for i, (a, b) in enumerate(pairs):
        ax = fig.add_subplot(rows, cols, i + 1)
        both = frame[[a, b]].astype(float).dropna()
        ax.scatter(both[a], both[b], s=28, color="#1f4e79", alpha=0.85)
        if len(both) <= 12:  # name the points while the plot can hold the names
            for name, (x, y) in both.iterrows():
                ax.annotate(short(name, 24), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        rho = both[a].corr(both[b], method="spearman") if len(both) >= 3 else float("nan")
        ax.set_title(
            f"n={len(both)}, Spearman ρ={rho:.2f}" if np.isfinite(rho) else f"n={len(both)}", fontsize=9
        )
        ax.set_xlabel(f"{short(a, 36)} ({unit})", fontsize=8)
        ax.set_ylabel(f"{short(b, 36)} ({unit})", fontsize=8)
        ax.grid(alpha=0.3)
    return to_data_uri(fig)


def cost(frame: pd.DataFrame, *, score_label: str) -> str:
    """Score vs throughput and vs parameter count, both on a log x axis.

    Args:
        frame: index backbone; columns ``score``, ``img_per_s``, ``params`` (NaN or non-positive x
            values are left out of that panel: a log axis cannot place them).
        score_label: y axis label.
    """
    fig = _figure(10.0, 4.0)
    panels = [("img_per_s", "throughput (images/s, log)"), ("params", "parameters (log)")]
    for i, (column, xlabel) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        both = frame[[column, "score"]].astype(float)
        both = both[(both[column] > 0) & both["score"].notna()]
        ax.scatter(both[column], both["score"], s=30, color="#1f4e79", alpha=0.85)
        if len(both) <= 12:
            for name, (x, y) in both.iterrows():
                ax.annotate(short(name, 24), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if len(both):
            _log_x(ax, both[column].min(), both[column].max())
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(score_label)
        ax.grid(alpha=0.3, which="both")
    return to_data_uri(fig)


def _log_x(ax, low: float, high: float) -> None:
    """Log x axis spanning at least a decade, ticked at 1, 2, 5 × 10^k with short labels (2M, 50k)."""
    ax.set_xscale("log")
    # Under a decade matplotlib labels the minor ticks in scientific notation, which overlap; a decade
    # of room always holds a few 1-2-5 ticks.
    if high / low < 10:
        pad = math.sqrt(10 * low / high)
        ax.set_xlim(low / pad, high * pad)
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(EngFormatter(places=0, sep=""))
    ax.xaxis.set_minor_formatter(NullFormatter())


def pairs_of(columns: list[str], limit: int = 6) -> list[tuple[str, str]]:
    """All unordered pairs of ``columns`` in order, at most ``limit`` (keeps the figure readable)."""
    return list(itertools.combinations(columns, 2))[:limit]
