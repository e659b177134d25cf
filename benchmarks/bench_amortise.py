"""P3: what the frozen-feature protocols cost on top of the one extraction pass they share.

One backbone, patches13 (all three splits) at its card's input size: time one extraction pass into
an empty cache, then linear probe + kNN + few-shot on the cached features (as the runner runs them).
Target: (extraction + protocols) / extraction ≤ 1.3.

    python -m benchmarks.bench_amortise [--quick]
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import extract_patches13, save
from bobench.options import RunOptions
from bobench.protocols import get_protocol
from bobench.protocols.base import ProbeData
from bobench.task import load_task

TASKS = ["patches13-linear", "patches13-knn", "patches13-fewshot"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbone", default="mobilenetv2_100.tv_in1k")
    ap.add_argument("--quick", action="store_true", help="64 px instead of the card's 224 px")
    args = ap.parse_args(argv)
    image_size = 64 if args.quick else None
    *_, feats, t_extract = extract_patches13(args.backbone, image_size, "bench-amortise-")
    data = ProbeData(
        feats["train"], feats["test"], feats["val"], n_classes=13, classes=feats["train"].classes
    )
    per_task = {}
    for name in TASKS:
        task = load_task(name)
        t1 = time.perf_counter()
        # on the device the features were extracted on, as the runner passes it
        result = get_protocol(task.protocol)(data, dict(task.params), 0, RunOptions(device="cpu"))
        per_task[name] = {
            "seconds": time.perf_counter() - t1,
            "primary": next(m.value for m in result.metrics if m.name == task.primary),
        }
    t_protocols = sum(v["seconds"] for v in per_task.values())
    ratio = (t_extract + t_protocols) / t_extract
    print(
        f"| {args.backbone} | {sum(f.n for f in feats.values())} | {t_extract:.1f} s | {t_protocols:.1f} s | "
        f"{ratio:.2f}x | <= 1.3x |"
    )
    for name, v in per_task.items():
        print(f"  {name}: {v['seconds']:.2f} s, primary {v['primary']:.4f}")
    path = save(
        "amortise",
        {
            "benchmark": "P3 amortisation",
            "backbone": args.backbone,
            "image_size": image_size or 224,
            "extract_s": t_extract,
            "protocols_s": t_protocols,
            "per_task": per_task,
            "ratio": ratio,
        },
        quick=args.quick,
    )
    print(f"wrote {path}")
    return {"ratio": ratio}


if __name__ == "__main__":
    main()
