"""Frozen-feature cells: extract each dataset once (cached), then run every probe on the features.

The cells of one built backbone are grouped by (dataset, image size, splits, OOD sets): each group is
one :meth:`~bobench.features.FeatureStore.get_or_extract` per split (a cache hit when any earlier run
extracted the same features) and then one protocol call per cell. A failing extraction fails the cells
of its group; a failing protocol fails its own cell.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from bobench.cells import CellOutcome, PlannedCell, WorkGroup, error_text, failed
from bobench.device import peak_memory_mb, reset_peak_memory, resolve_placement
from bobench.features import ExtractOptions, FeatureStore
from bobench.task import TaskConfig

if TYPE_CHECKING:
    from bobench.backbones.base import Backbone


def protocol_params(task: TaskConfig) -> dict[str, Any]:
    """The task's protocol parameters, plus the task's metric list for protocols that accept one.

    The task's metrics list is what gets computed, not only what gets kept (``ece_ts`` needs its
    temperature fit); names a protocol derives (``top1@ood=blur``) are not in ``METRICS`` and stay
    filters.
    """
    from bobench.metrics import METRICS
    from bobench.protocols import PROTOCOLS

    params = dict(task.params)
    wanted = [m for m in task.metrics if m in METRICS]
    if PROTOCOLS[task.protocol].meta.get("accepts_metrics") and wanted and "metrics" not in params:
        params["metrics"] = wanted
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


def _extract(store: FeatureStore, backbone, task: TaskConfig, opts: ExtractOptions):
    """``(features by split, test-split extras with OOD sets, train dataset, test dataset)``."""
    from bobench.data import DatasetError, load_dataset

    feats: dict[str, Any] = {}
    ds_train = ds_test = None
    for split in task.splits:
        try:
            ds = load_dataset(task.dataset, split=split)
        except DatasetError:
            if split == "val":  # no val split: protocols fall back to k-fold on train
                feats["val"] = None
                continue
            raise
        ds_train = ds if split == "train" else ds_train
        ds_test = ds if split == "test" else ds_test
        feats[split] = store.get_or_extract(backbone, ds, opts)
    assert ds_test is not None  # TaskConfig guarantees "test" in splits
    extras = dict(ds_test.extras)
    if task.ood:
        id_classes = (ds_train or ds_test).classes
        extras["ood"] = {
            name: _ood_set(store, backbone, spec, opts, id_classes) for name, spec in task.ood.items()
        }
    return feats, extras, ds_train or ds_test


def run_frozen(
    backbone: Backbone, cells: Sequence[PlannedCell], group: WorkGroup, build_s: float = 0.0
) -> Iterator[CellOutcome]:
    """Run ``cells`` (all of ``backbone``) as frozen-feature protocols; yields one outcome per cell.

    ``build_s`` (the model build) and each extraction's time are charged to the first cell that
    needed them (see :class:`~bobench.runner.CellOutcome`).
    """
    from bobench.protocols import get_protocol
    from bobench.protocols.base import ProbeData

    card = backbone.card.to_dict()
    store = FeatureStore(group.cache_dir)
    options = group.options
    placement = resolve_placement(options.device, options.precision)
    # probes run where the features were extracted, except after MPS: the linear solver and the kNN
    # vote need float64, which MPS lacks
    probe_options = options.replace(device="cpu" if placement.device.type == "mps" else str(placement.device))
    by_data: dict[tuple, list[PlannedCell]] = {}
    for pc in cells:
        key = (pc.task.dataset, pc.task.image_size, pc.task.splits, tuple(sorted(pc.task.ood.items())))
        by_data.setdefault(key, []).append(pc)
    charge = build_s
    for data_cells in by_data.values():
        task = data_cells[0].task
        t1 = time.perf_counter()
        reset_peak_memory(placement.device)
        try:
            opts = ExtractOptions.from_run(options, image_size=task.image_size)
            feats, extras, ds_train = _extract(store, backbone, task, opts)
        except Exception as exc:
            err = error_text(exc)  # starts with the error itself: the cause names the dataset
            for pc in data_cells:
                yield failed(pc, f"dataset {task.dataset}", err, card=card)
            charge = 0.0
            continue
        extract_s = time.perf_counter() - t1
        charge += extract_s
        all_feats = [*feats.values(), *(o.features for o in extras.get("ood", {}).values())]
        fresh = [f for f in all_feats if f is not None and not f.cache_hit]
        n_fresh = sum(f.stats["n_extracted"] for f in fresh)
        img_per_s = n_fresh / sum(f.stats["wall_time_s"] for f in fresh) if n_fresh else None
        # where this cell's extractions read their images (img_per_s depends on it, the features do not)
        read_from = {
            s: f.stats.get("input_cache") for s, f in feats.items() if f is not None and not f.cache_hit
        }
        data = ProbeData(
            train=feats.get("train", feats["test"]),
            test=feats["test"],
            val=feats.get("val"),
            n_classes=len(ds_train.classes),
            classes=list(ds_train.classes),
            extras=extras,
        )
        for pc in data_cells:
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
                run = get_protocol(pc.task.protocol)
                result = run(data, protocol_params(pc.task), pc.seed, probe_options)
                keep = set(pc.task.metrics)
                metrics = [m for m in result.metrics if not keep or m.name in keep]
                if not metrics:
                    raise ValueError(
                        f"protocol {pc.task.protocol} returned none of the task's metrics {sorted(keep)}"
                    )
                if pc.task.primary not in {m.name for m in result.metrics}:
                    raise ValueError(f"task {pc.task.name}: primary metric {pc.task.primary!r} not produced")
            except Exception as exc:
                wall = charge + time.perf_counter() - t2
                charge = 0.0
                yield failed(pc, f"task {pc.task.name}", error_text(exc), wall_time_s=wall, **common)
                continue
            protocol_s = time.perf_counter() - t2
            info = {**result.info, "build_s": build_s, "extract_s": extract_s, "protocol_s": protocol_s}
            if any(read_from.values()):
                info["input_cache"] = read_from
            wall, charge = charge + protocol_s, 0.0
            yield CellOutcome(
                pc,
                "ok",
                metrics=metrics,
                wall_time_s=wall,
                peak_mem_mb=peak_memory_mb(placement.device),
                predictions=result.predictions,
                info=info,
                **common,
            )
