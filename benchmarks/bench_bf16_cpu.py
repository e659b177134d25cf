"""CPU bf16 extraction (``--precision bf16``, opt-in on the CPU): how close its embeddings are to fp32, and how fast.

For each backbone, patches13's val split (156 real-photo crops) at the card's input size is extracted twice
through bobench's feature store, fp32 and bf16 autocast, batch 32, on the CPU. Reported: the cosine between
each image's bf16 and fp32 embeddings (min and median), and both wall times with their ratio. Whether bf16 is
faster depends on the CPU: with AVX512-BF16 or AMX, oneDNN runs bf16 matmuls and convolutions natively; with
AVX2 only it converts, and bf16 is slower than fp32. ``cpu_flags`` in the JSON says which this machine has.

    python -m benchmarks.bench_bf16_cpu [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from benchmarks.common import save
from bobench import create_backbone, load_dataset
from bobench.features import ExtractOptions, FeatureStore

MODELS = [
    "mobilenetv2_100.tv_in1k",
    "tf_efficientnet_lite0.in1k",
    "random/timm:vit_tiny_patch16_224",
    "random/timm:resnet50",
]


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="first model, 64 px")
    args = ap.parse_args(argv)
    ds = load_dataset("patches13", split="val")
    rows = []
    for name in MODELS[:1] if args.quick else MODELS:
        bb = create_backbone(name)
        out, secs = {}, {}
        for precision in ("fp32", "bf16", "fp32", "bf16"):  # the second of each is timed (warm)
            opts = ExtractOptions(
                device="cpu", precision=precision, batch_size=32, num_workers=1, progress=False,
                image_size=64 if args.quick else None,
            )  # fmt: skip
            t0 = time.perf_counter()
            fs = FeatureStore(tempfile.mkdtemp(prefix="bench-bf16-")).get_or_extract(bb, ds, opts)
            secs[precision] = time.perf_counter() - t0
            out[precision] = fs.load()[0].astype(np.float64)
        a, b = out["fp32"], out["bf16"]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        row = {
            "model": name, "n": len(cos), "cos_min": float(cos.min()), "cos_median": float(np.median(cos)),
            "fp32_s": secs["fp32"], "bf16_s": secs["bf16"], "speedup": secs["fp32"] / secs["bf16"],
        }  # fmt: skip
        rows.append(row)
        print(f"| {name} | cos min {row['cos_min']:.5f} median {row['cos_median']:.5f} | fp32 {row['fp32_s']:.1f} s "
              f"| bf16 {row['bf16_s']:.1f} s | {row['speedup']:.2f}x |", flush=True)  # fmt: skip
    payload = {"benchmark": "CPU bf16 extraction", "cpu_flags": cpu_flags(), "rows": rows}
    print(f"wrote {save('bf16_cpu', payload, quick=args.quick)}")
    return payload


if __name__ == "__main__":
    main()
