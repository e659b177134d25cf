"""``make bench``: run every benchmark in turn (P1 extraction, P2 linear, P3 amortisation, P4 kNN, P6 reuse, P7 training,
P8 detection, P9 segmentation, P10 cache hit, P11 input cache, P12 CPU bf16; P5 needs a GPU).

Each writes ``benchmarks/results/<name>.json``; BENCHMARKS.md quotes them. Pass ``--quick`` for a
smoke run. Run on an otherwise idle machine: the numbers are ratios measured side by side, but a
busy core still adds noise.
"""

from __future__ import annotations

import importlib
import sys

# (module, extra arguments): P2 runs twice, at 100 classes and at the few-class shape
BENCHES: list[tuple[str, list[str]] | str] = [
    "bench_extract",
    "bench_linear",
    ("bench_linear", ["--shape", "3000,1280,10"]),
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
    for entry in BENCHES:
        name, extra = (entry, []) if isinstance(entry, str) else entry
        print(f"\n## {' '.join([name, *extra])}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main([*args, *extra])


if __name__ == "__main__":
    main()
