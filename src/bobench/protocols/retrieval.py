"""Image retrieval on frozen features: queries = the test split, gallery (database) = the train split.

Features are L2-normalised and every gallery item is ranked by cosine similarity to the query. The
ranking is total and deterministic: by **(-similarity, gallery index)**, i.e. equal similarities put the
smaller gallery index first. Items that are *junk* for a query (revisitop's junk lists, the query itself
in leave-one-out mode) are removed from its ranking: they neither help nor hurt.

Ground truth (param ``gt``; ``"auto"``: ``revisitop`` when ``data.extras`` has ``retrieval_gt``, else
``class``):

* ``class``: a gallery item is relevant iff it has the query's label. ``mode="query_gallery"``: test
  queries against the train gallery; ``mode="leave_one_out"``: each test image queries all the other
  test images (e.g. CUB, SOP). Metrics: ``map`` (standard AP), ``mrr``, ``recall@k`` (the retrieval
  community's Recall@k, e.g. for CUB/SOP: the fraction of queries with at least one relevant item in
  the top k) and ``precision@k`` for every k in ``ks``.
* ``revisitop`` (ROxford5k/RParis6k, Radenović et al. 2018): ``extras["retrieval_gt"][q]`` is
  ``{"easy": [...], "hard": [...], "junk": [...]}`` (gallery indices). Settings Easy (positives easy,
  junk junk + hard), Medium (easy + hard; junk) and Hard (hard; junk + easy) give ``map@{s}`` (revisitop's
  ``compute_ap``) and ``mp@{k}@{s}`` (its ``mP@k``); see :mod:`bobench.protocols.retrieval_metrics`.
  The headline ``map`` is the Medium mAP (the first scored setting if Medium is not asked for).

Queries without any positive are left out of every average and counted in
``info["n_queries_without_positives"]``.

How ranks are found, and memory. Nothing larger than a ``[batch_size, gallery piece]`` similarity block
is ever formed (pieces are sized by ``memory_budget_gb``, about 40 bytes per block entry); the gallery is
streamed shard by shard. With ``max_rank=None`` (default) metrics are *exact* over the full ranking,
in two passes over the gallery: pass 1 keeps each query's similarities to its *labelled* items
(positives and junk) and a short running top list (for the top-1 prediction); pass 2 recomputes the
same blocks and counts, for each labelled item, the gallery items ranked before it (one
``searchsorted`` of the block against the query's sorted labelled items, then a histogram). Both
compare 64-bit keys ``(order-preserving bits of -similarity, gallery index)``, so the tie rule is exact.
Memory beyond the block: about 40 bytes per (query, labelled item) pair (class mode: the same-label
gallery items of every query; e.g. CUB leave-one-out: 5794 x ~30) plus the queries. Cost: twice the
similarity matmuls. With ``max_rank=R`` one pass keeps each query's top ``R + (its max junk count)``
items ([Q, R + J] similarities and indices, 12 bytes each); positives beyond rank R count as not
retrieved (AP truncated at R, normalised by all positives; revisitop's mP@k then uses the last
*retrieved* positive).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from bobench.metrics import Metric
from bobench.options import RunOptions
from bobench.protocols.base import (
    Features,
    ProbeData,
    ProtocolResult,
    check_param_keys,
    is_int,
    is_positive_number,
    run_device,
)
from bobench.protocols.knn_search import block_topk, gallery_pieces, merge_topk, unit_rows
from bobench.protocols.retrieval_metrics import (
    SETTING_ROLES,
    GroundTruth,
    average_precision,
    junk_free_ranks,
    per_query_scores,
    reciprocal_rank,
    revisitop_ap,
    revisitop_precision_at_k,
)

__all__ = [
    "DEFAULT_PARAMS",
    "TIE_RULE",
    "average_precision",
    "reciprocal_rank",
    "resolve_params",
    "revisitop_ap",
    "revisitop_precision_at_k",
    "run",
]

REVISITOP_SETTINGS = ("easy", "medium", "hard")
DEFAULT_PARAMS: dict[str, Any] = {
    "mode": "query_gallery",  # or "leave_one_out" (class ground truth only)
    "gt": "auto",  # "auto" | "class" | "revisitop"
    "settings": REVISITOP_SETTINGS,
    "ks": (1, 5, 10),
    "batch_size": 1024,  # queries per similarity block
    "max_rank": None,  # None: exact metrics over the full ranking
    "memory_budget_gb": 1.0,  # one gallery piece plus its similarity block and rank-counting workspace
}
TIE_RULE = "(-similarity, gallery index): of equal similarities the smaller gallery index ranks first"

#: pass 1's labelled pairs: per gallery piece, (its offset, per query block ([2, m] pairs, [m] similarities))
_Found = list[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]]
_SHIFT = 2**31  # gallery indices fit below it; key = (2**31 - 1 - ordered_bits(sim)) * 2**31 + index
_PAD = torch.iinfo(torch.int64).max  # beyond every key of a finite similarity


def run(
    data: ProbeData, params: Mapping[str, Any], seed: int, options: RunOptions | None = None
) -> ProtocolResult:
    """Retrieval: rank the gallery for every query and score the rankings (see the module docstring).

    Args:
        data: ``test`` (queries), ``train`` (gallery; unused with ``mode="leave_one_out"``), and
            ``extras["retrieval_gt"]`` for revisitop ground truth.
        params: any of :data:`DEFAULT_PARAMS`.
        seed: unused (retrieval is deterministic).
        options: run options; similarities are computed on ``options.device`` (None: ``auto``).

    Returns:
        Metrics (all higher is better). Class: ``map``, ``mrr``, ``recall@{k}``, ``precision@{k}``.
        Revisitop: ``map`` and ``mrr`` (of the Medium setting), ``map@{s}``, ``mrr@{s}`` and ``mp@{k}@{s}``
        for each scored setting
        (a setting with no query having positives is skipped and listed in ``info``). Predictions: one
        row per query (per setting): ``index``, ``label``, ``pred`` (label of the top-1 non-junk gallery
        item; -1 if none), ``confidence`` (its cosine similarity), ``setting``.

    Raises:
        ValueError: a bad parameter (``device`` is a run option, not a parameter), malformed ground
            truth, mismatched or empty splits, non-finite features, no query with a positive, or a
            CUDA device on a machine without one.
    """
    del seed
    p = resolve_params(params)
    dev = run_device(options, "auto")
    t0 = time.perf_counter()
    gt = p["gt"] if p["gt"] != "auto" else ("revisitop" if "retrieval_gt" in data.extras else "class")
    loo = p["mode"] == "leave_one_out"
    if gt == "revisitop" and "retrieval_gt" not in data.extras:
        raise ValueError(
            "retrieval: gt 'revisitop' needs data.extras['retrieval_gt'] (from the dataset reader)"
        )
    if gt == "revisitop" and loo:
        raise ValueError("retrieval: revisitop ground truth needs mode 'query_gallery', not 'leave_one_out'")
    gallery: Features = data.test if loo else data.train
    query_X, query_y = data.test.load()
    query_y = np.asarray(query_y, dtype=np.int64)
    n_q, n_g = len(query_y), gallery.n
    if n_q == 0 or n_g == 0:
        raise ValueError(f"retrieval needs queries and a gallery; got {n_q} queries and {n_g} gallery items")
    if n_g >= _SHIFT or gallery.dim != np.shape(query_X)[1]:
        raise ValueError(f"retrieval: gallery of {n_g} x {gallery.dim} does not fit queries {query_X.shape}")
    settings = ("class",) if gt == "class" else p["settings"]
    truth = GroundTruth(query_y, n_g, loo, data.extras.get("retrieval_gt") if gt == "revisitop" else None)
    n_junk = {s: truth.n_role[:, list(SETTING_ROLES[s][1])].sum(1) for s in settings}
    k_top = min(n_g, int(max(int(j.max()) for j in n_junk.values())) + (p["max_rank"] or 1))
    bs = p["batch_size"]
    rows = max(1, int(p["memory_budget_gb"] * 2**30) // (8 * gallery.dim + 40 * bs))

    queries = unit_rows(query_X, "test features (queries)", dev)
    exact = p["max_rank"] is None
    top_v, top_i, gallery_y, found = _scan(gallery, queries, truth, k_top, exact, bs, rows, dev)
    truth.set_gallery_labels(gallery_y)
    t1 = time.perf_counter()
    if exact:
        qid, gid, full_rank = _count_ranks(gallery, queries, found, bs, rows, dev)
    else:  # the labelled items among each query's top list; their column is their full rank
        q_all = np.repeat(np.arange(n_q), top_i.shape[1])
        labelled = truth.roles(q_all, top_i.reshape(-1)) >= 0
        qid, gid = q_all[labelled], top_i.reshape(-1)[labelled]
        full_rank = np.tile(np.arange(top_i.shape[1]), n_q)[labelled]
    t2 = time.perf_counter()

    role = truth.roles(qid, gid)
    top_role = truth.roles(np.repeat(np.arange(n_q), top_i.shape[1]), top_i.reshape(-1)).reshape(top_i.shape)
    cut = np.inf if exact else p["max_rank"]
    metrics: list[Metric] = []
    preds: list[dict[str, np.ndarray]] = []
    without: dict[str, int] = {}
    for s in settings:
        pos_roles, junk_roles = SETTING_ROLES[s]
        n_pos = truth.n_role[:, list(pos_roles)].sum(1)
        rank = junk_free_ranks(qid, full_rank, np.isin(role, junk_roles))
        keep = np.isin(role, pos_roles) & (rank < cut)
        scores = per_query_scores(qid[keep], rank[keep], n_pos, p["ks"], revisitop=gt == "revisitop")
        valid = n_pos > 0
        without[s] = int(n_q - valid.sum())
        preds.append(_top1(s, top_role, top_i, top_v, junk_roles, query_y, truth.gallery_y))
        if not valid.any():
            continue
        mean = {name: float(a[valid].mean()) for name, a in scores.items()}
        if gt == "class":
            metrics += [Metric("map", mean["ap"], True), Metric("mrr", mean["rr"], True)]
            metrics += [Metric(f"recall@{k}", mean[f"recall@{k}"], True) for k in p["ks"]]
            metrics += [Metric(f"precision@{k}", mean[f"precision@{k}"], True) for k in p["ks"]]
        else:
            metrics.append(Metric(f"map@{s}", mean["ap"], True))
            metrics.append(Metric(f"mrr@{s}", mean["rr"], True))  # BoB ranks revisitop sets by MRR
            metrics += [Metric(f"mp@{k}@{s}", mean[f"mp@{k}"], True) for k in p["ks"]]
    if not metrics:
        raise ValueError(f"retrieval ({gt} ground truth): no query has a relevant gallery item to score")
    headline = "class"
    if gt == "revisitop":
        scored = [s for s in settings if without[s] < n_q]
        headline = "medium" if "medium" in scored else scored[0]
        value = {m.name: m.value for m in metrics}
        metrics[:0] = [
            Metric("map", value[f"map@{headline}"], True),
            Metric("mrr", value[f"mrr@{headline}"], True),
        ]
    preds.sort(key=lambda d: d["setting"][0] != headline)  # the headline's rows first, as kNN does
    info: dict[str, Any] = {
        "n_queries": n_q,
        "n_gallery": n_g,
        "mode": p["mode"],
        "gt": gt,
        "settings": list(settings),
        "headline": "map" if gt == "class" else f"map@{headline}",
        "ks": list(p["ks"]),
        "tie_rule": TIE_RULE,
        "max_rank": p["max_rank"],
        "exact": exact,
        "n_queries_without_positives": without["class"] if gt == "class" else without,
        "skipped_settings": [s for s in settings if without[s] == n_q],
        "n_labelled_pairs": len(qid),
        "batch_size": bs,
        "gallery_piece_rows": rows,
        "device": str(dev),
        "timings_s": {"scan": t1 - t0, "rank": t2 - t1, "score": time.perf_counter() - t2},
        "wall_time_s": time.perf_counter() - t0,
    }
    return ProtocolResult(metrics, {k: np.concatenate([d[k] for d in preds]) for k in preds[0]}, info)


def resolve_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate retrieval ``params`` over :data:`DEFAULT_PARAMS`; any unknown key or bad value raises ValueError."""
    check_param_keys(params, list(DEFAULT_PARAMS), "retrieval")
    p = {**DEFAULT_PARAMS, **params}

    def bad(key: str, want: str) -> ValueError:
        return ValueError(f"retrieval parameter {key!r} must be {want}, got {p[key]!r}")

    if p["mode"] not in ("query_gallery", "leave_one_out"):
        raise bad("mode", "'query_gallery' or 'leave_one_out'")
    if p["gt"] not in ("auto", "class", "revisitop"):
        raise bad("gt", "'auto', 'class' or 'revisitop'")
    st = p["settings"]
    if (
        isinstance(st, str)
        or not st
        or any(s not in REVISITOP_SETTINGS for s in st)
        or len(set(st)) < len(st)
    ):
        raise bad("settings", f"a non-empty list of distinct settings among {list(REVISITOP_SETTINGS)}")
    ks = p["ks"]
    if isinstance(ks, int | str) or not ks or not all(is_int(k) and k >= 1 for k in ks):
        raise bad("ks", "a non-empty list of ints >= 1")
    p["settings"], p["ks"] = tuple(st), tuple(sorted({int(k) for k in ks}))
    if not is_int(p["batch_size"]) or p["batch_size"] < 1:
        raise bad("batch_size", "an int >= 1")
    mr = p["max_rank"]
    if mr is not None and (not is_int(mr) or mr < max(p["ks"])):
        raise bad("max_rank", f"None (exact) or an int >= max(ks) = {max(p['ks'])}")
    if not is_positive_number(p["memory_budget_gb"]):
        raise bad("memory_budget_gb", "a positive number")
    return p


# -- internals ----------------------------------------------------------------------------------------


def _keys(sims: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """int64 keys whose ascending order is (-similarity, gallery index): exact, ties included.

    The float32 bits, with the low 31 bits of negative numbers flipped, order like the floats (``+ 0.0``
    first turns -0.0 into +0.0, which compares equal). Similarities are finite (checked on load).
    """
    bits = (sims + 0.0).view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    return ordered.neg_().add_(_SHIFT - 1).mul_(_SHIFT).add_(cols)


def _scan(
    gallery: Features,
    queries: torch.Tensor,
    truth: GroundTruth,
    k_top: int,
    exact: bool,
    bs: int,
    rows: int,
    dev: torch.device,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, _Found]:
    """Pass 1: every query's top ``k_top`` (sims, indices), the gallery labels and, if ``exact``, per
    (gallery piece, query block) the labelled pairs found there with their similarities."""
    n_q = len(queries)
    qy = torch.from_numpy(truth.query_y).to(dev)
    vals = idx = None
    found: _Found = []
    labels: list[np.ndarray] = []
    offset = 0
    for piece, piece_y in gallery_pieces(gallery, None, rows):
        labels.append(np.asarray(piece_y, dtype=np.int64))
        g = unit_rows(piece, "gallery features", dev)
        py = torch.from_numpy(labels[-1]).to(dev)
        new_v, new_i, here = [], [], []
        for s in range(0, n_q, bs):
            sims = queries[s : s + bs] @ g.T
            v, i, _ = block_topk(sims, k_top)
            new_v.append(v)
            new_i.append(i + offset)
            if exact:
                pairs = truth.labelled(s, s + len(sims), offset, py, qy)
                here.append((pairs, sims[pairs[0], pairs[1]]))
        found.append((offset, here))
        if vals is None or idx is None:
            vals, idx = torch.cat(new_v), torch.cat(new_i)
        else:
            vals, idx = merge_topk(vals, idx, torch.cat(new_v), torch.cat(new_i), k_top)
        offset += len(g)
    if offset != gallery.n or vals is None or idx is None:
        raise ValueError(f"the gallery yielded {offset} rows but declares n={gallery.n}")
    return vals.cpu().numpy(), idx.cpu().numpy(), np.concatenate(labels), found


def _count_ranks(
    gallery: Features,
    queries: torch.Tensor,
    found: _Found,
    bs: int,
    rows: int,
    dev: torch.device,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pass 2: the full 0-based rank of every labelled pair, as flat ``(qid, gallery index, rank)``
    sorted by query, then rank.

    For each query block, its labelled items' keys are sorted ([b, L], padded). An item of a gallery
    piece precedes the labelled items whose keys exceed its own: ``searchsorted`` gives how many it does
    not precede, and a cumulative histogram turns that into counts per labelled item.
    """
    sizes = [min(bs, len(queries) - s) for s in range(0, len(queries), bs)]
    block_keys: list[torch.Tensor] = []
    for j, size in enumerate(sizes):
        r = torch.cat([here[j][0][0] for _, here in found])
        c = torch.cat([here[j][0][1] + off for off, here in found])
        k = _keys(torch.cat([here[j][1] for _, here in found]), c)
        k, order = k.sort()
        r, order = r[order].sort(stable=True)  # by row, then key
        k = k[order]
        counts = torch.bincount(r, minlength=size)
        width = int(counts.max()) if len(r) else 0
        slot = torch.arange(len(r), device=dev) - (counts.cumsum(0) - counts)[r]
        keys = torch.full((size, width), _PAD, dtype=torch.int64, device=dev)
        keys[r, slot] = k
        block_keys.append(keys)
    ranks = [torch.zeros_like(k) for k in block_keys]
    for (piece, _), (off, here) in zip(gallery_pieces(gallery, None, rows), found, strict=True):
        g = unit_rows(piece, "gallery features", dev)
        cols = torch.arange(off, off + len(g), device=dev)
        for j, s in enumerate(range(0, len(queries), bs)):
            width = block_keys[j].shape[1]
            if width == 0:
                continue
            sims = queries[s : s + bs] @ g.T
            pairs, v = here[j]
            sims[pairs[0], pairs[1]] = v  # pass 1's values: a labelled item never precedes itself
            t = torch.searchsorted(block_keys[j], _keys(sims, cols), right=True)
            t += torch.arange(len(sims), device=dev)[:, None] * (width + 1)
            hist = torch.bincount(t.view(-1), minlength=len(sims) * (width + 1)).view(len(sims), width + 1)
            ranks[j] += hist.cumsum(1)[:, :width]
    qid, gid, full = [], [], []
    for j, s in enumerate(range(0, len(queries), bs)):
        real = block_keys[j] != _PAD
        qid.append(real.nonzero()[:, 0].cpu().numpy() + s)
        gid.append((block_keys[j][real] % _SHIFT).cpu().numpy())
        full.append(ranks[j][real].cpu().numpy())
    return np.concatenate(qid), np.concatenate(gid), np.concatenate(full)


def _top1(
    setting: str,
    top_role: np.ndarray,
    top_i: np.ndarray,
    top_v: np.ndarray,
    junk_roles: tuple[int, ...],
    query_y: np.ndarray,
    gallery_y: np.ndarray,
) -> dict[str, np.ndarray]:
    """Prediction rows of one setting: the first non-junk item of each query's top list."""
    ok = ~np.isin(top_role, junk_roles)
    col = ok.argmax(axis=1)
    has = ok[np.arange(len(col)), col]
    best = top_i[np.arange(len(col)), col]
    return {
        "index": np.arange(len(query_y)),
        "label": query_y,
        "pred": np.where(has, gallery_y[best], -1),
        "confidence": np.where(has, top_v[np.arange(len(col)), col], np.nan).astype(np.float32),
        "setting": np.full(len(query_y), setting),
    }
