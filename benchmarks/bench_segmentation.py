"""P9: segmentation. A frozen linear head trained from cached maps against re-running the backbone every epoch.

Both sides call the protocol itself, ``bobench.protocols.segmentation.run``, as a task cell does (a fresh
backbone from ``create_backbone``, ``TrainData`` from ``load_segmentation_dataset``'s train / val / test
splits, ``checkpoint_dir=None``), with the same params (``mnist-seg-linear.yaml``'s: linear head on all
maps, 10 epochs, lr 1e-2, batch 16, weight decay 1e-4), seed, image size and ``RunOptions``. They differ
in one param:

- cached (``cache_maps: true``, the default): the frozen backbone runs once per train, val and test image
  into a map store under a fresh, empty temporary ``<cache_dir>/maps`` (float16, memory-mapped), then the
  head trains for every epoch and is scored on val every epoch and on test once from those maps.
- uncached (``cache_maps: false``): every epoch runs the backbone on every training image, and val (every
  epoch) and test (once) run the backbone on every image again (one at a time, as the protocol's
  ``whole`` evaluation does).

So that both train on the same data, the uncached side has ``scale_range: None`` and ``hflip: 0``: its
train transform is then a resize to ``image_size`` (and a crop of that same size), which is what the cache
stores; the script checks it on the first training items (``input_check`` in the JSON: the largest pixel
difference and the number of mask pixels that differ). Head init, sample order and the held-out val are
seeded alike, so the two runs differ only by the storage precision of the maps (float16 in the cache,
float32 computed afresh): test mIoU is reported for both, with the difference.

The figure is the wall time of the whole ``run`` call (map extraction, head training, val and test
scoring), with the backbone built and the datasets loaded off the clock. The cached side always starts
from an empty cache, so its time includes the extraction pass; a second cached run on the same (now
full) cache is timed too (``cached_hit``: what every further lr, head or seed on those maps pays).
Where the time goes is recorded per run by timing the protocol's phases (``MapStore.get_or_extract``,
``Trainer.fit`` less its val scoring, ``score_cached`` / ``score`` for val and test; a few microseconds of
wrapper per call). A warm-up run of each side (one epoch, not kept) pays the imports first. Rounds
alternate the order of the sides; medians over rounds are reported, with the ratio uncached / cached
(miss). Each run records the foreign load (P7's method: the CPU time other processes used meanwhile, in
cores), and a run during which others used more than ``--max-foreign`` cores is measured again (up to
``--retries`` times); the least disturbed attempt counts, every attempt is kept. Target: uncached /
cached >= 5x over 10 epochs at equal mIoU.

Points (each with its own warm-up and rounds, on the same data, 96 px):

- ``light``: MobileNetV2 (``mobilenetv2_100.tv_in1k``, real ImageNet weights) with the task's
  ``maps: all``: the cell ``mnist-seg-linear`` runs. 3 rounds.
- ``heavy``: ResNet-50 (``--heavy``, default ``random/timm:resnet50``: random init, so its mIoU only checks
  that both sides agree), its head on the last map (``--heavy-maps last``, the protocol's default for a
  linear head): a backbone that costs far more than its head. 1 round (``--heavy-rounds``).
- ``heavy_all_maps_probe``: the same ResNet-50 with the task's ``maps: all`` for ``--probe-epochs`` (2)
  epochs, one run per side, no hit run: where the time goes when the head reads all of a wide backbone's
  maps; not a target point (0 skips it).

    python -m benchmarks.bench_segmentation [--quick] [--rounds 3] [--heavy-rounds 1] [--no-heavy]
    python -m benchmarks.bench_segmentation --no-light --probe-epochs 0 --batch-size 16 --no-save  # a variant

The default run takes about 11 minutes on a quiet 2-core CPU machine (more when retries are needed).
``--quick``: 2 epochs, one round, the light point only, written to ``benchmarks/results/quick/``. Results go
to ``benchmarks/results/segmentation.json``.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.bench_train import cpu_seconds
from benchmarks.common import measure_quiet, save
from bobench import create_backbone
from bobench.data import load_segmentation_dataset
from bobench.map_set import resize_for_maps
from bobench.options import RunOptions
from bobench.protocols import segmentation
from bobench.protocols.base import TrainData

SEED = 0
#: mnist-seg-linear.yaml's params (image_size 96 is the task's, passed through TrainData)
TASK_PARAMS: dict[str, Any] = {
    "head": "linear",
    "maps": "all",
    "frozen": True,
    "epochs": 10,
    "lr": 1.0e-2,
    "batch_size": 16,
    "weight_decay": 1.0e-4,
}
SIDES = ("uncached", "cached")


# -- phase timers -------------------------------------------------------------------------------------
class Phases:
    """Seconds spent in the protocol's phases during one run, by wrapping the functions it calls."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seconds = {"extract": 0.0, "fit": 0.0, "val": 0.0, "test": 0.0}
        self.calls = {"extract": 0, "val": 0, "test": 0}

    def timed(self, fn: Callable, phase: Callable[..., str]) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            name = phase(*a, **kw)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                if name in self.calls:
                    self.calls[name] += 1

        return wrapper

    def install(self) -> None:
        """Wrap ``MapStore.get_or_extract``, ``Trainer.fit`` and the two scorers (for this process, once)."""
        if getattr(self, "installed", False):
            return
        self.installed = True
        from bobench.map_cache import MapStore
        from bobench.training import Trainer

        MapStore.get_or_extract = self.timed(MapStore.get_or_extract, lambda *a, **k: "extract")
        Trainer.fit = self.timed(Trainer.fit, lambda *a, **k: "fit")

        def which(*a: Any, **kw: Any) -> str:
            return "test" if a[-1] == "test" else "val"  # both take the description last

        segmentation.score_cached = self.timed(segmentation.score_cached, which)
        segmentation.score = self.timed(segmentation.score, which)

    def summary(self, total: float) -> dict[str, float]:
        s = self.seconds
        train = s["fit"] - s["val"]  # Trainer.fit calls the val scoring after every epoch
        return {
            "extract_s": s["extract"],
            "train_s": train,
            "val_s": s["val"],
            "test_s": s["test"],
            "other_s": total - s["extract"] - s["fit"] - s["test"],
            "val_calls": self.calls["val"],
        }


PHASES = Phases()


# -- one run --------------------------------------------------------------------------------------------
@dataclass
class Point:
    """One comparison: a backbone, the maps its head reads, epochs, rounds, data and options."""

    label: str
    model: str
    maps: str
    epochs: int
    rounds: int
    data: str
    image_size: int
    options: RunOptions
    hit: bool = True  # also time a second cached run on the full cache
    warm_up: bool = True  # one 1-epoch run of each side first, not kept
    note: str = ""


def load_splits(spec: str) -> dict[str, Any]:
    return {s: load_segmentation_dataset(spec, split=s) for s in ("train", "val", "test")}


def side_params(side: str, epochs: int, maps: str = "all") -> dict[str, Any]:
    """The task's params for ``side``, with ``epochs`` and the maps the head reads."""
    p = {**TASK_PARAMS, "epochs": epochs, "maps": maps}
    if side == "uncached":
        p.update(cache_maps=False, scale_range=None, hflip=0)
    return p


def run_once(
    side: str, point: Point, splits: dict[str, Any], cache_dir: str, epochs: int | None = None
) -> dict[str, Any]:
    """One timed ``segmentation.run`` of ``side`` (``uncached`` or ``cached``) with ``cache_dir`` as the
    run's cache folder; the backbone is built off the clock."""
    t0 = time.perf_counter()
    backbone = create_backbone(point.model)
    build_s = time.perf_counter() - t0
    data = TrainData(
        train=splits["train"], val=splits["val"], test=splits["test"], classes=list(splits["train"].classes),
        image_size=point.image_size, cache_dir=cache_dir,
    )  # fmt: skip
    params = side_params(side, epochs or point.epochs, point.maps)
    PHASES.reset()
    before, t0 = cpu_seconds(), time.perf_counter()
    result = segmentation.run(backbone, data, params, SEED, point.options, None)
    after, wall = cpu_seconds(), time.perf_counter() - t0
    busy, steal, main, workers = (a - b for a, b in zip(after, before, strict=True))
    info = result.info
    metrics = {m.name: m.value for m in result.metrics}
    return {
        "wall_s": wall,
        **PHASES.summary(wall),
        "backbone_build_s": build_s,
        "test_mIoU": metrics.get("mIoU"),
        "test_mAcc": metrics.get("mAcc"),
        "test_pixel_acc": metrics.get("pixel_acc"),
        "val_mIoU": info["val_score"],
        "val_curve": [h["val"] for h in info["history"]],
        "loss_curve": [h["loss"] for h in info["history"]],
        "epoch": info["epoch"],
        "cached_maps": info["cached_maps"],
        "map_cache": info.get("map_cache"),
        "cache_dir": cache_dir,
        "main_cpu_s": main,
        "worker_cpu_s": workers,
        "foreign_cores": (busy - main - workers) / wall,
        "steal_cores": steal / wall,
        "loadavg_1min_after": os.getloadavg()[0],
    }


def in_fresh_cache(fn: Callable[[str], dict[str, Any]], keep: list[str] | None = None) -> dict[str, Any]:
    """``fn(folder)`` with a new, empty cache folder, removed afterwards (or appended to ``keep``)."""
    folder = tempfile.mkdtemp(prefix="bench-seg-")
    try:
        return fn(folder)
    finally:
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            keep.append(folder)


def input_check(splits: dict[str, Any], image_size: int, n: int = 16) -> dict[str, Any]:
    """Do the uncached side's training inputs equal what the cache stores? On the first ``n`` items: the
    uncached train transform (``scale_range: None``, ``hflip: 0``) against the cache's resize."""
    p = segmentation.resolve_params(side_params("uncached", 1))
    view = segmentation.dataset_view(splits["train"], segmentation.train_transforms(p, image_size))
    worst, mask_pixels = 0.0, 0
    for i in range(min(n, len(view))):
        x, m = view[i]
        ref_x, ref_m = resize_for_maps(*splits["train"][i], image_size)
        worst = max(worst, float((x - ref_x).abs().max()))
        mask_pixels += int((m != ref_m.long()).sum())
    return {"items": min(n, len(view)), "max_abs_pixel_diff": worst, "mask_pixels_differing": mask_pixels}


# -- a point: rounds of both sides --------------------------------------------------------------------
def bench_point(point: Point, args: argparse.Namespace) -> dict[str, Any]:
    """Rounds of uncached, cached (empty cache) and cached (hit) runs, the order alternating."""
    splits = load_splits(point.data)
    check = input_check(splits, point.image_size)
    o = point.options
    print(
        f"\n### {point.label}: {point.model}, linear head on maps={point.maps!r}, {point.data} at "
        f"{point.image_size} px, {point.epochs} epochs, {point.rounds} round(s), {torch.get_num_threads()} "
        f"threads, {o.device} {o.precision}, batch {o.batch_size}, workers {o.num_workers}; load before: "
        f"{os.getloadavg()}\ninput check (uncached train transform vs the cache's resize, {check['items']} "
        f"items): max pixel diff {check['max_abs_pixel_diff']:.2e}, {check['mask_pixels_differing']} mask "
        "pixels differ",
        flush=True,
    )
    if point.warm_up:  # imports, first-touch allocations, the dataset's files in the page cache
        for side in SIDES:
            in_fresh_cache(functools.partial(run_once, side, point, splits, epochs=1))
    print("| round | side | wall s | extract s | train s | val s | test s | test mIoU | val mIoU | foreign |")
    runs: dict[str, list[dict[str, Any]]] = {"uncached": [], "cached": []}
    if point.hit:
        runs["cached_hit"] = []

    def measured(name: str, fn: Callable[[], dict[str, Any]], r: int) -> dict[str, Any]:
        row = measure_quiet(fn, name, args.retries, args.max_foreign)
        runs[name].append(row)
        print(
            f"| {r} | {name} | {row['wall_s']:.2f} | {row['extract_s']:.2f} | {row['train_s']:.2f} | "
            f"{row['val_s']:.2f} | {row['test_s']:.2f} | {row['test_mIoU']:.4f} | {row['val_mIoU']:.4f} | "
            f"{row['foreign_cores']:.2f} |",
            flush=True,
        )
        return row

    for r in range(point.rounds):
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            if side == "uncached":
                uncached = functools.partial(run_once, "uncached", point, splits)
                measured("uncached", functools.partial(in_fresh_cache, uncached), r)
                continue
            caches: list[str] = []  # every attempt's cache folder, kept for the hit run, removed after
            try:
                cached = functools.partial(run_once, "cached", point, splits)
                row = measured("cached", functools.partial(in_fresh_cache, cached, caches), r)
                if any(v["hit"] for v in row["map_cache"].values()):
                    raise RuntimeError("the cached run found maps in its empty cache")
                if point.hit:  # on the cache the kept (least disturbed) attempt filled
                    hit = measured("cached_hit", functools.partial(cached, row["cache_dir"]), r)
                    if not all(v["hit"] for v in hit["map_cache"].values()):
                        raise RuntimeError("the second cached run did not find its maps")
            finally:
                for c in caches:
                    shutil.rmtree(c, ignore_errors=True)
    config = {
        "model": point.model, "maps": point.maps, "data": point.data, "image_size": point.image_size,
        "epochs": point.epochs, "rounds": point.rounds, "note": point.note, "seed": SEED,
        "params_cached": side_params("cached", point.epochs, point.maps),
        "params_uncached": side_params("uncached", point.epochs, point.maps),
        "options": {k: getattr(o, k) for k in ("device", "precision", "batch_size", "num_workers", "progress")},
        "threads": torch.get_num_threads(), "n_images": {s: len(d) for s, d in splits.items()},
    }  # fmt: skip
    return {"config": config, "input_check": check, **summarise(runs), "runs": runs}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per side, the ratio uncached / cached (and per round), the mIoU differences."""
    keys = ("wall_s", "extract_s", "train_s", "val_s", "test_s", "other_s", "test_mIoU", "val_mIoU")
    med = {
        side: {k: statistics.median(float(row[k]) for row in rows) for k in keys}
        for side, rows in runs.items()
    }
    pairs = list(zip(runs["uncached"], runs["cached"], strict=True))
    diff = [u["test_mIoU"] - c["test_mIoU"] for u, c in pairs]
    val_diff = [u["val_mIoU"] - c["val_mIoU"] for u, c in pairs]
    out: dict[str, Any] = {
        "median": med,
        "ratio": med["uncached"]["wall_s"] / med["cached"]["wall_s"],
        "ratio_per_round": [u["wall_s"] / c["wall_s"] for u, c in pairs],
        "test_mIoU_uncached_minus_cached": diff,
        "val_mIoU_uncached_minus_cached": val_diff,
        "max_abs_test_mIoU_diff": max(abs(d) for d in diff),
        "same_epoch_chosen": all(u["epoch"] == c["epoch"] for u, c in pairs),
        "max_foreign_cores": max(row["foreign_cores"] for rows in runs.values() for row in rows),
        "target": 5.0,
    }
    out["met"] = out["ratio"] >= out["target"]
    if "cached_hit" in med:
        out["ratio_vs_hit"] = med["uncached"]["wall_s"] / med["cached_hit"]["wall_s"]
    return out


def report(point: Point, out: dict[str, Any]) -> None:
    m = out["median"]
    c = m["cached"]
    hit = f", cached (hit) {m['cached_hit']['wall_s']:.2f} s" if "cached_hit" in m else ""
    vs_hit = f"; vs hit {out['ratio_vs_hit']:.2f}x" if "ratio_vs_hit" in out else ""
    print(
        f"{point.label}: uncached {m['uncached']['wall_s']:.2f} s, cached {c['wall_s']:.2f} s (extract "
        f"{c['extract_s']:.2f}, train {c['train_s']:.2f}, val {c['val_s']:.2f}, test {c['test_s']:.2f}){hit}: "
        f"ratio {out['ratio']:.2f}x (rounds {', '.join(f'{v:.2f}' for v in out['ratio_per_round'])}{vs_hit}); "
        f"test mIoU uncached {m['uncached']['test_mIoU']:.4f}, cached {c['test_mIoU']:.4f} (max |diff| "
        f"{out['max_abs_test_mIoU_diff']:.4f}); max foreign load {out['max_foreign_cores']:.2f} cores; "
        f"load after: {os.getloadavg()}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> dict:
    """Run P9 and write ``benchmarks/results/segmentation.json`` (``--quick``: a smoke run, written under ``quick/``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 epochs, one round, light point only")
    ap.add_argument("--model", default="mobilenetv2_100.tv_in1k")
    ap.add_argument("--maps", default="all", help="the maps the light point's head reads (the task's: all)")
    ap.add_argument("--data", default="mnist-seg")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--heavy", default="random/timm:resnet50", help="the second, heavier backbone")
    ap.add_argument("--heavy-maps", default="last", help="the maps the heavy point's head reads")
    ap.add_argument("--heavy-rounds", type=int, default=1)
    ap.add_argument("--no-heavy", action="store_true", help="skip the heavy point and the probe")
    ap.add_argument("--no-light", action="store_true", help="skip the light point")
    ap.add_argument("--probe-epochs", type=int, default=2, help="epochs of the all-maps probe (0: skip it)")
    ap.add_argument("--batch-size", type=int, default=None, help="RunOptions.batch_size (default: its 64)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: RunOptions')")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--retries", type=int, default=2, help="reruns of a run disturbed by others")
    ap.add_argument("--max-foreign", type=float, default=0.15, help="cores others may use during a run")
    ap.add_argument("--no-save", action="store_true", help="print only (a variant run): write no JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.rounds, args.no_heavy = 2, 1, True
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    extra = {} if args.batch_size is None else {"batch_size": args.batch_size}
    options = RunOptions(
        device=args.device, precision=args.precision, num_workers=args.workers, progress=False, **extra
    )
    common = {"data": args.data, "image_size": args.image_size, "options": options}
    points = []
    if not args.no_light:
        points.append(
            Point("light", args.model, args.maps, args.epochs, args.rounds, warm_up=not args.quick, **common)
        )
    if not args.no_heavy:
        points.append(Point("heavy", args.heavy, args.heavy_maps, args.epochs, args.heavy_rounds, **common))
        if args.probe_epochs:
            points.append(Point(
                "heavy_all_maps_probe", args.heavy, "all", args.probe_epochs, 1, hit=False, warm_up=False,
                note="the task's maps=all on the heavy backbone, few epochs: where its time goes, not a target point",
                **common,
            ))  # fmt: skip
    PHASES.install()
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    for point in points:
        out[point.label] = bench_point(point, args)
        report(point, out[point.label])
    out["benchmark_wall_s"] = time.perf_counter() - t0
    print(f"whole benchmark: {out['benchmark_wall_s']:.0f} s", flush=True)
    if args.no_save:
        return out
    path = save(
        "segmentation",
        {
            "benchmark": "P9 segmentation: frozen linear head from cached maps vs the backbone every epoch",
            **out,
        },
        quick=args.quick,
    )
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
