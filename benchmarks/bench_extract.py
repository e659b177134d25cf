"""P1: bobench's feature extractor vs a bare timm ``inference_mode`` loop.

Same images (patches13 train split), same model, same transform, same batch size and DataLoader
workers; the baseline is the loop a careful user writes by hand (NCHW, no extras). bobench's
extractor adds channels_last for CNNs and writes the cache shards; its time includes writing them.
Target: ≥ 1.0× everywhere and ≥ 1.3× on CNNs.

    python -m benchmarks.bench_extract [--quick] [--models NAME ...] [--paired-rounds N] [--forward-chunk N]

``--paired-rounds N`` times N rounds of (bare loop, then bobench) back to back instead of best-of-2 per
side, and reports the median of the N per-round ratios (and their range): on shared cores the noise between
two runs minutes apart is larger than the difference measured.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.common import best_of, save
from bobench import create_backbone, load_dataset
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
    ap.add_argument("--workers", type=int, default=1)
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

        def ours(bb=bb, ds=ds, opts=opts, chunks=chunks) -> None:
            fs = FeatureStore(tempfile.mkdtemp(prefix="bench-extract-")).get_or_extract(bb, ds, opts)
            chunks.append(fs.manifest["stats"]["forward_chunk"])

        def bare(bb=bb, ds=ds) -> None:
            # NCHW, as a user's model is: bobench's extractor leaves a CNN in channels_last
            bb.model.to(memory_format=torch.contiguous_format)
            bare_loop(bb, ds, args.batch_size, args.workers)

        bare()  # warm-up: allocator, thread pools, page cache
        rounds = []  # (bare s, bobench s) per paired round
        for _ in range(args.paired_rounds):
            rounds.append((best_of(bare, 1), best_of(ours, 1)))
        if rounds:
            t_bare, t_ours = (float(np.median(t)) for t in zip(*rounds, strict=True))
            speedup = float(np.median([b / o for b, o in rounds]))
        else:
            t_bare, t_ours = best_of(bare, repeats), best_of(ours, repeats)
            speedup = t_bare / t_ours
        row = {
            "model": name,
            "family": bb.card.family,
            "images": len(ds),
            "bare_img_per_s": len(ds) / t_bare,
            "bobench_img_per_s": len(ds) / t_ours,
            "speedup": speedup,
            "paired_round_ratios": [b / o for b, o in rounds],
            "bobench_forward_chunks": chunks,
            "target": 1.3 if bb.card.family == "cnn" else 1.0,
        }
        rows.append(row)
        print(
            f"| {name} | {row['family']} | {row['bare_img_per_s']:.1f} | {row['bobench_img_per_s']:.1f} | "
            f"{row['speedup']:.2f}x | >= {row['target']}x |",
            flush=True,
        )
        if rounds:
            r = row["paired_round_ratios"]
            print(
                f"  {len(r)} paired rounds: {min(r):.2f}-{max(r):.2f}x ({', '.join(f'{x:.3f}' for x in r)}); "
                f"bobench's chunks {chunks}"
            )
    path = save(
        "extract" if args.forward_chunk is None else f"extract-chunk{args.forward_chunk}",
        {
            "benchmark": "P1 extraction",
            "split": split,
            "image_size": 224,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "forward_chunk": args.forward_chunk,
            "rows": rows,
        },
        quick=args.quick,
    )
    print(f"wrote {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
