"""Ranking metrics of :mod:`bobench.protocols.retrieval`, per query and vectorised over many queries.

Every function takes the 0-based ranks of a query's *positives* in its ranking after junk removal
(rank 0 = the first result) and the number of positives the ground truth names. A positive missing
from ``ranks`` was not retrieved (only possible when the ranking is truncated): it counts as a miss.

* :func:`average_precision`: standard non-interpolated AP, the mean over all positives of the precision
  at each positive's rank (0 for one not retrieved). Equal to scikit-learn's ``average_precision_score``
  of the relevance vector against the scores when no scores tie.
* :func:`revisitop_ap`: the AP of the revisitop toolkit (``compute_ap`` in ``python/evaluate.py`` of
  github.com/filipradenovic/revisitop): trapezoids under the precision-recall curve,
  ``sum_j (p0_j + p1_j) / 2 / n_positives`` with ``p0_j = j / r_j`` (1 when ``r_j == 0``) and
  ``p1_j = (j + 1) / (r_j + 1)`` for the j-th positive (0-based) at rank ``r_j``.
* :func:`revisitop_precision_at_k`: revisitop's ``mP@k`` per query, as its ``compute_map``:
  ``kq = min(last positive's 1-based rank, k)``, then ``#{positives with 1-based rank <= kq} / kq``.
  So a query whose positives all lie within the top k scores 1 (plain precision@k would not).
* :func:`reciprocal_rank`: ``1 / (first_rank + 1)``; 0 when nothing relevant was retrieved.

:class:`GroundTruth` says which (query, gallery item) pairs are positive or junk in each setting of
:data:`SETTING_ROLES`, for class labels or revisitop's easy/hard/junk lists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Role of a labelled (query, gallery item) pair. Class mode: EASY = same label, JUNK = the query itself.
EASY, HARD, JUNK = 0, 1, 2
#: setting -> (positive roles, junk roles)
SETTING_ROLES = {
    "class": ((EASY,), (JUNK,)),
    "easy": ((EASY,), (HARD, JUNK)),
    "medium": ((EASY, HARD), (JUNK,)),
    "hard": ((HARD,), (EASY, JUNK)),
}


def _sorted_ranks(ranks: np.ndarray | Sequence[int], n_positives: int) -> np.ndarray:
    r = np.sort(np.asarray(ranks, dtype=np.int64).reshape(-1))
    if n_positives < 1:
        raise ValueError(f"n_positives must be >= 1 (a query without positives has no AP), got {n_positives}")
    if len(r) > n_positives or (len(r) and (r[0] < 0 or np.any(np.diff(r) == 0))):
        raise ValueError(
            f"ranks must be at most n_positives={n_positives} distinct ranks >= 0, got {r.tolist()}"
        )
    return r


def average_precision(ranks_of_positives: np.ndarray | Sequence[int], n_positives: int) -> float:
    """Standard (non-interpolated) average precision of one query.

    Args:
        ranks_of_positives: 0-based ranks of the retrieved positives, any order, distinct.
        n_positives: number of positives in the ground truth (>= len(ranks)).

    Returns:
        ``sum_j (j + 1) / (r_j + 1) / n_positives`` over the sorted ranks ``r_j``.

    Raises:
        ValueError: ``n_positives < 1``, or ranks negative, repeated or more than ``n_positives``.
    """
    r = _sorted_ranks(ranks_of_positives, n_positives).astype(np.float64)
    j = np.arange(len(r))
    return float(np.sum((j + 1) / (r + 1)) / n_positives)


def revisitop_ap(ranks: np.ndarray | Sequence[int], n_positives: int) -> float:
    """Average precision exactly as revisitop's ``compute_ap(ranks, nres)`` (trapezoidal rule).

    Args:
        ranks: 0-based ranks of the positives after junk removal, any order, distinct.
        n_positives: ``nres``, the number of positives in the ground truth.

    Returns:
        ``sum_j (p0 + p1) * (1 / n_positives) / 2`` with ``p0 = j / r_j`` (``1.0`` if ``r_j == 0``),
        ``p1 = (j + 1) / (r_j + 1)``, j the 0-based position of the positive among the sorted ranks.

    Raises:
        ValueError: as :func:`average_precision`.
    """
    r = _sorted_ranks(ranks, n_positives)
    ap = 0.0
    for j, rank in enumerate(r.tolist()):  # a transcription of the reference loop, kept scalar on purpose
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * (1.0 / n_positives) / 2.0
    return ap


def revisitop_precision_at_k(ranks: np.ndarray | Sequence[int], k: int) -> float:
    """revisitop's precision at ``k`` of one query (its ``compute_map`` ``prs``), 0 if ``ranks`` is empty.

    Args:
        ranks: 0-based ranks of the positives after junk removal.
        k: the cut-off (>= 1).

    Returns:
        With ``pos = ranks + 1`` and ``kq = min(max(pos), k)``: ``#{pos <= kq} / kq``.
    """
    pos = np.asarray(ranks, dtype=np.int64).reshape(-1) + 1
    if len(pos) == 0:
        return 0.0
    kq = min(int(pos.max()), k)
    return float(np.sum(pos <= kq) / kq)


def reciprocal_rank(first_rank: int | None) -> float:
    """``1 / (first_rank + 1)`` for the 0-based rank of the first positive; 0.0 for None (not retrieved)."""
    if first_rank is None:
        return 0.0
    if first_rank < 0:
        raise ValueError(f"first_rank must be >= 0, got {first_rank}")
    return 1.0 / (first_rank + 1)


def per_query_scores(
    qid: np.ndarray, rank: np.ndarray, n_pos: np.ndarray, ks: Sequence[int], revisitop: bool
) -> dict[str, np.ndarray]:
    """Every metric for every query at once, from the flat list of retrieved positives.

    Equal to the scalar functions above applied query by query (tested), without a Python loop.

    Args:
        qid: ``[M]`` query of each retrieved positive, ascending.
        rank: ``[M]`` its 0-based rank after junk removal, ascending within each query.
        n_pos: ``[Q]`` positives per query in the ground truth (0: the query is not scorable).
        ks: cut-offs.
        revisitop: score AP with :func:`revisitop_ap` and add ``mp@k``; else standard AP.

    Returns:
        ``[Q]`` arrays, NaN where ``n_pos == 0``: ``ap``; ``rr``; ``recall@k`` (1.0 if a positive is in the
        top k), ``precision@k`` (``#positives in top k / k``) and, for revisitop, ``mp@k``.
    """
    nq = len(n_pos)
    qid = np.asarray(qid, dtype=np.int64)
    r = np.asarray(rank, dtype=np.float64)
    first = np.searchsorted(qid, qid, side="left")  # index of each query's first positive
    j = np.arange(len(qid)) - first  # position of the positive among its query's positives
    p1 = (j + 1) / (r + 1)
    if revisitop:
        p0 = np.where(r > 0, j / np.maximum(r, 1), 1.0)
        contrib = (p0 + p1) / 2
    else:
        contrib = p1
    valid = n_pos > 0
    denom = np.where(valid, n_pos, 1)
    out = {"ap": np.bincount(qid, contrib, minlength=nq) / denom}
    starts = np.flatnonzero(j == 0)
    ends = np.r_[starts[1:], len(qid)][: len(starts)] - 1  # no positive at all: no start, no end
    first_rank = np.full(nq, np.inf)
    last_pos = np.zeros(nq)  # 1-based rank of the last retrieved positive
    first_rank[qid[starts]] = r[starts]
    last_pos[qid[ends]] = r[ends] + 1
    out["rr"] = 1.0 / (first_rank + 1)  # inf -> 0: nothing retrieved
    for k in ks:
        out[f"recall@{k}"] = (first_rank < k).astype(np.float64)
        out[f"precision@{k}"] = np.bincount(qid, r < k, minlength=nq) / k
        if revisitop:
            kq = np.minimum(last_pos, k)
            hits = np.bincount(qid, r + 1 <= kq[qid], minlength=nq)
            out[f"mp@{k}"] = np.where(kq > 0, hits / np.maximum(kq, 1), 0.0)
    for a in out.values():
        a[~valid] = np.nan
    return out


def junk_free_ranks(qid: np.ndarray, full_rank: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """Ranks after removing junk: each rank minus the junk items ranked before it in its query.

    This is revisitop's ``compute_map`` step "decrease positions of positives based on the number of
    junk images appearing before them", vectorised.

    Args:
        qid: ``[M]`` query of each labelled item, ascending.
        full_rank: ``[M]`` its 0-based rank in the full ranking, ascending within each query.
        junk: ``[M]`` bool, whether the item is junk (its own value is meaningless).
    """
    before = np.cumsum(junk) - junk  # junk strictly before each item, counted from the first query
    first = np.searchsorted(qid, qid, side="left")
    return full_rank - (before - before[first])


@dataclass
class GroundTruth:
    """Who is relevant or junk for whom: ``roles(q, g)`` and ``n_role[q, role]`` (counts per query).

    Class mode: role EASY = same label (positive), JUNK = the query itself (leave-one-out), -1 otherwise.
    Revisitop: EASY / HARD / JUNK as listed in the ground truth, -1 for unlisted items.
    """

    query_y: np.ndarray
    n_gallery: int
    loo: bool
    gt: list[Mapping[str, Any]] | None

    def __post_init__(self) -> None:
        n_q = len(self.query_y)
        self.n_role = np.zeros((n_q, 3), dtype=np.int64)
        self.gallery_y = np.zeros(0, dtype=np.int64)
        if self.gt is None:
            self.n_role[:, JUNK] = int(self.loo)
            return
        if not isinstance(self.gt, list | tuple) or len(self.gt) != n_q:
            got = len(self.gt) if isinstance(self.gt, list | tuple) else type(self.gt).__name__
            raise ValueError(f"retrieval_gt must be a list of one dict per query ({n_q}), got {got}")
        q_parts, g_parts, r_parts = [], [], []
        for q, entry in enumerate(self.gt):
            if not isinstance(entry, Mapping):
                raise ValueError(f"retrieval_gt[{q}] must be a dict of easy/hard/junk lists, got {entry!r}")
            for role, key in ((EASY, "easy"), (HARD, "hard"), (JUNK, "junk")):
                ids = np.asarray(entry.get(key, []))  # a missing list is empty
                if ids.ndim != 1 or (len(ids) and ids.dtype.kind not in "iu"):
                    raise ValueError(f"retrieval_gt[{q}][{key!r}] must be a list of ints, got {ids!r}")
                if len(ids) and (ids.min() < 0 or ids.max() >= self.n_gallery):
                    raise ValueError(
                        f"retrieval_gt[{q}][{key!r}] has an index outside the {self.n_gallery} gallery items"
                    )
                q_parts.append(np.full(len(ids), q))
                g_parts.append(ids.astype(np.int64))
                r_parts.append(np.full(len(ids), role))
                self.n_role[q, role] = len(ids)
        key = np.concatenate([np.zeros(0, np.int64), *q_parts]) * self.n_gallery
        key += np.concatenate([np.zeros(0, np.int64), *g_parts])
        order = np.argsort(key, kind="stable")
        self.pair_key, self.pair_role = key[order], np.concatenate([np.zeros(0, np.int64), *r_parts])[order]
        dup = np.flatnonzero(np.diff(self.pair_key) == 0)
        if len(dup):
            q, g = divmod(int(self.pair_key[dup[0]]), self.n_gallery)
            raise ValueError(
                f"retrieval_gt[{q}] lists gallery item {g} twice (easy, hard, junk are disjoint)"
            )
        by_g = np.argsort(self.pair_key % self.n_gallery, kind="stable")  # pairs by gallery index, for pass 1
        self.pair_q, self.pair_g = self.pair_key[by_g] // self.n_gallery, self.pair_key[by_g] % self.n_gallery

    def set_gallery_labels(self, gallery_y: np.ndarray) -> None:
        """Record the gallery labels (known after pass 1); class mode counts each query's positives."""
        self.gallery_y = gallery_y
        if self.gt is None:  # positives = same-label gallery items, less the query itself
            uniq, counts = np.unique(gallery_y, return_counts=True)
            at = np.minimum(np.searchsorted(uniq, self.query_y), len(uniq) - 1)
            same = np.where(uniq[at] == self.query_y, counts[at], 0)
            self.n_role[:, EASY] = same - int(self.loo)

    def roles(self, q: np.ndarray, g: np.ndarray) -> np.ndarray:
        """Role (EASY, HARD, JUNK, or -1 = unlabelled) of each pair (query ``q[i]``, gallery item ``g[i]``)."""
        if self.gt is None:
            role = np.where(self.gallery_y[g] == self.query_y[q], EASY, -1)
            return np.where(g == q, JUNK, role) if self.loo else role
        if len(self.pair_key) == 0:
            return np.full(len(q), -1)
        key = q.astype(np.int64) * self.n_gallery + g
        at = np.minimum(np.searchsorted(self.pair_key, key), len(self.pair_key) - 1)
        return np.where(self.pair_key[at] == key, self.pair_role[at], -1)

    def labelled(self, s: int, e: int, off: int, piece_y: torch.Tensor, qy: torch.Tensor) -> torch.Tensor:
        """``[2, m]`` (row in the query block [s, e), column in the gallery piece at ``off``) pairs."""
        if self.gt is None:  # every same-label item (the query itself included: junk in leave-one-out)
            return (qy[s:e, None] == piece_y[None, :]).nonzero().T
        lo, hi = np.searchsorted(self.pair_g, [off, off + len(piece_y)])
        q, g = self.pair_q[lo:hi], self.pair_g[lo:hi]
        sel = (q >= s) & (q < e)
        return torch.from_numpy(np.stack([q[sel] - s, g[sel] - off])).to(piece_y.device)
