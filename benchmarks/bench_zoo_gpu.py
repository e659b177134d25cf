"""P5: zoo backbones on a GPU: bobench's extractor vs a bare timm loop, end to end.

For each backbone (random init: throughput does not depend on the weights), the same JPEG image folder
(patches13's 780 real-photo crops written ``--copies`` times), the same card transform, batch size and
DataLoader workers, the same mixed precision (bf16 autocast). The baseline is the loop a careful GPU
user writes by hand: ``DataLoader(pin_memory=True)``, ``.to(device, non_blocking=True)``,
``torch.autocast``, ``inference_mode``, NCHW. bobench's time includes writing the cache shards. Also
reported: the model-only ceiling (the bare model on a resident GPU batch), to show whether a row is
bound by data loading or by the model.

With ``--input-cache`` each backbone also runs bobench with the input cache (``--input-cache``,
:mod:`bobench.input_cache`): **first**, into an empty input cache (the one decode-and-resize pass, then the
extraction, or on a GPU one extraction that decodes with ``--workers`` and stores the batches it reads: what
the first backbone of a battle that resizes alike pays), and **reuse**, from the full input cache (every
further backbone: uint8 rows read from a memory map, normalised on the GPU), with the default readers and
with ``--reuse-workers``. Each reuse run's features are compared with the ordinary
run's (max abs difference; the ordinary side's own run-to-run difference is the yardstick, since cuDNN may
pick other kernels between runs).

``--photo WxH`` writes each crop upscaled to a photo's size first (P11's data), so decoding costs what it
costs on photos. ``--device cpu`` runs the same sides on the CPU (a smoke test of the script).

    python -m benchmarks.bench_zoo_gpu [--quick] [--models a,b] [--copies 8] [--workers 12]
        [--input-cache] [--reuse-workers 4] [--photo 500x375] [--name zoo_gpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.common import best_of, fresh_features, patches13_jpegs, save
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


def bare_loop(bb, ds, batch_size: int, workers: int, device: torch.device, precision: str = "bf16") -> int:
    ds.transform = bb.transform()
    model = bb.model.to(device).eval()
    n = 0
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"),
    ):
        for x, _ in loader:
            out = model.forward_head(model.forward_features(x.to(device, non_blocking=True)), pre_logits=True)
            n += len(x)
    out.float().cpu()  # wait for the last batch
    return n


def model_only(bb, batch_size: int, device: torch.device, iters: int = 20) -> float:
    """img/s of the bare model on one resident batch (no data loading): the ceiling."""
    model = bb.model.to(device).eval()
    x = torch.randn(batch_size, *bb.card.input_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        for _ in range(3):
            model.forward_head(model.forward_features(x), pre_logits=True)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            model.forward_head(model.forward_features(x), pre_logits=True)
        sync()
    return batch_size * iters / (time.perf_counter() - t0)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if len(a) else 0.0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one copy, one repeat, two models")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--input-cache", action="store_true", help="also run bobench's first and reuse sides")
    ap.add_argument("--reuse-workers", type=int, default=4, help="the second reuse side's readers")
    ap.add_argument("--photo", default=None, help="WxH: upscale each crop to a photo's size (P11's data)")
    ap.add_argument("--name", default="zoo_gpu", help="results/<name>.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_zoo_gpu needs a CUDA GPU (or --device cpu for a smoke run)")
    models = args.models.split(",")[: 2 if args.quick else None]
    copies, repeats = (1, 1) if args.quick else (args.copies, 2)
    photo = tuple(int(v) for v in args.photo.split("x")) if args.photo else None
    work = Path(tempfile.mkdtemp(prefix="bench-zoo-gpu-"))
    root = patches13_jpegs(work / "images", copies, photo)
    rows: list[dict] = []

    def write(rows: list[dict]) -> Path:
        payload = {
            "benchmark": "P5 zoo extraction on GPU",
            "precision": f"{args.precision} autocast" if args.precision == "bf16" else "fp32",
            "config": vars(args),
            "photo_size": list(photo) if photo else None,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "rows": rows,
        }
        return save(args.name, payload, quick=args.quick)

    cols = "| backbone | params | bare img/s | bobench img/s | ratio | model-only img/s |"
    if args.input_cache:
        cols += " first img/s | reuse img/s | reuse ratio | reuse (w) img/s | reuse (w) ratio |"
    print(cols, flush=True)
    for m, name in enumerate(models):
        bb = create_backbone(name, pretrained=False)
        ds = load_dataset(f"imagefolder:{root}?val_fraction=0&test_fraction=0", split="train")
        opts = ExtractOptions(
            device=args.device,
            precision=args.precision,
            batch_size=args.batch_size,
            num_workers=args.workers,
            progress=False,
        )
        inputs = work / f"inputs-{m}"
        last: dict = {}  # each side's newest features; whether "first" streamed

        def ours(
            side: str = "ordinary", bb=bb, ds=ds, opts=opts, inputs=inputs, last=last, name=name
        ) -> None:
            # the feature folder is fresh; its input cache is this model's shared one (emptied by "first")
            shared = None if side == "ordinary" else inputs
            folder = fresh_features(work / f"features-{side}", shared, empty_inputs=side == "first")
            run_opts = opts
            if side != "ordinary":
                workers = {"first": args.workers, "reuse": None, "reuse_w": args.reuse_workers}[side]
                run_opts = dataclasses.replace(opts, input_cache=True, num_workers=workers)
            fs = FeatureStore(folder).get_or_extract(bb, ds, run_opts)
            if side != "ordinary" and not fs.stats["input_cache"]["used"]:
                raise SystemExit(f"{name}: the input cache was not used: {fs.stats['input_cache']}")
            if side == "first":
                last["first_streamed"] = bool(fs.stats["input_cache"].get("streamed"))
            if side in last:
                last[f"{side}-previous"] = last[side]
            last[side] = fs.load()[0]

        def bare(bb=bb, ds=ds) -> None:
            bare_loop(bb, ds, args.batch_size, args.workers, device, args.precision)

        bare()  # warm-up: cuDNN autotune, allocator, page cache
        t_bare = best_of(bare, repeats)
        t_ours = best_of(ours, repeats)
        row = {
            "model": name,
            "params": bb.card.params,
            "input_size": list(bb.card.input_size),
            "images": len(ds),
            "bare_img_per_s": len(ds) / t_bare,
            "bobench_img_per_s": len(ds) / t_ours,
            "speedup": t_bare / t_ours,
        }
        line = ""
        if args.input_cache:
            t_first = best_of(lambda: ours("first"), repeats)
            t_reuse = best_of(lambda: ours("reuse"), repeats)
            t_reuse_w = best_of(lambda: ours("reuse_w"), repeats)
            row.update(
                first_img_per_s=len(ds) / t_first,
                first_ratio=t_bare / t_first,
                reuse_img_per_s=len(ds) / t_reuse,
                first_streamed=last["first_streamed"],
                reuse_ratio=t_bare / t_reuse,
                reuse_workers=args.reuse_workers,
                reuse_w_img_per_s=len(ds) / t_reuse_w,
                reuse_w_ratio=t_bare / t_reuse_w,
                input_cache_mb=sum(f.stat().st_size for f in inputs.rglob("*.npy")) / 2**20,
                max_diff_reuse_vs_ordinary=max_diff(last["reuse"], last["ordinary"]),
                max_diff_first_vs_ordinary=max_diff(last["first"], last["ordinary"]),
                max_diff_ordinary_run_to_run=max_diff(
                    last["ordinary"], last.get("ordinary-previous", last["ordinary"])
                ),
                reuse_equals_ordinary=bool(np.array_equal(last["reuse"], last["ordinary"])),
            )
            line = (
                f" {row['first_img_per_s']:.0f} | {row['reuse_img_per_s']:.0f} | {row['reuse_ratio']:.2f}x | "
                f"{row['reuse_w_img_per_s']:.0f} | {row['reuse_w_ratio']:.2f}x |"
            )
        bb.model.to(memory_format=torch.contiguous_format)
        row["model_only_img_per_s"] = model_only(bb, args.batch_size, device)
        rows.append(row)
        write(rows)  # after every backbone: a run stopped at a time limit keeps what it measured
        print(
            f"| {name} | {bb.card.params / 1e6:.1f}M | {row['bare_img_per_s']:.0f} | "
            f"{row['bobench_img_per_s']:.0f} | {row['speedup']:.2f}x | {row['model_only_img_per_s']:.0f} |"
            + line,
            flush=True,
        )
        if args.input_cache:
            print(
                f"  features: reuse vs ordinary max |diff| {row['max_diff_reuse_vs_ordinary']:.3g} "
                f"(equal: {row['reuse_equals_ordinary']}); first vs ordinary {row['max_diff_first_vs_ordinary']:.3g} "
                f"(streamed: {row['first_streamed']}); ordinary run to run {row['max_diff_ordinary_run_to_run']:.3g}",
                flush=True,
            )
        del bb
        shutil.rmtree(inputs, ignore_errors=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    shutil.rmtree(work, ignore_errors=True)
    path = write(rows)
    print(f"wrote {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
