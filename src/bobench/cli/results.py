"""``bobench results list | export | robustness``: what is in the results store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from bobench.cli.output import echo_json as _echo_json
from bobench.cli.output import table as _table

results_app = typer.Typer(help="Inspect and export stored results.", no_args_is_help=True)


def default_db() -> Path:
    """``$BOBENCH_DB``, else ``bobench-results/results.db`` in the working directory."""
    return Path(os.environ.get("BOBENCH_DB", "bobench-results/results.db"))


@results_app.command("list")
def results_list(
    db: Annotated[Path, typer.Option(help="Results database.")] = default_db(),
    backbone: Annotated[str | None, typer.Option(help="Only this backbone.")] = None,
    task: Annotated[str | None, typer.Option(help="Only this task.")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Show failed cells and their errors.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List stored results (or failures), one row per metric."""
    from bobench.store import ResultStore

    if not db.exists():
        raise FileNotFoundError(f"no results database at {db}; run a battle first or pass --db PATH")
    filters = {k: v for k, v in {"backbone": backbone, "task": task}.items() if v}
    with ResultStore(db, readonly=True) as store:
        df = store.results(status="failed" if failed else "ok", **filters)
    cols = ["backbone", "task", "protocol", "seed", "metric", "value", "device", "created_at"]
    if failed:
        cols = ["backbone", "task", "protocol", "seed", "error", "created_at"]
        from bobench.analysis.rows import error_headline

        # one line per cell in a table; `bobench report` shows the whole text
        df = df.assign(error=[error_headline(e) for e in df["error"]])
    rows = df[cols].to_dict(orient="records")
    if as_json:
        _echo_json(rows)
    else:
        for r in rows:
            if isinstance(r.get("value"), float):
                r["value"] = f"{r['value']:.4f}"
        _table(rows, cols, f"{len(rows)} {'failed cells' if failed else 'results'} in {db}")


@results_app.command("export")
def results_export(
    out: Annotated[Path, typer.Argument(help="Output file: .csv or .parquet")],
    db: Annotated[Path, typer.Option(help="Results database.")] = default_db(),
    fmt: Annotated[str | None, typer.Option("--format", help="csv | parquet (default: from suffix)")] = None,
) -> None:
    """Export every stored result in long format (one row per metric)."""
    from bobench.store import ResultStore

    if not db.exists():
        raise FileNotFoundError(f"no results database at {db}; run a battle first or pass --db PATH")
    with ResultStore(db, readonly=True) as store:
        path = store.export(out, fmt)
    typer.echo(f"wrote {path}")


@results_app.command("robustness")
def results_robustness(
    task: Annotated[str, typer.Option("--task", "-t", help="An OOD task in the store, e.g. patches13-ood.")],
    db: Annotated[Path, typer.Option(help="Results database.")] = default_db(),
    id_metric: Annotated[str, typer.Option(help="In-distribution accuracy metric.")] = "top1",
    ood_metric: Annotated[str, typer.Option(help="OOD accuracy metric.")] = "top1@ood=mean",
    linear: Annotated[bool, typer.Option("--linear", help="Fit in accuracy, not logit, space.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Effective robustness: each backbone's OOD accuracy above the ID-vs-OOD line fitted over all."""
    from bobench.analysis import effective_robustness
    from bobench.store import ResultStore

    if not db.exists():
        raise FileNotFoundError(f"no results database at {db}; run a battle first or pass --db PATH")
    with ResultStore(db, readonly=True) as store:
        frame = store.results()
    out = effective_robustness(frame, task, id_metric, ood_metric, transform="linear" if linear else "logit")
    rows = out.to_dict(orient="records")
    if as_json:
        _echo_json({"fit": out.attrs, "backbones": rows})
        return
    fit = out.attrs
    title = (
        f"{task}: {ood_metric} vs {id_metric}, {fit['transform']} fit over {fit['n']} backbones: "
        f"a={fit['a']:.3f}, b={fit['b']:.3f}, r2={fit['r2']:.3f}"
    )
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float):
                r[k] = f"{v:.4f}"
    _table(rows, list(out.columns), title)
