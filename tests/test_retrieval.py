"""Retrieval protocol: hand-computed rankings, scikit-learn's AP, revisitop's AP, blockwise == one block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from bobench.options import RunOptions
from bobench.protocols import retrieval
from bobench.protocols.base import ArrayFeatures, ProbeData
from bobench.protocols.retrieval_metrics import (
    average_precision,
    per_query_scores,
    reciprocal_rank,
    revisitop_ap,
    revisitop_precision_at_k,
)

CPU = RunOptions(device="cpu")


def _at(degrees: list[float]) -> np.ndarray:
    """2-D unit vectors at the given angles: cosine similarity falls with the angle between them."""
    rad = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def _data(G, gy, Q, qy, shard_size: int = 8192, **extras) -> ProbeData:
    return ProbeData(ArrayFeatures(G, gy, shard_size), ArrayFeatures(Q, qy), None, 10, extras=extras)


def _metrics(result) -> dict[str, float]:
    return {m.name: m.value for m in result.metrics}


def _exact(n: int, seed: int, dim: int = 10) -> np.ndarray:
    """Rows of four +-1 entries (norm exactly 2): every cosine is a multiple of 1/4, computed without
    rounding whatever the blocking, so there are many exact ties."""
    rng = np.random.default_rng(seed)
    X = np.zeros((n, dim), np.float32)
    for row in X:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    return X


# --------------------------------------------------------------------------------- pure functions
def test_scalar_metrics_by_hand():
    # positives at ranks 2, 4, 5 of 3: precisions 1/3, 2/5, 3/6
    assert average_precision([5, 2, 4], 3) == pytest.approx((1 / 3 + 2 / 5 + 3 / 6) / 3)
    assert average_precision([0], 2) == pytest.approx(0.5)  # the other positive was not retrieved
    # revisitop: ranks 1, 2, 4 of 3: (0 + 1/2)/2/3 + (1/2 + 2/3)/2/3 + (2/4 + 3/5)/2/3 = 83/180
    assert revisitop_ap([1, 2, 4], 3) == pytest.approx(83 / 180)
    assert revisitop_ap([0], 1) == 1.0  # rank 0: precision_0 = 1 by definition
    # mP@k: positions 2, 3, 5 (1-based); k=1: kq=1 -> 0/1; k=10: kq=min(5, 10)=5 -> 3/5
    assert revisitop_precision_at_k([1, 2, 4], 1) == 0.0
    assert revisitop_precision_at_k([1, 2, 4], 10) == pytest.approx(3 / 5)
    assert revisitop_precision_at_k([0], 10) == 1.0  # all positives in the top 10: 1, not 1/10
    assert reciprocal_rank(2) == pytest.approx(1 / 3) and reciprocal_rank(None) == 0.0
    with pytest.raises(ValueError, match="n_positives"):
        average_precision([], 0)
    with pytest.raises(ValueError, match="distinct"):
        revisitop_ap([1, 1], 2)


def test_vectorised_scores_equal_scalar_functions():
    rng = np.random.default_rng(0)
    n_pos = rng.integers(0, 6, 40)
    qid = np.repeat(np.arange(40), n_pos)
    rank = np.concatenate([np.sort(rng.choice(30, k, replace=False)) for k in n_pos])
    for revisitop, ap_fn in ((False, average_precision), (True, revisitop_ap)):
        out = per_query_scores(qid, rank, n_pos, (1, 5), revisitop=revisitop)
        for q in range(40):
            r = rank[qid == q]
            if n_pos[q] == 0:
                assert np.isnan(out["ap"][q])
                continue
            assert out["ap"][q] == pytest.approx(ap_fn(r, n_pos[q]))
            assert out["rr"][q] == pytest.approx(reciprocal_rank(int(r[0])))
            assert out["precision@5"][q] == pytest.approx(np.sum(r < 5) / 5)
            assert out["recall@1"][q] == float(r[0] == 0)
            if revisitop:
                assert out["mp@5"][q] == pytest.approx(revisitop_precision_at_k(r, 5))


# ------------------------------------------------------------------------------- class ground truth
def test_class_mode_by_hand():
    # gallery index: 0    1    2    3    4    5     (angle in degrees, label)
    G = _at([50, 10, 30, 20, 40, 60])
    gy = [1, 0, 1, 0, 0, 1]
    Q = _at([0, 180, 65])
    qy = [1, 2, 1]
    # q0 (0 deg) ranks 1, 3, 2, 4, 0, 5 with labels 0 0 1 0 1 1: positives at ranks 2, 4, 5
    #   AP = (1/3 + 2/5 + 3/6) / 3 = 37/90, RR = 1/3, P@5 = 2/5, P@10 = 3/10
    # q1 has label 2: no positive, left out
    # q2 (65 deg) ranks 5, 0, 4, 2, 3, 1 with labels 1 1 0 1 0 0: positives at ranks 0, 1, 3
    #   AP = (1 + 1 + 3/4) / 3 = 11/12, RR = 1, P@1 = 1, P@5 = 3/5, P@10 = 3/10
    res = retrieval.run(_data(G, gy, Q, qy), {}, 0, CPU)
    m = _metrics(res)
    assert m["map"] == pytest.approx((37 / 90 + 11 / 12) / 2)
    assert m["mrr"] == pytest.approx((1 / 3 + 1) / 2)
    assert (m["recall@1"], m["recall@5"], m["recall@10"]) == (0.5, 1.0, 1.0)
    assert m["precision@1"] == 0.5 and m["precision@5"] == pytest.approx(0.5)
    assert m["precision@10"] == pytest.approx(0.3)
    assert all(metric.higher_is_better for metric in res.metrics)
    assert res.info["n_queries_without_positives"] == 1 and res.info["gt"] == "class"
    pred = res.predictions
    assert pred["index"].tolist() == [0, 1, 2] and pred["label"].tolist() == qy
    assert pred["pred"].tolist() == [0, 1, 1]  # labels of g1, g5, g5
    assert pred["confidence"][0] == pytest.approx(np.cos(np.deg2rad(10)), abs=1e-6)
    assert set(pred["setting"]) == {"class"}

    # truncated to the top 4: q0's positives at ranks 4 and 5 are not retrieved: (1/3) / 3 = 1/9
    trunc = _metrics(retrieval.run(_data(G, gy, Q, qy), {"ks": [1, 2], "max_rank": 4}, 0, CPU))
    assert trunc["map"] == pytest.approx((1 / 9 + 11 / 12) / 2)


def test_ties_rank_the_smaller_gallery_index_first():
    # query (1, 0), label 0. Gallery: g0 (0, 1) label 1, g1 (0, -1) label 0, g2 (1, 0) label 1,
    # g3 (-1, 0) label 0, g4 (0, 1) label 0. Similarities 0, 0, 1, -1, 0 are exact, g0, g1, g4 tie.
    # Ranking by (-sim, index): g2, g0, g1, g4, g3 -> labels 1 1 0 0 0: positives at ranks 2, 3, 4
    # AP = (1/3 + 2/4 + 3/5) / 3. (Index descending among ties would give ranks 1, 2, 4.)
    G = np.array([[0, 1], [0, -1], [1, 0], [-1, 0], [0, 1]], np.float32)
    gy = [1, 0, 1, 0, 0]
    Q, qy = np.array([[1, 0]], np.float32), [0]
    for shard, bs in ((8192, 1024), (2, 1)):
        params = {"batch_size": bs}
        res = retrieval.run(_data(G, gy, Q, qy, shard_size=shard), params, 0, CPU)
        assert _metrics(res)["map"] == pytest.approx((1 / 3 + 2 / 4 + 3 / 5) / 3)
        assert _metrics(res)["mrr"] == pytest.approx(1 / 3)
    # the top-1 of a query equidistant from two items is the smaller index
    res = retrieval.run(_data(G[[1, 0, 4]], [5, 6, 7], np.array([[1, 0]], np.float32), [5]), {}, 0, CPU)
    assert res.predictions["pred"].tolist() == [5] and res.predictions["confidence"][0] == 0.0


def _reference(G, gy, Q, qy, loo: bool, ks=(1, 5, 10)) -> dict[str, float]:
    """Brute force: full float64 similarity matrix, scikit-learn's AP (no ties in random data)."""
    Gn = G / np.linalg.norm(G, axis=1, keepdims=True)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    sims = Qn.astype(np.float64) @ Gn.T.astype(np.float64)
    out: dict[str, list[float]] = {"map": [], "mrr": []}
    for q in range(len(Q)):
        keep = np.arange(len(G)) != q if loo else np.ones(len(G), bool)
        s, rel = sims[q][keep], (np.asarray(gy) == qy[q])[keep]
        if not rel.any():
            continue
        out["map"].append(average_precision_score(rel, s))
        hits = rel[np.argsort(-s)]
        out["mrr"].append(1 / (np.argmax(hits) + 1))
        for k in ks:
            out.setdefault(f"recall@{k}", []).append(float(hits[:k].any()))
            out.setdefault(f"precision@{k}", []).append(hits[:k].sum() / k)
    return {k: float(np.mean(v)) for k, v in out.items()}


def test_class_mode_matches_sklearn_average_precision():
    rng = np.random.default_rng(1)
    G, gy = rng.normal(size=(200, 16)).astype(np.float32), rng.integers(0, 5, 200)
    Q, qy = rng.normal(size=(50, 16)).astype(np.float32), rng.integers(0, 5, 50)
    m = _metrics(retrieval.run(_data(G, gy, Q, qy), {}, 0, CPU))
    ref = _reference(G, gy, Q, qy, loo=False)
    assert m == pytest.approx(ref, abs=1e-9)


def test_leave_one_out_excludes_the_query_itself():
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(60, 8)).astype(np.float32), rng.integers(0, 6, 60)
    y[0] = 99  # alone in its class: no positive once itself is excluded
    train = rng.normal(size=(5, 8)).astype(np.float32)  # ignored in leave-one-out mode
    res = retrieval.run(_data(train, [0] * 5, X, y), {"mode": "leave_one_out"}, 0, CPU)
    assert _metrics(res) == pytest.approx(_reference(X, y, X, y, loo=True), abs=1e-9)
    assert res.info["n_queries_without_positives"] == 1 and res.info["n_gallery"] == 60
    # the top-1 is never the query itself (its similarity 1 would win)
    assert np.all(res.predictions["confidence"] < 1 - 1e-6)


# --------------------------------------------------------------------------------- revisitop
# Gallery items 0..9 at angles such that the ranking of every query (all at 0 degrees) is
# 3, 7, 0, 9, 5, 1, 8, 2, 6, 4 (full ranks 0..9).
_ORDER = [3, 7, 0, 9, 5, 1, 8, 2, 6, 4]
_GT = [
    {"easy": [0, 5], "hard": [8], "junk": [3, 9]},  # A
    {"easy": [3], "hard": [], "junk": []},  # B
    {"easy": [], "hard": [4, 7], "junk": [6]},  # C
]


def _revisitop_data(gt=_GT, shard_size: int = 8192) -> ProbeData:
    angles = np.zeros(10)
    angles[_ORDER] = np.arange(10) * 10.0
    Q = _at([0.0] * len(gt))
    return _data(_at(list(angles)), np.arange(10), Q, [0] * len(gt), shard_size, retrieval_gt=gt)


def test_revisitop_by_hand():
    # Ranks after junk removal, then revisitop's AP sum_j (p0 + p1) / 2 / nres, p0 = j/r (1 if r=0),
    # p1 = (j+1)/(r+1); mP@k = #{pos <= kq} / kq with pos 1-based and kq = min(max pos, k).
    # A easy:   junk 3, 9, 8 -> easy 0, 5 at ranks 1, 2: (0 + 1/2)/4 + (1/2 + 2/3)/4 = 5/12
    #           pos 2, 3: mP@1 = 0, mP@5 = mP@10 = 2/3 (kq = 3)
    # A medium: junk 3, 9 -> 0, 5, 8 at ranks 1, 2, 4: 1/12 + 7/36 + (2/4 + 3/5)/6 = 83/180
    #           pos 2, 3, 5: mP@1 = 0, mP@5 = mP@10 = 3/5
    # A hard:   junk 3, 9, 0, 5 -> 8 at rank 2: (0 + 1/3)/2 = 1/6; pos 3: mP@5 = mP@10 = 1/3
    # B easy = medium: 3 at rank 0: AP 1, every mP 1. B hard: no positive, skipped.
    # C easy: no positive, skipped. C medium = hard: junk 6 -> 7, 4 at ranks 1, 8:
    #           (0 + 1/2)/4 + (1/8 + 2/9)/4 = 61/288; pos 2, 9: mP@5 = 1/5, mP@10 = 2/9 (kq = 9)
    res = retrieval.run(_revisitop_data(), {}, 0, CPU)
    m = _metrics(res)
    assert res.info["gt"] == "revisitop"
    assert m["map@easy"] == pytest.approx((5 / 12 + 1) / 2)
    assert m["map@medium"] == pytest.approx((83 / 180 + 1 + 61 / 288) / 3)
    assert m["map@hard"] == pytest.approx((1 / 6 + 61 / 288) / 2)
    assert m["map"] == m["map@medium"] and res.metrics[0].name == "map"
    # MRR (what BoB reports): first positive after junk removal at ranks A 1, B 0, C 1 (medium);
    # A 1, B 0 (easy); A 2, C 1 (hard)
    assert m["mrr@medium"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3) and m["mrr"] == m["mrr@medium"]
    assert m["mrr@easy"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["mrr@hard"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert m["mp@1@easy"] == pytest.approx(0.5) and m["mp@5@easy"] == pytest.approx(5 / 6)
    assert m["mp@1@medium"] == pytest.approx(1 / 3)
    assert m["mp@5@medium"] == pytest.approx((3 / 5 + 1 + 1 / 5) / 3)
    assert m["mp@10@medium"] == pytest.approx((3 / 5 + 1 + 2 / 9) / 3)
    assert m["mp@5@hard"] == pytest.approx((1 / 3 + 1 / 5) / 2)
    assert m["mp@10@hard"] == pytest.approx((1 / 3 + 2 / 9) / 2)
    assert res.info["n_queries_without_positives"] == {"easy": 1, "medium": 0, "hard": 1}
    pred = res.predictions
    assert pred["setting"].tolist()[:3] == ["medium"] * 3 and len(pred["index"]) == 9
    # top-1 after junk removal: A medium drops 3 -> 7; B keeps 3; C medium drops 6 only -> 3
    assert pred["pred"][:3].tolist() == [7, 3, 3]
    # easy only: A's top-1 is still 7, and the headline falls back to easy
    only = retrieval.run(_revisitop_data(), {"settings": ["easy"]}, 0, CPU)
    assert _metrics(only)["map"] == pytest.approx((5 / 12 + 1) / 2)


def test_revisitop_junk_ranked_first_is_removed():
    # item 7 is ranked second, behind item 3: listing 3 as junk makes 7 the first result (AP 1)
    with_junk = retrieval.run(_revisitop_data([{"easy": [7], "hard": [], "junk": [3]}]), {}, 0, CPU)
    assert _metrics(with_junk)["map@easy"] == 1.0
    plain = retrieval.run(_revisitop_data([{"easy": [7], "hard": [], "junk": []}]), {}, 0, CPU)
    assert _metrics(plain)["map@easy"] == pytest.approx((0 + 1 / 2) / 2)  # rank 1: (0 + 1/2) / 2
    # junk behind the positive changes nothing
    behind = retrieval.run(_revisitop_data([{"easy": [7], "hard": [], "junk": [4]}]), {}, 0, CPU)
    assert _metrics(behind)["map@easy"] == _metrics(plain)["map@easy"]


# ---------------------------------------------------------------------------- blockwise == one-shot
def _brute_ranks(G, Q, q: int, exclude: set[int]) -> list[int]:
    """Gallery indices in the documented order, (-sim, index), with exact similarities."""
    sims = (Q[q] / 2) @ (G / 2).T
    return [int(g) for g in np.lexsort((np.arange(len(G)), -sims)) if int(g) not in exclude]


def test_blockwise_equals_one_shot_and_brute_force_with_ties():
    rng = np.random.default_rng(3)
    G, Q = _exact(90, 4), _exact(25, 5)
    gy, qy = rng.integers(0, 4, 90), rng.integers(0, 4, 25)
    gt = []
    for _ in range(25):
        part = rng.permutation(90)[: rng.integers(0, 20)]
        cut = sorted(rng.integers(0, len(part) + 1, 2))
        gt.append(
            {
                "easy": part[: cut[0]].tolist(),
                "hard": part[cut[0] : cut[1]].tolist(),
                "junk": part[cut[1] :].tolist(),
            }
        )
    first = {}
    for name, extras in (("class", {}), ("revisitop", {"retrieval_gt": gt})):
        runs = [
            retrieval.run(_data(G, gy, Q, qy, shard, **extras), extra, 0, CPU)
            for shard, extra in (
                (8192, {"batch_size": 1000}),
                (7, {"batch_size": 3}),
                (7, {"batch_size": 3, "memory_budget_gb": 1e-7}),  # one gallery row per piece
                (7, {"batch_size": 4, "max_rank": 90}),  # the top-list path, untruncated
            )
        ]
        for other in runs[1:]:
            assert _metrics(other) == _metrics(runs[0])
            for key, col in runs[0].predictions.items():
                np.testing.assert_array_equal(other.predictions[key], col)
        first[name] = _metrics(runs[0])
    # both equal a brute-force ranking by (-similarity, index) with exact similarities and many ties
    class_aps, medium_aps = [], []
    for q, entry in enumerate(gt):
        ranking = _brute_ranks(G, Q, q, set())
        pos = [r for r, g in enumerate(ranking) if gy[g] == qy[q]]
        if pos:
            class_aps.append(average_precision(pos, len(pos)))
        ranking = _brute_ranks(G, Q, q, set(entry["junk"]))
        pos = [r for r, g in enumerate(ranking) if g in set(entry["easy"]) | set(entry["hard"])]
        if pos:
            medium_aps.append(revisitop_ap(pos, len(pos)))
    assert first["class"]["map"] == pytest.approx(np.mean(class_aps), abs=1e-12)
    assert first["revisitop"]["map@medium"] == pytest.approx(np.mean(medium_aps), abs=1e-12)


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"k": [1]}, "unknown retrieval parameter"),
        ({"device": "cpu"}, r"\['device'\].*'device' is a run option.*--device"),
        ({"mode": "loo"}, "'mode'"),
        ({"gt": "labels"}, "'gt'"),
        ({"ks": 5}, "'ks'"),
        ({"ks": [0, 5]}, "'ks'"),
        ({"settings": "medium"}, "'settings'"),
        ({"settings": ["medium", "extreme"]}, "'settings'"),
        ({"batch_size": 0}, "'batch_size'"),
        ({"max_rank": 5}, "'max_rank'"),
        ({"memory_budget_gb": -1}, "'memory_budget_gb'"),
        ({"gt": "revisitop"}, "needs data.extras"),
    ],
)
def test_bad_params_raise_one_clear_error(params, match):
    data = _data(_at([0, 10]), [0, 1], _at([5]), [0])
    with pytest.raises(ValueError, match=match):
        retrieval.run(data, params, 0, CPU)


def test_bad_ground_truth_raises():
    with pytest.raises(ValueError, match="twice"):
        retrieval.run(_revisitop_data([{"easy": [1], "hard": [1], "junk": []}]), {}, 0, CPU)
    with pytest.raises(ValueError, match="outside"):
        retrieval.run(_revisitop_data([{"easy": [10], "hard": [], "junk": []}]), {}, 0, CPU)
    with pytest.raises(ValueError, match="leave_one_out"):
        retrieval.run(_revisitop_data(), {"mode": "leave_one_out"}, 0, CPU)
    with pytest.raises(ValueError, match="no query has a relevant"):
        retrieval.run(_data(_at([0, 10]), [0, 1], _at([5]), [7]), {}, 0, CPU)


# ------------------------------------------------------------------------------------ run options
def test_device_comes_from_run_options_only():
    data = _data(_at([50, 10, 30]), [1, 0, 1], _at([0, 65]), [1, 1])
    default = retrieval.run(data, {}, 0)  # no options: the protocol's own default ("auto")
    on_cpu = retrieval.run(data, {}, 0, CPU)
    assert on_cpu.info["device"] == "cpu"
    assert _metrics(on_cpu) == _metrics(default)
    for key, col in on_cpu.predictions.items():
        np.testing.assert_array_equal(default.predictions[key], col)
    if not torch.cuda.is_available():  # an explicit CUDA request never falls back to the CPU
        with pytest.raises(ValueError, match="no CUDA GPU"):
            retrieval.run(data, {}, 0, RunOptions(device="cuda"))
