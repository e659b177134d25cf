"""P8: detection. Mask R-CNN training throughput against torchvision's reference, and COCO evaluation time.

**Training.** bobench's detector, ``build_detector(create_backbone("random/timm:resnet50"), kind="mask_rcnn",
heads="4conv1fc")`` trained by bobench's ``Trainer`` as ``protocols.detection.run`` drives it (its
``forward_loss`` summing the loss dict, ``collate_detection``, the protocol's warm-up + multi-step scheduler,
AdamW from ``create_optimizer_v2``, weight decay 0.05), against torchvision's
``maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)`` trained by a bare loop: ``DataLoader`` ->
forward -> ``sum(loss_dict.values())`` -> backward -> ``optimizer.step`` -> ``zero_grad`` ->
``scheduler.step_update``, with torch's AdamW (no decay on biases and norms, as timm's groups) and the same
scheduler. Both get the same images and targets in the same order (the Trainer's seeded permutation),
the same ``min_size`` / ``max_size``, anchors, RoI sampling, lr, batch, workers, threads, device and
precision, and the same per-step seed of torch's generator, so they draw the same anchors and RoIs.
No augmentation (the protocol's jitter would only add per-side noise); images in ``[0, 1]``.

Two torchvision models:

- ``matched``: ``maskrcnn_resnet50_fpn_v2`` with its FPN swapped for the norm-free FPN bobench builds
  (mmdet's, as in BoB; v2's has BatchNorm after every FPN conv) and its backbone BatchNorms kept in eval
  mode (bobench's ``norm_eval``), loaded with bobench's initial weights (timm's ResNet-50 and
  torchvision's have the same modules and parameter names). The two models then compute the same
  function: the runs report their mean training loss, which agrees, so the ratio is the frameworks' cost
  on identical work. This is the ratio the target is read on.
- ``stock`` (``--stock``, on in a full run): ``maskrcnn_resnet50_fpn_v2`` as built (BatchNorm in the
  FPN, backbone BatchNorm in training mode, as it trains from scratch), with bobench's weights where the
  names and shapes agree. It does a little more work per step; it is reported for reference.

Each side is timed from the end of its first (warm-up) update to the end of its last, rounds rotate
the order of the sides, medians over rounds are reported, and a run during which other processes used
more than ``--max-foreign`` cores is measured again (up to ``--retries`` times; P7's method). Target:
bobench / matched >= 0.95.

**Evaluation.** One fixed set of predictions (seeded from mnist-det's ground truth: every instance
detected twice with masks shifted by up to 1 px and sometimes the wrong class, false positives up to
``--dets-per-image``, masks encoded by bobench's ``predictions_from_outputs``) scored for bbox and segm
by ``coco_metrics`` with each backend, against the same backend called directly as torchvision's
reference ``CocoEvaluator`` does (``COCO`` from the dict, per IoU type ``loadRes`` of results carrying only
that type's field, ``COCOeval`` ``evaluate`` / ``accumulate`` / ``summarize``, stdout swallowed). The
bare calls get a fresh deep copy of ground truth and predictions, made outside their clock (both
libraries edit what they are given); ``coco_metrics`` copies internally, on its clock. Also timed: the
conversion of model outputs to COCO results, ``predictions_from_outputs`` against the reference's
``prepare_for_coco_segmentation``. Each figure is the median of ``--eval-rounds`` rotated rounds.

    python -m benchmarks.bench_detection [--quick] [--size 128] [--batch-size 2] [--steps 10] [--rounds 5]
    python -m benchmarks.bench_detection --threads 1 --max-foreign 1.1 --skip-eval   # a busy 2-core machine
    python -m benchmarks.bench_detection --device cuda --size 1024 --amp     # GPU: batch 8, 512 RoIs, ...

CPU defaults (size 128, batch 2, 64 sampled RoIs per image, 10 timed steps, 5 rounds, 3 sides, then 15
evaluation rounds) take about ten minutes on a quiet 2-core machine. On an accelerator the defaults are
torchvision's 512 RoIs per image, batch 8, 8 workers and 30 timed steps; ``--amp`` is bf16 autocast
(fp16 with a gradient scaler where bf16 is not supported). Results go to
``benchmarks/results/detection[_<device>][_t<threads>].json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import io
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from benchmarks.bench_train import Clock, Repeated, cpu_seconds
from benchmarks.common import measure_quiet, save
from bobench import create_backbone
from bobench.data.coco import collate_detection
from bobench.data.dense_readers import load_detection_dataset
from bobench.dense.heads import build_detector
from bobench.dense.neck import BATCH_NORMS
from bobench.device import Placement, resolve_placement
from bobench.options import RunOptions

# the protocol's own pieces, so the bobench side is detection.run's code path
from bobench.protocols.detection import dataset_view, resolve_params, scheduler
from bobench.seeding import seed_for
from bobench.training import Trainer

SEED = 0


@dataclass
class TrainSetup:
    """Both sides' models (each reset before every run), the shared data, recipe and options."""

    models: dict[str, nn.Module]
    initial: dict[str, dict[str, torch.Tensor]]
    train: Repeated
    order: list[int]  # the Trainer's sample order for epoch 0; the bare loop uses it too
    params: dict[str, Any]
    options: RunOptions
    placement: Placement
    updates: int  # per run; the first is the warm-up, the rest are timed
    rois: dict[str, list[int]]  # rows the box and mask heads saw, per side, over all runs


def _bobench_key(key: str) -> str:
    """A bobench detector state key as the torchvision model names the same tensor."""
    return key.replace("backbone.backbone.model.", "backbone.body.").replace(
        "backbone.pyramid.", "backbone.fpn."
    )


def torchvision_reference(
    num_classes: int, detector_kwargs: dict[str, Any], source: nn.Module, matched: bool
) -> nn.Module:
    """torchvision's ``maskrcnn_resnet50_fpn_v2`` with ``source``'s (bobench's) weights where they fit.

    ``matched``: its FPN is replaced by torchvision's norm-free FPN (the one bobench builds), so every
    tensor of ``source`` loads, strictly, and the two compute the same function (with the backbone's
    BatchNorms in eval mode, see :func:`norm_eval`). Otherwise the model is v2 as built and only the
    tensors whose names and shapes agree are copied.

    Raises:
        RuntimeError: ``matched`` and a tensor of ``source`` found no place (the layouts drifted apart).
    """
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    model = maskrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=num_classes, **detector_kwargs
    )
    if matched:
        widths = [
            m.in_channels for m in model.backbone.fpn.inner_blocks.modules() if isinstance(m, nn.Conv2d)
        ]
        model.backbone.fpn = FeaturePyramidNetwork(widths, 256, extra_blocks=LastLevelMaxPool())
    mine = model.state_dict()
    theirs = {_bobench_key(k): v for k, v in source.state_dict().items()}
    theirs = {k: v for k, v in theirs.items() if not k.startswith("backbone.body.fc.")}  # timm's classifier
    if matched:
        model.load_state_dict(theirs, strict=True)
    else:
        model.load_state_dict(
            {k: v for k, v in theirs.items() if k in mine and mine[k].shape == v.shape}, strict=False
        )
    return model


def norm_eval(model: nn.Module) -> None:
    """``model.train()`` with the backbone's BatchNorms in eval mode (bobench's ``norm_eval``)."""
    model.train()
    for m in model.backbone.body.modules():
        if isinstance(m, BATCH_NORMS):
            m.eval()


def _count_rois(model: nn.Module, counts: list[int]) -> None:
    """Add the rows the box head and the mask head see in each forward to ``counts`` ([box, mask])."""

    def hook(index: int):
        def add(_module: nn.Module, inputs: tuple, _output: Any) -> None:
            counts[index] += int(inputs[0].shape[0])

        return add

    model.roi_heads.box_head.register_forward_hook(hook(0))
    model.roi_heads.mask_head.register_forward_hook(hook(1))


def build_training(args: argparse.Namespace) -> TrainSetup:
    """The models and data of both sides (see the module docstring)."""
    placement = resolve_placement(args.device, args.precision)
    p = resolve_params({"detector": "mask_rcnn", "heads": "4conv1fc", "epochs": 1, "lr": args.lr})
    base = load_detection_dataset(args.data, split="train")
    updates = args.steps + 1
    train = Repeated(dataset_view(base, None, training=True), updates * args.batch_size)
    order = torch.randperm(
        len(train), generator=torch.Generator().manual_seed(seed_for(SEED, "order", 0))
    ).tolist()
    detector_kwargs = {
        "min_size": args.size,
        "max_size": args.size,
        "box_batch_size_per_image": args.box_batch,
    }
    num_classes = len(base.classes) + 1  # torchvision counts the background
    torch.manual_seed(seed_for(SEED, "heads"))
    bobench_model = build_detector(
        create_backbone(args.model), num_classes, kind="mask_rcnn", heads="4conv1fc",
        fpn_channels=p["fpn_channels"], **detector_kwargs,
    )  # fmt: skip
    models: dict[str, nn.Module] = {"bobench": bobench_model}
    models["matched"] = torchvision_reference(num_classes, detector_kwargs, bobench_model, matched=True)
    if args.stock:
        models["stock"] = torchvision_reference(num_classes, detector_kwargs, bobench_model, matched=False)
    rois = {side: [0, 0] for side in models}
    for side, model in models.items():
        _count_rois(model, rois[side])
    options = RunOptions(
        device=str(placement.device),
        precision=placement.precision,
        batch_size=args.batch_size,
        num_workers=args.workers,
        channels_last=False,  # as the protocol: detection images differ in size
        progress=False,
        checkpoint_minutes=None,
    )
    initial = {side: {k: v.detach().clone() for k, v in m.state_dict().items()} for side, m in models.items()}
    return TrainSetup(models, initial, train, order, p, options, placement, updates, rois)


def _adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """torch's AdamW, biases and norm weights without decay (timm's groups, torchvision's
    ``--norm-weight-decay 0``)."""
    decay, no_decay = [], []
    for name, q in model.named_parameters():
        if q.requires_grad:
            (no_decay if q.ndim <= 1 or name.endswith(".bias") else decay).append(q)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return torch.optim.AdamW(groups, lr=lr)


def bobench_run(s: TrainSetup, clock: Clock) -> dict[str, Any]:
    """One epoch of ``Trainer.fit`` as ``detection.run`` sets it up (no val, no checkpoints)."""
    from timm.optim import create_optimizer_v2

    model, p = s.models["bobench"], s.params
    model.load_state_dict(s.initial["bobench"])
    opt = create_optimizer_v2(model, opt="adamw", lr=p["lr"][0], weight_decay=p["weight_decay"])

    def forward_loss(net: nn.Module, images: list, targets: list) -> torch.Tensor:
        return sum(net(images, targets).values())  # detection.run's

    trainer = Trainer(
        model, opt, scheduler(opt, p), None, epochs=1, batch_size=s.options.batch_size, options=s.options,
        seed=SEED, clip_grad=p["clip_grad"], evaluate=None, checkpoints=None, on_update=clock.tick,
        description="detection", forward_loss=forward_loss, collate_fn=collate_detection,
    )  # fmt: skip
    result = trainer.fit(s.train)
    return {"mean_loss": result.history[0]["loss"], "trainer_reported_img_per_s": result.img_per_s}


def bare_run(side: str, s: TrainSetup, clock: Clock) -> dict[str, Any]:
    """The loop torchvision's ``references/detection`` runs, minus its logging and per-step ``item()``."""
    model, p = s.models[side], s.params
    device, placement = s.placement.device, s.placement
    model.load_state_dict(s.initial[side])
    model.to(device)
    opt = _adamw(model, p["lr"][0], p["weight_decay"])
    sched = scheduler(opt, p)(s.updates)
    scaler = torch.amp.GradScaler(device.type, enabled=placement.precision == "fp16")
    amp = torch.autocast(
        device.type, dtype=placement.autocast or torch.float32, enabled=placement.autocast is not None
    )
    loader = DataLoader(
        Subset(s.train, s.order),
        batch_size=s.options.batch_size,
        shuffle=False,
        num_workers=s.options.num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_detection,
    )
    if side == "matched":
        norm_eval(model)
    else:
        model.train()
    cpu = device.type == "cpu"
    losses = []
    for updates, (images, targets) in enumerate(loader, start=1):
        # the per-step seed the Trainer uses, so both sides sample the same anchors and RoIs
        step_seed = seed_for(SEED, "step", 0, updates - 1, 0)
        if cpu:
            torch.default_generator.manual_seed(step_seed)
        else:
            torch.manual_seed(step_seed)
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [
            {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
            for t in targets
        ]
        with amp:
            loss = sum(model(images, targets).values())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step_update(num_updates=updates)
        losses.append(loss.detach())
        clock.tick(updates)
    return {"mean_loss": float(torch.stack(losses).float().mean())}


def measure(side: str, s: TrainSetup) -> dict[str, Any]:
    """One timed run of ``side``, with the CPU time it used and the load others put on the machine."""
    clock = Clock(s.placement.device, s.updates)
    rois_before = list(s.rois[side])
    before, t0 = cpu_seconds(), time.perf_counter()
    extra = bobench_run(s, clock) if side == "bobench" else bare_run(side, s, clock)
    after, wall = cpu_seconds(), time.perf_counter() - t0
    busy, steal, main, workers = (a - b for a, b in zip(after, before, strict=True))
    images = s.updates * s.options.batch_size
    box, mask = (a - b for a, b in zip(s.rois[side], rois_before, strict=True))
    return {
        "img_per_s": clock.img_per_s(s.options.batch_size),
        "timed_s": clock.t1 - clock.t0,
        "wall_s": wall,
        "main_cpu_s_per_img": main / images,
        "worker_cpu_ms_per_img": 1e3 * workers / images,
        "foreign_cores": (busy - main - workers) / wall,
        "steal_cores": steal / wall,
        "box_rois_per_img": box / images,
        "mask_rois_per_img": mask / images,
        **extra,
    }


def train_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved rounds of every side; medians and per-round ratios (bobench / each torchvision side)."""
    s = build_training(args)
    sides = list(s.models)
    print(
        f"training: {args.model} Mask R-CNN 4conv1fc on {args.data} at {args.size} px, batch {args.batch_size}, "
        f"{args.box_batch} RoIs/img, {args.steps} timed steps, {args.workers} worker(s), "
        f"{torch.get_num_threads()} threads, {s.placement.device} {s.placement.precision}; sides {sides}; "
        f"load before: {os.getloadavg()}",
        flush=True,
    )
    print(
        "| round | side | img/s | main CPU s/img | mean loss | box/mask RoIs per img | foreign load (cores) |",
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in sides[r % len(sides) :] + sides[: r % len(sides)]:
            row = measure_quiet(functools.partial(measure, side, s), side, args.retries, args.max_foreign)
            runs[side].append(row)
            print(
                f"| {r} | {side} | {row['img_per_s']:.3f} | {row['main_cpu_s_per_img']:.2f} | "
                f"{row['mean_loss']:.5f} | "
                f"{row['box_rois_per_img']:.0f}/{row['mask_rois_per_img']:.1f} | {row['foreign_cores']:.2f} |",
                flush=True,
            )
    speed = {side: [row["img_per_s"] for row in runs[side]] for side in sides}
    summary: dict[str, Any] = {"target": 0.95}
    for side in sides:
        summary[f"{side}_img_per_s"] = statistics.median(speed[side])
        summary[f"{side}_cpu_s_per_img"] = statistics.median(row["main_cpu_s_per_img"] for row in runs[side])
        summary[f"spread_{side}"] = (max(speed[side]) - min(speed[side])) / statistics.median(speed[side])
    for side in sides[1:]:
        summary[f"ratio_vs_{side}"] = summary["bobench_img_per_s"] / summary[f"{side}_img_per_s"]
        # the same comparison in main-process CPU time per image (steadier on a shared machine)
        summary[f"cpu_ratio_vs_{side}"] = summary[f"{side}_cpu_s_per_img"] / summary["bobench_cpu_s_per_img"]
        per_round = [o / b for o, b in zip(speed["bobench"], speed[side], strict=True)]
        summary[f"ratio_vs_{side}_per_round"] = per_round
        # each round's runs are back to back: the paired ratio is the one slow drifts in load cancel from
        summary[f"ratio_vs_{side}_median_of_rounds"] = statistics.median(per_round)
    losses = {side: runs[side][0]["mean_loss"] for side in sides}
    summary["mean_loss_first_run"] = losses
    print(
        f"bobench {summary['bobench_img_per_s']:.3f} img/s; "
        + "; ".join(
            f"{side} {summary[f'{side}_img_per_s']:.3f} img/s, ratio {summary[f'ratio_vs_{side}']:.3f} "
            f"(CPU-time ratio {summary[f'cpu_ratio_vs_{side}']:.3f}) "
            f"(rounds {', '.join(f'{v:.3f}' for v in summary[f'ratio_vs_{side}_per_round'])})"
            for side in sides[1:]
        )
        + f"; mean losses {losses}; load after: {os.getloadavg()}",
        flush=True,
    )
    config = {
        "model": args.model, "data": args.data, "image_size": args.size, "batch_size": args.batch_size,
        "box_batch_size_per_image": args.box_batch, "timed_steps": args.steps, "rounds": args.rounds,
        "workers": args.workers, "lr": args.lr, "device": str(s.placement.device),
        "precision": s.placement.precision, "threads": torch.get_num_threads(),
    }  # fmt: skip
    return {"config": config, **summary, "runs": runs}


# -- evaluation ---------------------------------------------------------------------------------------


def synthetic_outputs(dataset: Any, dets_per_image: int, seed: int = SEED) -> list[dict[str, np.ndarray]]:
    """torchvision-style detection outputs for every image of ``dataset``: each ground-truth instance
    twice (mask shifted by up to 1 px, box its extent, the wrong class 20 % of the time, score 0.3-1),
    then false positives (ellipses in random boxes, score 0-0.6) up to ``dets_per_image``."""
    from pycocotools import mask as mask_utils

    from bobench.data.coco import segmentation_to_rle

    rng = np.random.default_rng(seed)
    k = len(dataset.classes)
    images = {im["id"]: im for im in dataset.coco_gt["images"]}
    category_to_label = {c: lab for lab, c in dataset.label_to_category.items()}
    out = []
    for i in range(len(dataset)):
        info = images[dataset.image_ids[i]]
        h, w = info["height"], info["width"]
        masks, labels, scores = [], [], []
        for ann in dataset.annotations(i):
            gt = mask_utils.decode(segmentation_to_rle(ann["segmentation"], h, w))
            for _ in range(2):
                dy, dx = (int(v) for v in rng.integers(-1, 2, size=2))
                masks.append(np.roll(gt, (dy, dx), axis=(0, 1)))
                right = rng.random() >= 0.2
                labels.append(category_to_label[ann["category_id"]] if right else int(rng.integers(1, k + 1)))
                scores.append(float(rng.uniform(0.3, 1.0)))
        yy, xx = np.mgrid[:h, :w]
        while len(masks) < dets_per_image:
            bw, bh = (int(v) for v in rng.integers(8, max(9, min(h, w) // 2), size=2))
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            cy, cx = y0 + bh / 2, x0 + bw / 2
            masks.append((((yy - cy) / (bh / 2)) ** 2 + ((xx - cx) / (bw / 2)) ** 2 <= 1).astype(np.uint8))
            labels.append(int(rng.integers(1, k + 1)))
            scores.append(float(rng.uniform(0.0, 0.6)))
        m = np.stack(masks[:dets_per_image]).astype(np.float32)
        boxes = np.zeros((len(m), 4))
        for j, mm in enumerate(m):
            ys, xs = np.nonzero(mm)
            boxes[j] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(ys) else (0, 0, 1, 1)
        out.append(
            {"boxes": boxes, "scores": np.array(scores[: len(m)]), "labels": np.array(labels[: len(m)]),
             "masks": m[:, None]}
        )  # fmt: skip
    return out


def reference_conversion(
    image_ids: list[int], outputs: list[dict[str, np.ndarray]], label_to_category: dict[int, int]
) -> list[dict[str, Any]]:
    """torchvision ``references/detection/coco_eval.py``'s ``prepare_for_coco_segmentation`` (plus the box,
    as one list serves both IoU types here), on numpy outputs."""
    from pycocotools import mask as mask_utils

    results = []
    for image_id, out in zip(image_ids, outputs, strict=True):
        masks = out["masks"] > 0.5
        boxes = out["boxes"].copy()
        boxes[:, 2:] -= boxes[:, :2]
        rles = [
            mask_utils.encode(np.array(m[0, :, :, np.newaxis], dtype=np.uint8, order="F"))[0] for m in masks
        ]
        for rle in rles:
            rle["counts"] = rle["counts"].decode("utf-8")
        results.extend(
            {"image_id": image_id, "category_id": label_to_category[int(lab)], "bbox": box, "score": float(sc),
             "segmentation": rle}
            for lab, box, sc, rle in zip(out["labels"], boxes.tolist(), out["scores"], rles, strict=True)
        )  # fmt: skip
    return results


def bare_coco(gt: dict[str, Any], predictions: list[dict[str, Any]], backend: str) -> list[float]:
    """The 12 COCO stats per IoU type (bbox then segm) from ``backend`` called directly (edits its inputs)."""
    if backend == "faster-coco-eval":
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    stats: list[float] = []
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        for iou_type, field in (("bbox", "bbox"), ("segm", "segmentation")):
            results = [
                {
                    "image_id": p["image_id"],
                    "category_id": p["category_id"],
                    "score": p["score"],
                    field: p[field],
                }
                for p in predictions
            ]
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            stats += [float(v) for v in evaluator.stats[:6]]
    return stats


def eval_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Median seconds of ``coco_metrics`` and of the bare backends on one fixed prediction set."""
    from bobench.dense.coco_eval import STAT_NAMES, coco_metrics, predictions_from_outputs, resolve_backend

    ds = load_detection_dataset(args.eval_data, split=args.eval_split)
    outputs = synthetic_outputs(ds, args.dets_per_image)
    ids = [int(i) for i in ds.image_ids]
    backends = ["pycocotools"]
    if resolve_backend("auto") == "faster-coco-eval":
        backends.append("faster-coco-eval")
    gt = ds.coco_gt
    print(
        f"evaluation: {args.eval_data} {args.eval_split}, {len(ids)} images, {len(gt['annotations'])} "
        f"instances, {sum(len(o['scores']) for o in outputs)} detections; backends {backends}; "
        f"coco_metrics' default: {resolve_backend('auto')}",
        flush=True,
    )

    def timed(fn: Any, *a: Any) -> tuple[float, float, Any]:
        t0, c0 = time.perf_counter(), time.process_time()
        value = fn(*a)
        return time.perf_counter() - t0, time.process_time() - c0, value

    jobs: dict[str, Any] = {
        "convert bobench": lambda: predictions_from_outputs(ids, outputs, ds.label_to_category),
        "convert reference": lambda: reference_conversion(ids, outputs, ds.label_to_category),
    }
    predictions = jobs["convert bobench"]()
    for backend in backends:
        jobs[f"bobench {backend}"] = lambda b=backend: coco_metrics(
            gt, predictions, ("bbox", "segm"), backend=b
        )
        jobs[f"bare {backend}"] = backend
    seconds: dict[str, list[float]] = {name: [] for name in jobs}
    cpu_per_job: dict[str, list[float]] = {name: [] for name in jobs}
    stats: dict[str, list[float]] = {}
    names = list(jobs)
    for r in range(-1, args.eval_rounds):  # round -1: a warm-up (imports, first-touch allocations), not kept
        for name in names[r % len(names) :] + names[: r % len(names)]:
            job = jobs[name]
            if isinstance(job, str):  # a bare backend: fresh inputs, made off the clock
                fn, inputs = bare_coco, (copy.deepcopy(gt), copy.deepcopy(predictions), job)
            else:
                fn, inputs = job, ()
            gc.collect()  # no job pays for collecting another's garbage (the deep copies make plenty)
            t, c, value = timed(fn, *inputs)
            if r < 0:
                continue
            seconds[name].append(t)
            cpu_per_job[name].append(c)
            if isinstance(value, dict):
                value = [value[f"{pre}_{n}"] for pre in ("box", "mask") for n in STAT_NAMES]
                value = [-1.0 if np.isnan(v) else v for v in value]
            if name.startswith(("bobench ", "bare ")):
                stats[name] = value
    median = {name: statistics.median(v) for name, v in seconds.items()}
    cpu = {name: statistics.median(v) for name, v in cpu_per_job.items()}
    for name in names:
        print(
            f"  {name}: {median[name]:.3f} s, CPU {cpu[name]:.3f} s "
            f"(rounds {', '.join(f'{v:.3f}' for v in seconds[name])})",
            flush=True,
        )
    reference = stats["bare pycocotools"]
    worst = {name: max(abs(a - b) for a, b in zip(v, reference, strict=True)) for name, v in stats.items()}
    summary: dict[str, Any] = {
        "seconds": median,
        "seconds_per_round": seconds,
        "cpu_seconds": cpu,
        "cpu_seconds_per_round": cpu_per_job,
        "box_AP": reference[0],
        "mask_AP": reference[6],
        "max_abs_stat_difference_vs_bare_pycocotools": worst,
        # baseline seconds / bobench seconds: above 1 means bobench is faster
        "speedup_convert": median["convert reference"] / median["convert bobench"],
    }
    for backend in backends:
        summary[f"speedup_{backend}_vs_bare_{backend}"] = (
            median[f"bare {backend}"] / median[f"bobench {backend}"]
        )
    auto = resolve_backend("auto")
    summary["speedup_default_vs_bare_pycocotools"] = median["bare pycocotools"] / median[f"bobench {auto}"]
    print(
        "  "
        + ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if k.startswith("speedup"))
        + f"; box AP {reference[0]:.4f}, mask AP {reference[6]:.4f}; stats differ from bare pycocotools by at "
        f"most {max(worst.values()):.1e}",
        flush=True,
    )
    config = {
        "data": args.eval_data, "split": args.eval_split, "images": len(ids),
        "instances": len(gt["annotations"]), "detections": len(predictions), "rounds": args.eval_rounds,
        "default_backend": auto,
    }  # fmt: skip
    return {"config": config, **summary}


def main(argv: list[str] | None = None) -> dict:
    """Run P8 (training, then evaluation) and write ``benchmarks/results/detection[_<device>].json``.

    Returns the summary: ``training`` (img/s per side, ratios, per-round ratios) and ``evaluation``
    (median seconds per job, speed-ups); ``--quick`` runs a smoke version and writes nothing.
    """
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: matched side only, 2 timed steps, 1 round"
    )
    ap.add_argument("--model", default="random/timm:resnet50", help="backbone spec (random init is fine)")
    ap.add_argument("--data", default="nuclei", help="detection set to train on (nuclei | mnist-det | ...)")
    ap.add_argument("--size", type=int, default=None, help="min_size = max_size (CPU 128, else 1024)")
    ap.add_argument("--batch-size", type=int, default=None, help="images per update (CPU 2, else 8)")
    ap.add_argument("--box-batch", type=int, default=None, help="RoIs sampled per image (CPU 64, else 512)")
    ap.add_argument(
        "--steps", type=int, default=None, help="timed updates per run, after one warm-up (CPU 10, else 30)"
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers, both sides (CPU 1, else 8)"
    )
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--amp", action="store_true", help="mixed precision: bf16 autocast (fp16 where no bf16)")
    ap.add_argument("--stock", action=argparse.BooleanOptionalAction, default=None,
                    help="also time torchvision's v2 as built (default: on, off with --quick)")  # fmt: skip
    ap.add_argument("--retries", type=int, default=2, help="reruns of a run disturbed by others")
    ap.add_argument("--max-foreign", type=float, default=0.15, help="cores others may use during a run")
    ap.add_argument("--eval-data", default="mnist-det")
    ap.add_argument("--eval-split", default="test")
    ap.add_argument("--dets-per-image", type=int, default=100)
    ap.add_argument("--eval-rounds", type=int, default=15)
    ap.add_argument("--skip-train", action="store_true", help="evaluation part only")
    ap.add_argument("--skip-eval", action="store_true", help="training part only")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench_detection: --device {args.device} asked for, but torch sees no CUDA GPU; skipped")
        return {"skipped": "no CUDA GPU"}
    cpu = args.device == "cpu"
    for name, on_cpu, elsewhere in (
        ("size", 128, 1024), ("batch_size", 2, 8), ("box_batch", 64, 512), ("steps", 10, 30), ("workers", 1, 8),
    ):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, on_cpu if cpu else elsewhere)
    if args.amp:
        bf16 = cpu or (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        args.precision = "bf16" if bf16 else "fp16"
    if args.quick:
        args.steps, args.rounds, args.eval_rounds = 2, 1, 1
        args.stock = False if args.stock is None else args.stock
    elif args.stock is None:
        args.stock = True
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out: dict[str, Any] = {}
    if not args.skip_train:
        out["training"] = train_benchmark(args)
    if not args.skip_eval:
        out["evaluation"] = eval_benchmark(args)
    if args.quick:
        return out
    device = resolve_placement(args.device, args.precision).device
    name = "detection" if device.type == "cpu" else f"detection_{device.type}"
    if args.threads is not None:  # a thread count other than torch's default: its own file
        name += f"_t{args.threads}"
    path = save(
        name, {"benchmark": "P8 detection: Mask R-CNN training throughput, COCO evaluation time", **out}
    )
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
