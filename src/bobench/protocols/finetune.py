"""Full fine-tuning, as Battle of the Backbones ran it, built from timm's own recipe parts.

The model is the backbone's pooled embedding (:meth:`~bobench.backbones.base.Backbone.embed`) and a
new linear head. Defaults are BoB's classification recipe (``bob_protocols.md`` §2.1): AdamW lr 1e-3,
weight decay 0.05, layer-wise lr decay 0.75, cosine schedule with 5 warm-up epochs (warm-up lr 1e-4,
min lr 1e-6), drop path 0.1, label smoothing 0.1, RandAugment ``rand-m9-mstd0.5-inc1``, mixup 0.8 /
cutmix 1.0, random erasing 0.25, colour jitter 0.4, RandomResizedCrop scale (0.08, 1), effective batch
1024, 100 epochs; each is a task parameter. Optimizer, layer decay, schedule, mixup, losses and train
transform come from timm (``create_optimizer_v2``, ``create_scheduler_v2``, ``Mixup``,
``SoftTargetCrossEntropy``, ``create_transform(is_training=True)``); layer groups come from
:mod:`bobench.backbones.layers`, for every backbone kind.

Where bobench deliberately differs from BoB: the epoch (and, with a list of ``lr``, the learning
rate) is chosen on a **val** split (held out of train, stratified and seeded, when the dataset has
none) and the test split is scored once, with that choice; BoB reported the best epoch on its eval
split. Every value's val score is kept in the cell's info.

Multi-label datasets (CheXpert) train with a sigmoid per label (BCE), no mixup, and are selected and
scored by mean AUROC.
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
from bobench.protocols.base import ProtocolResult, TrainData, check_param_keys, is_int, is_positive_number

DEFAULTS: dict[str, Any] = {
    "epochs": 100,
    "lr": 1e-3,  # a number, or a list: a sweep, the best on val is reported
    "batch_size": 1024,  # effective (micro-batches x accumulation x GPUs); micro-batch is --batch-size
    "opt": "adamw",
    "weight_decay": 0.05,
    "layer_decay": 0.75,  # None or 1.0: off
    "sched": "cosine",
    "warmup_epochs": 5,
    "warmup_lr": 1e-4,
    "min_lr": 1e-6,
    "drop_path": 0.1,
    "smoothing": 0.1,
    "auto_augment": "rand-m9-mstd0.5-inc1",  # None: no RandAugment
    "mixup": 0.8,
    "cutmix": 1.0,
    "reprob": 0.25,
    "color_jitter": 0.4,
    "scale": [0.08, 1.0],
    "clip_grad": None,
    "n_shot": None,  # int: images per class; float in (0, 1): fraction of train (stratified, seeded)
    "frozen_backbone": False,  # train the head only, the backbone in eval mode without gradients
    "val_fraction": 0.1,  # held out of train (stratified, seeded) when the dataset has no val split
}


def resolve_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` over :data:`DEFAULTS`, validated; ``lr`` becomes a list.

    Raises:
        ValueError: an unknown key (with a suggestion) or an invalid value, named.
    """
    check_param_keys(params, list(DEFAULTS), "finetune")
    p = {**DEFAULTS, **params}
    lrs = p["lr"] if isinstance(p["lr"], list | tuple) else [p["lr"]]
    if not lrs or not all(is_positive_number(v) for v in lrs):
        raise ValueError(
            f"finetune: lr must be a positive number or a non-empty list of them, got {p['lr']!r}"
        )
    p["lr"] = [float(v) for v in lrs]
    for key in ("epochs", "batch_size"):
        if not is_int(p[key]) or p[key] < 1:
            raise ValueError(f"finetune: {key} must be an integer >= 1, got {p[key]!r}")
    for key in ("weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "drop_path", "smoothing"):
        if isinstance(p[key], bool) or not isinstance(p[key], int | float) or p[key] < 0:
            raise ValueError(f"finetune: {key} must be a number >= 0, got {p[key]!r}")
    for key in ("mixup", "cutmix", "reprob", "color_jitter"):
        if isinstance(p[key], bool) or not isinstance(p[key], int | float) or p[key] < 0:
            raise ValueError(f"finetune: {key} must be a number >= 0, got {p[key]!r}")
    if p["layer_decay"] is not None and not (0 < p["layer_decay"] <= 1):
        raise ValueError(f"finetune: layer_decay must be in (0, 1] or null, got {p['layer_decay']!r}")
    shot = p["n_shot"]
    if shot is not None and not ((is_int(shot) and shot >= 1) or (isinstance(shot, float) and 0 < shot < 1)):
        raise ValueError(
            f"finetune: n_shot must be an integer >= 1 (per class) or a fraction in (0, 1), got {shot!r}"
        )
    if not 0 < p["val_fraction"] < 1:
        raise ValueError(f"finetune: val_fraction must be in (0, 1), got {p['val_fraction']!r}")
    if p["clip_grad"] is not None and not is_positive_number(p["clip_grad"]):
        raise ValueError(f"finetune: clip_grad must be a positive number or null, got {p['clip_grad']!r}")
    return p


class Classifier(nn.Module):
    """A backbone's pooled embedding and a linear head; timm's layer decay sees the backbone's layers.

    Parameters are named ``backbone.model.<name>`` and ``head.*``; :meth:`group_matcher` gives timm's
    optimizer factory the backbone's layer ids, with the head last (lr scale 1).
    """

    def __init__(self, backbone: nn.Module, n_out: int, frozen: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.card.embed_dim, n_out)
        self.frozen = frozen
        if frozen:
            backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                features = self.backbone.embed(x).float()
            return self.head(features)
        return self.head(self.backbone.embed(x))

    def group_matcher(self, coarse: bool = False):
        """Layer ids for timm's layer decay: the backbone's (:mod:`bobench.backbones.layers`), head last."""
        from bobench.backbones.layers import group_matcher_for

        return group_matcher_for(self.backbone, head_prefix="head.")

    def no_weight_decay(self) -> set[str]:
        """The backbone's own no-decay names (a ViT's position embedding, class token), prefixed."""
        from bobench.backbones.layers import no_weight_decay_for

        return no_weight_decay_for(self.backbone)

    def train_mode(self, model: nn.Module) -> None:
        """Training mode; a frozen backbone stays in eval (its BatchNorm statistics are not updated)."""
        model.train()
        if self.frozen:
            self.backbone.eval()


def stratified_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of ``round(fraction * n_c)`` (at least 1) items of every class ``c``, seeded, sorted."""
    rng = np.random.default_rng([seed, 7919])
    picks = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        k = max(1, round(fraction * len(rows)))
        picks.append(rng.choice(rows, size=k, replace=False))
    return np.sort(np.concatenate(picks)).astype(np.int64)


def _class_labels(ds: Any, multilabel: bool) -> np.ndarray:
    """Labels for stratification: the class index, or for multi-label data the first positive label."""
    targets = np.asarray(ds.targets)
    if not multilabel:
        return targets
    return np.where(targets.any(1), targets.argmax(1), -1)


def _splits(data: TrainData, p: dict[str, Any], seed: int) -> tuple[Any, Any, dict[str, Any]]:
    """``(train, val, info)``: n-shot subsampling of train, and a val split held out when there is none."""
    from torch.utils.data import Subset

    from bobench.protocols.fewshot import sample_subset

    train, info = data.train, {}
    labels = _class_labels(train, data.multilabel)
    index = np.arange(len(train))
    val = data.val
    if val is None:
        held = stratified_fraction(labels, p["val_fraction"], seed)
        index = np.setdiff1d(index, held)
        val = Subset(train, held.tolist())
        info["val"] = (
            f"held out of train: {len(held)} images ({p['val_fraction']:.0%} per class, seed {seed})"
        )
    shot = p["n_shot"]
    if shot is not None:
        sub = labels[index]
        if isinstance(shot, float):
            keep = stratified_fraction(sub, shot, seed)
        else:
            keep = sample_subset(sub, shot, seed, int(sub.max()) + 1)
        index = index[keep]
        info["n_shot"] = shot
    info["n_train"], info["n_val"] = len(index), len(val)
    return Subset(train, index.tolist()) if len(index) != len(train) else train, val, info


def with_transform(ds: Any, transform: Any) -> Any:
    """A shallow copy of an ImageDataset (or a Subset of one) that applies ``transform``."""
    from torch.utils.data import Subset

    if isinstance(ds, Subset):
        return Subset(with_transform(ds.dataset, transform), ds.indices)
    out = copy.copy(ds)
    out.transform = transform
    return out


def train_transform(backbone: Any, p: dict[str, Any], image_size: int | None) -> Any:
    """timm's training transform for ``backbone`` under recipe ``p`` (crop scale, jitter, RandAugment,
    random erasing), with the backbone's own input size, interpolation and normalisation."""
    from timm.data import create_transform

    pre = backbone.preprocess(train=True, image_size=image_size)
    return create_transform(
        input_size=tuple(pre["input_size"]),
        is_training=True,
        scale=tuple(p["scale"]),
        color_jitter=p["color_jitter"],
        auto_augment=p["auto_augment"],
        interpolation=pre["interpolation"],
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        re_prob=p["reprob"],
    )


def loss_and_mixup(p: dict[str, Any], n_classes: int, multilabel: bool) -> tuple[nn.Module, Any]:
    """The recipe's loss and its timm ``Mixup`` (``None`` without mixup/cutmix, or for multi-label:
    BCE on the raw labels), with label smoothing inside Mixup's soft targets or in the loss."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if multilabel:
        return nn.BCEWithLogitsLoss(), None
    if p["mixup"] > 0 or p["cutmix"] > 0:
        mix = Mixup(
            mixup_alpha=p["mixup"],
            cutmix_alpha=p["cutmix"],
            label_smoothing=p["smoothing"],
            num_classes=n_classes,
        )
        return SoftTargetCrossEntropy(), mix
    if p["smoothing"] > 0:
        return LabelSmoothingCrossEntropy(p["smoothing"]), None
    return nn.CrossEntropyLoss(), None


def _val_score(outputs: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> float:
    """Top-1 (multi-class) or mean AUROC (multi-label), higher is better."""
    if multilabel:
        from bobench.metrics import mean_auroc

        return float(mean_auroc(torch.sigmoid(outputs).numpy(), targets.numpy()))
    return float((outputs.argmax(1) == targets).float().mean())


def run(
    backbone: Any,
    data: TrainData,
    params: Mapping[str, Any],
    seed: int,
    options: RunOptions | None = None,
    checkpoint_dir: str | Path | None = None,
) -> ProtocolResult:
    """Fine-tune ``backbone`` (a fresh build for this cell) on ``data``; score the val-selected model on test.

    Args:
        backbone: a :class:`~bobench.backbones.base.Backbone`, trained in place.
        data: train / val (or None) / test image datasets.
        params: see :data:`DEFAULTS`.
        seed: the cell's seed: head init, splits, sample order, augmentation, mixup, drop path.
        options: device, precision, micro-batch, workers, checkpoint interval.
        checkpoint_dir: where to checkpoint (one folder per learning rate); a rerun resumes from it.

    Returns:
        Test metrics (multi-class: top1, top5, balanced_acc, ece, ece_em, nll; multi-label: mean_auroc,
        mean_ap and per-label AUROC), per-sample predictions, and in ``info`` the chosen lr and epoch,
        every lr's best val score, the chosen run's val curve, and throughput.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from bobench.backbones.layers import set_drop_path
    from bobench.checkpoints import Checkpoints
    from bobench.seeding import seed_all, seed_for
    from bobench.sweep import lr_sweep
    from bobench.training import Trainer, TrainResult, cpu_state, evaluate_model

    p = resolve_params(params)
    options = options or RunOptions()
    if options.channels_last is None:
        options = options.replace(channels_last=bool(backbone.prefers_channels_last))
    train, val, info = _splits(data, p, seed)
    train = with_transform(train, train_transform(backbone, p, data.image_size))
    eval_tf = backbone.transform(train=False, image_size=data.image_size)
    val, test = with_transform(val, eval_tf), with_transform(data.test, eval_tf)
    info["drop_path_slots"] = (
        set_drop_path(backbone, p["drop_path"]) if p["drop_path"] and not p["frozen_backbone"] else 0
    )
    seed_all(seed_for(seed, "head"))
    model = Classifier(backbone, data.n_classes, frozen=p["frozen_backbone"])
    initial = cpu_state(model)
    loss_fn, mixup = loss_and_mixup(p, data.n_classes, data.multilabel)
    layer_decay = (
        p["layer_decay"] if p["layer_decay"] not in (None, 1.0) and not p["frozen_backbone"] else None
    )

    def evaluate(m: nn.Module) -> float:
        out, y = evaluate_model(m, val, options, description="val")
        return _val_score(out, y, data.multilabel)

    def fit(lr: float, folder: Checkpoints | None) -> TrainResult:
        model.load_state_dict(initial)
        trainable = model.head if p["frozen_backbone"] else model
        opt = create_optimizer_v2(
            trainable, opt=p["opt"], lr=lr, weight_decay=p["weight_decay"], layer_decay=layer_decay
        )

        def scheduler(updates_per_epoch: int):
            sched, _ = create_scheduler_v2(
                opt, p["sched"], num_epochs=p["epochs"], warmup_epochs=p["warmup_epochs"], warmup_lr=p["warmup_lr"],
                min_lr=p["min_lr"], step_on_epochs=False, updates_per_epoch=updates_per_epoch,
            )  # fmt: skip
            return sched

        trainer = Trainer(
            model, opt, scheduler, loss_fn, epochs=p["epochs"], batch_size=p["batch_size"], options=options,
            seed=seed, clip_grad=p["clip_grad"], mixup=mixup, train_mode=model.train_mode, evaluate=evaluate,
            checkpoints=folder, description=f"finetune lr={lr:g}",
        )  # fmt: skip
        return trainer.fit(train)

    best, sweep = lr_sweep(p["lr"], checkpoint_dir, fit)
    model.load_state_dict(best["state"])
    out, y = evaluate_model(model, test, options, description="test")
    metrics, predictions = _score(out, y, data)
    if "setting" not in predictions:  # which model scored them (the report's bootstrap reads this column)
        predictions["setting"] = np.full(
            len(predictions["index"]), f"lr={best['lr']:g},epoch={best['epoch']}"
        )
    info.update(
        lr=best["lr"], epoch=best["epoch"], val_score=best["score"], val_by_lr=sweep, history=best["history"],
        batch_size=best["batch_size"], img_per_s=best["img_per_s"], n_test=len(test),
        layer_decay=layer_decay, frozen_backbone=p["frozen_backbone"],
    )  # fmt: skip
    return ProtocolResult(metrics, predictions, info)


def _score(out: torch.Tensor, y: torch.Tensor, data: TrainData):
    from bobench.metrics import classification_metrics

    if data.multilabel:
        from bobench.metrics import multilabel_metrics

        scores = torch.sigmoid(out).numpy()
        metrics = multilabel_metrics(scores, y.numpy(), data.classes)
        n, n_labels = scores.shape
        predictions = {
            "index": np.repeat(np.arange(n), n_labels),
            "setting": np.tile(np.array(data.classes, dtype=object), n),
            "label": y.numpy().reshape(-1).astype(np.int64),
            "pred": (scores.reshape(-1) >= 0.5).astype(np.int64),
            "confidence": scores.reshape(-1),
        }
        return metrics, predictions
    probs = torch.softmax(out.double(), 1).numpy()
    labels = y.numpy().astype(np.int64)
    metrics = classification_metrics(probs, labels)
    pred = probs.argmax(1)
    predictions = {
        "index": np.arange(len(labels)),
        "label": labels,
        "pred": pred,
        "confidence": probs[np.arange(len(labels)), pred],
    }
    assert all(math.isfinite(m.value) for m in metrics)
    return metrics, predictions
