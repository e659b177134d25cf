"""Confidence intervals of overall scores and ranks, by a paired bootstrap (see :mod:`bobench.analysis`).

Each replicate perturbs the score matrix, then recomputes z-scores, task-type means, overall scores and
ranks exactly as :func:`~bobench.analysis.zscores` and :func:`~bobench.analysis.rank` do. A cell
(backbone, setting) is perturbed in the first way that applies:

1. ``predictions``: every seed of the cell kept a predictions Parquet (``config_json["predictions"]``)
   and its metric is an accuracy recomputable from it: ``top1`` (rows of the file's first ``setting``
   value, the protocol's headline), ``top1@<s>`` (rows of setting ``s``, e.g. ``top1@k=1:uniform``,
   ``top1@ood=sketch``) or ``top1@ood=mean`` (mean over the ``ood=*`` settings). Correctness is
   ``pred == label`` per sample, rows ordered by ``index``; the full-sample accuracy must reproduce the
   stored score to 1e-6, else the cell falls through (reason in ``attrs["notes"]``). Test samples are
   drawn with replacement once per replicate per test set (the task's dataset, or each OOD set): the
   same draw for every backbone, task and seed on that set, so the bootstrap is paired and shared
   sampling noise cancels from comparisons.
2. ``seeds``: ≥2 seeds: seeds are drawn with replacement (the same seed positions for every backbone of
   the setting) and averaged.
3. ``fixed``: the point value in every replicate (e.g. ``mrr``, ``map``, ``ece`` with one seed). Such a
   setting is listed in ``attrs["not_resampled"]``: its noise is not in the CIs.

CIs are percentile intervals: linear interpolation for scores; for ranks the ``lower`` / ``higher``
order statistic, so rank bounds are whole (and conservative).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bobench.analysis.rows import parse_config, select_rows
from bobench.analysis.scores import degenerate_spread, nanmean, rank, rank_min, score_matrix, zscores

__all__ = ["bootstrap", "score_ci"]

_CHUNK = 4_000_000  # index draws held at once (32 MB): an ImageNet-sized test set in chunks of replicates
_TOLERANCE = 1e-6  # predictions must reproduce the stored score this closely to stand in for it
_PRED_COLUMNS = ["index", "label", "pred", "setting"]


def _rng(seed: int, *key: Any) -> np.random.Generator:
    """A generator for one named stream: the draws of a test set do not depend on what else is ranked."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _resampled_means(correct: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """``[n_boot, m]`` means of the rows of ``correct`` ``[m, n]``, every row on the same drawn indices."""
    m, n = correct.shape
    # float32 sums of 0/1 times counts are exact integers below 2**24, and 3x faster than float64
    dtype = np.float32 if n < 2**24 else np.float64
    weights = correct.T.astype(dtype)
    out = np.empty((n_boot, m))
    step = max(1, _CHUNK // n)
    for start in range(0, n_boot, step):
        c = min(step, n_boot - start)
        idx = rng.integers(0, n, size=(c, n))
        # counts[r, i] = how often sample i is drawn in replicate r; then one matmul scores every row
        counts = np.bincount((idx + n * np.arange(c)[:, None]).ravel(), minlength=c * n).reshape(c, n)
        out[start : start + c] = (counts.astype(dtype) @ weights).astype(np.float64) / n
    return out


def score_ci(correct: np.ndarray, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of one accuracy from its per-sample correctness.

    >>> score_ci(np.r_[np.ones(70), np.zeros(30)], n_boot=2000)
    (0.61, 0.79)
    """
    c = np.asarray(correct, dtype=np.float64).ravel()
    if c.size == 0:
        raise ValueError("score_ci needs at least one sample")
    _check(n_boot, ci)
    means = _resampled_means(c[None, :], np.random.default_rng(seed), n_boot)[:, 0]
    low, high = np.quantile(means, [(1 - ci) / 2, (1 + ci) / 2])
    return float(low), float(high)


def _check(n_boot: int, ci: float) -> None:
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")


def _parts(metric: str, preds: pd.DataFrame, task: dict[str, Any], dataset: str) -> list | None:
    """``[(test-set key, correctness, weight)]`` whose weighted accuracies sum to ``metric``, or None."""
    settings = list(pd.unique(preds["setting"]))
    if metric == "top1" and settings:
        chosen = [(settings[0], 1.0)]
    elif metric == "top1@ood=mean":
        oods = [s for s in settings if str(s).startswith("ood=")]
        chosen = [(s, 1.0 / len(oods)) for s in oods] if oods else None
    elif metric.startswith("top1@") and metric[5:] in settings:
        chosen = [(metric[5:], 1.0)]
    else:
        chosen = None
    if not chosen:
        return None
    parts = []
    for setting, weight in chosen:
        rows = preds[(preds["setting"] == setting).to_numpy()].sort_values("index", kind="stable")
        index = rows["index"].to_numpy(np.int64)
        correct = (rows["pred"].to_numpy() == rows["label"].to_numpy()).astype(np.float64)
        # An OOD set is its own test set (named by its dataset spec); any other setting re-scores the
        # task's test split. n and the index digest keep differently-subsetted files from being paired.
        name = str(setting)[4:] if str(setting).startswith("ood=") else None
        where = ("ood", task.get("ood", {}).get(name, name)) if name else ("test", dataset)
        key = (*where, len(index), hashlib.sha1(index.tobytes()).hexdigest()[:16])
        parts.append((key, correct, weight))
    return parts


def _prediction_parts(cell: pd.DataFrame, cache: dict[str, Any]) -> tuple[list | None, str]:
    """Components of a cell's seed-mean from its predictions, or (None, why not; '' if unremarkable)."""
    out = []
    for row in cell.itertuples():
        config = parse_config(row.config_json) if hasattr(row, "config_json") else {}
        path = config.get("predictions")
        # only accuracies are resampled from predictions (other metrics, e.g. detection AP, keep their
        # predictions in other columns for re-scoring, not for this bootstrap)
        if not path or not str(row.metric).startswith("top1"):
            return None, ""
        if path not in cache:
            cache[path] = pd.read_parquet(path, columns=_PRED_COLUMNS) if Path(path).is_file() else None
        if cache[path] is None:
            return None, f"predictions file {path} is missing"
        parts = _parts(str(row.metric), cache[path], config.get("task", {}), str(row.dataset))
        if parts is None:
            return None, ""
        full = sum(w * c.mean() for _, c, w in parts)
        if abs(full - row.value) > _TOLERANCE:
            return None, f"seed {row.seed}: predictions give {full:.6g}, the store has {row.value:.6g}"
        out += [(key, c, w / len(cell)) for key, c, w in parts]
    return out, ""


def _replicate_overall(values: np.ndarray, sign: np.ndarray, groups: Sequence[np.ndarray]) -> np.ndarray:
    """``[B, backbones]`` overall scores of ``[B, backbones, settings]`` matrices (the math of zscores and rank)."""
    n = (~np.isnan(values)).sum(1)
    mean = nanmean(values, 1)
    std = np.sqrt(nanmean((values - mean[:, None, :]) ** 2, 1))
    bad = degenerate_spread(n, mean, std)  # a setting that a replicate makes constant drops out of it
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(bad[:, None, :], np.nan, sign * (values - mean[:, None, :]) / std[:, None, :])
    return nanmean(np.stack([nanmean(z[..., g], -1) for g in groups], -1), -1)


def bootstrap(
    results: pd.DataFrame,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    *,
    metric: str | Sequence[str] = "primary",
    require_complete: bool = False,
) -> pd.DataFrame:
    """Bootstrap CIs of each backbone's overall score and rank, and which backbones are tied.

    Args:
        results: the long results table; ``metric`` and ``require_complete`` as in
            :func:`~bobench.analysis.score_matrix` and :func:`~bobench.analysis.rank`.
        n_boot: replicates. seed: seeds every draw (reproducible). ci: coverage of the intervals.

    Returns:
        Indexed by backbone, in :func:`~bobench.analysis.rank` order: ``overall``, ``overall_low``,
        ``overall_high``, ``rank``, ``rank_low``, ``rank_high``, ``tie_group`` (1 holds the best backbone
        and every backbone whose rank CI overlaps its rank CI; then, greedily, the best backbone not yet
        grouped and those overlapping it, ...), ``tied_with_best`` (``tie_group == 1``),
        ``n_settings``, ``n_missing``, ``complete``. ``attrs``: ``n_boot``, ``seed``, ``ci``,
        ``resampling`` ``{setting: {"predictions" | "seeds" | "fixed": [backbones]}}``, ``resampled``
        (settings with no fixed cell), ``partly_resampled``, ``not_resampled`` (every cell fixed),
        ``notes`` (why a cell with predictions fell back), ``degenerate``, ``excluded``.

    Example:
        >>> bootstrap(store.results(), n_boot=1000).loc[:, ["overall", "rank", "rank_low", "rank_high"]]
    """
    _check(n_boot, ci)
    rows = select_rows(results, metric)
    matrix = score_matrix(results, metric)
    z = zscores(matrix)
    point = rank(z, require_complete=require_complete)
    backbones, settings = list(matrix.index), list(matrix.columns)
    values = np.broadcast_to(matrix.to_numpy(np.float64), (n_boot, *matrix.shape)).copy()
    samples: dict[tuple, list] = {}
    seeded: dict[tuple, list] = {}
    resampling = {s: {"predictions": [], "seeds": [], "fixed": []} for s in settings}
    notes, cache = [], {}
    for (backbone, setting), cell in rows.groupby(["backbone", "setting"], sort=False):
        b, s = backbones.index(backbone), settings.index(setting)
        cell = cell.sort_values("seed")
        parts, note = _prediction_parts(cell, cache)
        if parts is not None:
            values[:, b, s] = 0.0
            for key, correct, weight in parts:
                samples.setdefault(key, []).append((b, s, weight, correct))
            method = "predictions"
        elif len(cell) >= 2:
            seeded.setdefault((setting, len(cell)), []).append((b, s, cell["value"].to_numpy(np.float64)))
            method = "seeds"
        else:
            method = "fixed"
        resampling[setting][method].append(str(backbone))
        if note:
            notes.append(f"{backbone} | {setting}: {note}; {method} instead")
    for key, members in samples.items():
        means = _resampled_means(np.stack([m[3] for m in members]), _rng(seed, "samples", key), n_boot)
        for j, (b, s, weight, _) in enumerate(members):
            values[:, b, s] += weight * means[:, j]
    for (setting, k), members in seeded.items():
        pick = _rng(seed, "seeds", setting, k).integers(0, k, size=(n_boot, k))
        for b, s, seed_values in members:
            values[:, b, s] = seed_values[pick].mean(1)

    keep = [j for j, s in enumerate(settings) if s not in set(z.attrs["degenerate"])]
    hib = matrix.attrs["higher_is_better"]
    sign = np.array([1.0 if hib.get(settings[j], True) else -1.0 for j in keep])
    types = [point.attrs["task_types"][settings[j]] for j in keep]
    groups = [np.array([i for i, t in enumerate(types) if t == want]) for want in point.attrs["types"]]
    overall = (
        _replicate_overall(values[..., keep], sign, groups) if keep else np.full(values.shape[:2], np.nan)
    )
    ranked = np.isin(backbones, list(point.index))
    overall[:, ~ranked] = np.nan  # require_complete: excluded backbones do not take ranks
    ranks = rank_min(overall)

    alpha = (1 - ci) / 2
    out = point[["overall", "rank", "n_settings", "n_missing", "complete"]].copy()
    bounds = {c: [] for c in ("overall_low", "overall_high", "rank_low", "rank_high")}
    for backbone in out.index:
        o, r = overall[:, backbones.index(backbone)], ranks[:, backbones.index(backbone)]
        valid = ~np.isnan(o)
        if not valid.any():
            for col in bounds.values():
                col.append(np.nan)
            continue
        lo_hi = np.quantile(o[valid], [alpha, 1 - alpha])
        bounds["overall_low"].append(lo_hi[0])
        bounds["overall_high"].append(lo_hi[1])
        bounds["rank_low"].append(np.quantile(r[valid], alpha, method="lower"))
        bounds["rank_high"].append(np.quantile(r[valid], 1 - alpha, method="higher"))
    for col, vals in bounds.items():
        kind = "float64" if col.startswith("overall") else "Int64"
        out[col] = pd.array(np.asarray(vals, dtype=np.float64), dtype="Float64").astype(kind)
    out["tie_group"] = pd.array(_tie_groups(out), dtype="Int64")
    out["tied_with_best"] = (out["tie_group"] == 1).fillna(False).astype(bool)
    out = out[["overall", "overall_low", "overall_high", "rank", "rank_low", "rank_high", "tied_with_best",
               "tie_group", "n_settings", "n_missing", "complete"]]  # fmt: skip

    fixed = {s for s, m in resampling.items() if m["fixed"]}
    moved = {s for s, m in resampling.items() if m["predictions"] or m["seeds"]}
    out.attrs = {
        "n_boot": int(n_boot), "seed": seed, "ci": ci, "resampling": resampling,
        "resampled": [s for s in settings if s not in fixed],
        "partly_resampled": [s for s in settings if s in fixed and s in moved],
        "not_resampled": [s for s in settings if s not in moved],
        "notes": notes, "degenerate": z.attrs["degenerate"], "excluded": point.attrs["excluded"],
    }  # fmt: skip
    return out


def _tie_groups(table: pd.DataFrame) -> list[Any]:
    """Greedy groups of overlapping rank CIs, leaders taken best first (``table`` is in rank order)."""
    group: dict[Any, int] = {}
    ranked = [b for b in table.index if not pd.isna(table.at[b, "rank_low"])]
    for leader in ranked:
        if leader in group:
            continue
        group[leader] = len(set(group.values())) + 1
        low, high = table.at[leader, "rank_low"], table.at[leader, "rank_high"]
        for other in ranked:
            if (
                other not in group
                and table.at[other, "rank_low"] <= high
                and table.at[other, "rank_high"] >= low
            ):
                group[other] = group[leader]
    return [group.get(b) for b in table.index]
