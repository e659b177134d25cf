"""Rank correlations: between settings or task types (do they agree?), and of scores with model size.

Both use Spearman's ρ (:func:`scipy.stats.spearmanr`) over backbones, on pairwise complete observations:
a backbone missing a setting is left out of that pair, never imputed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from bobench.analysis.rows import newest_cards
from bobench.analysis.scores import rank, zscores

__all__ = ["BOB_COVARIATE_RHO", "covariate_correlations", "task_correlations"]

#: BoB's Spearman ρ of overall z-score with parameter count / pretraining-data size, per family
#: (``bob_findings.csv``), for reports next to :func:`covariate_correlations`.
BOB_COVARIATE_RHO: dict[str, dict[str, float]] = {
    "vit": {"params": 0.58, "pretraining_images": 0.72},
    "cnn": {"params": 0.35, "pretraining_images": 0.33},
}


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """:func:`scipy.stats.spearmanr` of two complete vectors; NaN (no warning) for n < 2 or a constant."""
    # imported here: scipy.stats takes ~0.5 s, which every `from bobench.analysis import ...` (the CLI's
    # leaderboard, `bobench results robustness`) would otherwise pay without needing it
    from scipy import stats

    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    res = stats.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def task_correlations(z_or_matrix: pd.DataFrame, by: str = "setting") -> pd.DataFrame:
    """Spearman ρ between columns across backbones, on pairwise complete observations.

    Args:
        z_or_matrix: :func:`~bobench.analysis.score_matrix` or :func:`~bobench.analysis.zscores` output. On z-scores every column is
            higher-is-better, so a positive ρ always means the two settings agree on the order.
        by: ``"setting"`` (the columns as they are) or ``"task_type"`` (each backbone's mean z per task
            type, as in :func:`~bobench.analysis.rank`; a raw matrix is z-scored first).

    Returns:
        Square DataFrame of ρ (:func:`scipy.stats.spearmanr` on the backbones having both columns; NaN
        with fewer than 2 of them or a constant column); ``attrs["n"]`` the pairwise counts (a DataFrame
        converted to ``{row: {column: n}}``).
    """
    if by == "task_type":
        z = z_or_matrix if "population" in z_or_matrix.attrs else zscores(z_or_matrix)
        ranked = rank(z)
        table = ranked[ranked.attrs["types"]]
    elif by == "setting":
        table = z_or_matrix
    else:
        raise ValueError(f"by must be 'setting' or 'task_type', got {by!r}")
    cols, x = list(table.columns), table.to_numpy(dtype="float64")
    rho = np.full((len(cols), len(cols)), np.nan)
    count = np.zeros((len(cols), len(cols)), dtype=int)
    for i in range(len(cols)):
        for j in range(i, len(cols)):
            both = ~np.isnan(x[:, i]) & ~np.isnan(x[:, j])
            count[i, j] = count[j, i] = int(both.sum())
            rho[i, j] = rho[j, i] = _spearman(x[both, i], x[both, j])[0]
    out = pd.DataFrame(rho, index=cols, columns=cols)
    out.attrs = {"n": {a: {b: int(count[i, j]) for j, b in enumerate(cols)} for i, a in enumerate(cols)}}
    return out


def _covariate_value(value: Any) -> float | None:
    """A positive finite number, or None for unknown: ``"unknown"``, missing, 0 (random init), junk."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def covariate_correlations(
    ranking: pd.DataFrame,
    results: pd.DataFrame,
    covariates: Iterable[str] = ("params", "pretraining_images"),
    by: str | None = "family",
) -> pd.DataFrame:
    """Spearman ρ of the overall score with backbone-card covariates, per family (BoB's scaling analysis).

    Args:
        ranking: :func:`~bobench.analysis.rank` output (its ``overall``; backbones without a score are skipped).
        results: the results table, for each backbone's ``card_json`` (the newest row's card).
        covariates: card fields; values that are unknown (``"unknown"``, missing, non-numeric) or 0 (a
            random-init control's ``pretraining_images``) are excluded and counted in ``n_excluded``.
        by: ``"family"`` (``cnn``, ``vit``, everything else as ``other``) or None (one group, ``all``).

    Returns:
        One row per (family, covariate): ``family``, ``covariate``, ``rho``, ``p_value`` (both from
        :func:`scipy.stats.spearmanr`; NaN under 2 backbones or a constant), ``n``, ``n_excluded`` and
        ``bob_rho`` (:data:`BOB_COVARIATE_RHO`, NaN where BoB reports none).
    """
    cards = newest_cards(results)
    overall = ranking["overall"].astype("float64").dropna()

    def group(backbone: str) -> str:
        if by is None:
            return "all"
        if by != "family":
            raise ValueError(f"by must be 'family' or None, got {by!r}")
        family = cards.get(backbone, {}).get("family")
        return family if family in ("cnn", "vit") else "other"

    groups = {b: group(str(b)) for b in overall.index}
    rows = []
    for fam in [g for g in ("vit", "cnn", "other", "all") if g in groups.values()]:
        members = [b for b, g in groups.items() if g == fam]
        for cov in covariates:
            pairs = [(overall[b], _covariate_value(cards.get(str(b), {}).get(cov))) for b in members]
            kept = [(s, v) for s, v in pairs if v is not None]
            x, y = np.array([s for s, _ in kept]), np.array([v for _, v in kept])
            rho, p = _spearman(x, y)
            bob = BOB_COVARIATE_RHO.get(fam, {}).get(cov, math.nan)
            rows.append((fam, cov, rho, p, len(kept), len(pairs) - len(kept), bob))
    cols = ["family", "covariate", "rho", "p_value", "n", "n_excluded", "bob_rho"]
    return pd.DataFrame(rows, columns=cols)
