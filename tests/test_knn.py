"""kNN protocol: against scikit-learn, a by-hand weighted vote, and blockwise == one block."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score
from sklearn.neighbors import KNeighborsClassifier

from bobench.features import FeatureSet
from bobench.options import RunOptions
from bobench.protocols import knn
from bobench.protocols.base import ArrayFeatures, ProbeData

KS = (1, 2, 3, 4, 5, 10, 25, 60)


def _gaussian(n: int, dim: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, n_classes, n)


def _exact(n: int, seed: int, dim: int = 10) -> np.ndarray:
    """Rows with four entries of +-1 (norm exactly 2): normalised entries are +-0.5, so every cosine
    similarity is a multiple of 1/4 computed without rounding, whatever the blocking. Many exact ties."""
    rng = np.random.default_rng(seed)
    X = np.zeros((n, dim), np.float32)
    for row in X:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    return X


def _reference_neighbors(G: np.ndarray, Q: np.ndarray, k: int) -> np.ndarray:
    """The documented order: similarity descending, then gallery index ascending (exact data only)."""
    Gn = G / np.linalg.norm(G, axis=1, keepdims=True)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    sims = Qn.astype(np.float64) @ Gn.T.astype(np.float64)
    index = np.broadcast_to(np.arange(len(G)), sims.shape)
    return np.lexsort((index, -sims), axis=1)[:, :k]


def _sklearn_pred(G: np.ndarray, y: np.ndarray, Q: np.ndarray, k: int) -> np.ndarray:
    clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine", weights="uniform")
    return clf.fit(G, y).predict(Q)


def _feature_set(folder: Path, X: np.ndarray, y: np.ndarray, shard: int) -> FeatureSet:
    """A real on-disk FeatureSet (shards read back memory-mapped), written as the FeatureStore lays it out."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, s in enumerate(range(0, len(y), shard)):
        np.save(folder / f"shard-{i:05d}.npy", X[s : s + shard])
        np.save(folder / f"shard-{i:05d}.labels.npy", y[s : s + shard])
        shards.append({"index": i, "file": f"shard-{i:05d}.npy", "labels": f"shard-{i:05d}.labels.npy"})
    manifest = {
        "n": len(y),
        "dim": X.shape[1],
        "shards": shards,
        "complete": True,
        "dataset": {"classes": []},
    }
    return FeatureSet("test-key", folder, manifest)


class StreamOnly:
    """A gallery that can only be streamed: kNN must never call ``load()`` on the gallery."""

    def __init__(self, inner: FeatureSet) -> None:
        self.inner = inner
        self.n, self.dim, self.labels = inner.n, inner.dim, inner.labels

    def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for X, y in self.inner.iter_shards():
            assert isinstance(X, np.memmap)
            yield X, y

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        raise AssertionError("the gallery was loaded whole")


# -- scikit-learn equivalence ----------------------------------------------------------------------------


@pytest.mark.parametrize("duplicates", [False, True])
def test_uniform_vote_equals_sklearn(duplicates: bool) -> None:
    G, y = _gaussian(300, 24, 5, seed=0)
    if duplicates:  # exact copies, same label: a tie at the k-th place cannot change the vote
        G, y = np.concatenate([G, G[:120]]), np.concatenate([y, y[:120]])
    Q, _ = _gaussian(150, 24, 5, seed=1)
    Q[:10] = G[200:210]  # queries that are gallery rows (similarity 1, duplicated in the copies)
    out = knn.knn_predict(G, y, Q, KS, block_size=64)
    for k in KS:
        np.testing.assert_array_equal(out.pred[f"k={k}:uniform"], _sklearn_pred(G, y, Q, k), err_msg=f"k={k}")
    # the engineered ties really happen: class-count ties at even k, similarity ties among copies
    labels = y[out.neighbors]
    counts = np.stack([np.bincount(row[:4], minlength=5) for row in labels])
    assert ((counts == counts.max(1, keepdims=True)).sum(1) > 1).any()
    if duplicates:
        assert out.boundary_ties > 0


def test_exact_ties_go_to_the_lowest_gallery_index() -> None:
    """Dense exact ties between labels: sklearn's pick among them is unspecified (np.argpartition), ours
    is the documented (similarity desc, index asc) order."""
    G, Q = _exact(400, seed=2), _exact(120, seed=3)
    y = np.random.default_rng(4).integers(0, 4, len(G))
    out = knn.knn_predict(G, y, Q, KS, block_size=32)
    ref = _reference_neighbors(G, Q, max(KS))
    np.testing.assert_array_equal(out.neighbors, ref)
    assert out.boundary_ties > 0
    for k in KS:
        expect = np.array([np.bincount(row, minlength=4).argmax() for row in y[ref[:, :k]]])
        np.testing.assert_array_equal(out.pred[f"k={k}:uniform"], expect)


# -- blockwise == one block ------------------------------------------------------------------------------


def _gallery(kind: str, X: np.ndarray, y: np.ndarray, tmp_path: Path):
    if kind == "array":
        return X, y
    if kind == "array_features":
        return ArrayFeatures(X, y, shard_size=7), None
    return StreamOnly(_feature_set(tmp_path / "fs", X, y, shard=13)), None


@pytest.mark.parametrize("kind", ["array", "array_features", "feature_set"])
@pytest.mark.parametrize(("block", "gallery_block"), [(1, 1), (5, 3), (17, None), (1000, 10_000)])
def test_blockwise_equals_one_block(kind: str, block: int, gallery_block: int | None, tmp_path: Path) -> None:
    G, Q = _exact(150, seed=5), _exact(40, seed=6)
    y = np.random.default_rng(7).integers(0, 6, len(G))
    whole = knn.knn_predict(G, y, Q, KS, block_size=10_000, gallery_block_size=10_000)
    train_X, train_y = _gallery(kind, G, y, tmp_path)
    part = knn.knn_predict(train_X, train_y, Q, KS, block_size=block, gallery_block_size=gallery_block)
    np.testing.assert_array_equal(part.neighbors, whole.neighbors)
    np.testing.assert_array_equal(part.similarities, whole.similarities)
    for d_part, d_whole in (
        (part.pred, whole.pred),
        (part.confidence, whole.confidence),
        (part.top5, whole.top5),
    ):
        assert d_part.keys() == d_whole.keys()
        for name in d_whole:
            np.testing.assert_array_equal(d_part[name], d_whole[name], err_msg=name)


def test_blockwise_on_real_valued_features(tmp_path: Path) -> None:
    """Float rounding may differ by block shape (1 ulp), so compare predictions and similarities."""
    G, y = _gaussian(500, 64, 7, seed=8)
    Q, _ = _gaussian(90, 64, 7, seed=9)
    whole = knn.knn_predict(G, y, Q, KS)
    fs = StreamOnly(_feature_set(tmp_path / "fs", G, y, shard=64))
    part = knn.knn_predict(fs, None, Q, KS, block_size=8, memory_budget_gb=64 * 1e-6)  # ~40-row pieces
    np.testing.assert_allclose(part.similarities, whole.similarities, atol=1e-6)
    for name in whole.pred:
        np.testing.assert_array_equal(part.pred[name], whole.pred[name], err_msg=name)


# -- votes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("temperature", "weighted_k3"), [(0.07, 0), (1.0, 1)])
def test_weighted_vote_by_hand(temperature: float, weighted_k3: int) -> None:
    # query (1, 0): similarities 1 (label 0), 0 (label 1), 1/sqrt(2) (label 1)
    G = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    y = np.array([0, 1, 1])
    out = knn.knn_predict(G, y, np.array([[1.0, 0.0]], np.float32), (1, 2, 3), temperature=temperature)
    np.testing.assert_array_equal(out.neighbors, [[0, 2, 1]])
    s0, s1 = math.exp(1 / temperature), math.exp(0.0) + math.exp(math.sqrt(0.5) / temperature)
    assert out.pred["k=3"][0] == weighted_k3  # T = 1 lets two weaker neighbours outvote the nearest
    assert out.confidence["k=3"][0] == pytest.approx(max(s0, s1) / (s0 + s1), rel=1e-6)
    w2 = math.exp(math.sqrt(0.5) / temperature)
    assert out.confidence["k=2"][0] == pytest.approx(s0 / (s0 + w2), rel=1e-6)
    assert out.pred["k=3:uniform"][0] == 1 and out.confidence["k=3:uniform"][0] == pytest.approx(2 / 3)
    assert out.pred["k=2:uniform"][0] == 0  # one vote each: the smaller label wins the tie
    assert out.pred["k=1"][0] == out.pred["k=1:uniform"][0] == 0


def test_vote_probabilities_and_their_calibration_by_hand() -> None:
    from bobench.metrics import ece, nll

    # query (1, 0) as in the test above, k = 3 (the gallery size) is the headline
    G = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    y = np.array([0, 1, 1])
    Q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    out = knn.knn_predict(G, y, Q, (1, 3), n_classes=3, temperature=1.0, headline_k=3)
    s0, s1 = math.exp(1.0), math.exp(0.0) + math.exp(math.sqrt(0.5))
    np.testing.assert_allclose(out.probs["k=3"][0], [s0 / (s0 + s1), s1 / (s0 + s1), 0.0], rtol=1e-6)
    res = knn.run(
        ProbeData(ArrayFeatures(G, y), ArrayFeatures(Q, np.array([0, 2])), None, n_classes=3),
        {"ks": [1, 3], "temperature": 1.0},
        seed=0,
    )
    m = {x.name: x.value for x in res.metrics}
    probs = out.probs["k=3"]
    # class 2 got no vote: its probability is 0 and the NLL pays the clipped 27.6 nats
    assert m["nll"] == pytest.approx(nll(probs, np.array([0, 2])))
    assert m["nll"] > 13 and m["ece"] == pytest.approx(ece(probs, np.array([0, 2])))


def test_top5_ranks_only_classes_with_votes() -> None:
    G = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], np.float32)
    y = np.array([6, 6, 3])
    out = knn.knn_predict(G, y, np.array([[1.0, 0.0]], np.float32), (3,), n_classes=8, headline_k=3)
    np.testing.assert_array_equal(out.top5["k=3"], [[6, 3, -1, -1, -1]])


# -- the protocol ----------------------------------------------------------------------------------------


def _blobs(n_per: int, seed: int, n_classes: int = 8, dim: int = 16) -> ArrayFeatures:
    centres = np.random.default_rng(100).normal(size=(n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per)
    X = centres[y] + np.random.default_rng(seed).normal(size=(len(y), dim)) * 1.2
    return ArrayFeatures(X.astype(np.float32), y)


def test_run_metrics_predictions_and_info() -> None:
    train, val, test = _blobs(10, 1), _blobs(4, 2), _blobs(6, 3)
    res = knn.run(ProbeData(train, test, val, n_classes=8), {}, seed=0)
    ks = (1, 10, 20, 50, 80)  # 100 and 200 clip to the 80 gallery rows
    settings = [knn.setting_name(k, v) for k in ks for v in ("weighted", "uniform")]
    names = [m.name for m in res.metrics]
    calib = ["ece", "ece_em", "nll", "ece_ts", "ece_em_ts", "nll_ts"]
    assert names == ["top1", "top5", "balanced_acc", *calib] + [f"top1@{s}" for s in settings]
    assert all(m.higher_is_better != (m.name in calib) for m in res.metrics)
    values = {m.name: m.value for m in res.metrics}
    assert values["top1"] == values["top1@k=20"] and values["top5"] >= values["top1"]
    assert values["top1"] > 0.5  # separable blobs
    p = res.predictions
    assert p is not None and set(p) == {"index", "label", "pred", "confidence", "setting"}
    assert all(len(v) == test.n * len(settings) for v in p.values())
    head = p["setting"] == "k=20"
    assert head[: test.n].all() and set(p["setting"]) == set(settings)
    assert values["balanced_acc"] == pytest.approx(balanced_accuracy_score(p["label"][head], p["pred"][head]))
    assert res.info["headline"] == "k=20" and res.info["ks"] == list(ks)
    assert set(res.info["val_top1"]) == set(settings) and res.info["n_val"] == val.n


def test_val_does_not_change_test_scores() -> None:
    train, val, test = _blobs(10, 1), _blobs(4, 2), _blobs(6, 3)
    with_val = knn.run(ProbeData(train, test, val, n_classes=8), {"ks": [1, 5]}, seed=0)
    without = knn.run(ProbeData(train, test, None, n_classes=8), {"ks": [1, 5]}, seed=0)
    scaled = {"ece_ts", "ece_em_ts", "nll_ts"}  # need a val split to fit the temperature on
    assert [m for m in with_val.metrics if m.name not in scaled] == without.metrics
    assert "val_top1" not in without.info and not scaled & {m.name for m in without.metrics}


def test_tiny_gallery_clips_k_and_drops_top5() -> None:
    train = ArrayFeatures(np.eye(3, 4, dtype=np.float32), np.array([0, 1, 2]))
    res = knn.run(ProbeData(train, _blobs(2, 3, n_classes=3, dim=4), None, n_classes=3), {}, seed=0)
    names = {m.name for m in res.metrics}
    assert "top5" not in names and {"top1@k=1", "top1@k=3:uniform"} <= names
    assert res.info["ks"] == [1, 3] and res.info["headline"] == "k=3"


def test_params_are_validated() -> None:
    data = ProbeData(_blobs(3, 1), _blobs(2, 2), None, n_classes=8)
    with pytest.raises(ValueError, match="'k'"):
        knn.run(data, {"k": 5}, seed=0)
    for bad in ({"ks": []}, {"ks": [0, 5]}, {"ks": 5}, {"temperature": 0}, {"block_size": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            knn.run(data, bad, seed=0)
    with pytest.raises(ValueError, match=r"\['device'\].*is a run option.*--device"):
        knn.run(data, {"device": "cpu"}, seed=0)
    with pytest.raises(ValueError, match="NaN"):
        knn.knn_predict(np.full((2, 3), np.nan, np.float32), np.zeros(2, int), np.ones((1, 3)), (1,))


def test_device_comes_from_run_options() -> None:
    data = ProbeData(_blobs(10, 1), _blobs(6, 3), _blobs(4, 2), n_classes=8)
    default = knn.run(data, {"ks": [1, 5]}, seed=0)  # no options: "auto", as a library call
    on_cpu = knn.run(data, {"ks": [1, 5]}, seed=0, options=RunOptions(device="cpu"))
    assert on_cpu.info["device"] == "cpu"
    if not torch.cuda.is_available():  # "auto" is the CPU here: identical results
        assert default.metrics == on_cpu.metrics
        for key, col in default.predictions.items():
            np.testing.assert_array_equal(on_cpu.predictions[key], col)
        with pytest.raises(ValueError, match="no CUDA GPU"):  # never a silent fall back to the CPU
            knn.run(data, {}, seed=0, options=RunOptions(device="cuda"))
    with pytest.raises(ValueError, match="MPS lacks"):  # the vote's float64
        knn.run(data, {}, seed=0, options=RunOptions(device="mps"))
