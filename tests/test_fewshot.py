"""Few-shot protocol: exact n-per-class draws, reproducibility, short classes, and shots that help."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bobench.features import FeatureSet
from bobench.options import RunOptions
from bobench.protocols import fewshot
from bobench.protocols.base import ArrayFeatures, ProbeData

FAST_LINEAR = {"Cs": [0.01, 0.1, 1.0], "max_iter": 200}  # a short path keeps each probe fit well under 1 s


def _blobs(n_per: int | list[int], seed: int, n_classes: int = 5, dim: int = 24, noise: float = 1.0):
    centres = np.random.default_rng(100).normal(size=(n_classes, dim))
    counts = [n_per] * n_classes if isinstance(n_per, int) else n_per
    y = np.repeat(np.arange(n_classes), counts)
    X = centres[y] + np.random.default_rng(seed).normal(size=(len(y), dim)) * noise
    return ArrayFeatures(X.astype(np.float32), y)


def test_subsets_are_exactly_n_per_class_and_reproducible() -> None:
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(4), [9, 30, 12, 50]))
    for shot in (1, 3, 9):
        index = fewshot.sample_subset(labels, shot, seed=0, n_classes=4)
        assert len(np.unique(index)) == len(index) == 4 * shot
        np.testing.assert_array_equal(np.bincount(labels[index], minlength=4), [shot] * 4)
        np.testing.assert_array_equal(index, fewshot.sample_subset(labels, shot, seed=0, n_classes=4))
        assert not np.array_equal(index, fewshot.sample_subset(labels, shot, seed=1, n_classes=4))
        assert fewshot.subset_hash(index) != fewshot.subset_hash(fewshot.sample_subset(labels, shot, 1, 4))


def test_too_few_samples_names_the_class_and_count() -> None:
    labels = np.repeat(np.arange(3), [5, 2, 5])
    with pytest.raises(fewshot.TooFewSamplesError, match=r"id 1\): 2") as err:
        fewshot.sample_subset(labels, 3, seed=0, n_classes=3)
    assert err.value.short == {1: 2} and isinstance(err.value, ValueError)
    with pytest.raises(fewshot.TooFewSamplesError, match=r"id 3\): 0"):  # a class absent from train
        fewshot.sample_subset(labels, 1, seed=0, n_classes=4)


def test_run_skips_a_shot_count_some_class_cannot_fill() -> None:
    train = _blobs([8, 8, 4, 8, 8], seed=1)
    data = ProbeData(train, _blobs(5, seed=3), None, n_classes=5, classes=["a", "b", "rare", "d", "e"])
    res = fewshot.run(data, {"shots": [2, 6], "n_seeds": 2, "linear": FAST_LINEAR}, seed=0)
    assert {m.name for m in res.metrics} == {
        f"fewshot_{m}_top1@2shot{s}" for m in ("linear", "knn") for s in ("", ":std")
    }
    assert res.info["shots"] == [2] and "'rare' (id 2): 4" in res.info["skipped"]["6"]
    with pytest.raises(fewshot.TooFewSamplesError, match="'rare'"):
        fewshot.run(data, {"shots": [6], "linear": FAST_LINEAR}, seed=0)


def test_end_to_end_accuracy_grows_with_shots() -> None:
    train, val, test = _blobs(40, 1, noise=2.0), _blobs(10, 2, noise=2.0), _blobs(30, 3, noise=2.0)
    params = {"shots": [1, 4, 16], "n_seeds": 3, "linear": FAST_LINEAR}
    res = fewshot.run(ProbeData(train, test, val, n_classes=5), params, seed=7)
    values = {m.name: m for m in res.metrics}
    assert len(values) == 3 * 2 * 2
    for name, m in values.items():
        assert m.higher_is_better is (not name.endswith(":std")), name
    mean = {
        n: np.mean([values[f"fewshot_{m}_top1@{n}shot"].value for m in ("linear", "knn")]) for n in (1, 4, 16)
    }
    assert mean[1] < mean[4] < mean[16]
    assert res.info["seeds"] == [7, 8, 9] and res.info["C_selection"] == "val"
    for method in ("linear", "knn"):
        for n in ("1", "4", "16"):
            per_seed = res.info["per_seed"][method][n]
            assert len(per_seed) == 3
            m = values[f"fewshot_{method}_top1@{n}shot"]
            assert m.value == pytest.approx(np.mean(per_seed))
            assert values[f"{m.name}:std"].value == pytest.approx(np.std(per_seed, ddof=1))
    hashes = res.info["subsets"]
    assert all(len(set(h)) == 3 for h in hashes.values())  # the draws differ across seeds
    again = fewshot.run(ProbeData(train, test, val, n_classes=5), params, seed=7)
    assert again.metrics == res.metrics and again.info["subsets"] == hashes


def test_without_val_the_probe_uses_fixed_C() -> None:
    # 1-shot, 2 classes: k-fold selection would have one row per fold at best
    data = ProbeData(_blobs(6, 1, n_classes=2), _blobs(5, 3, n_classes=2), None, n_classes=2)
    res = fewshot.run(data, {"shots": [1], "n_seeds": 2, "fixed_C": 0.5, "linear": FAST_LINEAR}, seed=0)
    assert res.info["C_selection"] == "fixed_C" and res.info["linear_C"] == {"1": [0.5, 0.5]}
    assert all(0.0 <= m.value <= 1.0 for m in res.metrics)


def test_draws_from_a_memory_mapped_feature_set(tmp_path: Path) -> None:
    pool = _blobs(6, 1)
    shards = []
    for i, s in enumerate(range(0, pool.n, 7)):
        np.save(tmp_path / f"s{i}.npy", pool.X[s : s + 7])
        np.save(tmp_path / f"s{i}.labels.npy", pool.y[s : s + 7])
        shards.append({"index": i, "file": f"s{i}.npy", "labels": f"s{i}.labels.npy"})
    fs = FeatureSet("k", tmp_path, {"n": pool.n, "dim": pool.dim, "shards": shards, "dataset": {}})
    test = _blobs(4, 3)
    params = {"shots": [2], "n_seeds": 2, "linear": FAST_LINEAR}
    on_disk = fewshot.run(ProbeData(fs, test, None, n_classes=5), params, seed=0)
    in_memory = fewshot.run(ProbeData(pool, test, None, n_classes=5), params, seed=0)
    assert on_disk.metrics == in_memory.metrics and on_disk.info["subsets"] == in_memory.info["subsets"]


def test_params_are_validated() -> None:
    data = ProbeData(_blobs(3, 1), _blobs(2, 2), None, n_classes=5)
    with pytest.raises(ValueError, match="'shot'"):
        fewshot.run(data, {"shot": [1]}, seed=0)
    for bad in ({"shots": []}, {"shots": [0]}, {"shots": 5}, {"n_seeds": 0}, {"linear": 3}, {"fixed_C": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            fewshot.run(data, bad, seed=0)
    with pytest.raises(ValueError, match="'kk'"):  # nested protocol params are checked before any fit
        fewshot.run(data, {"knn": {"kk": 1}}, seed=0)
    with pytest.raises(ValueError, match="seed"):
        fewshot.run(data, {}, seed=-1)
    for bad in ({"device": "cpu"}, {"linear": {"device": "cpu"}}, {"knn": {"device": "cpu"}}):
        with pytest.raises(ValueError, match=r"\['device'\].*is a run option.*--device"):
            fewshot.run(data, bad, seed=0)


@pytest.mark.parametrize("with_val", [True, False])  # linear.run, or the fixed-C fit without val
def test_run_options_reach_both_protocols(with_val: bool) -> None:
    data = ProbeData(_blobs(4, 1), _blobs(4, 3), _blobs(3, 2) if with_val else None, n_classes=5)
    params = {"shots": [2], "n_seeds": 1, "linear": FAST_LINEAR}
    default = fewshot.run(data, params, seed=0)  # no options: each protocol's own default device
    on_cpu = fewshot.run(data, params, seed=0, options=RunOptions(device="cpu"))
    if not torch.cuda.is_available():  # kNN's "auto" is the CPU here
        assert on_cpu.metrics == default.metrics and on_cpu.info["per_seed"] == default.info["per_seed"]
        with pytest.raises(ValueError, match="no CUDA GPU"):
            fewshot.run(data, params, seed=0, options=RunOptions(device="cuda"))
    with pytest.raises(ValueError, match="MPS lacks"):
        fewshot.run(data, params, seed=0, options=RunOptions(device="mps"))
