"""P1: bobench's feature extractor vs a bare timm ``inference_mode`` loop.

Same images (patches13 train split), same model, same transform, same batch size; the baseline is the
loop a careful user writes by hand (NCHW, no extras), with DataLoader workers "one per spare core"
(:func:`bobench.distributed.default_workers`, 1 on a 2-core machine) and, as a second baseline, with
none (loading in the main process, which bobench does on the CPU by default). bobench's extractor adds
channels_last for CNNs, cache-sized chunks on the CPU, and writes the cache shards; its time includes
writing them. ``--workers N`` gives every side N workers instead. Target: ≥ 1.0× everywhere and ≥ 1.3×
on CNNs.

    python -m benchmarks.bench_extract [--quick] [--models NAME ...] [--paired-rounds N] [--forward-chunk N]
        [--workers N]

``--paired-rounds N`` times N rounds of (the bare loops, then bobench; the order reversed every other
round) back to back instead of best-of-2 per side, and reports the median of the N per-round ratios (and
their range): on shared cores the noise between two runs minutes apart is larger than the difference
measured.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.common import best_of, save
from bobench import create_backbone, load_dataset
from bobench.distributed import default_workers
from bobench.features import ExtractOptions, FeatureStore

MODELS = ["mobilenetv2_100.tv_in1k", "tf_efficientnet_lite0.in1k", "random/timm:vit_tiny_patch16_224"]


def bare_loop(bb, ds, batch_size: int, workers: int) -> int:
    """What a user writes by hand: timm model, card transform, DataLoader, inference_mode."""
    ds.transform = bb.transform()
    model = bb.model.eval()
    n = 0
    with torch.inference_mode():
        for x, _ in DataLoader(ds, batch_size=batch_size, num_workers=workers):
            model.forward_head(model.forward_features(x), pre_logits=True)
            n += len(x)
    return n


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="val split only, one repeat")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--workers", type=int, default=None, help="workers for every side (default: see the module docstring)"
    )
    ap.add_argument("--models", nargs="+", default=MODELS, help="backbone names (default: the three above)")
    ap.add_argument("--paired-rounds", type=int, default=0, help="N paired rounds, median ratio (see above)")
    ap.add_argument(
        "--forward-chunk",
        type=lambda v: v if v == "search" else int(v),
        default=None,
        help="bobench's chunk: an integer, or 'search' (default: the CPU's pixel rule)",
    )
    args = ap.parse_args(argv)
    split, repeats = ("val", 1) if args.quick else ("train", 2)
    rows = []
    bare_workers = args.workers if args.workers is not None else default_workers()
    for name in args.models:
        bb = create_backbone(name)
        ds = load_dataset("patches13", split=split)
        opts = ExtractOptions(
            batch_size=args.batch_size,
            num_workers=args.workers,
            progress=False,
            device="cpu",
            forward_chunk=args.forward_chunk,
        )

        chunks: list[int] = []  # the chunk size each bobench run used (measured or fixed)
        loaders: list[int] = []  # the DataLoader workers each bobench run used

        def ours(bb=bb, ds=ds, opts=opts, chunks=chunks, loaders=loaders) -> None:
            fs = FeatureStore(tempfile.mkdtemp(prefix="bench-extract-")).get_or_extract(bb, ds, opts)
            chunks.append(fs.manifest["stats"]["forward_chunk"])
            loaders.append(fs.manifest["stats"]["loader_workers"])

        def bare(bb=bb, ds=ds, workers=bare_workers) -> None:
            # NCHW, as a user's model is: bobench's extractor leaves a CNN in channels_last
            bb.model.to(memory_format=torch.contiguous_format)
            bare_loop(bb, ds, args.batch_size, workers)

        sides = {"bare": bare}
        if bare_workers != 0 and args.workers is None:
            sides["bare_in_process"] = lambda bare=bare: bare(workers=0)
        sides["ours"] = ours
        bare()  # warm-up: allocator, thread pools, page cache
        times: dict[str, list[float]] = {k: [] for k in sides}
        for r in range(args.paired_rounds):
            for k in list(sides) if r % 2 == 0 else list(sides)[::-1]:
                times[k].append(best_of(sides[k], 1))
        if args.paired_rounds:
            med = {k: float(np.median(v)) for k, v in times.items()}
            ratios = {
                k: [b / o for b, o in zip(times[k], times["ours"], strict=True)] for k in sides if k != "ours"
            }
            speedup = {k: float(np.median(v)) for k, v in ratios.items()}
        else:
            med = {k: best_of(fn, repeats) for k, fn in sides.items()}
            ratios = {}
            speedup = {k: med[k] / med["ours"] for k in sides if k != "ours"}
        row = {
            "model": name,
            "family": bb.card.family,
            "images": len(ds),
            "bare_workers": bare_workers,
            "bare_img_per_s": len(ds) / med["bare"],
            "bobench_img_per_s": len(ds) / med["ours"],
            "speedup": speedup["bare"],
            "paired_round_ratios": ratios.get("bare", []),
            "bobench_forward_chunks": chunks,
            "bobench_loader_workers": loaders,
            "target": 1.3 if bb.card.family == "cnn" else 1.0,
        }
        if "bare_in_process" in sides:
            row.update(
                bare_in_process_img_per_s=len(ds) / med["bare_in_process"],
                speedup_vs_bare_in_process=speedup["bare_in_process"],
                paired_round_ratios_vs_bare_in_process=ratios.get("bare_in_process", []),
            )
        rows.append(row)
        print(
            f"| {name} | {row['family']} | {row['bare_img_per_s']:.1f} | {row['bobench_img_per_s']:.1f} | "
            f"{row['speedup']:.2f}x | >= {row['target']}x |",
            flush=True,
        )
        if "bare_in_process" in sides:
            print(
                f"  bare loop in-process: {row['bare_in_process_img_per_s']:.1f} img/s, bobench "
                f"{row['speedup_vs_bare_in_process']:.2f}x"
            )
        for k, r in ratios.items():
            print(
                f"  {len(r)} paired rounds vs {k}: {min(r):.2f}-{max(r):.2f}x ({', '.join(f'{x:.3f}' for x in r)}); "
                f"bobench's chunks {sorted(set(chunks))}, workers {sorted(set(loaders))}"
            )
    path = save(
        "extract" if args.forward_chunk is None else f"extract-chunk{args.forward_chunk}",
        {
            "benchmark": "P1 extraction",
            "split": split,
            "image_size": 224,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "bare_workers": bare_workers,
            "forward_chunk": args.forward_chunk,
            "rows": rows,
        },
        quick=args.quick,
    )
    print(f"wrote {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
