"""The battle runner: plan → validate → preflight → skip done → group → execute → record.

Cells (backbone × task × seed) are grouped by backbone so each model is built once (a random-init
control once per seed: the cell's seed is its init seed), and within a build by (dataset, image size)
so every frozen protocol on the same data reuses one cached forward pass (:mod:`bobench.frozen`). A
failing cell is recorded with its error and the battle goes on; a killed battle resumes where it
stopped, because finished cells are in the store (skipped unless ``force``) and finished features are
cached.

Before any work, backbone and task names are validated (a name that matches nothing raises: a usage
error) and the preflight (:mod:`bobench.preflight`) finds backbones without weights and datasets
that are not on disk; the cells they block are recorded as failed with that cause, without running.

Executors decide where a group runs (:mod:`bobench.executors`); the driver process is the single writer
of the results store, whatever the executor.

Under ``torchrun`` (``--nproc N``, :mod:`bobench.distributed`) every rank plans; rank 0 alone reads the
store, runs the preflight and hands the cells to run to the others (:func:`share_cells`); every rank
runs them in the same order (trained cells together, in DDP; frozen cells each); rank 0 alone records.
After each trained cell the ranks agree on its outcome (a cell that failed on any rank is recorded as
failed, with that rank's error); a rank that left lockstep ends the launch (``RankFailure``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bobench import distributed
from bobench.cells import CellOutcome, PlannedCell, WorkGroup, failed
from bobench.options import RunOptions
from bobench.preflight import Preflight
from bobench.store import Cell, ResultStore
from bobench.task import TaskConfig, load_task, resolve_paths


def _config_hash(backbone: str, task: TaskConfig, seed: int) -> str:
    blob = json.dumps({"backbone": backbone, "task": task.config_hash(), "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def plan(
    backbones: Sequence[str],
    tasks: Sequence[str | TaskConfig],
    seeds: Sequence[int] | None = None,
    paths: dict[str, str] | None = None,
) -> list[PlannedCell]:
    """Every (backbone, task, seed) cell, in backbone-major order.

    Args:
        backbones: zoo names or specs.
        tasks: task names, YAML paths or loaded configs.
        seeds: override the tasks' own seeds.
        paths: values for ``${name}`` path placeholders in the tasks' dataset specs.

    Raises:
        TaskError: an unknown task, or a task that names a path placeholder ``paths`` lacks (before any
            work starts).
    """
    loaded = [resolve_paths(t if isinstance(t, TaskConfig) else load_task(t), paths or {}) for t in tasks]
    cells = []
    for bb in backbones:
        for t in loaded:
            for seed in seeds if seeds is not None else t.seeds:
                h = _config_hash(bb, t, seed)
                cell = Cell(
                    backbone=bb, task=t.name, dataset=t.dataset, protocol=t.protocol, seed=seed, config_hash=h
                )
                config = {"backbone": bb, "seed": seed, "task": t.model_dump(mode="json")}
                cells.append(PlannedCell(bb, t, seed, cell, config))
    return cells


def _predictions_path(store: ResultStore, pc: PlannedCell) -> Path:
    safe = pc.backbone.replace("/", "__").replace(":", "_")
    return (
        Path(store.path).parent
        / "predictions"
        / safe
        / pc.task.name
        / f"seed{pc.seed}-{pc.cell.config_hash[:16]}.parquet"
    )


def record(store: ResultStore, out: CellOutcome) -> None:
    """Write one outcome to the store (and its per-sample predictions to Parquet beside it)."""
    pc = out.planned
    config = {**pc.config, "info": out.info} if out.info else pc.config
    if out.status == "ok" and out.predictions is not None:
        import pandas as pd

        path = _predictions_path(store, pc)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        pd.DataFrame(out.predictions).to_parquet(tmp, index=False)
        tmp.replace(path)
        config = {**config, "predictions": str(path)}
    common = {
        "config": config,
        "card": out.card,
        "device": out.device,
        "dtype": out.dtype,
        "wall_time_s": out.wall_time_s,
    }
    if out.status == "ok":
        store.record(
            pc.cell,
            out.metrics,
            **common,
            img_per_s=out.img_per_s,
            peak_mem_mb=out.peak_mem_mb,
            n_train=out.n_train,
            n_test=out.n_test,
        )
    else:
        store.record_failure(pc.cell, out.error, **common)


@dataclass
class BattleSummary:
    """Counts of a battle run and the cells it planned.

    ``failed`` counts cells that ran and failed, ``blocked`` those the preflight failed without running;
    both are in ``failures`` and in the store.
    """

    planned: list[PlannedCell]
    done: int = 0
    failed: int = 0
    blocked: int = 0
    skipped: int = 0
    failures: list[CellOutcome] = field(default_factory=list)
    preflight: Preflight | None = None
    wall_time_s: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no cell failed or was blocked in this run."""
        return not self.failed and not self.blocked


def validate_backbones(backbones: Sequence[str]) -> None:
    """Raise for the first backbone name that can name nothing (a usage error, before any work).

    Raises:
        UnknownNameError: the name, with did-you-mean suggestions.
    """
    from bobench.backbones.availability import check_name

    for name in dict.fromkeys(backbones):
        check_name(name)


def validate_tasks(tasks: Sequence[TaskConfig]) -> None:
    """Check every task's protocol parameters before any work (the protocol's own check).

    Raises:
        TaskError: naming the task and the bad parameter (a usage error: the CLI exits 2).
    """
    from bobench.protocols import PROTOCOLS
    from bobench.registry import import_target
    from bobench.task import TaskError

    for task in {t.name: t for t in tasks}.values():
        check = PROTOCOLS[task.protocol].meta.get("params")
        if not check:
            continue
        try:
            import_target(check)(dict(task.params))
        except (ValueError, TypeError) as exc:
            raise TaskError(f"task {task.name}: {exc}") from None


def share_cells(cells: Sequence[PlannedCell] | None, planned: Sequence[PlannedCell]) -> list[PlannedCell]:
    """Rank 0's ``cells`` to run, as every rank's own planned cells (``cells`` itself without torchrun).

    Rank 0 passes what it will run (``[]``: nothing, e.g. a dry run; whenever the other ranks wait
    here), the other ranks pass None and find the same cells in their own ``planned``.

    Raises:
        RankFailure: a rank did not plan a cell rank 0 hands out (on every rank).
    """
    rank, world = distributed.rank_world()
    if world == 1:
        return list(cells or [])
    hashes = distributed.broadcast_object([pc.cell.config_hash for pc in cells or []] if rank == 0 else None)
    mine = {pc.cell.config_hash: pc for pc in planned}
    if not all(distributed.agree("share cells", all(h in mine for h in hashes))):
        raise distributed.RankFailure(
            "the ranks planned different cells (were they given different tasks, paths or bobench versions?)"
        )
    return [mine[h] for h in hashes]


def _settle(out: CellOutcome) -> CellOutcome:
    """Under DDP, one outcome of a trained cell on every rank: ok only if it was ok on every rank."""
    oks = distributed.agree(f"cell {out.planned.cell.config_hash} done", out.status == "ok")
    if all(oks):
        return out
    errors = distributed.gather_objects((out.cause, out.error))  # every rank knows one failed
    if out.status != "ok":
        return out
    r = oks.index(False)
    common = {
        "card": out.card,
        "device": out.device,
        "dtype": out.dtype,
        "checkpoint_dir": out.checkpoint_dir,
    }
    return failed(out.planned, errors[r][0], f"failed on rank {r}: {errors[r][1]}", **common)


def run_battle(
    backbones: Sequence[str],
    tasks: Sequence[str | TaskConfig],
    *,
    store: ResultStore | None,
    cache_dir: str | Path | None = None,
    options: RunOptions | None = None,
    seeds: Sequence[int] | None = None,
    force: bool = False,
    executor: str = "local",
    on_outcome: Callable[[CellOutcome, BattleSummary], None] | None = None,
    paths: dict[str, str] | None = None,
    executor_options: dict[str, Any] | None = None,
    preflight: Preflight | bool = True,
) -> BattleSummary:
    """Run backbones × tasks × seeds, skipping cells already in ``store`` unless ``force``.

    Args:
        backbones: zoo names or specs. tasks: names, paths or configs. seeds: override task seeds.
        store: the results store (this process is its only writer); None on the ranks other than 0 of
            a torchrun launch, which run the cells rank 0 hands out and record nothing.
        cache_dir: feature cache root (default ``~/.cache/bobench/features``).
        options: device, precision, batch size, workers (never part of a cell's identity).
        executor: ``local`` (in-process, the default) or ``ray`` (one Ray task per backbone).
        executor_options: passed to the executor, e.g. ``{"address": "auto", "max_retries": 2}`` for ray.
        on_outcome: called after each cell that ran is recorded (progress display); cells the preflight
            blocks are recorded without it (they are summarised once per cause instead).
        paths: values for ``${name}`` dataset path placeholders (a paths file, see ``load_paths``).
        preflight: True checks weights and dataset paths first (:func:`bobench.preflight.check`), a
            :class:`~bobench.preflight.Preflight` is used as given, False skips the check.

    Returns:
        A :class:`BattleSummary`; failures are also in the store with their errors.

    Raises:
        UnknownNameError: a backbone name that names nothing. TaskError: an unknown task or a missing
            path placeholder. Both before any work.
        RankFailure: under torchrun, the ranks left lockstep (see :mod:`bobench.distributed`).
    """
    from bobench.executors import get_executor
    from bobench.features import FeatureStore
    from bobench.preflight import check
    from bobench.protocols import protocol_kind

    t0 = time.perf_counter()
    rank, world = distributed.rank_world()
    if rank == 0 and store is None:
        raise ValueError(
            "run_battle needs a store (only the ranks other than 0 of a torchrun run go without)"
        )
    if world > 1 and executor != "local":
        raise ValueError(
            f"under torchrun (--nproc) cells run in the launched processes: no --executor {executor}"
        )
    options = options or RunOptions()
    cache = str(cache_dir) if cache_dir is not None else str(FeatureStore().root)
    planned = plan(backbones, tasks, seeds, paths)
    validate_tasks([pc.task for pc in planned])
    validate_backbones(backbones)
    # rank 0 alone reads the store and records; the others get their cells from share_cells()
    pending_cells = [pc for pc in planned if force or not store.has_result(pc.cell)] if rank == 0 else []
    if preflight is True and rank == 0:
        loaded = list({pc.task.name: pc.task for pc in pending_cells}.values())
        preflight = check(list(dict.fromkeys(pc.backbone for pc in pending_cells)), loaded, paths=paths)
    summary = BattleSummary(planned, skipped=len(planned) - len(pending_cells) if rank == 0 else 0)
    summary.preflight = preflight or None
    runnable = []
    for pc in pending_cells:
        blocker = preflight.blocker(pc.backbone, pc.task) if preflight else None
        if blocker is None:
            runnable.append(pc)
            continue
        out = failed(pc, f"{blocker.kind} {blocker.subject}", blocker.message())
        record(store, out)
        summary.blocked += 1
        summary.failures.append(out)
    pending: dict[str, list[PlannedCell]] = {}
    for pc in share_cells(runnable if rank == 0 else None, planned):
        pending.setdefault(pc.backbone, []).append(pc)
    if rank != 0:
        options = options.replace(progress=False)
    groups = [WorkGroup(bb, tuple(cells), options, cache) for bb, cells in pending.items()]
    for out in get_executor(executor)(groups, **(executor_options or {})):
        left = None
        if world > 1 and protocol_kind(out.planned.task.protocol) == "trained":
            left = distributed.out_of_step()  # then others may wait in a collective: no agreeing
            out = out if left else _settle(out)
        if rank != 0:
            if left:
                raise distributed.RankFailure(f"rank {rank} left lockstep in {out.planned.task.name}: {left}")
            continue
        record(store, out)  # the driver is the single writer
        if out.status == "ok" and out.checkpoint_dir:  # recorded: the training state is not needed
            shutil.rmtree(out.checkpoint_dir, ignore_errors=True)
        if out.status == "ok":
            summary.done += 1
        else:
            summary.failed += 1
            summary.failures.append(out)
        if on_outcome is not None:
            on_outcome(out, summary)
        if left:
            raise distributed.RankFailure(
                f"rank 0 left lockstep in {out.planned.task.name}: {left}; stopping every rank (the cell is "
                "recorded as failed; rerunning resumes it from its last checkpoint)"
            )
    summary.wall_time_s = time.perf_counter() - t0
    return summary
