"""What ``bobench run``, ``bobench battle`` and ``bobench demo`` share: plan, preflight, run, report.

Exit codes a script can rely on: 0 when every cell of this invocation ran and succeeded (cells already
in the database are skipped, not failed), 1 when any cell failed or was blocked by the preflight (all
are recorded in the database with their errors; rerunning retries only them), 2 for a usage error
(unknown backbone, task or suite, a missing paths key, a malformed option), reported before any work.

Under torchrun (``--nproc N``) rank 0 does all of this; the other ranks only run the cells rank 0
hands out (:func:`bobench.runner.share_cells`) and print nothing.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import typer

from bobench.options import RunOptions


def _first_line(text: str) -> str:
    return (text.splitlines() or ["unknown error"])[0]  # whole: it is printed once per cause


def _plan_lines(n_backbones: int, n_tasks: int, planned: int, skipped: int, db: Path) -> list[str]:
    return [
        f"plan: {n_backbones} backbone(s) x {n_tasks} task(s)"
        f"{'' if planned == n_backbones * n_tasks else ' x their seeds'} = {planned} cell(s); "
        f"{skipped} already in {db} (skipped), {planned - skipped} to run."
    ]


def _failure_lines(failures: Sequence) -> list[str]:
    """One line per cause (a backbone, a dataset, a task), with how many cells it failed."""
    groups: Counter[tuple[str, str]] = Counter()
    for out in failures:
        cause = out.cause or f"task {out.planned.task.name}"
        groups[(cause, _first_line(out.error))] += 1
    return [f"  {cause}: {msg} ({n} cell{'s' * (n > 1)})" for (cause, msg), n in groups.items()]


def battle(
    backbones: Sequence[str],
    tasks: Sequence[str],
    *,
    db: Path,
    options: RunOptions,
    title: str,
    cache_dir: Path | None = None,
    force: bool = False,
    seeds: Sequence[int] | None = None,
    paths: Path | None = None,
    report: bool = True,
    executor: str = "local",
    executor_options: dict | None = None,
    dry_run: bool = False,
    strict: bool = False,
    fetch_hint: str | None = None,
) -> int:
    """Plan, preflight, run and report one battle; returns the exit code (see the module docstring).

    Raises:
        UnknownNameError, TaskError, DatasetError: usage errors, before any work (the CLI exits 2).
    """
    from bobench.battle_display import BattleDisplay
    from bobench.distributed import is_main
    from bobench.preflight import check
    from bobench.runner import plan, run_battle, share_cells, validate_backbones, validate_tasks
    from bobench.store import ResultStore
    from bobench.task import load_paths, load_task

    where = load_paths(paths)
    loaded = [load_task(t, where) for t in tasks]
    validate_tasks(loaded)
    validate_backbones(backbones)
    planned = plan(backbones, loaded, seeds)
    if not is_main():  # a torchrun rank other than 0: run what rank 0 hands out; rank 0 reports
        run_battle(
            backbones, loaded, store=None, cache_dir=cache_dir, options=options, seeds=seeds, force=force,
            preflight=False,
        )  # fmt: skip
        return 0
    with ResultStore(db) as store:
        pending = [pc for pc in planned if force or not store.has_result(pc.cell)]
        flight = check(
            list(dict.fromkeys(pc.backbone for pc in pending)),
            list({pc.task.name: pc.task for pc in pending}.values()),
            paths=where,
            paths_file=str(paths) if paths else os.environ.get("BOBENCH_PATHS"),
            fetch_hint=fetch_hint,
        )
        for line in _plan_lines(
            len(set(backbones)), len(loaded), len(planned), len(planned) - len(pending), db
        ):
            typer.echo(line)
        for line in flight.lines():
            typer.secho(line, fg="yellow", err=True)
        if dry_run:
            n_blocked = sum(flight.blocker(pc.backbone, pc.task) is not None for pc in pending)
            if len(pending) <= 20:  # a small plan in full; a large one is what the counts say
                for pc in pending:
                    mark = " (blocked)" if flight.blocker(pc.backbone, pc.task) else ""
                    typer.echo(f"  {pc.backbone} | {pc.task.name} | seed {pc.seed}{mark}")
            typer.echo(
                f"dry run: nothing was run; {len(pending) - n_blocked} cell(s) would run, {n_blocked} are "
                "blocked by the preflight" + ("." if flight.ok else " (exit 1).")
            )
            share_cells([], planned)  # under torchrun: the other ranks run nothing either
            return 0 if flight.ok else 1
        if strict and not flight.ok:
            typer.secho(
                "--strict: stopping before any work; fix the above or drop --strict to run what can run.",
                fg="red",
                err=True,
            )
            share_cells([], planned)
            return 1
        with BattleDisplay(len(planned)) as display:
            summary = run_battle(
                backbones,
                loaded,
                store=store,
                cache_dir=cache_dir,
                options=options,
                seeds=seeds,
                force=force,
                on_outcome=display.on_outcome,
                executor=executor,
                executor_options=executor_options,
                preflight=flight,
            )
        if summary.done or summary.skipped:
            from bobench.analysis import format_leaderboard, leaderboard

            table = leaderboard(store, backbones, loaded)
            typer.echo(format_leaderboard(table, f"{title}: primary metric x100, ranked by mean z-score"))
    if report:
        from bobench.report import build_report

        page = build_report(db, db.parent / "report", title=f"bobench {title}: {db.name}")
        typer.echo(f"Report: {page} (open it in a browser; `bobench report` rebuilds it).")
    ran = summary.done + summary.failed
    typer.echo(
        f"{ran} cells run ({summary.done} ok, {summary.failed} failed), {summary.blocked} blocked by the "
        f"preflight, {summary.skipped} skipped (already in {db}) in {summary.wall_time_s:.0f} s."
    )
    if summary.ok:
        return 0
    run_failures = [f for f in summary.failures if not f.error.startswith("preflight:")]
    if run_failures:
        typer.secho("Failed, by cause:", fg="red", err=True)
        for line in _failure_lines(run_failures):
            typer.secho(line, fg="red", err=True)
    n = summary.failed + summary.blocked
    typer.secho(
        f"exit 1: {n} cell(s) failed or were blocked; they are recorded with their errors "
        "(`bobench results list --failed`), and rerunning the same command retries only them.",
        fg="red",
        err=True,
    )
    return 1
