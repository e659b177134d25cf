"""Detection and instance segmentation: a torchvision Mask R-CNN / Cascade detector on any backbone.

The backbone's multi-scale maps (:meth:`~bobench.backbones.base.Backbone.features`) feed an FPN (a
learned ViTDet simple pyramid for plain ViTs) and torchvision's detection heads, or bobench's cascade
(:mod:`bobench.dense`). Defaults are Battle of the Backbones' COCO recipe (``bob_protocols.md`` §2.2):
Cascade Mask R-CNN with 4conv1fc heads, AdamW (weight decay 0.05), a learning-rate sweep
{8e-5, 1e-4, 2e-4, 3e-4}, 36 epochs with the lr divided by 10 at epochs 27 and 33 after 1000 warm-up
updates, large-scale jitter (scale 0.1-2.0, crop or pad to the task's size) and horizontal flips,
effective batch 16; the backbone end-to-end with frozen BatchNorm statistics (``norm_eval``) or frozen
whole (``frozen: true``). Each is a task parameter; CPU demos and tests use ``heads: slim``.

Where bobench deliberately differs from BoB: the epoch and the learning rate are chosen on a **val**
split (held out of train, seeded, when the dataset has none) and the test split is scored once with
that choice (BoB evaluated on val2017 every epoch and reported it). Metrics are COCO box and mask AP
from pycocotools (or faster-coco-eval, shown equal); every test detection is kept so a result can be
re-scored.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bobench.options import RunOptions
from bobench.protocols.base import (
    ProtocolResult,
    TrainData,
    check_param_keys,
    is_positive_number,
    split_train_val,
)

DEFAULTS: dict[str, Any] = {
    "detector": "cascade_mask_rcnn",  # mask_rcnn | cascade_mask_rcnn | faster_rcnn | cascade_rcnn
    "heads": "4conv1fc",  # BoB's heads; "slim": small heads for CPU demos and tests
    "fpn_channels": 256,
    "frozen": False,  # True: backbone in eval, no gradients (only neck and heads train)
    "epochs": 36,
    "lr": [8e-5, 1e-4, 2e-4, 3e-4],  # a number, or a list: a sweep, the best on val is reported
    "batch_size": 16,  # effective (micro-batches x accumulation x GPUs); micro-batch is --batch-size
    "weight_decay": 0.05,
    "schedule": "step",  # step: lr x decay_rate at each of decay_epochs | cosine: to min_lr_ratio x lr
    "decay_epochs": [27, 33],  # lr x decay_rate at each (schedule: step)
    "decay_rate": 0.1,
    "warmup_updates": 1000,  # linear warm-up from warmup_ratio x lr (capped at a third of the run)
    "warmup_ratio": 0.001,
    "min_lr_ratio": 0.0,  # schedule: cosine
    "lsj_scale": [0.1, 2.0],  # large-scale jitter; None: no jitter (resize only)
    "hflip": 0.5,
    "clip_grad": None,
    "val_fraction": 0.1,  # held out of train (seeded) when the dataset has no val split
    "select_on": "box_AP",  # the val metric that picks the epoch and the lr
    "detector_args": {},  # passed to bobench.dense.heads.build_detector (proposal counts, ...)
}
DETECTORS = ("mask_rcnn", "cascade_mask_rcnn", "faster_rcnn", "cascade_rcnn")
HEADS = ("4conv1fc", "slim")
SCHEDULES = ("step", "cosine")


def resolve_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` over :data:`DEFAULTS`, checked (unknown keys and bad values name the fix)."""
    check_param_keys(params, list(DEFAULTS), "detection")
    p = {**DEFAULTS, **params}
    if p["detector"] not in DETECTORS:
        raise ValueError(f"detection: detector must be one of {', '.join(DETECTORS)}, got {p['detector']!r}")
    if p["schedule"] not in SCHEDULES:
        raise ValueError(f"detection: schedule must be one of {', '.join(SCHEDULES)}, got {p['schedule']!r}")
    if p["heads"] not in HEADS:
        raise ValueError(f"detection: heads must be one of {', '.join(HEADS)}, got {p['heads']!r}")
    lrs = p["lr"] if isinstance(p["lr"], list | tuple) else [p["lr"]]
    if not lrs or not all(is_positive_number(v) for v in lrs):
        raise ValueError(f"detection: lr must be a positive number or a list of them, got {p['lr']!r}")
    p["lr"] = [float(v) for v in lrs]
    for key in ("epochs", "batch_size", "fpn_channels"):
        if not isinstance(p[key], int) or p[key] < 1:
            raise ValueError(f"detection: {key} must be a positive integer, got {p[key]!r}")
    if not 0 < float(p["val_fraction"]) < 1:
        raise ValueError(f"detection: val_fraction must be in (0, 1), got {p['val_fraction']!r}")
    if p["lsj_scale"] is not None and (
        len(p["lsj_scale"]) != 2 or not 0 < p["lsj_scale"][0] <= p["lsj_scale"][1]
    ):
        raise ValueError(
            f"detection: lsj_scale must be [low, high] with 0 < low <= high, got {p['lsj_scale']!r}"
        )
    if not isinstance(p["detector_args"], Mapping):
        raise ValueError(f"detection: detector_args must be a mapping, got {p['detector_args']!r}")
    return p


class _Images(torch.utils.data.Dataset):
    """Images ``indices`` of a detection dataset, with the COCO ground truth of just those images."""

    def __init__(self, dataset: Any, indices: np.ndarray) -> None:
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        self.label_to_category = dataset.label_to_category
        ids = {int(dataset.image_ids[i]) for i in self.indices}
        gt = dataset.coco_gt
        self.coco_gt = {
            **gt,
            "images": [im for im in gt["images"] if int(im["id"]) in ids],
            "annotations": [a for a in gt["annotations"] if int(a["image_id"]) in ids],
        }

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]


def dataset_view(dataset: Any, transforms: Any, training: bool) -> Any:
    """A shallow copy of a detection dataset with its own transforms (train drops crowds and
    degenerate boxes, which torchvision's detectors refuse; evaluation keeps everything)."""
    out = copy.copy(dataset)
    out.transforms = transforms
    out.drop_degenerate = out.drop_crowd = training
    return out


def _train_transforms(p: dict[str, Any], size: int) -> Any:
    from torchvision.transforms import v2

    ops: list[Any] = []
    if p["hflip"]:
        ops.append(v2.RandomHorizontalFlip(float(p["hflip"])))
    if p["lsj_scale"] is not None:  # ViTDet's large-scale jitter: resize by 0.1-2x of the target, crop/pad
        ops += [
            v2.ScaleJitter(target_size=(size, size), scale_range=tuple(p["lsj_scale"]), antialias=True),
            v2.RandomCrop((size, size), pad_if_needed=True),
        ]
    ops.append(v2.SanitizeBoundingBoxes(min_size=1.0))  # boxes the crop emptied go, with their masks
    return v2.Compose(ops)


def label_map(classes: list[str], dataset: Any) -> dict[int, int]:
    """Model label (``1..K`` over ``classes``) -> ``dataset``'s category id of the same name (a shifted
    test set may number its categories otherwise, or lack some: those detections are not scored)."""
    by_name = {dataset.classes[lab - 1]: cat for lab, cat in dataset.label_to_category.items()}
    return {i + 1: by_name[c] for i, c in enumerate(classes) if c in by_name}


def detect(
    model: nn.Module, dataset: Any, options: RunOptions, categories: Mapping[int, int] | None = None
) -> list[dict[str, Any]]:
    """COCO result dicts of ``model``'s detections on every image of ``dataset`` (in eval mode).

    ``categories`` maps model labels to ``dataset``'s category ids (default: the dataset's own
    ``label_to_category``, for a model trained on it); detections of unmapped labels are dropped.
    """
    from bobench.data.coco import collate_detection
    from bobench.dense.coco_eval import predictions_from_outputs
    from bobench.training import predict_batches

    categories = dict(categories if categories is not None else dataset.label_to_category)
    known = torch.tensor(sorted(categories))
    out: list[dict[str, Any]] = []
    batches = predict_batches(
        model, dataset, options, description="detect", collate_fn=collate_detection,
        batch_size=max(1, min(options.batch_size or 2, 8)),
    )  # fmt: skip
    for outputs, targets in batches:
        kept = []
        for o in outputs:
            keep = torch.isin(o["labels"].cpu(), known)
            kept.append({k: v.cpu()[keep] if k == "labels" else v.cpu()[keep].float() for k, v in o.items()})
        out += predictions_from_outputs([int(t["image_id"]) for t in targets], kept, categories)
    return out


def _scores(dataset: Any, predictions: list[dict[str, Any]], masks: bool) -> dict[str, float]:
    from bobench.dense.coco_eval import coco_metrics

    return coco_metrics(dataset.coco_gt, predictions, iou_types=("bbox", "segm") if masks else ("bbox",))


def scheduler(optimizer: Any, p: dict[str, Any]):
    """``updates_per_epoch -> scheduler``: multi-step decay (mmdetection's ``step``) or cosine, after a
    linear warm-up from ``warmup_ratio x lr``; timm schedulers stepped per update."""
    from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler

    def build(updates_per_epoch: int):
        total = p["epochs"] * updates_per_epoch
        lr = optimizer.param_groups[0]["lr"]
        warmup = {"warmup_t": min(int(p["warmup_updates"]), total // 3),
                  "warmup_lr_init": float(p["warmup_ratio"]) * lr, "t_in_epochs": False}  # fmt: skip
        if p["schedule"] == "cosine":
            return CosineLRScheduler(
                optimizer, t_initial=total, lr_min=float(p["min_lr_ratio"]) * lr, **warmup
            )
        # mmdetection's step: the lr drops for the first update of epoch e. timm applies milestone m at
        # t == m - 1 (its historical convention), and by default counts t after the warm-up: undo both.
        decay = [int(e * updates_per_epoch) + 1 for e in p["decay_epochs"]]
        return MultiStepLRScheduler(
            optimizer, decay_t=decay, decay_rate=float(p["decay_rate"]), warmup_prefix=False, **warmup
        )

    return build


def run(
    backbone: Any,
    data: TrainData,
    params: Mapping[str, Any],
    seed: int,
    options: RunOptions | None = None,
    checkpoint_dir: str | Path | None = None,
) -> ProtocolResult:
    """Train a detector on ``backbone`` (a fresh build for this cell); score the val-selected model on test.

    Args:
        backbone: a :class:`~bobench.backbones.base.Backbone`, trained in place unless ``frozen``.
        data: train / val (or None) / test :class:`~bobench.data.coco.DetectionDataset` splits.
        params: see :data:`DEFAULTS`.
        seed: the cell's seed: head init, held-out val, sample order, augmentation.
        options: device, precision, micro-batch, workers, checkpoint interval.
        checkpoint_dir: where to checkpoint (one folder per learning rate); a rerun resumes from it.

    Returns:
        Test metrics (``box_AP``, ``box_AP50``, ``box_AP75``, ``box_APs/m/l`` and, with masks, the same
        with ``mask_``), every test detection as predictions, and in ``info`` the chosen lr and epoch,
        every lr's best val score, the chosen run's val curve and throughput.
    """
    from timm.optim import create_optimizer_v2

    from bobench.checkpoints import Checkpoints
    from bobench.data.coco import collate_detection
    from bobench.dense.heads import build_detector
    from bobench.metrics import Metric
    from bobench.seeding import seed_all, seed_for
    from bobench.sweep import lr_sweep
    from bobench.training import Trainer, TrainResult, cpu_state

    p = resolve_params(params)
    options = (options or RunOptions()).replace(channels_last=False)  # images differ in size
    size = int(data.image_size or backbone.preprocess()["input_size"][-1])
    masks = data.train.has_masks and "mask" in p["detector"]  # a box-only detector on masked data: boxes
    select_on = p["select_on"]
    index, val_base, val_index, info = split_train_val(data, p["val_fraction"], seed)
    train = _Images(dataset_view(data.train, _train_transforms(p, size), training=True), index)
    val = _Images(dataset_view(val_base, None, training=False), val_index)
    test = _Images(dataset_view(data.test, None, training=False), np.arange(len(data.test)))
    seed_all(seed_for(seed, "heads"))
    kind = p["detector"] if masks else p["detector"].replace("mask_", "")
    model = build_detector(  # torchvision counts the background as a class
        backbone, data.n_classes + 1, kind=kind, heads=p["heads"], fpn_channels=p["fpn_channels"],
        frozen=bool(p["frozen"]), min_size=size, max_size=size, **dict(p["detector_args"]),
    )  # fmt: skip
    initial = cpu_state(model)

    def evaluate(m: nn.Module) -> float:
        value = _scores(val, detect(m, val, options), masks)[select_on]
        return -math.inf if math.isnan(value) else float(value)

    def forward_loss(net: nn.Module, images: list, targets: list) -> torch.Tensor:
        return sum(net(images, targets).values())

    def fit(lr: float, folder: Checkpoints | None) -> TrainResult:
        model.load_state_dict(initial)
        opt = create_optimizer_v2(
            [q for q in model.parameters() if q.requires_grad] if p["frozen"] else model,
            opt="adamw", lr=lr, weight_decay=p["weight_decay"],
        )  # fmt: skip
        trainer = Trainer(
            model, opt, scheduler(opt, p), None, epochs=p["epochs"], batch_size=p["batch_size"],
            options=options, seed=seed, clip_grad=p["clip_grad"], evaluate=evaluate, checkpoints=folder,
            description=f"detection lr={lr:g}", forward_loss=forward_loss, collate_fn=collate_detection,
        )  # fmt: skip
        return trainer.fit(train)

    best, val_by_lr = lr_sweep(p["lr"], checkpoint_dir, fit)
    model.load_state_dict(best["state"])
    found = detect(model, test, options)
    scores = _scores(test, found, masks)
    settings = ["test"] * len(found)
    for name, shifted in data.ood.items():  # e.g. Sim10k -> Cityscapes: the same model, another domain
        ood = _Images(dataset_view(shifted, None, training=False), np.arange(len(shifted)))
        more = detect(model, ood, options, label_map(data.classes, shifted))
        ood_masks = masks and shifted.has_masks
        scores.update({f"{k}@ood={name}": v for k, v in _scores(ood, more, ood_masks).items()})
        found, settings = found + more, settings + [f"ood={name}"] * len(more)
    # COCO leaves a size bucket without ground truth undefined (NaN): not a score, so not recorded
    metrics = [Metric(k, float(v), higher_is_better=True) for k, v in scores.items() if not math.isnan(v)]
    info["undefined_metrics"] = sorted(k for k, v in scores.items() if math.isnan(v))
    info.update(
        lr=best["lr"], epoch=best["epoch"], val_score=best["score"], select_on=select_on,
        val_by_lr=val_by_lr, history=best["history"],
        img_per_s=best["img_per_s"], detector=kind, heads=p["heads"], frozen=bool(p["frozen"]), image_size=size,
        n_detections=len(found),
    )  # fmt: skip
    return ProtocolResult(metrics, predictions=_columns(found, settings), info=info)


def _columns(found: list[dict[str, Any]], settings: list[str]) -> dict[str, np.ndarray]:
    """Test detections as columns for the store (re-scorable: boxes as XYWH, masks as RLE json)."""
    import json

    box = np.array([d["bbox"] for d in found], dtype=np.float64).reshape(-1, 4)
    return {
        "image_id": np.array([d["image_id"] for d in found], dtype=np.int64),
        "category_id": np.array([d["category_id"] for d in found], dtype=np.int64),
        "score": np.array([d["score"] for d in found], dtype=np.float64),
        "x": box[:, 0], "y": box[:, 1], "w": box[:, 2], "h": box[:, 3],
        "rle": np.array([json.dumps(d["segmentation"]) if "segmentation" in d else "" for d in found], dtype=object),
        "setting": np.array(settings, dtype=object),
    }  # fmt: skip
