"""Cosine k-nearest-neighbour classification on frozen features, many k and two votes in one pass.

Features are L2-normalised, so the dot product is the cosine similarity. One pass over the gallery (the
train split) keeps, for every query, its ``max(ks)`` most similar gallery rows; every k then reads a
prefix of that list, and both votes are scored from it:

* ``uniform``: majority vote of the k labels. Identical to scikit-learn's
  ``KNeighborsClassifier(algorithm="brute", metric="cosine", weights="uniform")``: class ties go to the
  smallest label (``scipy.stats.mode`` there, first ``argmax`` here).
* ``weighted`` (DINO's ``knn_classifier``): neighbour j adds ``exp(sim_j / T)`` to its class, T = 0.07;
  the class with the largest sum wins (ties: smallest label).

Neighbour order is total and deterministic: by similarity, descending, then by gallery index,
ascending. scikit-learn picks among *exactly* equal distances with ``np.argpartition``, whose choice is
unspecified, so the two agree whenever no exact tie between different labels straddles the k-th place
(duplicated gallery vectors with one label, and class-count ties, give identical predictions). Both
compute float32 similarities with their own matmul, so values within an ulp may still rank apart; and
a matmul's rounding depends on block shapes, so different ``block_size``s can reorder such near-ties
(exact duplicates included) without changing any prediction unless their labels differ.

Memory stays bounded on large galleries (1.28M ImageNet train rows): the gallery is streamed once,
shard by shard (memory-mapped for a :class:`~bobench.features.FeatureSet`) in pieces sized by
``memory_budget_gb``; for each piece and each block of ``block_size`` queries the block's top-k is
merged into the running top-k (:mod:`bobench.protocols.knn_search`). Queries (test, plus val when
given) and the running ``[Q, max(ks)]`` lists are held in memory.

Device: :func:`run` computes on ``options.device`` (:class:`bobench.options.RunOptions`,
``--device``), never a parameter; ``auto`` when it gets no options. The vote accumulates in float64,
which MPS lacks: ``mps`` is refused, and ``auto`` takes the CPU where it would pick MPS.

Example:
    >>> out = knn_predict(train_X, train_y, test_X, ks=(1, 20))   # [5000, 384], [5000], [1000, 384]
    >>> out.pred["k=20"].shape, out.pred["k=1:uniform"].shape, out.neighbors.shape
    ((1000,), (1000,), (1000, 20))
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bobench.calibration import vote_calibration
from bobench.metrics import Metric, balanced_acc_of_predictions
from bobench.options import RunOptions
from bobench.protocols.base import (
    Features,
    ProbeData,
    ProtocolResult,
    check_param_keys,
    compute_device,
    is_int,
    is_positive_number,
    run_device,
)
from bobench.protocols.knn_search import search, unit_rows

__all__ = ["DEFAULT_KS", "DEFAULT_PARAMS", "HEADLINE_K", "KnnPredictions", "knn_predict"]
__all__ += ["VOTE_NAME", "resolve_params", "run", "setting_name"]

DEFAULT_KS = (1, 10, 20, 50, 100, 200)
#: DINO reports the weighted vote at k = 20 (T = 0.07); that is our headline ``top1``.
HEADLINE_K = 20
VOTE_NAME = "kNN vote"  # names the float64 vote in compute_device's MPS error
DEFAULT_PARAMS: dict[str, Any] = {
    "ks": DEFAULT_KS,
    "temperature": 0.07,
    "block_size": 4096,  # queries per similarity block
    "memory_budget_gb": 1.0,  # gallery piece + similarity block; queries and top-k lists come on top
}


def setting_name(k: int, vote: str) -> str:
    """``"k=20"`` for the weighted vote, ``"k=20:uniform"`` for the majority vote."""
    return f"k={k}" if vote == "weighted" else f"k={k}:{vote}"


@dataclass
class KnnPredictions:
    """What :func:`knn_predict` returns (numpy arrays, queries in input order).

    Attributes:
        ks: the k values scored, ascending, clipped to the gallery size.
        neighbors: ``[Q, max(ks)]`` gallery row indices, ordered by (similarity desc, index asc).
        similarities: ``[Q, max(ks)]`` their cosine similarities.
        pred, confidence: per setting name (:func:`setting_name`) ``[Q]`` predicted class and its share
            of the vote (weighted: its share of the summed weights; uniform: its count / k).
        top5: for the weighted vote at ``headline_k`` only, ``[Q, 5]`` classes by score (ties: smaller
            label first); slots beyond the classes that got any vote are -1.
        probs: for the weighted vote at ``headline_k`` only, ``[Q, C]`` float32 class probabilities: each
            class's share of the summed ``exp(sim / T)`` weights (0 for classes without a vote).
        boundary_ties: query-block rows whose k-th place was an exact tie (resolved by gallery index).
    """

    ks: tuple[int, ...]
    neighbors: np.ndarray
    similarities: np.ndarray
    pred: dict[str, np.ndarray] = field(default_factory=dict)
    confidence: dict[str, np.ndarray] = field(default_factory=dict)
    top5: dict[str, np.ndarray] = field(default_factory=dict)
    boundary_ties: int = 0
    probs: dict[str, np.ndarray] = field(default_factory=dict)


def knn_predict(
    train_X: np.ndarray | Features,
    train_y: np.ndarray | None,
    test_X: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    n_classes: int | None = None,
    temperature: float = 0.07,
    headline_k: int | None = HEADLINE_K,
    block_size: int = 4096,
    gallery_block_size: int | None = None,
    memory_budget_gb: float = 1.0,
    device: str | torch.device = "cpu",
) -> KnnPredictions:
    """Cosine kNN predictions for every k in ``ks`` and both votes, in one pass over the gallery.

    Args:
        train_X: gallery features ``[N, D]``, or a :class:`Features` streamed with ``iter_shards()``
            (then ``train_y`` must be None: labels come with the shards).
        train_y: ``[N]`` integer labels >= 0 for an array gallery.
        test_X: ``[Q, D]`` query features.
        ks: neighbour counts; clipped to N and deduplicated.
        n_classes: number of classes (default: largest gallery label + 1).
        temperature: T of the weighted vote ``exp(sim / T)``; > 0.
        headline_k: the weighted-vote k that also gets ``top5`` (clipped to N and added to ``ks``);
            None: no top-5.
        block_size: queries per similarity block.
        gallery_block_size: gallery rows per piece; None derives it from ``memory_budget_gb``.
        memory_budget_gb: bound on one gallery piece plus its similarity block.
        device: where the similarities and votes are computed (a device name as for ``--device``:
            ``"auto"`` picks CUDA when present; MPS lacks the vote's float64).

    Returns:
        :class:`KnnPredictions`.

    Raises:
        ValueError: empty gallery, mismatched dims or lengths, non-finite features, negative labels,
            bad ``ks``/``temperature``/block sizes.
    """
    dev = compute_device(device, VOTE_NAME)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if block_size < 1 or (gallery_block_size is not None and gallery_block_size < 1):
        raise ValueError(f"block sizes must be >= 1, got {block_size} and {gallery_block_size}")
    test_X = np.asarray(test_X)
    if isinstance(train_X, np.ndarray):
        if train_y is None or len(train_y) != len(train_X) or train_X.ndim != 2:
            raise ValueError("an array gallery needs train_X [N, D] and train_y [N] of equal length")
        n_gallery, dim = train_X.shape
    else:
        if train_y is not None:
            raise ValueError("train_y must be None when train_X is a Features object (labels are in it)")
        n_gallery, dim = train_X.n, train_X.dim
    if n_gallery == 0:
        raise ValueError("kNN needs a non-empty gallery (train split)")
    if test_X.ndim != 2 or test_X.shape[1] != dim:
        raise ValueError(f"test_X must be [Q, {dim}] like the gallery, got {test_X.shape}")
    ks_c = _clip_ks(ks, n_gallery, headline_k)
    head = None if headline_k is None else min(headline_k, n_gallery)
    kmax = ks_c[-1]
    if gallery_block_size is None:
        # per gallery row: raw + normalised copy (8 B/dim), a float32 similarity per query and topk's
        # workspace (8 B/query)
        gallery_block_size = max(1, int(memory_budget_gb * 2**30) // (8 * dim + 8 * block_size))

    queries = unit_rows(test_X, "test_X", dev)
    n_q = len(queries)
    hits = search(
        train_X,
        train_y,
        queries,
        kmax,
        block_size=block_size,
        piece_rows=gallery_block_size,
        device=dev,
        what="train_X",
    )
    vals, idx, gallery_y = hits.similarities, hits.indices, hits.gallery_labels
    if gallery_y.min() < 0:
        raise ValueError(f"labels must be >= 0, got {gallery_y.min()}")
    n_classes = max(int(n_classes or 0), int(gallery_y.max()) + 1)

    nb_labels = torch.from_numpy(gallery_y).to(dev)[idx]
    parts: dict[str, dict[str, list[np.ndarray]]] = {"pred": {}, "confidence": {}, "top5": {}, "probs": {}}
    for s in range(0, n_q, block_size):
        block = _vote(
            vals[s : s + block_size], nb_labels[s : s + block_size], ks_c, n_classes, temperature, head
        )
        for kind, by_setting in block.items():
            for name, arr in by_setting.items():
                parts[kind].setdefault(name, []).append(arr)
    whole = {kind: {name: np.concatenate(a) for name, a in d.items()} for kind, d in parts.items()}
    return KnnPredictions(
        ks_c,
        idx.cpu().numpy(),
        vals.cpu().numpy(),
        whole["pred"],
        whole["confidence"],
        whole["top5"],
        hits.boundary_ties,
        whole["probs"],
    )


def run(
    data: ProbeData, params: Mapping[str, Any], seed: int, options: RunOptions | None = None
) -> ProtocolResult:
    """The kNN protocol: gallery = train, scored on test for every k and both votes.

    kNN has nothing to tune, so nothing is chosen on val: when ``data.val`` is given, its top-1 for
    every setting is only recorded in ``info["val_top1"]`` (val and test queries share the one pass).

    Args:
        data: train (gallery), test, optional val.
        params: any of ``ks``, ``temperature``, ``block_size``, ``memory_budget_gb`` (defaults in
            :data:`DEFAULT_PARAMS`).
        seed: unused (kNN is deterministic); accepted for the protocol contract.
        options: run options; computes on ``options.device`` (None: ``auto``).

    Returns:
        Metrics, all ``higher_is_better``: ``top1`` (weighted vote, k = 20 clipped to the gallery size;
        DINO's setting), ``top5`` (same setting; only when k >= 5 and there are more than 5 classes; a
        class with no vote never counts as a hit), ``balanced_acc`` (same setting; mean recall over
        the classes present in test), and ``top1@k={k}`` (weighted) and ``top1@k={k}:uniform`` for
        every k; calibration of the headline vote's probabilities (lower is better): ``ece``,
        ``ece_em``, ``nll`` and, with a val split, ``ece_ts``, ``ece_em_ts``, ``nll_ts`` under a
        temperature fitted on val (see :func:`bobench.calibration.vote_calibration`). Predictions for
        every setting, with a ``setting`` column. ``info`` records the ``device`` used.

    Raises:
        ValueError: an unknown or invalid parameter (named; ``device`` is a run option), an empty
            split, or a device that cannot run it (no CUDA GPU; MPS).
    """
    del seed
    p = resolve_params(params)
    dev = run_device(options, "auto", VOTE_NAME)
    t0 = time.perf_counter()
    test_X, test_y = data.test.load()
    if len(test_y) == 0:
        raise ValueError("kNN: the test split is empty")
    val_X, val_y = data.val.load() if data.val is not None else (test_X[:0], test_y[:0])
    kw = {key: p[key] for key in ("temperature", "block_size", "memory_budget_gb")}
    queries = np.concatenate([test_X, val_X])  # one pass over the gallery scores both
    out = knn_predict(data.train, None, queries, p["ks"], n_classes=data.n_classes, device=dev, **kw)
    n_test = len(test_y)
    head = setting_name(min(HEADLINE_K, data.train.n), "weighted")
    pred_h = out.pred[head][:n_test]
    metrics = [Metric("top1", _acc(pred_h, test_y), True)]
    top5 = out.top5[head][:n_test]
    if top5.shape[1] == 5 and min(HEADLINE_K, data.train.n) >= 5 and data.n_classes > 5:
        metrics.append(Metric("top5", float(np.mean((top5 == test_y[:, None]).any(1))), True))
    metrics.append(Metric("balanced_acc", balanced_acc_of_predictions(pred_h, test_y), True))
    probs = out.probs[head]  # calibration of the headline vote: the test split's, and under a
    metrics += vote_calibration(probs[:n_test], test_y, probs[n_test:], val_y)  # temperature fitted on val
    settings = [setting_name(k, v) for k in out.ks for v in ("weighted", "uniform")]
    metrics += [Metric(f"top1@{s}", _acc(out.pred[s][:n_test], test_y), True) for s in settings]

    order = [head] + [s for s in settings if s != head]  # the headline first, then every other setting
    predictions = {
        "index": np.tile(np.arange(n_test), len(order)),
        "label": np.tile(test_y, len(order)),
        "pred": np.concatenate([out.pred[s][:n_test] for s in order]),
        "confidence": np.concatenate([out.confidence[s][:n_test] for s in order]),
        "setting": np.repeat(np.array(order), n_test),
    }
    info: dict[str, Any] = {
        "ks": list(out.ks),
        "headline": head,
        "temperature": p["temperature"],
        "n_train": data.train.n,
        "n_test": n_test,
        "boundary_ties": out.boundary_ties,
        "device": str(dev),
        "wall_time_s": time.perf_counter() - t0,
    }
    if data.val is not None:
        info["n_val"] = len(val_y)
        info["val_top1"] = {s: _acc(out.pred[s][n_test:], val_y) for s in settings}
    return ProtocolResult(metrics, predictions, info)


def resolve_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate kNN ``params`` over :data:`DEFAULT_PARAMS`; an unknown key or bad value raises ValueError."""
    check_param_keys(params, list(DEFAULT_PARAMS), "kNN")
    p = {**DEFAULT_PARAMS, **params}
    ks, bs = p["ks"], p["block_size"]
    if isinstance(ks, int | str) or not ks or not all(is_int(k) and k >= 1 for k in ks):
        raise ValueError(f"kNN parameter 'ks' must be a non-empty list of ints >= 1, got {ks!r}")
    if not is_int(bs) or bs < 1:
        raise ValueError(f"kNN parameter 'block_size' must be an int >= 1, got {bs!r}")
    for key in ("temperature", "memory_budget_gb"):
        if not is_positive_number(p[key]):
            raise ValueError(f"kNN parameter {key!r} must be a positive number, got {p[key]!r}")
    p["ks"], p["temperature"], p["memory_budget_gb"] = (
        tuple(ks),
        float(p["temperature"]),
        float(p["memory_budget_gb"]),
    )
    return p


# -- internals ----------------------------------------------------------------------------------------


def _clip_ks(ks: Sequence[int], n_gallery: int, headline_k: int | None) -> tuple[int, ...]:
    ks = list(ks) + ([headline_k] if headline_k is not None else [])
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be non-empty and >= 1, got {list(ks)}")
    return tuple(sorted({min(int(k), n_gallery) for k in ks}))


def _vote(
    sims: torch.Tensor,
    labels: torch.Tensor,
    ks: tuple[int, ...],
    n_classes: int,
    temperature: float,
    headline_k: int | None,
) -> dict[str, dict[str, np.ndarray]]:
    """Both votes at every k for one query block: ``{"pred"|"confidence"|"top5": {setting: array}}``.

    ``ks`` ascend, so class scores accumulate segment by segment instead of being recounted per k.
    """
    b = len(sims)
    weights = (sims.double() / temperature).exp()
    weighted = torch.zeros(b, n_classes, dtype=torch.float64, device=sims.device)
    counts = torch.zeros_like(weighted)
    res: dict[str, dict[str, np.ndarray]] = {"pred": {}, "confidence": {}, "top5": {}, "probs": {}}
    prev = 0
    for k in ks:
        seg = labels[:, prev:k]
        weighted.scatter_add_(1, seg, weights[:, prev:k])
        counts.scatter_add_(1, seg, torch.ones_like(weights[:, prev:k]))
        prev = k
        for name, scores, total in (
            (setting_name(k, "weighted"), weighted, weighted.sum(1)),
            (setting_name(k, "uniform"), counts, torch.full((b,), float(k), device=sims.device)),
        ):
            best, pred = scores.max(dim=1)  # CPU and CUDA return the first maximal index: smallest label
            res["pred"][name] = pred.cpu().numpy()
            res["confidence"][name] = (best / total).float().cpu().numpy()
        if k == headline_k:
            res["top5"][setting_name(k, "weighted")] = _top5(weighted)
            res["probs"][setting_name(k, "weighted")] = (
                (weighted / weighted.sum(1, keepdim=True)).float().cpu().numpy()
            )
    return res


def _top5(scores: torch.Tensor) -> np.ndarray:
    """``[b, 5]`` classes by (score desc, class asc); classes with zero score become -1."""
    m = min(5, scores.shape[1])
    fifth = scores.topk(m, dim=1).values[:, -1:]
    above, at = scores > fifth, scores == fifth
    # take every class above the 5th score, then the smallest labels tied with it until 5 are in
    keep = above | (at & (at.cumsum(dim=1) <= m - above.sum(dim=1, keepdim=True)))
    cls = keep.nonzero()[:, 1].view(-1, m)  # row-major: class ascending within each row
    sc, order = scores.gather(1, cls).sort(dim=1, descending=True, stable=True)
    cls = cls.gather(1, order)
    return torch.where(sc > 0, cls, -1).cpu().numpy()


def _acc(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(pred == y)) if len(y) else float("nan")
