"""Build the static HTML report of a results database: one self-contained ``index.html``.

The page has no scripts and no external resources: plots are PNG ``data:`` URIs and the CSS is inline,
so it opens from ``file://`` offline and can be mailed or archived as one file. Everything read from the
database (backbone and task names, card fields, errors) is user data and reaches the page only through
Jinja2 autoescaping; a Content-Security-Policy forbidding scripts is a second line of defence.

Degenerate databases still render: with fewer than two scored backbones there are no z-scores (the page
says so and shows raw scores), all-NaN settings are shown as missing, a failed-only database shows its
failures. Numbers come from :mod:`bobench.analysis`; this module only lays them out.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import jinja2
import pandas as pd

from bobench import analysis, provenance
from bobench.analysis.rows import error_headline, newest_config
from bobench.report import plots
from bobench.store import ResultStore

__all__ = ["build_report", "render_html", "report_context"]

T = TypeVar("T")
_KEY = ["backbone", "task", "dataset", "protocol", "seed", "config_hash"]
# Columns of analysis.rank() that are not per-task-type scores.
_RANK_META = {"overall", "n_settings", "n_missing", "missing", "complete", "rank"}
_CI = 0.95
_ERROR_CHARS = 4000  # of each failure's full text shown folded; tracebacks of OOMs can be huge
# Card fields in reading order (identity, size, pretraining, input contract, provenance); others follow.
_CARD_ORDER = (
    *("name", "source", "spec", "family", "params", "embed_dim", "pool", "pretrained", "pretraining"),
    *("pretraining_kind", "pretraining_data", "pretraining_images", "input_size", "mean", "std"),
    *("interpolation", "crop_pct", "license", "paper", "weights", "weights_digest"),
)
_LIBRARIES = ("torch", "torchvision", "timm", "numpy", "scikit-learn", "open_clip_torch", "transformers")


def build_report(
    db: str | os.PathLike[str], out: str | os.PathLike[str], *, n_boot: int = 200, title: str | None = None
) -> Path:
    """Render the results in ``db`` to ``<out>/index.html``.

    Args:
        db: results database written by a battle (opened read-only; a running battle is not disturbed).
        out: output directory, created if needed; only ``index.html`` in it is (over)written.
        n_boot: bootstrap resamples for the confidence intervals of scores and ranks.
        title: page title (default: ``bobench report: <db file name>``).

    Returns:
        The path of the written ``index.html``.

    Raises:
        FileNotFoundError: ``db`` does not exist (the message says how to make one).
        ValueError: ``n_boot`` < 1.
    """
    db, out = Path(db), Path(out)
    if n_boot < 1:  # checked here: the report turns the analysis' ValueErrors into notes on the page
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not db.exists():
        raise FileNotFoundError(f"no results database at {db}; run a battle first or pass --db PATH")
    with ResultStore(db, readonly=True) as store:
        results = store.results(status=None)
    html = render_html(report_context(results, n_boot=n_boot, title=title or f"bobench report: {db.name}"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a reader never sees half a page
    try:
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def render_html(context: dict[str, Any]) -> str:
    """Fill the packaged template with ``context`` (as from :func:`report_context`), autoescaping on."""
    source = resources.files("bobench.report").joinpath("template.html.j2").read_text(encoding="utf-8")
    # autoescape=True, not select_autoescape(): the template is loaded from a string, without a name.
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(source).render(**context)


def report_context(
    results: pd.DataFrame, *, n_boot: int = 200, title: str = "bobench report"
) -> dict[str, Any]:
    """Everything the template shows, computed from the long results table (ok and failed rows).

    Args:
        results: ``ResultStore.results(status=None)``.
        n_boot: bootstrap resamples.
        title: page title.

    Returns:
        A dict of plain values (strings, numbers, lists of dicts, PNG data URIs); the keys are the
        template's variables. Sections that cannot be computed carry a ``note`` saying why.
    """
    notes: list[str] = []
    # Rows of a task's older config (before a version bump) are neither the battle's cells nor failures
    # that rerunning would retry: counted apart.
    current = newest_config(results)
    ok = results[(results["status"] == "ok").to_numpy() & current]
    failed = results[(results["status"] == "failed").to_numpy() & current]
    matrix = _attempt(notes, "score matrix", lambda: analysis.score_matrix(results)) if len(ok) else None
    scored = [] if matrix is None else [b for b in matrix.index if matrix.loc[b].notna().any()]
    z = ranking = boot = None
    if len(scored) >= 2:
        z = _attempt(notes, "z-scores", lambda: analysis.zscores(matrix))
        ranking = None if z is None else _attempt(notes, "ranking", lambda: analysis.rank(z))
        boot = _attempt(
            notes,
            "bootstrap",
            lambda: analysis.bootstrap(results, n_boot=n_boot, seed=0, ci=_CI),
        )
    order = list(ranking.index) if ranking is not None else list(matrix.index) if matrix is not None else []
    order += sorted(set(results["backbone"]) - set(order))  # failed-only backbones last
    return {
        "title": title,
        "summary": _summary(results, ok, failed, matrix, results[~current]),
        "notes": notes,
        "n_boot": n_boot,
        "ci_percent": round(100 * _CI),
        "leaderboard": _leaderboard(matrix, ranking, boot, scored),
        "heatmap": _heatmap(matrix, z, ranking),
        "correlations": _correlations(z),
        "scatter": _scatter(z, ranking),
        "cost": _cost(ok, matrix, ranking),
        "covariates": _covariates(ranking, results),
        "cards": _cards(results, order),
        "failures": _failures(failed),
        "provenance": _provenance(results),
    }


def _attempt(notes: list[str], what: str, compute: Callable[[], T]) -> T | None:
    # The analysis raises ValueError for data it cannot score (e.g. no overlap between backbones):
    # the report says so in place of that section and still renders the rest.
    try:
        return compute()
    except ValueError as exc:
        notes.append(f"{what} could not be computed: {exc}")
        return None


def _types(ranking: pd.DataFrame | None) -> list[str]:
    """The task-type columns of :func:`bobench.analysis.rank` output, in its order."""
    if ranking is None:
        return []
    return list(ranking.attrs.get("types") or [c for c in ranking.columns if c not in _RANK_META])


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    return "" if value is None or pd.isna(value) else fmt.format(value)


def _summary(
    results: pd.DataFrame,
    ok: pd.DataFrame,
    failed: pd.DataFrame,
    matrix: pd.DataFrame | None,
    superseded: pd.DataFrame,
) -> dict:
    return {
        "backbones": results["backbone"].nunique(),
        "tasks": results["task"].nunique(),
        "settings": 0 if matrix is None else matrix.shape[1],
        "cells_ok": len(ok.drop_duplicates(_KEY)),
        "cells_failed": len(failed.drop_duplicates(_KEY)),
        "cells_superseded": len(superseded.drop_duplicates(_KEY)),
    }


def _leaderboard(matrix, ranking, boot, scored: list[str]) -> dict[str, Any]:
    empty = {"rows": [], "columns": [], "plot": None}
    if matrix is None or not scored:
        return {**empty, "note": "No backbone has a score yet: nothing to rank."}
    if ranking is None and len(scored) < 2:
        why = "ranking needs z-scores, which need at least two backbones per setting"
        return {
            **empty,
            "note": f"Only 1 backbone has scores: {why}. Its raw scores are in the heat map section.",
        }
    if ranking is None:
        return {**empty, "note": "The ranking could not be computed (see the notes in the summary)."}
    types = _types(ranking)
    board = ranking
    if boot is not None:  # both indexed by backbone; the point estimates are rank()'s
        board = ranking.join(boot.drop(columns=[c for c in boot.columns if c in ranking.columns]))
    rows = []
    for name, r in board.iterrows():
        missing = r.get("missing") or []
        missing = ", ".join(map(str, missing)) if isinstance(missing, list | tuple) else str(missing)
        low, high = r.get("rank_low"), r.get("rank_high")
        rows.append({
            "rank": _num(r.get("rank"), "{:.0f}"),
            "backbone": str(name),
            "rank_ci": "" if pd.isna(low) or pd.isna(high) else f"{low:.0f}–{high:.0f}",
            "tie_group": _num(r.get("tie_group"), "{}"),
            "overall": _num(r["overall"]),
            "ci": "" if pd.isna(r.get("overall_low")) else f"[{r['overall_low']:.3f}, {r['overall_high']:.3f}]",
            "types": [_num(r[t]) for t in types],
            "settings": f"{int(r.get('n_settings', 0))}/{int(r.get('n_settings', 0) + r.get('n_missing', 0))}",
            "missing": missing,
        })  # fmt: skip
    fixed = [str(s) for s in (boot.attrs.get("not_resampled") or [])] if boot is not None else []
    note = (
        "Held fixed in the bootstrap (no stored predictions and a single seed), so their uncertainty is "
        f"not in the intervals: {', '.join(fixed)}."
        if fixed
        else None
    )
    plot_board = board.dropna(subset=["overall"])
    if boot is None:
        plot_board = plot_board.assign(overall_low=float("nan"), overall_high=float("nan"))
    return {
        "note": note,
        "rows": rows,
        "columns": types,
        "plot": plots.leaderboard(plot_board) if len(plot_board) else None,
    }


def _heatmap(matrix, z, ranking) -> dict[str, Any]:
    if matrix is None:
        return {"note": "No scores.", "plot": None, "raw": None}
    rows = list(ranking.index) if ranking is not None else list(matrix.index)
    raw = matrix.reindex(rows)
    table = {
        "columns": [str(c) for c in raw.columns],
        "rows": [{"backbone": str(b), "cells": [_num(v, "{:.4f}") for v in raw.loc[b]]} for b in raw.index],
    }
    if z is None:
        return {
            "note": "Z-scores need at least two backbones with scores; raw scores only.",
            "plot": None,
            "raw": table,
        }
    zz = z.reindex(rows)
    if not zz.notna().to_numpy().any():
        return {
            "note": "Every z-score is undefined (no setting varies across backbones).",
            "plot": None,
            "raw": table,
        }
    degenerate = [str(c) for c in z.attrs.get("degenerate", [])]
    note = (
        f"No z-score (fewer than two backbones, or no spread) for: {', '.join(degenerate)}."
        if degenerate
        else None
    )
    return {"note": note, "plot": plots.heatmap(zz, label="z-score (higher is better)"), "raw": table}


def _correlations(z) -> dict[str, Any]:
    if z is None or int(z.notna().any().sum()) < 2:
        return {"note": "Correlations need z-scores of at least two settings.", "plot": None}
    if len(z) < 3:
        return {
            "note": "Rank correlations over fewer than three backbones say nothing; not shown.",
            "plot": None,
        }
    # settings without any z-score (degenerate) would only add all-undefined rows and columns
    corr = analysis.task_correlations(z.loc[:, z.notna().any()], by="setting")
    if not corr.notna().to_numpy().any():
        return {"note": "Every correlation is undefined (too few shared backbones).", "plot": None}
    return {"note": None, "plot": plots.correlations(corr)}


def _scatter(z, ranking) -> dict[str, Any]:
    types = [t for t in _types(ranking) if ranking[t].notna().sum() >= 2]
    if len(types) >= 2:
        caption = "Mean z-score per task type, each pair of types; each point is a backbone."
        return {
            "note": None,
            "caption": caption,
            "plot": plots.scatter(ranking, plots.pairs_of(types), unit="z"),
        }
    counts = pd.Series(dtype=int) if z is None else z.notna().sum()
    counts = counts[counts >= 2]
    if len(counts) < 2:
        return {"note": "Scatter plots need z-scores of at least two settings.", "caption": "", "plot": None}
    top = list(counts.sort_values(ascending=False, kind="stable").index[:2])
    caption = "The two settings with the most backbones scored; each point is a backbone."
    return {"note": None, "caption": caption, "plot": plots.scatter(z, [(top[0], top[1])], unit="z")}


def _cost(ok: pd.DataFrame, matrix, ranking) -> dict[str, Any]:
    if matrix is None:
        return {"note": "No scores.", "plot": None, "devices": ""}
    if ranking is not None:
        score, label = ranking["overall"], "overall score (mean z)"
    else:
        score, label = matrix.mean(axis=1), "mean primary score (raw)"
    params = {b: _card(ok[ok["backbone"] == b]).get("params") for b in score.index}
    frame = pd.DataFrame({
        "score": score,
        "img_per_s": ok.groupby("backbone")["img_per_s"].median().reindex(score.index),
        "params": pd.to_numeric(pd.Series(params), errors="coerce").reindex(score.index),
    })  # fmt: skip
    devices = ", ".join(sorted(str(d) for d in ok["device"].dropna().unique()))
    return {"note": None, "plot": plots.cost(frame, score_label=label), "devices": devices or "unknown"}


def _covariates(ranking, results: pd.DataFrame) -> list[dict[str, str]]:
    """BoB's scaling check: Spearman ρ of the overall score with params / pretraining size, per family."""
    if ranking is None:
        return []
    table = analysis.covariate_correlations(ranking, results)
    return [
        {"family": str(r.family), "covariate": str(r.covariate), "rho": _num(r.rho, "{:.2f}"),
         "n": f"{r.n} (+{r.n_excluded} unknown)" if r.n_excluded else str(r.n), "bob": _num(r.bob_rho, "{:.2f}")}
        for r in table.itertuples()
    ]  # fmt: skip


def _card(rows: pd.DataFrame) -> dict[str, Any]:
    """The newest parseable card of these rows ({} if none)."""
    for text in rows.sort_values("id", ascending=False)["card_json"].dropna():
        try:
            card = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(card, dict):
            return card
    return {}


def _fmt_field(key: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int) and key in ("params", "pretraining_images"):
        return f"{value:,}"
    if isinstance(value, list | tuple):
        return " × ".join(map(str, value)) if key == "input_size" else ", ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _cards(results: pd.DataFrame, order: Iterable[str]) -> list[dict[str, Any]]:
    out = []
    for i, name in enumerate(order):
        card = _card(results[results["backbone"] == name])
        keys = [k for k in _CARD_ORDER if k in card] + sorted(set(card) - set(_CARD_ORDER))
        fields = [(k, _fmt_field(k, card[k])) for k in keys if card[k] not in ("", {}, [])]
        out.append({"anchor": f"card-{i}", "backbone": str(name), "fields": fields})
    return out


def _failures(failed: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for _, r in failed.sort_values("id").iterrows():
        text = str(r["error"] or "")
        out.append({
            **{k: str(r[k]) for k in ("backbone", "task", "dataset", "protocol", "seed")},
            "first_line": error_headline(text)[:500],
            "error": text[:_ERROR_CHARS] + ("\n… (truncated)" if len(text) > _ERROR_CHARS else ""),
        })  # fmt: skip
    return out


def _counted(pairs: Iterable[tuple[Any, int]]) -> str:
    """Distinct non-empty values of (value, n rows) pairs, most frequent first; counts shown if mixed."""
    counts: Counter[str] = Counter()
    for value, n in pairs:
        if value is not None and not pd.isna(value) and str(value):
            counts[str(value)] += int(n)
    if len(counts) <= 1:
        return next(iter(counts), "unknown")
    return "; ".join(f"{v} ({n} rows)" for v, n in counts.most_common())


def _column(results: pd.DataFrame, column: str) -> list[tuple[Any, int]]:
    return list(results[column].value_counts(dropna=True).items())


def _json_column(results: pd.DataFrame, column: str, key: str) -> list[tuple[Any, int]]:
    # value_counts first: a big database repeats the same few JSON texts on every row
    return [(json.loads(text).get(key), n) for text, n in _column(results, column)]


def _provenance(results: pd.DataFrame) -> list[tuple[str, str]]:
    env = "environment_json"
    rows = [
        ("bobench version", _counted(_column(results, "bobench_version"))),
        ("git hash", _counted(_column(results, "git_hash"))),
        ("python", _counted(_json_column(results, env, "python"))),
        *((lib, _counted(_json_column(results, "library_versions_json", lib))) for lib in _LIBRARIES),
        ("machine", _counted(_json_column(results, env, "hostname"))),
        ("platform", _counted(_json_column(results, env, "platform"))),
        ("device", _counted(_column(results, "device"))),
        ("dtype", _counted(_column(results, "dtype"))),
    ]
    created = results["created_at"].dropna()
    rows.append(("results created", f"{created.min()} … {created.max()}" if len(created) else "unknown"))
    here = provenance.collect()
    rows.append(("report made with", f"bobench {here['bobench_version']} {here['git_hash']}".strip()))
    return rows
