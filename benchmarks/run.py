"""``make bench``: run every benchmark in turn (P1 extraction, P2 linear, P3 amortisation, P4 kNN, P6 reuse, P7 training,
P8 detection, P9 segmentation, P10 cache hit, P11 input cache, P12 CPU bf16; P5 needs a GPU).

Each writes ``benchmarks/results/<name>.json``; BENCHMARKS.md quotes them. Pass ``--quick`` for a
smoke run. Run on an otherwise idle machine: the numbers are ratios measured side by side, but a
busy core still adds noise.
"""

from __future__ import annotations

import importlib
import sys

BENCHES = [
    "bench_extract",
    "bench_linear",
    "bench_amortise",
    "bench_knn",
    "bench_reuse",
    "bench_train",
    "bench_detection",
    "bench_segmentation",
    "bench_cache_hit",
    "bench_input_cache",
    "bench_bf16_cpu",
]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    for name in BENCHES:
        print(f"\n## {name}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main(args)


if __name__ == "__main__":
    main()
