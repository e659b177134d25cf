"""P6: retrieval and OOD on the features of one extraction pass.

One backbone, patches13 (all three splits) at its card's input size: time one extraction pass into an
empty cache, then the retrieval task and the OOD task's probe (trained on the cached train split,
scored on the cached test split and the corrupted test sets) as the runner runs them. The OOD sets'
own images (the four corrupted copies of the test split) need their own forward pass: it is timed
and reported separately, since no cache can make new images free.
Target: (extraction + retrieval + OOD protocol) / extraction ≤ 1.3.

    python -m benchmarks.bench_reuse [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import extract_patches13, save
from bobench import load_dataset
from bobench.frozen import protocol_params
from bobench.options import RunOptions
from bobench.protocols import get_protocol
from bobench.protocols.base import OodSet, ProbeData
from bobench.task import load_task


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbone", default="mobilenetv2_100.tv_in1k")
    ap.add_argument("--quick", action="store_true", help="64 px instead of the card's 224 px")
    args = ap.parse_args(argv)
    image_size = 64 if args.quick else None
    bb, store, opts, feats, t_extract = extract_patches13(args.backbone, image_size, "bench-reuse-")
    ood_task = load_task("patches13-ood")
    t1 = time.perf_counter()
    ood = {}
    for name, spec in ood_task.ood.items():
        ds = load_dataset(spec, split="test")
        ood[name] = OodSet(store.get_or_extract(bb, ds, opts), np.asarray(ds.targets), np.arange(13))
    t_ood_extract = time.perf_counter() - t1
    base = ProbeData(
        feats["train"], feats["test"], feats["val"], n_classes=13, classes=feats["train"].classes
    )
    per_task = {}
    for name, extras in (("patches13-retrieval", {}), ("patches13-ood", {"ood": ood})):
        task = load_task(name)
        data = ProbeData(base.train, base.test, base.val, 13, base.classes, extras=extras)
        t2 = time.perf_counter()
        options = RunOptions(device="cpu")  # the device the features were extracted on
        result = get_protocol(task.protocol)(data, protocol_params(task), 0, options)
        per_task[name] = {
            "seconds": time.perf_counter() - t2,
            "primary": next(m.value for m in result.metrics if m.name == task.primary),
        }
    t_protocols = sum(v["seconds"] for v in per_task.values())
    ratio = (t_extract + t_protocols) / t_extract
    n = sum(f.n for f in feats.values())
    n_ood = sum(o.features.n for o in ood.values())
    print(
        f"| {args.backbone} | {n} | {t_extract:.1f} s | {t_protocols:.2f} s | {ratio:.2f}x | <= 1.3x |"
        f" OOD images: {n_ood} in {t_ood_extract:.1f} s"
    )
    for name, v in per_task.items():
        print(f"  {name}: {v['seconds']:.2f} s, primary {v['primary']:.4f}")
    path = save(
        "reuse",
        {
            "benchmark": "P6 retrieval + OOD on cached features",
            "backbone": args.backbone,
            "image_size": image_size or 224,
            "images": n,
            "extract_s": t_extract,
            "protocols_s": t_protocols,
            "per_task": per_task,
            "ratio": ratio,
            "ood_images": n_ood,
            "ood_extract_s": t_ood_extract,
        },
        quick=args.quick,
    )
    print(f"wrote {path}")
    return {"ratio": ratio}


if __name__ == "__main__":
    main()
