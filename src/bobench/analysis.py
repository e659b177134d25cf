"""Rank backbones the Battle of the Backbones way: pure functions over the long results table.

Pipeline (each step a plain DataFrame, its provenance in ``df.attrs``)::

    matrix = score_matrix(store.results())   # backbone × setting, mean over seeds, NaN where missing
    z = zscores(matrix)                      # per setting, over the backbones that have it
    ranking = rank(z)                        # mean z per task type, then over task types
    cis = bootstrap(store.results())         # paired bootstrap CIs of overall score and rank

BoB (Goldblum et al. 2023) z-scores each setting across backbones, averages z within each task type and
then across task types. Here a *setting* is ``"<task>:<metric>"``; z uses the population standard
deviation (``ddof=0``, as :func:`scipy.stats.zscore`); lower-is-better metrics are sign-flipped so a
higher z is always better. Missing cells stay NaN everywhere: a backbone is ranked on what it has and
flagged, never scored as if a missing cell were present.

Only I/O: reading the prediction Parquet files named in ``config_json`` (bootstrap) and BoB's reference
CSV (:func:`load_reference`). :func:`bootstrap` and :func:`score_ci` live in
:mod:`bobench.analysis_bootstrap` and are importable from here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats

if TYPE_CHECKING:  # imported lazily by __getattr__ below: that module imports this one
    from bobench.analysis_bootstrap import bootstrap, score_ci

__all__ = [
    "BOB_COVARIATE_RHO",
    "BOB_RETRIEVAL_MAPPING",
    "REFERENCE_DIR",
    "bootstrap",
    "compare_with_reference",
    "covariate_correlations",
    "load_reference",
    "rank",
    "score_ci",
    "score_matrix",
    "task_correlations",
    "task_type",
    "zscores",
]

#: BoB's Spearman ρ of overall z-score with parameter count / pretraining-data size, per family
#: (``bob_findings.csv``), for reports next to :func:`covariate_correlations`.
BOB_COVARIATE_RHO: dict[str, dict[str, float]] = {
    "vit": {"params": 0.58, "pretraining_images": 0.72},
    "cnn": {"params": 0.35, "pretraining_images": 0.33},
}
#: Built-in BoB retrieval tasks → (dataset, metric) of ``bob_retrieval_mrr.csv``; our metric is ``mrr``.
BOB_RETRIEVAL_MAPPING: dict[str, tuple[str, str]] = {
    "bob-cub200-retrieval": ("CUB200", "MRR"),
    "bob-inat-retrieval": ("iNat", "MRR"),
    "bob-objectnet-retrieval": ("Objectnet", "MRR"),
    "bob-instre-retrieval": ("INSTRE", "MRR"),
    "bob-copydays-retrieval": ("Copydays", "MRR"),
    "bob-gldv2-retrieval": ("google_landmark", "MRR"),
    "bob-roxford5k-retrieval": ("roxford5k", "MRR"),
    "bob-rparis6k-retrieval": ("rparis6k", "MRR"),
}
#: BoB's reference tables, shipped with the package (copied from the project's shared reference)
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
_TASK_TYPES = {"linear": "classification", "knn": "classification", "fewshot": "classification"}
_TASK_TYPES |= {"retrieval": "retrieval", "ood": "ood"}
_KEY = ["backbone", "task", "seed", "metric"]
_RANK_DECIMALS = 10  # overall scores equal to 1e-10 are tied: summation-order noise must not rank


def task_type(protocol: str) -> str:
    """The task type a protocol's settings are averaged in before the overall mean.

    >>> task_type("knn"), task_type("retrieval"), task_type("detection")
    ('classification', 'retrieval', 'detection')
    """
    return _TASK_TYPES.get(protocol, protocol)


# -- the score matrix -------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _json(text: str) -> dict[str, Any]:
    return json.loads(text)


def _config(text: Any) -> dict[str, Any]:
    return _json(text) if isinstance(text, str) and text else {}


def _select_rows(results: pd.DataFrame, metric: str | Sequence[str] = "primary") -> pd.DataFrame:
    """The ok rows :func:`score_matrix` averages, with a ``setting`` column; newest row per key.

    A (backbone, task, seed, metric) recorded under several ``config_hash`` (the task changed since) keeps
    only its newest row (largest ``id``, else last), so stale scores never mix with current ones; the
    dropped keys are in ``attrs["superseded"]``.
    """
    df = results
    if "status" in df:
        df = df[(df["status"].astype(object) == "ok").to_numpy()]
    df = df[df["value"].notna().to_numpy() & (df["metric"].astype(object).fillna("") != "").to_numpy()]
    if isinstance(metric, str) and metric == "primary":
        if "config_json" not in df:
            raise ValueError("metric='primary' reads each task's primary from config_json; pass metric names")
        primary = np.array([_config(c).get("task", {}).get("primary") for c in df["config_json"]], object)
        df = df[df["metric"].astype(object).to_numpy() == primary]
    elif not (isinstance(metric, str) and metric == "all"):
        df = df[df["metric"].isin([metric] if isinstance(metric, str) else list(metric)).to_numpy()]
    df = df.sort_values("id", kind="stable") if "id" in df else df
    dup = df.duplicated(_KEY, keep="last").to_numpy()
    superseded = sorted({(r.backbone, f"{r.task}:{r.metric}", int(r.seed)) for r in df[dup].itertuples()})
    df = df[~dup].copy()
    df["setting"] = df["task"].astype(str) + ":" + df["metric"].astype(str)
    df.attrs = {"superseded": superseded}
    return df


def _one_per_setting(df: pd.DataFrame, column: str, cast: type) -> dict[str, Any]:
    out = {}
    for setting, values in df.groupby("setting", sort=False)[column]:
        distinct = pd.unique(values.dropna())
        if len(distinct) > 1:
            raise ValueError(f"setting {setting!r} has conflicting {column} values {list(distinct)}")
        out[setting] = cast(distinct[0]) if len(distinct) else None
    return out


def score_matrix(results: pd.DataFrame, metric: str | Sequence[str] = "primary") -> pd.DataFrame:
    """Backbone × setting matrix of scores, each the mean over seeds of the ok rows.

    Args:
        results: the long table of :meth:`bobench.store.ResultStore.results` (or :func:`load_reference`);
            rows that are not ``status == "ok"`` are ignored.
        metric: ``"primary"`` (each task's ``config_json["task"]["primary"]``), ``"all"``, or metric names.

    Returns:
        Index ``backbone``, one column per setting ``"<task>:<metric>"`` (first-appearance order). A
        missing (backbone, setting) cell is NaN, never filled. ``attrs``: ``higher_is_better``,
        ``protocol`` and ``dataset`` ``{setting: ...}``, ``n_seeds`` ``{setting: {backbone: int}}``,
        ``superseded`` (keys whose older-config rows were dropped, see :func:`_select_rows`).

    Raises:
        ValueError: a setting whose rows disagree on ``higher_is_better`` or ``protocol``.

    Example:
        >>> score_matrix(store.results()).loc["timm:resnet18", "mnist5k-linear:top1"]
        0.93
    """
    df = _select_rows(results, metric)
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


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """Mean over the non-NaN entries; NaN (not a RuntimeWarning) where there are none."""
    present = ~np.isnan(x)
    count = present.sum(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(present, x, 0.0).sum(axis) / count, np.nan)


def _degenerate(n: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    # A relative floor, not std == 0: equal scores such as 0.1, 0.1, 0.1 leave a ~1e-17 std from
    # rounding, which would turn noise into z-scores of ±1.
    return (n < 2) | ~(std > 1e-12 * np.maximum(1.0, np.abs(np.nan_to_num(mean))))


def _rank_min(overall: np.ndarray) -> np.ndarray:
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
    mean = _nanmean(x, 0)
    std = np.sqrt(_nanmean((x - mean) ** 2, 0))
    bad = _degenerate(n, mean, std)
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
        out[t] = _nanmean(z[[s for s in settings if types[s] == t]].to_numpy(float), 1)
    type_cols = list(out.columns)
    out["overall"] = _nanmean(out[type_cols].to_numpy(float), 1) if type_cols else np.nan
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
    out["rank"] = pd.array(_rank_min(out["overall"].to_numpy(float)), dtype="Float64").astype("Int64")
    out = out.sort_values(["rank", "overall"], ascending=[True, False], na_position="last", kind="stable")
    out.attrs = {
        "task_types": types,
        "types": type_cols,
        "degenerate": sorted(degenerate),
        "excluded": excluded,
    }
    return out


# -- correlations ----------------------------------------------------------------------------------


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """:func:`scipy.stats.spearmanr` of two complete vectors; NaN (no warning) for n < 2 or a constant."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    res = stats.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def task_correlations(z_or_matrix: pd.DataFrame, by: str = "setting") -> pd.DataFrame:
    """Spearman ρ between columns across backbones, on pairwise complete observations.

    Args:
        z_or_matrix: :func:`score_matrix` or :func:`zscores` output. On z-scores every column is
            higher-is-better, so a positive ρ always means the two settings agree on the order.
        by: ``"setting"`` (the columns as they are) or ``"task_type"`` (each backbone's mean z per task
            type, as in :func:`rank`; a raw matrix is z-scored first).

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


def _cards(results: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """The newest card of each backbone in ``results`` (``{}`` when none was recorded)."""
    df = results.sort_values("id", kind="stable") if "id" in results else results
    cards: dict[str, dict[str, Any]] = {}
    for backbone, text in zip(df["backbone"], df.get("card_json", [None] * len(df)), strict=True):
        if isinstance(text, str) and text:
            cards[str(backbone)] = _json(text)
    return cards


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
        ranking: :func:`rank` output (its ``overall``; backbones without a score are skipped).
        results: the results table, for each backbone's ``card_json`` (the newest row's card).
        covariates: card fields; values that are unknown (``"unknown"``, missing, non-numeric) or 0 (a
            random-init control's ``pretraining_images``) are excluded and counted in ``n_excluded``.
        by: ``"family"`` (``cnn``, ``vit``, everything else as ``other``) or None (one group, ``all``).

    Returns:
        One row per (family, covariate): ``family``, ``covariate``, ``rho``, ``p_value`` (both from
        :func:`scipy.stats.spearmanr`; NaN under 2 backbones or a constant), ``n``, ``n_excluded`` and
        ``bob_rho`` (:data:`BOB_COVARIATE_RHO`, NaN where BoB reports none).
    """
    cards = _cards(results)
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


# -- BoB's reference numbers -----------------------------------------------------------------------


def load_reference(path: str | Path | None = None) -> pd.DataFrame:
    """BoB's retrieval MRR table (``bob_retrieval_mrr.csv``) as a long, results-like table.

    Args:
        path: the CSV; default ``REFERENCE_DIR / "bob_retrieval_mrr.csv"``, the copy shipped in
            ``bobench/reference``.

    Returns:
        Columns ``backbone``, ``dataset``, ``metric``, ``value``, ``higher_is_better`` (True),
        ``source`` (``"BoB"``), plus ``task`` (= dataset), ``protocol`` (``"retrieval"``), ``seed`` (0)
        and ``status`` (``"ok"``) so that ``score_matrix(ref, metric="all")`` works on it.

    Raises:
        FileNotFoundError: no such file (the message names the path tried).
    """
    file = Path(path) if path is not None else REFERENCE_DIR / "bob_retrieval_mrr.csv"
    if not file.is_file():
        hint = "" if path is not None else "; pass load_reference(path=...) to your copy of it"
        raise FileNotFoundError(f"BoB reference table not found at {file}{hint}")
    ref = pd.read_csv(file, dtype={"backbone": str, "dataset": str, "metric": str, "value": float})
    ref = ref.assign(higher_is_better=True, source="BoB", task=ref["dataset"], protocol="retrieval")
    return ref.assign(seed=0, status="ok")


def compare_with_reference(
    results: pd.DataFrame,
    reference: pd.DataFrame | None = None,
    mapping: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """Place each of our scores among BoB's backbones on the same dataset and metric.

    Args:
        results: our results table.
        reference: :func:`load_reference` output (loaded when None).
        mapping: ``{our task: (reference dataset, reference metric[, our metric])}``; our metric
            defaults to the reference metric lower-cased (``MRR`` → ``mrr``). Default
            :data:`BOB_RETRIEVAL_MAPPING`.

    Returns:
        One row per (our backbone, mapped task) with a score: ``backbone``, ``task``, ``dataset``,
        ``metric`` (the reference's), ``value`` (ours, mean over seeds), ``bob_rank`` (1 + BoB backbones
        strictly better), ``bob_n``, ``bob_best``, ``bob_best_value``, ``bob_id`` (our card's
        ``extra["bob_id"]``, missing if none), ``bob_value`` (BoB's own score of that backbone there, NaN if
        none) and ``diff`` (``value - bob_value``: the reproduction gap).

    Example:
        >>> compare_with_reference(results, mapping={"bob-cub200-retrieval": ("CUB200", "MRR")})
    """
    reference = load_reference() if reference is None else reference
    mapping = BOB_RETRIEVAL_MAPPING if mapping is None else mapping
    cards = _cards(results)
    rows = []
    for task, spec in mapping.items():
        ref_dataset, ref_metric = spec[0], spec[1]
        ours = spec[2] if len(spec) > 2 else ref_metric.lower()
        matrix = score_matrix(results[(results["task"].astype(object) == task).to_numpy()], [ours])
        ref = reference[
            ((reference["dataset"] == ref_dataset) & (reference["metric"] == ref_metric)).to_numpy()
        ]
        if matrix.empty or ref.empty:
            continue
        higher = bool(ref["higher_is_better"].iloc[0]) if "higher_is_better" in ref else True
        sign = 1.0 if higher else -1.0
        values = ref.set_index("backbone")["value"].astype(float)
        best = (sign * values).idxmax()
        for backbone, value in matrix.iloc[:, 0].dropna().items():
            bob_id = cards.get(str(backbone), {}).get("extra", {}).get("bob_id")
            bob_value = float(values.get(bob_id, math.nan)) if bob_id else math.nan
            rows.append({
                "backbone": backbone, "task": task, "dataset": ref_dataset, "metric": ref_metric,
                "value": float(value), "bob_rank": 1 + int((sign * values > sign * value).sum()),
                "bob_n": len(values), "bob_best": best, "bob_best_value": float(values[best]),
                "bob_id": bob_id, "bob_value": bob_value, "diff": float(value) - bob_value,
            })  # fmt: skip
    cols = ["backbone", "task", "dataset", "metric", "value", "bob_rank", "bob_n", "bob_best"]
    return pd.DataFrame(rows, columns=[*cols, "bob_best_value", "bob_id", "bob_value", "diff"])


def __getattr__(name: str) -> Any:
    # bootstrap lives in its own module (which imports this one): import it lazily to avoid a cycle.
    if name in ("bootstrap", "score_ci"):
        from bobench import analysis_bootstrap

        return getattr(analysis_bootstrap, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
