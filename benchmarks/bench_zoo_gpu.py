"""P5: zoo backbones on a GPU: bobench's extractor vs a bare timm loop, end to end.

For each backbone (random init: throughput does not depend on the weights), the same JPEG image folder
(patches13's 780 real-photo crops written ``--copies`` times), the same card transform, batch size and
DataLoader workers, the same mixed precision (bf16 autocast). The baseline is the loop a careful GPU
user writes by hand: ``DataLoader(pin_memory=True)``, ``.to(device, non_blocking=True)``,
``torch.autocast``, ``inference_mode``, NCHW. bobench's time includes writing the cache shards. Also
reported: the model-only ceiling (the bare model on a resident GPU batch), to show whether a row is
bound by data loading or by the model.

    python -m benchmarks.bench_zoo_gpu [--quick] [--models a,b] [--copies 8] [--workers 12]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.common import best_of, patches13_jpegs, save
from bobench import create_backbone, load_dataset
from bobench.features import ExtractOptions, FeatureStore

MODELS = [
    "bob/resnet50",
    "bob/convnext-b-in21k",
    "bob/vit-b16-in1k",
    "bob/swinv2-b-in21k-ft1k-256",
    "modern/dinov2-vit-b14",
    "bob/vit-l16-in21k-ft1k",
]


def bare_loop(bb, ds, batch_size: int, workers: int, device: torch.device) -> int:
    ds.transform = bb.transform()
    model = bb.model.to(device).eval()
    n = 0
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, pin_memory=True)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for x, _ in loader:
            out = model.forward_head(model.forward_features(x.to(device, non_blocking=True)), pre_logits=True)
            n += len(x)
    out.float().cpu()  # wait for the last batch
    return n


def model_only(bb, batch_size: int, device: torch.device, iters: int = 20) -> float:
    """img/s of the bare model on one resident batch (no data loading): the ceiling."""
    model = bb.model.to(device).eval()
    x = torch.randn(batch_size, *bb.card.input_size, device=device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model.forward_head(model.forward_features(x), pre_logits=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            model.forward_head(model.forward_features(x), pre_logits=True)
        torch.cuda.synchronize()
    return batch_size * iters / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="one copy, one repeat, two models")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=12)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_zoo_gpu needs a CUDA GPU")
    device = torch.device("cuda")
    models = args.models.split(",")[: 2 if args.quick else None]
    copies, repeats = (1, 1) if args.quick else (args.copies, 2)
    root = patches13_jpegs(Path(tempfile.mkdtemp(prefix="bench-zoo-gpu-")), copies)
    rows = []
    print("| backbone | params | bare img/s | bobench img/s | ratio | model-only img/s |", flush=True)
    for name in models:
        bb = create_backbone(name, pretrained=False)
        ds = load_dataset(f"imagefolder:{root}?val_fraction=0&test_fraction=0", split="train")
        opts = ExtractOptions(
            device="cuda",
            precision="bf16",
            batch_size=args.batch_size,
            num_workers=args.workers,
            progress=False,
        )

        def ours(bb=bb, ds=ds, opts=opts) -> None:
            FeatureStore(tempfile.mkdtemp(prefix="bench-zoo-gpu-cache-")).get_or_extract(bb, ds, opts)

        def bare(bb=bb, ds=ds) -> None:
            bare_loop(bb, ds, args.batch_size, args.workers, device)

        bare()  # warm-up: cuDNN autotune, allocator, page cache
        t_bare = best_of(bare, repeats)
        t_ours = best_of(ours, repeats)
        bb.model.to(memory_format=torch.contiguous_format)
        ceiling = model_only(bb, args.batch_size, device)
        row = {
            "model": name,
            "params": bb.card.params,
            "input_size": list(bb.card.input_size),
            "images": len(ds),
            "bare_img_per_s": len(ds) / t_bare,
            "bobench_img_per_s": len(ds) / t_ours,
            "speedup": t_bare / t_ours,
            "model_only_img_per_s": ceiling,
        }
        rows.append(row)
        print(
            f"| {name} | {bb.card.params / 1e6:.1f}M | {row['bare_img_per_s']:.0f} | "
            f"{row['bobench_img_per_s']:.0f} | {row['speedup']:.2f}x | {ceiling:.0f} |",
            flush=True,
        )
        del bb
        torch.cuda.empty_cache()
    payload = {
        "benchmark": "P5 zoo extraction on GPU",
        "precision": "bf16 autocast",
        "batch_size": args.batch_size,
        "workers": args.workers,
        "rows": rows,
    }
    path = save("zoo_gpu", payload, quick=args.quick)
    print(f"wrote {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
