"""P2: bobench's linear probe (a whole C path in one call) against scikit-learn fitted once per C.

Same data for both: synthetic features shaped like pooled CNN features of 100 classes (class means on a
64-dim subspace of 1,280, isotropic noise, then uneven per-dimension scales and offsets as raw features
have), 10,000 train, 2,000 val, 2,000 test rows; both standardise with the train statistics
(:func:`bobench.protocols.linear.standardization`, timed on both sides), fit the same 10 values of C
(:func:`~bobench.protocols.linear.default_Cs`), choose C by val top-1 (ties: smaller C) and score test
at the chosen C.

* bobench: ``linear.run`` with its defaults (CPU, float32 features, ``tol=1e-7`` on the relative decrease
  of the objective per quasi-Newton step, two such small steps in a row to stop).
* scikit-learn: ``LogisticRegression(C=C, solver="lbfgs")`` per C, three ways:

  - on the same float32 array at ``tol=1e-8`` ("float32"; ``max_iter=1000``): the baseline the target was
    first set against. Its ``tol`` does not decide where the fits stop: tol 1e-8, 1e-9 and 1e-10 gave the
    same iterations and the same solutions on P2 (BENCHMARKS.md): float32 precision stops them, and its
    worst objective gap was 260 times bobench's (6.5e-5 against 2.5e-7);
  - on the float32 array at its default ``tol=1e-4`` ("default"), which stops weakly regularised fits early
    (gaps of percents at C=100);
  - on the float64 standardised array at ``tol=1e-8`` ("float64"; ``max_iter=10000``), which does converge
    with its tol: the baseline for matched convergence, its worst objective gap still above bobench's on P2.

  The benchmark reports each side's objective gap to the best solution any of them found, per C.

Speed-up = sklearn wall time / bobench wall time, against each baseline; target >= 10x at matched
convergence, i.e. against a baseline whose worst objective gap is no smaller than bobench's
(``met_matched_convergence``; ``met`` keeps the first definition, against the float32 baseline).
Accuracy target: bobench's test top-1 within 0.5 points of sklearn's. Times are the best of ``--repeats``
runs.

    python -m benchmarks.bench_linear [--quick] [--shape N_TRAIN,DIM,CLASSES]

``--shape 3000,1280,10`` is the few-class point (the shape of the demo's mnist5k probe, 1,000 val/test
rows), where the gradient product's orientation decides the speed (BENCHMARKS.md P2).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
import torch
from scipy.special import log_softmax
from sklearn.linear_model import LogisticRegression

from benchmarks.common import best_of, save
from bobench.protocols import linear
from bobench.protocols.base import ArrayFeatures, ProbeData
from bobench.provenance import device_info

TARGET_SPEEDUP = 10.0
TARGET_POINTS = 0.5
# name: (tol, float64 input, max_iter)
SKLEARN_RUNS = {
    "float32": (1e-8, False, 1000),
    "default": (1e-4, False, 1000),
    "float64": (1e-8, True, 10_000),
}


def make_data(n_train: int, n_eval: int, dim: int, n_classes: int, seed: int = 0) -> ProbeData:
    """Train/val/test features of one class-conditional distribution (float32, not standardised)."""
    rng = np.random.default_rng(seed)
    rank = min(64, dim)
    basis = np.linalg.qr(rng.normal(size=(dim, rank)))[0].T  # [rank, dim], orthonormal rows
    centres = rng.normal(size=(n_classes, rank)) @ basis
    scales, offsets = rng.lognormal(0.0, 1.0, dim), rng.normal(size=dim) * 2

    def draw(n: int) -> ArrayFeatures:
        y = rng.integers(0, n_classes, n)
        x = centres[y] + rng.normal(size=(n, dim)) * 1.8  # noise level: best top-1 ~ 0.75, not 1.0
        return ArrayFeatures((x * scales + offsets).astype(np.float32), y)

    return ProbeData(draw(n_train), draw(n_eval), draw(n_eval), n_classes)


def run_sklearn(
    data: ProbeData, Cs: np.ndarray, tol: float, float64: bool = False, max_iter: int = 1000
) -> dict[str, Any]:
    """The per-C baseline: standardise (float32 features, or float64 with ``float64``), fit and score val
    for each C, then score test at the chosen C."""
    mean, scale = linear.standardization(data.train)
    dtype = np.float64 if float64 else np.float32
    z = ((data.train.X - mean) / scale).astype(dtype)
    zv = ((data.val.X - mean) / scale).astype(dtype)
    fits = [LogisticRegression(C=C, tol=tol, max_iter=max_iter).fit(z, data.train.y) for C in Cs]
    val_top1 = [float(f.score(zv, data.val.y)) for f in fits]
    best = linear.select(val_top1)
    zt = ((data.test.X - mean) / scale).astype(dtype)
    return {
        "fits": fits,
        "val_top1": val_top1,
        "best": best,
        "test_top1": float(fits[best].score(zt, data.test.y)),
    }


def objective(data: ProbeData, W: np.ndarray, b: np.ndarray, C: float) -> float:
    """The shared objective in float64: mean log-loss + ||W||^2 / (2 C N)."""
    mean, scale = linear.standardization(data.train)
    z = (data.train.X - mean) / scale
    logp = log_softmax(z @ W.T.astype(np.float64) + b, axis=1)
    n = data.train.n
    return float(-logp[np.arange(n), data.train.y].mean() + (W.astype(np.float64) ** 2).sum() / (2 * C * n))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2,000 x 256 train, 20 classes, 500 val/test")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per side (default 2, quick 1)")
    ap.add_argument("--shape", default=None, help="N_TRAIN,DIM,CLASSES instead (val/test: N_TRAIN / 3 rows)")
    args = ap.parse_args(argv)
    n_train, n_eval, dim, n_classes = (2000, 500, 256, 20) if args.quick else (10_000, 2000, 1280, 100)
    if args.shape:
        try:
            n_train, dim, n_classes = (int(v) for v in args.shape.split(","))
        except ValueError:
            ap.error(
                f"--shape takes three integers N_TRAIN,DIM,CLASSES (e.g. 3000,1280,10), got {args.shape!r}"
            )
        n_eval = n_train // 3
    repeats = args.repeats or (1 if args.quick else 2)
    data = make_data(n_train, n_eval, dim, n_classes)
    Cs = linear.default_Cs()
    load_before = os.getloadavg()[0]  # other processes on the cores: the main source of noise here

    ours = linear.run(data, {}, seed=0)  # untimed warm-up (first-call kernel set-up), and the result
    t_ours = best_of(lambda: linear.run(data, {}, seed=0), repeats)
    t_sk, sk = {}, {}
    for name, spec in SKLEARN_RUNS.items():
        t0 = time.perf_counter()
        sk[name] = run_sklearn(data, Cs, *spec)
        times = [time.perf_counter() - t0]
        times += [best_of(lambda spec=spec: run_sklearn(data, Cs, *spec), 1) for _ in range(repeats - 1)]
        t_sk[name] = min(times)

    # Convergence of each side, per C: objective gap to the best solution any run found.
    models = linear.fit_path(data.train, Cs, n_classes)
    f_ours = [objective(data, m.weight, m.bias, m.C) for m in models]
    f_sk = {
        k: [objective(data, f.coef_, f.intercept_, C) for f, C in zip(v["fits"], Cs, strict=True)]
        for k, v in sk.items()
    }
    f_best = np.minimum.reduce([f_ours, *f_sk.values()])
    rel_gap = lambda f: ((np.asarray(f) - f_best) / f_best).tolist()  # noqa: E731

    top1_ours = {m.name: m.value for m in ours.metrics}["top1"]
    speedup = {name: t / t_ours for name, t in t_sk.items()}
    points = {name: 100 * (top1_ours - v["test_top1"]) for name, v in sk.items()}
    worst = {"bobench": max(rel_gap(f_ours)), **{name: max(rel_gap(f)) for name, f in f_sk.items()}}
    # matched convergence: a baseline that stopped no closer to the optimum than bobench did
    matched = worst["float64"] >= worst["bobench"]
    print(
        f"\nlinear probe, {n_train:,} x {dim} train, {n_classes} classes, {n_eval:,} val/test, {len(Cs)} values "
        f"of C; {device_info('cpu')}, torch threads {torch.get_num_threads()}, "
        f"1-min load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print("| run | seconds | speed-up | worst objective gap | test top-1 |")
    print("|---|---|---|---|---|")
    print(f"| bobench path | {t_ours:.2f} | 1x | {worst['bobench']:.1e} | {top1_ours:.4f} |")
    for name, (tol, float64, _) in SKLEARN_RUNS.items():
        label = f"sklearn {'float64' if float64 else 'float32'} tol={tol:g}"
        print(
            f"| {label} | {t_sk[name]:.1f} | {speedup[name]:.1f}x | {worst[name]:.1e} | "
            f"{sk[name]['test_top1']:.4f} |"
        )
    payload = {
        "benchmark": "P2 linear probe",
        "quick": args.quick,
        "shape": args.shape,
        "repeats": repeats,
        "device": device_info("cpu"),
        "torch_threads": torch.get_num_threads(),
        "n_train": n_train,
        "n_val": n_eval,
        "n_test": n_eval,
        "dim": dim,
        "n_classes": n_classes,
        "Cs": Cs.tolist(),
        "bobench": {
            "seconds": t_ours,
            "C": ours.info["C"],
            "test_top1": top1_ours,
            "val_top1": ours.info["val_top1"],
            "n_iter_path": ours.info["n_iter_path"],
            "objective_rel_gap": rel_gap(f_ours),
        },
        "sklearn": {
            name: {
                "tol": SKLEARN_RUNS[name][0],
                "float64_input": SKLEARN_RUNS[name][1],
                "max_iter": SKLEARN_RUNS[name][2],
                "seconds": t_sk[name],
                "C": float(Cs[v["best"]]),
                "test_top1": v["test_top1"],
                "val_top1": v["val_top1"],
                "n_iter_path": [int(f.n_iter_[0]) for f in v["fits"]],
                "objective_rel_gap": rel_gap(f_sk[name]),
            }
            for name, v in sk.items()
        },
        "speedup": speedup,
        "top1_points": points,
        "worst_objective_rel_gap": worst,
        "float64_no_closer_than_bobench": matched,
        "target_speedup": TARGET_SPEEDUP,
        "target_points": TARGET_POINTS,
        # the first definition: against sklearn on float32 features at tol 1e-8
        "met": bool(speedup["float32"] >= TARGET_SPEEDUP and abs(points["float32"]) <= TARGET_POINTS),
        "met_matched_convergence": bool(
            matched and speedup["float64"] >= TARGET_SPEEDUP and abs(points["float64"]) <= TARGET_POINTS
        ),
        "load_avg_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }
    path = save(
        "linear" if not args.shape else "linear-" + args.shape.replace(",", "x"), payload, quick=args.quick
    )
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
