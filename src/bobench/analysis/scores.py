"""Scores, z-scores and ranks: BoB's aggregation of the long results table into one ranking.

BoB (Goldblum et al. 2023) z-scores each setting across backbones, averages z within each task type and
then across task types. Here a *setting* is ``"<task>:<metric>"``; z uses the population standard
deviation (``ddof=0``, as :func:`scipy.stats.zscore`); lower-is-better metrics are sign-flipped so a
higher z is always better. Missing cells stay NaN everywhere: a backbone is ranked on what it has and
flagged, never scored as if a missing cell were present.

:func:`nanmean`, :func:`degenerate_spread` and :func:`rank_min` are the array math of :func:`zscores` and
:func:`rank`; :mod:`bobench.analysis.confidence` reuses them on stacks of bootstrap replicates so that a
replicate is scored exactly as the point estimate is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from bobench.analysis.rows import select_rows

__all__ = ["degenerate_spread", "nanmean", "rank", "rank_min", "score_matrix", "task_type", "zscores"]

# fine-tuning is classification, as in BoB's aggregation (its classification results are mostly fine-tuning)
_TASK_TYPES = {"linear": "classification", "knn": "classification", "fewshot": "classification"}
_TASK_TYPES |= {"finetune": "classification"}
_TASK_TYPES |= {"retrieval": "retrieval", "ood": "ood"}
_RANK_DECIMALS = 10  # overall scores equal to 1e-10 are tied: summation-order noise must not rank


def task_type(protocol: str) -> str:
    """The task type a protocol's settings are averaged in before the overall mean.

    >>> task_type("knn"), task_type("retrieval"), task_type("detection")
    ('classification', 'retrieval', 'detection')
    """
    return _TASK_TYPES.get(protocol, protocol)


def _one_per_setting(df: pd.DataFrame, column: str, cast: type) -> dict[str, Any]:
    out = {}
    for setting, values in df.groupby("setting", sort=False)[column]:
        distinct = pd.unique(values.dropna())
        if len(distinct) > 1:
            raise ValueError(f"setting {setting!r} has conflicting {column} values {list(distinct)}")
        out[setting] = cast(distinct[0]) if len(distinct) else None
    return out


# -- the score matrix -------------------------------------------------------------------------------


def score_matrix(results: pd.DataFrame, metric: str | Sequence[str] = "primary") -> pd.DataFrame:
    """Backbone × setting matrix of scores, each the mean over seeds of the ok rows.

    Args:
        results: the long table of :meth:`bobench.store.ResultStore.results` (or
            :func:`~bobench.analysis.load_reference`);
            rows that are not ``status == "ok"`` are ignored.
        metric: ``"primary"`` (each task's ``config_json["task"]["primary"]``), ``"all"``, or metric names.

    Returns:
        Index ``backbone``, one column per setting ``"<task>:<metric>"`` (first-appearance order). A
        missing (backbone, setting) cell is NaN, never filled. ``attrs``: ``higher_is_better``,
        ``protocol`` and ``dataset`` ``{setting: ...}``, ``n_seeds`` ``{setting: {backbone: int}}``,
        ``superseded`` (keys whose older-config rows were dropped, see
        :func:`~bobench.analysis.rows.select_rows`).

    Raises:
        ValueError: a setting whose rows disagree on ``higher_is_better`` or ``protocol``.

    Example:
        >>> score_matrix(store.results()).loc["timm:resnet18", "mnist5k-linear:top1"]
        0.93
    """
    df = select_rows(results, metric)
    backbones, settings = pd.unique(df["backbone"].astype(object)), pd.unique(df["setting"])
    matrix = df.groupby(["backbone", "setting"])["value"].mean().unstack("setting")
    matrix = matrix.reindex(index=backbones, columns=settings).astype("float64")
    matrix.index.name, matrix.columns.name = "backbone", "setting"
    counts = df.groupby(["setting", "backbone"], sort=False)["seed"].nunique()
    matrix.attrs = {
        "higher_is_better": _one_per_setting(df, "higher_is_better", bool),
        "protocol": _one_per_setting(df, "protocol", str),
        "dataset": _one_per_setting(df, "dataset", str) if "dataset" in df else {},
        "n_seeds": {s: {b: int(n) for b, n in counts[s].items()} for s in settings},
        "superseded": df.attrs["superseded"],
    }
    return matrix


# -- z-scores and ranks ----------------------------------------------------------------------------


def nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """Mean over the non-NaN entries along ``axis``; NaN (not a RuntimeWarning) where there are none.

    >>> nanmean(np.array([[1.0, np.nan], [np.nan, np.nan]]), 1)
    array([ 1., nan])
    """
    present = ~np.isnan(x)
    count = present.sum(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(present, x, 0.0).sum(axis) / count, np.nan)


def degenerate_spread(n: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """True where a setting has no z-score: fewer than 2 backbones (``n``) or no spread (``std``).

    Args:
        n, mean, std: per setting (any matching shapes): backbone count, mean and population std.
    """
    # A relative floor, not std == 0: equal scores such as 0.1, 0.1, 0.1 leave a ~1e-17 std from
    # rounding, which would turn noise into z-scores of ±1.
    return (n < 2) | ~(std > 1e-12 * np.maximum(1.0, np.abs(np.nan_to_num(mean))))


def rank_min(overall: np.ndarray) -> np.ndarray:
    """1 + the number of strictly better scores along the last axis (ties share the min rank); NaN stays."""
    o = np.round(overall, _RANK_DECIMALS)
    better = (o[..., None, :] > o[..., :, None]).sum(-1)  # NaN compares False: never "better"
    return np.where(np.isnan(o), np.nan, 1.0 + better)


def zscores(matrix: pd.DataFrame) -> pd.DataFrame:
    """Per-setting z-scores over the backbones that have the setting; higher is always better.

    ``z = (x - mean) / std`` with the population std (``ddof=0``, as :func:`scipy.stats.zscore`), over
    the non-NaN cells of the column; negated where ``matrix.attrs["higher_is_better"][setting]`` is
    False (a setting absent from it counts as higher-is-better). A setting with fewer than 2 backbones or
    zero spread is an all-NaN column, listed in ``attrs["degenerate"]``.

    Returns:
        Same shape as ``matrix`` (missing cells stay NaN); ``attrs``: those of ``matrix`` plus
        ``population`` ``{setting: {"n", "mean", "std", "backbones"}}`` (what each z is relative to),
        ``degenerate`` and ``ddof`` (0).

    Example:
        >>> zscores(pd.DataFrame({"t:top1": [0.9, 0.8, 0.7]}, index=["a", "b", "c"]))["t:top1"].round(4).tolist()
        [1.2247, -0.0, -1.2247]
    """
    hib = matrix.attrs.get("higher_is_better", {})
    x = matrix.to_numpy(dtype="float64")
    n = (~np.isnan(x)).sum(0)
    mean = nanmean(x, 0)
    std = np.sqrt(nanmean((x - mean) ** 2, 0))
    bad = degenerate_spread(n, mean, std)
    sign = np.array([1.0 if hib.get(s, True) else -1.0 for s in matrix.columns])
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(bad, np.nan, sign * (x - mean) / std)
    out = pd.DataFrame(z, index=matrix.index, columns=matrix.columns)
    population = {
        s: {
            "n": int(n[j]),
            "mean": float(mean[j]),
            "std": float(std[j]),
            "backbones": [str(b) for b in matrix.index[~np.isnan(x[:, j])]],
        }
        for j, s in enumerate(matrix.columns)
    }
    degenerate = [s for j, s in enumerate(matrix.columns) if bad[j]]
    out.attrs = {**matrix.attrs, "population": population, "degenerate": degenerate, "ddof": 0}
    return out


def _setting_types(z: pd.DataFrame, task_types: Mapping[str, str] | None) -> dict[str, str]:
    protocols = z.attrs.get("protocol", {})
    given = dict(task_types or {})
    return {s: given.get(s) or task_type(protocols.get(s) or "unknown") for s in z.columns}


def rank(
    z: pd.DataFrame, *, require_complete: bool = False, task_types: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Rank backbones by the mean over task types of their mean z within each type.

    Task types come from ``task_types`` ``{setting: type}`` or else ``z.attrs["protocol"]`` through
    :func:`task_type` (``"unknown"`` without either). Degenerate settings (``z.attrs["degenerate"]``) are
    left out for everyone. A backbone lacking settings is ranked on the ones it has and flagged
    (``complete`` False, ``missing``); its missing cells are never counted as present.

    Args:
        z: :func:`zscores` output.
        require_complete: rank only backbones with every setting; the others go to ``attrs["excluded"]``
            ``{backbone: [missing settings]}``. z keeps its population (all backbones that have each
            setting): to z-score over complete backbones only, filter the matrix first.

    Returns:
        Index ``backbone``, sorted by rank: one column per task type (mean z over its settings present),
        ``overall`` (mean over the task types present), ``n_settings``, ``n_missing``, ``missing``,
        ``complete``, ``rank`` (1 = best; ties, to 1e-10, share the min rank; ``<NA>`` for a backbone
        with no scores). ``attrs``: ``task_types`` ``{setting: type}``, ``types`` (the task-type
        columns, in order), ``degenerate``, ``excluded``.
    """
    degenerate = set(z.attrs.get("degenerate", []))
    settings = [s for s in z.columns if s not in degenerate]
    types = {s: t for s, t in _setting_types(z, task_types).items() if s in degenerate or s in settings}
    out = pd.DataFrame(index=z.index.copy())
    for t in dict.fromkeys(types[s] for s in settings):
        out[t] = nanmean(z[[s for s in settings if types[s] == t]].to_numpy(float), 1)
    type_cols = list(out.columns)
    out["overall"] = nanmean(out[type_cols].to_numpy(float), 1) if type_cols else np.nan
    present = z[settings].notna().to_numpy()
    out["n_settings"] = present.sum(1)
    out["n_missing"] = len(settings) - out["n_settings"]
    out["missing"] = [[s for s, p in zip(settings, row, strict=True) if not p] for row in present]
    out["complete"] = out["n_missing"] == 0
    excluded = {}
    if require_complete:
        excluded = {
            str(b): m for b, m, ok in zip(out.index, out["missing"], out["complete"], strict=True) if not ok
        }
        out = out[out["complete"].to_numpy()].copy()
    out["rank"] = pd.array(rank_min(out["overall"].to_numpy(float)), dtype="Float64").astype("Int64")
    out = out.sort_values(["rank", "overall"], ascending=[True, False], na_position="last", kind="stable")
    out.attrs = {
        "task_types": types,
        "types": type_cols,
        "degenerate": sorted(degenerate),
        "excluded": excluded,
    }
    return out
