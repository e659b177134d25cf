"""Few-shot evaluation: the linear probe and kNN trained on n labelled images per class.

For each shot count n (default 1, 5, 10, 25) and each of ``n_seeds`` draws (seeds ``seed, seed + 1,
...``), exactly n train rows of every class are drawn without replacement, by a numpy Generator seeded
from ``(draw seed, n)``: the same (seed, n) always gives the same subset, whatever the other shot
counts. On each subset:

* linear probe (:func:`bobench.protocols.linear.run`): C is chosen on the **full** val split, as is
  common in few-shot probing (val labels are not counted as shots). Without val, k-fold on 1-shot is
  impossible, so the probe is fitted once at ``fixed_C`` (:func:`bobench.protocols.linear.fit_path`).
* kNN (:func:`bobench.protocols.knn.run`): ks = (1, 20), each clipped by kNN to the subset size n * C;
  the score is kNN's headline ``top1`` (weighted vote at k = min(20, n * C)).

Both score the full test split. A shot count that some class cannot fill (fewer than n train rows) is
**skipped**: its metrics are absent and ``info["skipped"]`` names each short class and its count (an
absent cell, which analysis handles, rather than a whole failed task); if every shot count is skipped,
:class:`TooFewSamplesError` is raised.

Metrics: ``fewshot_{linear,knn}_top1@{n}shot``, the mean top-1 over draws (higher is better), and
``fewshot_{linear,knn}_top1@{n}shot:std``, their sample standard deviation (ddof=1; 0 for one draw),
recorded with higher_is_better=False only because a smaller spread is preferable: it describes the
mean's reliability, and analysis must never rank backbones on a ``:std`` metric.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bobench.metrics import Metric, top1
from bobench.options import RunOptions
from bobench.protocols import knn, linear
from bobench.protocols.base import (
    ArrayFeatures,
    Features,
    ProbeData,
    ProtocolResult,
    check_param_keys,
    is_int,
    is_positive_number,
    run_device,
)

DEFAULT_PARAMS: dict[str, Any] = {
    "shots": (1, 5, 10, 25),
    "n_seeds": 3,
    "linear": {},  # linear-probe params, passed through (see linear.DEFAULTS)
    "knn": {"ks": (1, 20)},  # kNN params, passed through (merged over this default)
    "fixed_C": 1.0,  # the probe's C when there is no val split to choose it on
}
_GRID_KEYS = ("Cs", "C_min", "C_max", "num_C", "kfold")  # meaningless with a fixed C


class TooFewSamplesError(ValueError):
    """Some class has fewer train rows than the shot count asks for.

    Attributes:
        shot: the shot count. short: ``{class id: train rows}`` of every class below it.
    """

    def __init__(self, shot: int, short: Mapping[int, int], classes: Sequence[str] = ()) -> None:
        self.shot, self.short = shot, dict(short)
        named = ", ".join(
            f"{classes[c] if c < len(classes) else c!r} (id {c}): {n}" for c, n in self.short.items()
        )
        super().__init__(f"{shot}-shot needs {shot} train samples per class; too few in {named}")


def sample_subset(labels: np.ndarray, shot: int, seed: int, n_classes: int) -> np.ndarray:
    """Indices of exactly ``shot`` rows of every class ``0..n_classes-1``, drawn without replacement.

    Args:
        labels: ``[N]`` train labels.
        shot: rows per class (>= 1).
        seed: draw seed (>= 0); the Generator is seeded with ``(seed, shot)``.
        n_classes: the classes that must each get ``shot`` rows.

    Returns:
        ``[shot * n_classes]`` int64 row indices, ascending.

    Raises:
        TooFewSamplesError: a class has fewer than ``shot`` rows (all such classes are named).

    Example:
        >>> sample_subset(np.repeat(np.arange(3), 10), shot=2, seed=0, n_classes=3).shape
        (6,)
    """
    if seed < 0 or shot < 1:
        raise ValueError(f"seed must be >= 0 and shot >= 1, got seed={seed}, shot={shot}")
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=n_classes)[:n_classes]
    short = {c: int(counts[c]) for c in range(n_classes) if counts[c] < shot}
    if short:
        raise TooFewSamplesError(shot, short)
    rng = np.random.default_rng([seed, shot])
    # Classes in id order, each from its rows in index order: the draw depends only on (seed, shot).
    picks = [rng.choice(np.flatnonzero(labels == c), size=shot, replace=False) for c in range(n_classes)]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def subset_hash(index: np.ndarray) -> str:
    """First 16 hex digits of the sha256 of the int64 row indices: identifies a drawn subset."""
    return hashlib.sha256(np.ascontiguousarray(index, dtype=np.int64).tobytes()).hexdigest()[:16]


def run(
    data: ProbeData, params: Mapping[str, Any], seed: int, options: RunOptions | None = None
) -> ProtocolResult:
    """Few-shot linear probe and kNN, mean and spread over ``n_seeds`` draws per shot count.

    Args:
        data: train (the pool the shots are drawn from), test (scored in full), optional val (used
            whole to choose the probe's C).
        params: any of ``shots``, ``n_seeds``, ``linear`` (dict for :func:`linear.run`), ``knn`` (dict
            for :func:`knn.run`, merged over ``{"ks": (1, 20)}``), ``fixed_C`` (C without val).
        seed: first draw seed (>= 0); draws use ``seed .. seed + n_seeds - 1``, also passed to the
            protocols.
        options: run options, passed to both protocols (None: each keeps its own default device).

    Returns:
        Metrics as in the module docstring (never rank on ``:std``); no per-sample predictions; info
        with ``seeds``, ``per_seed`` ({method: {shot: [top1 per draw]}}), ``subsets`` ({shot: [hash per
        draw]}), ``linear_C`` ({shot: [chosen C per draw]}), ``C_selection`` and ``skipped``.

    Raises:
        ValueError: an unknown or invalid parameter (named), a negative seed.
        TooFewSamplesError: no shot count can be drawn.
    """
    p = resolve_params(params)
    if seed < 0:
        raise ValueError(f"few-shot seed must be >= 0, got {seed}")
    t0 = time.perf_counter()
    labels = np.asarray(data.train.labels, dtype=np.int64)
    seeds = [seed + i for i in range(p["n_seeds"])]
    subsets: dict[int, list[np.ndarray]] = {}
    skipped: dict[str, TooFewSamplesError] = {}
    for shot in p["shots"]:
        try:
            subsets[shot] = [sample_subset(labels, shot, s, data.n_classes) for s in seeds]
        except TooFewSamplesError as exc:
            skipped[str(shot)] = TooFewSamplesError(shot, exc.short, data.classes)  # with class names
    if not subsets:
        raise skipped[str(min(p["shots"]))]

    # One pass over the (possibly memory-mapped) train split for every row any draw needs.
    pool_index = np.unique(np.concatenate([i for draws in subsets.values() for i in draws]))
    pool = _gather(data.train, pool_index)
    per_seed: dict[str, dict[str, list[float]]] = {"linear": {}, "knn": {}}
    chosen_C: dict[str, list[float]] = {}
    metrics: list[Metric] = []
    for shot, draws in subsets.items():
        for s, index in zip(seeds, draws, strict=True):
            train = pool.subset(np.searchsorted(pool_index, index))
            lin_top1, C = _linear_top1(data, train, p, s, options)
            sub = ProbeData(train, data.test, None, data.n_classes, data.classes)
            knn_top1 = _metric(knn.run(sub, p["knn"], s, options).metrics, "top1")
            per_seed["linear"].setdefault(str(shot), []).append(lin_top1)
            per_seed["knn"].setdefault(str(shot), []).append(knn_top1)
            chosen_C.setdefault(str(shot), []).append(C)
        for method in ("linear", "knn"):
            values = np.asarray(per_seed[method][str(shot)])
            name = f"fewshot_{method}_top1@{shot}shot"
            metrics.append(Metric(name, float(values.mean()), True))
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            metrics.append(Metric(f"{name}:std", std, False))  # a spread: never rank on it
    info = {
        "seeds": seeds,
        "shots": list(subsets),
        "per_seed": per_seed,
        "subsets": {str(shot): [subset_hash(i) for i in draws] for shot, draws in subsets.items()},
        "linear_C": chosen_C,
        "C_selection": "val" if data.val is not None else "fixed_C",
        "skipped": {shot: str(exc) for shot, exc in skipped.items()},
        "n_train_pool": data.train.n,
        "n_test": data.test.n,
        "wall_time_s": time.perf_counter() - t0,
    }
    return ProtocolResult(metrics, None, info)


# -- internals ----------------------------------------------------------------------------------------


def resolve_params(params: Mapping[str, Any]) -> dict[str, Any]:
    check_param_keys(params, list(DEFAULT_PARAMS), "few-shot")
    p = {**DEFAULT_PARAMS, **params}
    shots = p["shots"]
    if isinstance(shots, int) or not shots or not all(is_int(n) and n >= 1 for n in shots):
        raise ValueError(f"few-shot parameter 'shots' must be a non-empty list of ints >= 1, got {shots!r}")
    if not is_int(p["n_seeds"]) or p["n_seeds"] < 1:
        raise ValueError(f"few-shot parameter 'n_seeds' must be an int >= 1, got {p['n_seeds']!r}")
    for key in ("linear", "knn"):
        if not isinstance(p[key], Mapping):
            raise ValueError(f"few-shot parameter {key!r} must be a mapping of params, got {p[key]!r}")
    C = p["fixed_C"]
    if not is_positive_number(C):
        raise ValueError(f"few-shot parameter 'fixed_C' must be a positive number, got {C!r}")
    p["shots"] = tuple(sorted({int(n) for n in shots}))
    p["knn"] = {**DEFAULT_PARAMS["knn"], **p["knn"]}
    p["linear"] = dict(p["linear"])
    knn.resolve_params(p["knn"])  # fail before any fit, naming the bad key
    linear.resolve_params(p["linear"])
    return p


def _gather(features: Features, index: np.ndarray) -> ArrayFeatures:
    """Rows ``index`` (ascending) of ``features``, read shard by shard (only those rows of a memmap)."""
    xs, ys, start = [], [], 0
    for X, y in features.iter_shards():
        lo, hi = np.searchsorted(index, [start, start + len(y)])
        local = index[lo:hi] - start
        if len(local):
            xs.append(np.asarray(X[local], dtype=np.float32))
            ys.append(np.asarray(y[local], dtype=np.int64))
        start += len(y)
    X_all = np.concatenate(xs) if xs else np.zeros((0, features.dim), np.float32)
    y_all = np.concatenate(ys) if ys else np.zeros(0, np.int64)
    return ArrayFeatures(X_all, y_all)


def _linear_top1(
    data: ProbeData, train: ArrayFeatures, p: Mapping[str, Any], seed: int, options: RunOptions | None
) -> tuple[float, float]:
    """Test top-1 of the probe on one few-shot subset, and its C."""
    if data.val is not None:
        sub = ProbeData(train, data.test, data.val, data.n_classes, data.classes)
        res = linear.run(sub, p["linear"], seed, options)
        return _metric(res.metrics, "top1"), float(res.info["C"])
    # No val: one fit at fixed_C (the probe's k-fold selection cannot work on 1 sample per class).
    lp = {k: v for k, v in p["linear"].items() if k not in _GRID_KEYS}
    lp = linear.resolve_params({**lp, "Cs": [p["fixed_C"]]})
    device = run_device(options, "cpu", linear.SOLVER_NAME)  # as linear.run chooses it
    kw = {"device": device, "batch_size": lp["batch_size"], "memory_budget_gb": lp["memory_budget_gb"]}
    (model,) = linear.fit_path(train, lp["Cs"], data.n_classes, max_iter=lp["max_iter"], tol=lp["tol"], **kw)
    probs = linear.predict_proba(model, data.test, **kw)
    return top1(probs, np.asarray(data.test.labels)), float(p["fixed_C"])


def _metric(metrics: Sequence[Metric], name: str) -> float:
    return next(m.value for m in metrics if m.name == name)
