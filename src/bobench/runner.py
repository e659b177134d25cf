"""The battle runner: plan → skip done → group by features → execute → record.

Cells (backbone × task × seed) are grouped by backbone so each model is built once, and within a group
by (dataset, image size) so every protocol on the same data reuses one cached forward pass. A failing
cell is recorded with its error and the battle goes on; a killed battle resumes where it stopped,
because finished cells are in the store (skipped unless ``force``) and finished features are cached.

Executors decide where a group runs (:mod:`bobench.executors`); the driver process is the single writer
of the results store, whatever the executor.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bobench.features import ExtractOptions, FeatureStore
from bobench.metrics import Metric
from bobench.store import Cell, ResultStore
from bobench.task import TaskConfig, load_task, resolve_paths


@dataclass(frozen=True)
class PlannedCell:
    """One unit of work: a backbone, a task and a seed, with its store identity."""

    backbone: str
    task: TaskConfig
    seed: int
    cell: Cell
    config: dict[str, Any]


@dataclass
class CellOutcome:
    """What running one cell produced; the driver turns it into store rows."""

    planned: PlannedCell
    status: str  # "ok" | "failed"
    metrics: list[Metric] = field(default_factory=list)
    error: str = ""
    card: dict[str, Any] | None = None
    device: str = ""
    dtype: str = ""
    wall_time_s: float | None = None
    img_per_s: float | None = None
    peak_mem_mb: float | None = None
    n_train: int | None = None
    n_test: int | None = None
    predictions: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkGroup:
    """All pending cells of one backbone, plus what is needed to run them anywhere."""

    backbone: str
    cells: tuple[PlannedCell, ...]
    extract: ExtractOptions
    cache_dir: str


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
        TaskError: a task names a path placeholder that ``paths`` lacks (before any work starts).
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


def _error_text(exc: BaseException) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return f"{type(exc).__name__}: {exc}\n\n{''.join(tb[-6:])}"


def _protocol_params(task: TaskConfig, device: str) -> dict[str, Any]:
    from bobench.metrics import METRICS
    from bobench.protocols import PROTOCOLS

    params = dict(task.params)
    meta = PROTOCOLS[task.protocol].meta
    # the task's metrics list is what gets computed, not only what gets kept (e.g. ece_ts needs its
    # temperature fit); names a protocol derives (top1@ood=blur) are not in METRICS and stay filters
    wanted = [m for m in task.metrics if m in METRICS]
    if meta.get("accepts_metrics") and wanted and "metrics" not in params:
        params["metrics"] = wanted
    # probes run on the device the features came from, unless the task says otherwise; after MPS
    # extraction each probe keeps its own default, as MPS lacks the float64 the linear solver needs
    if meta.get("accepts_device") and "device" not in params and not device.startswith("mps"):
        params["device"] = device
    return params


def _ood_set(store: FeatureStore, backbone, spec: str, opts: ExtractOptions, id_classes: Sequence[str]):
    """Features of an OOD dataset's test split, its labels mapped to in-distribution class indices."""
    import numpy as np

    from bobench.data import DatasetError, load_dataset
    from bobench.protocols.base import OodSet

    ds = load_dataset(spec, split="test")
    index = {c: i for i, c in enumerate(id_classes)}
    unknown = [c for c in ds.classes if c not in index]
    if unknown:
        raise DatasetError(
            f"OOD dataset {spec}: class(es) {unknown[:5]} are not in-distribution classes; an OOD set must "
            "use the same class names (e.g. ImageNet wnids) as the dataset the probe is trained on."
        )
    to_id = np.array([index[c] for c in ds.classes], dtype=np.int64)
    feats = store.get_or_extract(backbone, ds, opts)
    accept = None
    if "label_sets" in ds.extras:  # e.g. ObjectNet: {label wnid: [every wnid that counts as correct]}
        accept = {
            index[k]: np.array([index[w] for w in ws if w in index], dtype=np.int64)
            for k, ws in ds.extras["label_sets"].items()
            if k in index
        }
    return OodSet(feats, to_id[ds.targets], np.unique(to_id), accept)


def run_group(group: WorkGroup) -> Iterator[CellOutcome]:
    """Run every cell of one backbone: build it once, extract each dataset once, run the protocols.

    Never raises for a cell's failure: a failing build, extraction or protocol becomes ``failed``
    outcomes for exactly the cells it affects. Runs in the driver (local executor) or in a worker.
    """
    from bobench.backbones import create_backbone
    from bobench.data import DatasetError, load_dataset
    from bobench.device import resolve_placement
    from bobench.protocols import get_protocol
    from bobench.protocols.base import ProbeData

    t0 = time.perf_counter()
    try:
        backbone = create_backbone(group.backbone)
    except Exception as exc:
        err = _error_text(exc)
        for pc in group.cells:
            yield CellOutcome(pc, "failed", error=f"building backbone {group.backbone} failed: {err}")
        return
    card = backbone.card.to_dict()
    build_s = time.perf_counter() - t0
    store = FeatureStore(group.cache_dir)
    placement = resolve_placement(group.extract.device, group.extract.precision)
    by_data: dict[tuple, list[PlannedCell]] = {}
    for pc in group.cells:
        key = (pc.task.dataset, pc.task.image_size, pc.task.splits, tuple(sorted(pc.task.ood.items())))
        by_data.setdefault(key, []).append(pc)
    for (dataset, image_size, splits, ood), cells in by_data.items():
        t1 = time.perf_counter()
        try:
            opts = ExtractOptions(**{**group.extract.__dict__, "image_size": image_size})
            feats: dict[str, Any] = {}
            ds_train = ds_test = None
            for split in splits:
                try:
                    ds = load_dataset(dataset, split=split)
                except DatasetError:
                    if split == "val":  # no val split: protocols fall back to k-fold on train
                        feats["val"] = None
                        continue
                    raise
                ds_train = ds if split == "train" else ds_train
                ds_test = ds if split == "test" else ds_test
                feats[split] = store.get_or_extract(backbone, ds, opts)
            extras = dict(ds_test.extras)
            if ood:
                id_classes = (ds_train or ds_test).classes
                extras["ood"] = {
                    name: _ood_set(store, backbone, spec, opts, id_classes) for name, spec in ood
                }
        except Exception as exc:
            err = _error_text(exc)
            for pc in cells:
                yield CellOutcome(pc, "failed", error=f"features of {dataset} failed: {err}", card=card)
            continue
        extract_s = time.perf_counter() - t1
        all_feats = [*feats.values(), *(o.features for o in extras.get("ood", {}).values())]
        fresh = [f for f in all_feats if f is not None and not f.cache_hit]
        n_fresh = sum(f.stats["n_extracted"] for f in fresh)
        img_per_s = n_fresh / sum(f.stats["wall_time_s"] for f in fresh) if n_fresh else None
        ds_train = ds_train or ds_test  # a test-only task (leave-one-out retrieval)
        data = ProbeData(
            train=feats.get("train", feats["test"]),
            test=feats["test"],
            val=feats.get("val"),
            n_classes=len(ds_train.classes),
            classes=list(ds_train.classes),
            extras=extras,
        )
        for pc in cells:
            t2 = time.perf_counter()
            common = {
                "card": card,
                "device": str(placement.device),
                "dtype": placement.precision,
                "img_per_s": img_per_s,
                "n_train": data.train.n,
                "n_test": data.test.n,
            }
            try:
                result = get_protocol(pc.task.protocol)(
                    data, _protocol_params(pc.task, str(placement.device)), pc.seed
                )
                keep = set(pc.task.metrics)
                metrics = [m for m in result.metrics if not keep or m.name in keep]
                if not metrics:
                    raise ValueError(
                        f"protocol {pc.task.protocol} returned none of the task's metrics {sorted(keep)}"
                    )
                if pc.task.primary not in {m.name for m in result.metrics}:
                    raise ValueError(f"task {pc.task.name}: primary metric {pc.task.primary!r} not produced")
                wall = time.perf_counter() - t2
                yield CellOutcome(
                    pc,
                    "ok",
                    metrics=metrics,
                    wall_time_s=wall,
                    predictions=result.predictions,
                    info={**result.info, "build_s": build_s, "extract_s": extract_s},
                    **common,
                )
            except Exception as exc:
                yield CellOutcome(
                    pc, "failed", error=_error_text(exc), wall_time_s=time.perf_counter() - t2, **common
                )


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
    """Counts of a battle run and the cells it planned."""

    planned: list[PlannedCell]
    done: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[CellOutcome] = field(default_factory=list)
    wall_time_s: float = 0.0


def run_battle(
    backbones: Sequence[str],
    tasks: Sequence[str | TaskConfig],
    *,
    store: ResultStore,
    cache_dir: str | Path | None = None,
    extract: ExtractOptions | None = None,
    seeds: Sequence[int] | None = None,
    force: bool = False,
    executor: str = "local",
    on_outcome: Callable[[CellOutcome, BattleSummary], None] | None = None,
    paths: dict[str, str] | None = None,
    executor_options: dict[str, Any] | None = None,
) -> BattleSummary:
    """Run backbones × tasks × seeds, skipping cells already in ``store`` unless ``force``.

    Args:
        backbones: zoo names or specs. tasks: names, paths or configs. seeds: override task seeds.
        store: the results store (this process is its only writer).
        cache_dir: feature cache root (default ``~/.cache/bobench/features``).
        extract: device, precision, batch size, workers (``image_size`` comes from each task).
        executor: ``local`` (in-process, the default) or ``ray`` (one Ray task per backbone).
        executor_options: passed to the executor, e.g. ``{"address": "auto", "max_retries": 2}`` for ray.
        on_outcome: called after each cell is recorded (progress display).
        paths: values for ``${name}`` dataset path placeholders (a paths file, see ``load_paths``).

    Returns:
        A :class:`BattleSummary`; failures are also in the store with their errors.
    """
    from bobench.executors import get_executor

    t0 = time.perf_counter()
    extract = extract or ExtractOptions()
    cache = str(cache_dir) if cache_dir is not None else str(FeatureStore().root)
    planned = plan(backbones, tasks, seeds, paths)
    summary = BattleSummary(planned)
    pending: dict[str, list[PlannedCell]] = {}
    for pc in planned:
        if not force and store.has_result(pc.cell):
            summary.skipped += 1
        else:
            pending.setdefault(pc.backbone, []).append(pc)
    groups = [WorkGroup(bb, tuple(cells), extract, cache) for bb, cells in pending.items()]
    for out in get_executor(executor)(groups, **(executor_options or {})):
        record(store, out)  # the driver is the single writer
        if out.status == "ok":
            summary.done += 1
        else:
            summary.failed += 1
            summary.failures.append(out)
        if on_outcome is not None:
            on_outcome(out, summary)
    summary.wall_time_s = time.perf_counter() - t0
    return summary


def print_outcome(out: CellOutcome, summary: BattleSummary) -> None:
    """One log line per finished cell, on stderr."""
    pc = out.planned
    n = len(summary.planned) - summary.skipped
    i = summary.done + summary.failed
    if out.status == "ok":
        primary = next((m for m in out.metrics if m.name == pc.task.primary), out.metrics[0])
        msg = f"{primary.name}={primary.value:.4f}"
    else:
        msg = "FAILED: " + out.error.splitlines()[0][:200]
    secs = f" ({out.wall_time_s:.1f}s)" if out.wall_time_s is not None else ""
    print(
        f"[{i}/{n}] {pc.backbone} | {pc.task.name} | seed {pc.seed}: {msg}{secs}", file=sys.stderr, flush=True
    )
