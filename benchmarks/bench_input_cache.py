"""P11: the input cache (``--input-cache``): extraction from images decoded and resized once vs decoding every time.

The data: patches13's 780 real-photo crops (all splits) upscaled to 500 x 375 (ImageNet's typical photo) and
written as JPEG (quality 90), ``--copies`` times, as one image folder, so that decoding and resizing cost
what they cost on photos. For each point (a backbone and an input size), the same images, card transform,
batch size, device and precision; each side extracts into an empty feature cache:

- **bare**: the loop a careful user writes (P1's / P5's baseline: DataLoader with the card transform,
  ``inference_mode``, ``forward_head(forward_features(x))``), for reference;
- **ordinary**: bobench's extraction, decoding and resizing every image in the DataLoader workers;
- **first**: ``input_cache=True`` into an empty input cache: the one decode-and-resize pass that stores
  uint8 images, then the extraction from them (what the first backbone of a battle pays);
- **reuse**: ``input_cache=True`` on the now full input cache (what every further backbone that resizes
  alike pays: no decoding at all).

The features of ``reuse`` are checked equal to ``ordinary``'s (bit for bit). Rounds alternate the order of
the sides; medians are reported with the ratios ordinary / reuse and bare / reuse (the P5 target on a GPU:
bobench >= 1.3x the bare loop on a data-bound run), and ordinary / first. A run during which other processes
used more than ``--max-foreign`` cores is measured again (up to ``--retries`` times).

    python -m benchmarks.bench_input_cache [--quick] [--rounds 3] [--device cpu] [--workers N]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.bench_train import cpu_seconds
from benchmarks.common import fresh_features, measure_quiet, patches13_jpegs, save
from bobench import create_backbone, load_dataset
from bobench.features import ExtractOptions, FeatureStore

POINTS = [("mobilenetv2_100.tv_in1k", None), ("mobilenetv2_100.tv_in1k", 96)]  # 224 px (card), 96 px
SIDES = ("bare", "ordinary", "first", "reuse")


def bare_loop(bb: Any, ds: Any, opts: ExtractOptions, image_size: int | None) -> None:
    ds.transform = bb.transform(image_size=image_size)
    device = torch.device("cuda" if opts.device.startswith("cuda") else "cpu")
    model = bb.model.to(device).eval()
    loader = DataLoader(ds, batch_size=opts.batch_size, num_workers=opts.num_workers or 0, pin_memory=True)
    with torch.inference_mode():
        for x, _ in loader:
            out = model.forward_head(model.forward_features(x.to(device, non_blocking=True)), pre_logits=True)
    out.float().cpu()  # wait for the last batch


def timed(fn: Any) -> dict[str, Any]:
    before, t0 = cpu_seconds(), time.perf_counter()
    extra = fn() or {}
    after, wall = cpu_seconds(), time.perf_counter() - t0
    busy, steal, main, workers = (a - b for a, b in zip(after, before, strict=True))
    return {
        "wall_s": wall,
        "foreign_cores": (busy - main - workers) / wall,
        "steal_cores": steal / wall,
        **extra,
    }


def bench_point(model: str, image_size: int | None, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    ds = load_dataset(f"imagefolder:{data}?val_fraction=0&test_fraction=0", split="train")
    bb = create_backbone(model)
    opts = ExtractOptions(
        device=args.device, precision=args.precision, batch_size=args.batch_size, num_workers=args.workers,
        image_size=image_size, progress=False,
    )  # fmt: skip
    # the input cache's own worker defaults: every core decodes for the build, one reads for the extraction
    cached_opts = dataclasses.replace(opts, input_cache=True, num_workers=None)
    work = Path(tempfile.mkdtemp(prefix="bench-input-cache-"))
    features: dict[str, np.ndarray] = {}

    def run(side: str) -> dict[str, Any]:
        if side == "bare":
            return timed(lambda: bare_loop(bb, ds, opts, image_size))
        # first and reuse read or fill one input cache beside fresh feature folders; first empties it, and
        # reuse finds the one the last first filled
        shared = None if side == "ordinary" else work / "shared-inputs"
        root = fresh_features(work / f"features-{side}", shared, empty_inputs=side == "first")
        found: dict[str, Any] = {}

        def extract() -> dict[str, Any]:
            found["fs"] = FeatureStore(root).get_or_extract(
                bb, ds, opts if side == "ordinary" else cached_opts
            )
            return {"input_cache": found["fs"].stats["input_cache"]}

        row = timed(extract)
        features[side] = found["fs"].load()[0]
        return row

    run("ordinary"), run("first")  # warm-up: imports, page cache, the input cache filled once
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
    label = f"{model} at {image_size or bb.card.input_size[-1]} px"
    print(f"\n### {label}, {len(ds)} images, {torch.get_num_threads()} threads, {args.device}, "
          f"batch {args.batch_size}, workers {args.workers}")  # fmt: skip
    for r in range(args.rounds):
        order = SIDES if r % 2 == 0 else SIDES[::-1]
        for side in order:
            row = measure_quiet(lambda side=side: run(side), f"{side} r{r}", args.retries, args.max_foreign)
            runs[side].append(row)
            print(f"| {r} | {side} | {row['wall_s']:.2f} s | {len(ds) / row['wall_s']:.1f} img/s | "
                  f"foreign {row['foreign_cores']:.2f} |", flush=True)  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    med = {s: statistics.median(r["wall_s"] for r in rows) for s, rows in runs.items()}
    out = {
        "model": model, "image_size": image_size or bb.card.input_size[-1], "n_images": len(ds),
        "median_s": med, "img_per_s": {s: len(ds) / v for s, v in med.items()},
        "ordinary_over_reuse": med["ordinary"] / med["reuse"], "bare_over_reuse": med["bare"] / med["reuse"],
        "ordinary_over_first": med["ordinary"] / med["first"],
        "reuse_equals_ordinary": bool(np.array_equal(features["reuse"], features["ordinary"])),
        "max_foreign_cores": max(r["foreign_cores"] for rows in runs.values() for r in rows), "runs": runs,
    }  # fmt: skip
    print(f"{label}: img/s bare {out['img_per_s']['bare']:.1f}, ordinary {out['img_per_s']['ordinary']:.1f}, "
          f"first {out['img_per_s']['first']:.1f}, reuse {out['img_per_s']['reuse']:.1f}; reuse vs ordinary "
          f"{out['ordinary_over_reuse']:.2f}x, vs bare {out['bare_over_reuse']:.2f}x; first vs ordinary "
          f"{out['ordinary_over_first']:.2f}x; features equal: {out['reuse_equals_ordinary']}", flush=True)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="one round, the 96 px point, JSON under results/quick/"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--copies", type=int, default=1, help="times each of the 780 photos is written")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers of bare and ordinary")
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--max-foreign", type=float, default=0.15)
    args = ap.parse_args(argv)
    points = POINTS[1:] if args.quick else POINTS
    if args.quick:
        args.rounds = 1
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-photos-") as tmp:
        data = patches13_jpegs(Path(tmp) / "photos", args.copies, (500, 375))
        print(f"wrote the photos in {time.perf_counter() - t0:.1f} s")
        results = [bench_point(m, size, data, args) for m, size in points]
    payload = {"benchmark": "P11 input cache", "config": vars(args), "points": results,
               "seconds": time.perf_counter() - t0}  # fmt: skip
    print(f"wrote {save('input_cache', payload, quick=args.quick)}")
    return payload


if __name__ == "__main__":
    main()
