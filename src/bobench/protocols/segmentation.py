"""Semantic segmentation: a linear or UPerNet head on any backbone, scored by mIoU.

The backbone's maps (:meth:`~bobench.backbones.base.Backbone.features`) feed a head from
:mod:`bobench.dense.segmentation`: DINOv2's linear evaluation (BatchNorm + 1x1 conv on the last map, or on
all maps resized and concatenated) or UPerNet (pyramid pooling + FPN fusion). The backbone is frozen by
default (``frozen: false`` trains it end to end, its BatchNorm statistics frozen). Loss: cross-entropy
with the datasets' ignore index (255).

**Two training paths.** With a frozen backbone, ``cache_maps: true`` (the default) and whole-image
evaluation, the backbone runs **once** per image: its maps of every train, val and test image resized
to ``image_size`` x ``image_size`` are cached, memory-mapped, in half precision, in a content-addressed
store (:mod:`bobench.map_cache`, under ``<cache>/maps``), and the head trains for every epoch and lr
from them, as the frozen probes train from cached features; there is then no augmentation (as for the
probes). Otherwise every epoch runs the backbone on augmented crops: a random rescale of the image
(``scale_range`` x ``image_size``, aspect kept), a random ``image_size`` crop (padding ignored) and a
horizontal flip, mmsegmentation's recipe without its photometric distortion.

**Evaluation** is at each image's original resolution: ``whole`` resizes the image to ``image_size`` x
``image_size`` and upsamples the logits back; ``slide`` resizes its short side to ``image_size`` and
slides ``image_size`` windows overlapping by ``slide_overlap``; ``eval_scales`` (with ``eval_flip``)
adds multi-scale (+ flip) test-time augmentation. mIoU, mAcc and pixel accuracy come from one
dataset-level confusion matrix (:class:`~bobench.dense.seg_metrics.ConfusionMatrix`: a class absent from
both prediction and ground truth is left out of the mean). The epoch and the lr are chosen on val (held
out of train, seeded, when the dataset has none: ADE20K, VOC and Cityscapes publish no test labels, so
their official val is the test split) and test is scored once.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from bobench.options import RunOptions
from bobench.protocols.base import (
    ProtocolResult,
    TrainData,
    check_param_keys,
    is_positive_number,
    split_train_val,
)
from bobench.protocols.seg_scoring import KeptMasks, score, score_cached

DEFAULTS: dict[str, Any] = {
    "head": "linear",  # linear | upernet
    "maps": None,  # the maps the head reads: "last" | "all" | [indices]; None: last (linear), all (upernet)
    "channels": 512,  # upernet's width
    "frozen": True,  # False: the backbone trains too (BatchNorm statistics frozen)
    "cache_maps": True,  # frozen backbone + whole-image eval: train the head from cached maps
    "cache_dtype": "float16",
    "epochs": 20,
    "lr": 1e-3,  # a number, or a list: a sweep, the best on val is reported
    "batch_size": 16,
    "weight_decay": 1e-4,
    "warmup_epochs": 1,  # linear warm-up, then cosine to min_lr_ratio x lr, stepped per update
    "min_lr_ratio": 0.0,
    "scale_range": [0.5, 2.0],  # uncached training only: random rescale before the crop; None: resize
    "hflip": 0.5,  # uncached training only
    "eval_mode": "whole",  # whole | slide
    "slide_overlap": 1 / 3,  # slide: windows overlap by this fraction (mmseg: 512 windows, stride 341)
    "eval_scales": None,  # e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]: multi-scale test-time augmentation
    "eval_flip": False,
    "val_fraction": 0.1,
    "select_on": "mIoU",
    "clip_grad": None,
}
HEADS = ("linear", "upernet")
EVAL_MODES = ("whole", "slide")
METRICS = ("mIoU", "mAcc", "pixel_acc")


def resolve_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` over :data:`DEFAULTS`, checked (unknown keys and bad values name the fix)."""
    check_param_keys(params, list(DEFAULTS), "segmentation")
    p = {**DEFAULTS, **params}
    if p["head"] not in HEADS:
        raise ValueError(f"segmentation: head must be one of {', '.join(HEADS)}, got {p['head']!r}")
    if p["eval_mode"] not in EVAL_MODES:
        raise ValueError(
            f"segmentation: eval_mode must be one of {', '.join(EVAL_MODES)}, got {p['eval_mode']!r}"
        )
    if p["select_on"] not in METRICS:
        raise ValueError(
            f"segmentation: select_on must be one of {', '.join(METRICS)}, got {p['select_on']!r}"
        )
    if p["cache_dtype"] not in ("float16", "float32"):
        raise ValueError(f"segmentation: cache_dtype must be float16 or float32, got {p['cache_dtype']!r}")
    lrs = p["lr"] if isinstance(p["lr"], list | tuple) else [p["lr"]]
    if not lrs or not all(is_positive_number(v) for v in lrs):
        raise ValueError(f"segmentation: lr must be a positive number or a list of them, got {p['lr']!r}")
    p["lr"] = [float(v) for v in lrs]
    for key in ("epochs", "batch_size", "channels"):
        if not isinstance(p[key], int) or p[key] < 1:
            raise ValueError(f"segmentation: {key} must be a positive integer, got {p[key]!r}")
    if not 0 < float(p["val_fraction"]) < 1:
        raise ValueError(f"segmentation: val_fraction must be in (0, 1), got {p['val_fraction']!r}")
    if not 0 <= float(p["slide_overlap"]) < 1:
        raise ValueError(f"segmentation: slide_overlap must be in [0, 1), got {p['slide_overlap']!r}")
    if p["scale_range"] is not None and (
        len(p["scale_range"]) != 2 or not 0 < p["scale_range"][0] <= p["scale_range"][1]
    ):
        raise ValueError(
            f"segmentation: scale_range must be [low, high] with 0 < low <= high, got {p['scale_range']!r}"
        )
    if p["eval_scales"] is not None and not all(is_positive_number(v) for v in p["eval_scales"]):
        raise ValueError(f"segmentation: eval_scales must be positive numbers, got {p['eval_scales']!r}")
    return p


def uses_cached_maps(p: Mapping[str, Any]) -> bool:
    """Whether a cell with params ``p`` (resolved) trains its head from cached maps."""
    tta = p["eval_scales"] is not None or bool(p["eval_flip"])
    return bool(p["frozen"] and p["cache_maps"] and p["eval_mode"] == "whole" and not tta)


# -- datasets ----------------------------------------------------------------------------------------
class CachedTrainSet(torch.utils.data.Dataset):
    """``(maps, mask)`` of cached images: the maps as stored, the mask resized to the input size."""

    draws_random = False  # nothing to seed per item (SeededDataset reads a batch in one go)

    def __init__(self, maps: Any, indices: np.ndarray) -> None:
        self.maps, self.indices = maps, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        j = self.indices[i]
        return self.maps.item(j), torch.from_numpy(np.asarray(self.maps.masks[j], dtype=np.int64))

    def __getitems__(self, indices: list[int]) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        """Items ``indices`` from one read of each memory map (the DataLoader's collate stacks them)."""
        rows = [self.indices[i] for i in indices]
        maps, masks = self.maps.batch(rows), self.maps.mask_batch(rows)
        return [([m[b] for m in maps], masks[b]) for b in range(len(rows))]


def dataset_view(dataset: Any, transforms: Any) -> Any:
    """A shallow copy of a segmentation dataset with its own ``transforms`` (``None``: none)."""
    out = copy.copy(dataset)
    out.transforms = transforms
    return out


class ResizeAsCached:
    """``(image, mask)`` to ``size x size`` by :func:`~bobench.map_set.resize_for_maps`, the map cache's
    rule (image bilinear + antialias, mask ``nearest-exact``; torchvision's ``v2.Resize`` resizes a mask with
    ``nearest``, which moves labels by up to a pixel against the cache)."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[Any, Any]:
        from torchvision import tv_tensors

        from bobench.map_set import resize_for_maps

        im, m = resize_for_maps(image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor), self.size)
        return tv_tensors.Image(im.to(image.dtype)), tv_tensors.Mask(m.to(mask.dtype))


def train_transforms(p: dict[str, Any], size: int) -> Any:
    """The uncached training path's joint image + mask augmentation for resolved params ``p``: random
    rescale (``scale_range``), a ``size`` crop (padding ignored) and a flip (``hflip``)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    ops: list[Any] = []
    if p["scale_range"] is not None:
        ops.append(
            v2.ScaleJitter(target_size=(size, size), scale_range=tuple(p["scale_range"]), antialias=True)
        )
    else:  # exactly the cache's resize, so the two training paths see the same pixels and labels
        ops.append(ResizeAsCached(size))
    ops.append(
        v2.RandomCrop((size, size), pad_if_needed=True, fill={tv_tensors.Image: 0.0, tv_tensors.Mask: 255})
    )
    if p["hflip"]:
        ops.append(v2.RandomHorizontalFlip(float(p["hflip"])))
    return v2.Compose(ops)


# -- models as the trainer and the predictor call them ------------------------------------------------
class HeadOnMaps(nn.Module):
    """``seg``'s head on cached maps, for training: ``maps -> logits [B, K, size, size]``."""

    def __init__(self, seg: nn.Module, size: int) -> None:
        super().__init__()
        self.seg, self.size = seg, size

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.seg.forward_maps(maps, (self.size, self.size))


class Predictor(nn.Module):
    """Logits (or, with test-time augmentation, probabilities) ``[1, K, H, W]`` for one image at its
    original size, by the task's evaluation mode."""

    def __init__(self, seg: nn.Module, n_classes: int, size: int, p: dict[str, Any]) -> None:
        super().__init__()
        self.seg, self.n_classes, self.size = seg, n_classes, size
        self.mode, self.overlap = p["eval_mode"], float(p["slide_overlap"])
        self.scales, self.flip = p["eval_scales"], bool(p["eval_flip"])

    def _at_size(self, x: torch.Tensor) -> torch.Tensor:
        from bobench.dense.segmentation import slide_inference

        h, w = x.shape[-2:]
        if self.mode == "whole":
            small = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
            logits = self.seg(small)
        else:  # short side to size, then windows of size
            scale = self.size / min(h, w)
            hw = (max(self.size, round(h * scale)), max(self.size, round(w * scale)))
            small = F.interpolate(x, size=hw, mode="bilinear", antialias=True)
            stride = max(1, round(self.size * (1 - self.overlap)))
            logits = slide_inference(self.seg, small, self.n_classes, self.size, stride)
        return F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from bobench.dense.segmentation import multiscale_flip_inference

        if self.scales is None and not self.flip:
            return self._at_size(x)
        return multiscale_flip_inference(self._at_size, x, scales=self.scales or (1.0,), flip=self.flip)


def _scheduler(optimizer: Any, p: dict[str, Any]) -> Callable[[int], Any]:
    from timm.scheduler import CosineLRScheduler

    def build(updates_per_epoch: int):
        total = p["epochs"] * updates_per_epoch
        lr = optimizer.param_groups[0]["lr"]
        return CosineLRScheduler(
            optimizer, t_initial=total, lr_min=float(p["min_lr_ratio"]) * lr,
            warmup_t=min(int(p["warmup_epochs"] * updates_per_epoch), total // 3), warmup_lr_init=0.01 * lr,
            t_in_epochs=False,
        )  # fmt: skip

    return build


def run(
    backbone: Any,
    data: TrainData,
    params: Mapping[str, Any],
    seed: int,
    options: RunOptions | None = None,
    checkpoint_dir: str | Path | None = None,
) -> ProtocolResult:
    """Train a segmentation head (and, unless frozen, the backbone); score the val-selected model on test.

    Args:
        backbone: a :class:`~bobench.backbones.base.Backbone` (a fresh build for this cell).
        data: train / val (or None) / test :class:`~bobench.data.SegmentationDataset` splits.
        params: see :data:`DEFAULTS`.
        seed: the cell's seed: head init, held-out val, sample order, augmentation.
        options: device, precision, micro-batch, workers, checkpoint interval.
        checkpoint_dir: where to checkpoint (one folder per learning rate); a rerun resumes from it.

    Returns:
        Test ``mIoU``, ``mAcc`` and ``pixel_acc`` (fractions); in ``info`` the per-class IoU, the chosen lr
        and epoch, every lr's best val score, the val curve, whether maps were cached and the cache hits.
    """
    from timm.optim import create_optimizer_v2

    from bobench.checkpoints import Checkpoints
    from bobench.dense.segmentation import build_segmenter
    from bobench.map_cache import MapStore
    from bobench.metrics import Metric
    from bobench.seeding import seed_all, seed_for
    from bobench.sweep import lr_sweep
    from bobench.training import Trainer, TrainResult, cpu_state

    p = resolve_params(params)
    options = options or RunOptions()
    if options.channels_last is None:  # fixed-size crops and windows: CNNs run faster in channels_last
        options = options.replace(channels_last=bool(backbone.prefers_channels_last))
    size = int(data.image_size or backbone.preprocess()["input_size"][-1])
    k = data.n_classes
    index, val_base, val_index, info = split_train_val(data, p["val_fraction"], seed)
    seed_all(seed_for(seed, "head"))
    seg = build_segmenter(
        backbone, k, p["head"], maps=p["maps"], channels=p["channels"], frozen=bool(p["frozen"])
    )
    cached = uses_cached_maps(p)
    info.update(cached_maps=cached, maps=list(seg.in_index), head=p["head"], frozen=bool(p["frozen"]))
    if cached:
        store = MapStore(Path(data.cache_dir) / "maps" if data.cache_dir else None)
        sets = {}
        for name, ds in (("train", data.train), ("val", val_base), ("test", data.test)):
            if name == "val" and ds is data.train:
                sets[name] = sets["train"]
                continue
            sets[name] = store.get_or_extract(seg, ds, size, options, dtype=p["cache_dtype"])
        # channels_last: the memory format of the extraction that made the entry (None: made before it was
        # recorded), so a hit states how its maps were made, not how they would be now
        info["map_cache"] = {
            n: {"key": s.key[:16], "hit": s.cache_hit, "channels_last": s.stats.get("channels_last")}
            for n, s in sets.items()
        }
        net: nn.Module = HeadOnMaps(seg, size)
        train: Any = CachedTrainSet(sets["train"], index)

        val_masks = KeptMasks(val_base, val_index, k)  # val is scored every epoch: its masks are read once

        def val_scores() -> dict:
            return score_cached(seg, sets["val"], val_masks, k, options, "val")

        def test_scores() -> dict:
            test_masks = KeptMasks(data.test, np.arange(len(data.test)), k, budget=0)
            return score_cached(seg, sets["test"], test_masks, k, options, "test")
    else:
        net = seg
        info["channels_last"] = bool(options.channels_last)  # the backbone's memory format in every step
        # plain int indices: a view that pickles to DataLoader workers without copying the dataset
        train = Subset(dataset_view(data.train, train_transforms(p, size)), np.asarray(index).tolist())
        val = Subset(dataset_view(val_base, None), np.asarray(val_index).tolist())
        test = Subset(dataset_view(data.test, None), list(range(len(data.test))))
        predictor = Predictor(seg, k, size, p)

        def val_scores() -> dict:
            return score(predictor, val, k, options, "val")

        def test_scores() -> dict:
            return score(predictor, test, k, options, "test")

    initial = cpu_state(net)
    train_options = options
    if cached:  # the head reads the maps in the layout they were stored in
        train_options = options.replace(channels_last=False)
        if options.num_workers is None:
            # cached items are slices of memory-mapped arrays, nothing to decode: DataLoader workers would
            # only add a process start per epoch and pickle every map across (unless the user asked)
            train_options = train_options.replace(num_workers=0)

    def evaluate(m: nn.Module) -> float:
        value = val_scores()[p["select_on"]]
        return -math.inf if math.isnan(value) else float(value)

    def forward_loss(model: nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).float(), y, ignore_index=255)

    def fit(lr: float, folder: Checkpoints | None) -> TrainResult:
        net.load_state_dict(initial)
        trainable = [q for q in net.parameters() if q.requires_grad]
        opt = create_optimizer_v2(trainable, opt="adamw", lr=lr, weight_decay=p["weight_decay"])
        trainer = Trainer(
            net, opt, _scheduler(opt, p), None, epochs=p["epochs"], batch_size=p["batch_size"],
            options=train_options, seed=seed, clip_grad=p["clip_grad"], evaluate=evaluate, checkpoints=folder,
            description=f"segmentation lr={lr:g}", forward_loss=forward_loss,
        )  # fmt: skip
        return trainer.fit(train)

    best, val_by_lr = lr_sweep(p["lr"], checkpoint_dir, fit)
    net.load_state_dict(best["state"])
    scores = test_scores()
    metrics = [
        Metric(m, float(scores[m]), higher_is_better=True) for m in METRICS if not math.isnan(scores[m])
    ]
    info.update(
        lr=best["lr"], epoch=best["epoch"], val_score=best["score"], select_on=p["select_on"],
        val_by_lr=val_by_lr, history=best["history"], img_per_s=best["img_per_s"], image_size=size,
        per_class_iou=dict(zip(data.classes, (None if math.isnan(v) else float(v) for v in scores["per_class_iou"]), strict=True)),
    )  # fmt: skip
    return ProtocolResult(metrics, info=info)
