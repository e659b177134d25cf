"""Trained cells: a fresh backbone per cell, trained by its protocol, checkpointed, resumable.

A trained protocol changes the weights, so every cell builds its own backbone (a random-init control
with the cell's seed as its init seed). Its checkpoints live under the cache, keyed by the cell's config
hash, so a killed battle resumes the cell where it stopped (on any machine that shares the cache); the
driver deletes them once the cell is recorded ok.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bobench.cells import CellOutcome, PlannedCell, WorkGroup, error_text, failed
from bobench.device import peak_memory_mb, reset_peak_memory, resolve_placement


def checkpoint_root(cache_dir: str | os.PathLike) -> Path:
    """Where trained cells checkpoint: ``checkpoints/`` inside the cache folder (``--cache-dir``)."""
    return Path(cache_dir) / "checkpoints"


def _data(task, cache_dir: str | os.PathLike | None = None):
    from bobench.data import DatasetError, load_dataset, load_detection_dataset, load_segmentation_dataset
    from bobench.protocols import protocol_data
    from bobench.protocols.base import TrainData

    readers = {"detection": load_detection_dataset, "segmentation": load_segmentation_dataset}
    load = readers.get(protocol_data(task.protocol), load_dataset)
    splits = {}
    for split in task.splits:
        try:
            splits[split] = load(task.dataset, split=split)
        except DatasetError:
            if split == "val":  # no val split: the protocol holds one out of train
                splits[split] = None
                continue
            raise
    if "train" not in splits:
        raise ValueError(
            f"task {task.name}: a trained protocol needs a train split; add 'train' to its splits"
        )
    train = splits["train"]
    return TrainData(
        train=train,
        val=splits.get("val"),
        test=splits["test"],
        classes=list(train.classes),
        multilabel=bool(getattr(train, "multilabel", False)),
        image_size=task.image_size,
        ood={name: load(spec, split="test") for name, spec in task.ood.items()},
        cache_dir=None if cache_dir is None else str(cache_dir),
    )


def run_trained(pc: PlannedCell, group: WorkGroup) -> CellOutcome:
    """Build, train and score one trained cell; never raises (a failure is a ``failed`` outcome)."""
    from bobench.backbones import create_backbone
    from bobench.protocols import get_protocol

    t0 = time.perf_counter()
    options = group.options
    placement = resolve_placement(options.device, options.precision)
    try:
        backbone = create_backbone(pc.backbone, init_seed=pc.seed)
    except Exception as exc:
        return failed(
            pc, f"backbone {pc.backbone}", f"building backbone {pc.backbone} failed: {error_text(exc)}"
        )
    card = backbone.card.to_dict()
    common = {"card": card, "device": str(placement.device), "dtype": placement.precision}
    try:
        data = _data(pc.task, group.cache_dir)
    except Exception as exc:
        return failed(pc, f"dataset {pc.task.dataset}", error_text(exc), **common)
    folder = checkpoint_root(group.cache_dir) / pc.cell.config_hash[:32]
    reset_peak_memory(placement.device)
    try:
        result = get_protocol(pc.task.protocol)(
            backbone, data, dict(pc.task.params), pc.seed, options, folder
        )
        keep = set(pc.task.metrics)
        metrics = [m for m in result.metrics if not keep or m.name in keep]
        if pc.task.primary not in {m.name for m in result.metrics}:
            raise ValueError(f"task {pc.task.name}: primary metric {pc.task.primary!r} not produced")
    except Exception as exc:
        from bobench.data import DatasetError

        wall = time.perf_counter() - t0
        # an unreadable image met while training is the dataset's fault, grouped with its other cells
        cause = f"dataset {pc.task.dataset}" if isinstance(exc, DatasetError) else f"task {pc.task.name}"
        return failed(
            pc,
            cause,
            error_text(exc),
            wall_time_s=wall,
            checkpoint_dir=str(folder),
            **common,
        )
    info = dict(result.info)
    return CellOutcome(
        pc,
        "ok",
        metrics=metrics,
        wall_time_s=time.perf_counter() - t0,
        img_per_s=info.get("img_per_s"),
        peak_mem_mb=peak_memory_mb(placement.device),
        n_train=info.get("n_train"),
        n_test=info.get("n_test"),
        predictions=result.predictions,
        info=info,
        checkpoint_dir=str(folder),
        **common,
    )
