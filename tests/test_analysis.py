"""Analysis against known answers: hand-computed z-scores and ranks, scipy on BoB's own table, bootstrap
coverage on synthetic data, and bootstrap / covariates / reference comparison on real stores."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import bobench
from bobench import analysis
from bobench.analysis import (
    BOB_COVARIATE_RHO,
    bootstrap,
    compare_with_reference,
    covariate_correlations,
    load_reference,
    rank,
    score_ci,
    score_matrix,
    task_correlations,
    task_type,
    zscores,
)
from bobench.metrics import Metric
from bobench.store import Cell, ResultStore

_HIB = {"top1": True, "mrr": True, "nll": False, "ece": False, "map": True}


def _record(
    store: ResultStore,
    backbone: str,
    task: str,
    protocol: str,
    metrics: dict[str, float],
    *,
    primary: str,
    seed: int = 0,
    dataset: str | None = None,
    predictions: dict[str, Any] | None = None,
    card: dict[str, Any] | None = None,
    config_hash: str | None = None,
) -> None:
    """One cell as the runner records it: config_json["task"] and, if given, a predictions Parquet."""
    config: dict[str, Any] = {"backbone": backbone, "seed": seed, "task": {"name": task, "primary": primary}}
    if predictions is not None:
        path = store.path.parent / "predictions" / backbone / task / f"seed{seed}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(predictions).to_parquet(path, index=False)
        config["predictions"] = str(path)
    h = config_hash or f"h{seed}"
    cell = Cell(backbone, task, dataset or task.split("-")[0], protocol, seed=seed, config_hash=h)
    ms = [Metric(k, v, _HIB.get(k.split("@")[0], True)) for k, v in metrics.items()]
    store.record(cell, ms, config=config, card=card, provenance={})


@pytest.fixture
def hand_results(tmp_path: Path) -> pd.DataFrame:
    """3 backbones × 3 settings: lin (top1, 2 seeds for a), knn (nll, lower is better), ret (mrr, b missing)."""
    with ResultStore(tmp_path / "r.db") as store:
        for bb, seeds in {"a": [0.88, 0.92], "b": [0.8], "c": [0.7]}.items():
            for seed, v in enumerate(seeds):
                _record(store, bb, "d-lin", "linear", {"top1": v, "nll": 0.1}, primary="top1", seed=seed)
        # an older config of a's knn cell: superseded by the newer row, never averaged with it
        _record(store, "a", "d-knn", "knn", {"nll": 9.0, "top1": 0.5}, primary="nll", config_hash="old")
        for bb, v in {"a": 1.0, "b": 2.0, "c": 4.0}.items():
            _record(store, bb, "d-knn", "knn", {"nll": v, "top1": 0.5}, primary="nll")
        for bb, v in {"a": 0.6, "c": 0.4}.items():
            _record(store, bb, "d-ret", "retrieval", {"mrr": v}, primary="mrr")
        store.record_failure(
            Cell("b", "d-ret", "d", "retrieval", config_hash="h0"), "boom", config={}, provenance={}
        )
        return store.results(status=None)


def test_a_cell_whose_newest_config_failed_has_no_score(tmp_path: Path) -> None:
    """After a version bump the old config's score must not stand in for the new config's failed run, and
    a metric the new config no longer records is not carried over from the old one."""
    with ResultStore(tmp_path / "r.db") as store:
        for bb, v in {"a": 0.9, "b": 0.8, "c": 0.7}.items():
            _record(store, bb, "d-lin", "linear", {"top1": v, "ece": 0.1}, primary="top1", config_hash="v1")
        store.record_failure(Cell("b", "d-lin", "d", "linear", config_hash="v2"), "boom", config={})
        _record(store, "c", "d-lin", "linear", {"top1": 0.75}, primary="top1", config_hash="v2")
        results = store.results(status=None)
    m = score_matrix(results)
    assert m.loc["a", "d-lin:top1"] == 0.9 and "b" not in m.index  # b's only score was the old config's
    assert m.loc["c", "d-lin:top1"] == 0.75
    assert {("b", "d-lin:top1", 0), ("c", "d-lin:top1", 0)} <= set(m.attrs["superseded"])
    every = score_matrix(results, metric="all")
    assert every.loc["a", "d-lin:ece"] == 0.1 and math.isnan(every.loc["c", "d-lin:ece"])
    # the same table twice over, index and ids repeated (two exports concatenated): the same matrix
    twice = score_matrix(pd.concat([results, results.assign(backbone=results["backbone"] + "2")]))
    assert twice.loc["c2", "d-lin:top1"] == 0.75 and "b2" not in twice.index


def test_task_type():
    assert [task_type(p) for p in ("linear", "knn", "fewshot")] == ["classification"] * 3
    assert (task_type("retrieval"), task_type("ood"), task_type("detection")) == (
        "retrieval",
        "ood",
        "detection",
    )


def test_matrix_zscores_and_ranks_by_hand(hand_results):
    m = score_matrix(hand_results)
    assert list(m.columns) == ["d-lin:top1", "d-knn:nll", "d-ret:mrr"] and list(m.index) == ["a", "b", "c"]
    assert m.loc["a", "d-lin:top1"] == pytest.approx(0.9)  # mean over its two seeds
    assert math.isnan(m.loc["b", "d-ret:mrr"])  # the failed cell is missing, not filled
    assert m.attrs["higher_is_better"] == {"d-lin:top1": True, "d-knn:nll": False, "d-ret:mrr": True}
    assert m.attrs["n_seeds"]["d-lin:top1"] == {"a": 2, "b": 1, "c": 1}
    assert m.attrs["protocol"]["d-ret:mrr"] == "retrieval"
    assert m.loc["a", "d-knn:nll"] == 1.0 and ("a", "d-knn:nll", 0) in m.attrs["superseded"]

    z = zscores(m)
    s15, s14 = math.sqrt(1.5), math.sqrt(14)
    # lin: mean 0.8, std sqrt(0.02/3) → ±sqrt(1.5); knn: mean 7/3, std sqrt(14)/3, sign flipped (nll)
    np.testing.assert_allclose(z["d-lin:top1"], [s15, 0, -s15], atol=1e-12)
    np.testing.assert_allclose(z["d-knn:nll"], [4 / s14, 1 / s14, -5 / s14], atol=1e-12)
    np.testing.assert_allclose(z["d-ret:mrr"], [1, np.nan, -1], atol=1e-12)  # over a and c only
    assert z.attrs["population"]["d-ret:mrr"] == {"n": 2, "mean": pytest.approx(0.5), "std": pytest.approx(0.1),
                                                 "backbones": ["a", "c"]}  # fmt: skip
    assert z.attrs["degenerate"] == []

    r = rank(z)
    cls_a, cls_b, cls_c = (s15 + 4 / s14) / 2, (1 / s14) / 2, (-s15 - 5 / s14) / 2
    assert list(r.index) == ["a", "b", "c"] and list(r["rank"]) == [1, 2, 3]
    np.testing.assert_allclose(r["classification"], [cls_a, cls_b, cls_c])
    np.testing.assert_allclose(r["retrieval"], [1, np.nan, -1])
    # b is ranked on classification alone: its missing retrieval is neither 0 nor averaged in
    np.testing.assert_allclose(r["overall"], [(cls_a + 1) / 2, cls_b, (cls_c - 1) / 2])
    assert r.loc["b", "missing"] == ["d-ret:mrr"] and not r.loc["b", "complete"]
    assert list(r["n_missing"]) == [0, 1, 0] and list(r["n_settings"]) == [3, 2, 3]

    strict = rank(z, require_complete=True)
    assert list(strict.index) == ["a", "c"] and list(strict["rank"]) == [1, 2]
    assert strict.attrs["excluded"] == {"b": ["d-ret:mrr"]}


def test_matrix_metric_choices_and_degenerate(hand_results):
    every = score_matrix(hand_results, metric="all")
    assert set(every.columns) == {"d-lin:top1", "d-lin:nll", "d-knn:nll", "d-knn:top1", "d-ret:mrr"}
    z = zscores(score_matrix(hand_results, metric=["nll", "top1"]))
    assert sorted(z.attrs["degenerate"]) == ["d-knn:top1", "d-lin:nll"]  # constant 0.5 / 0.1
    assert z["d-lin:nll"].isna().all()
    r = rank(z)
    assert "d-lin:nll" not in r.loc["b", "missing"]  # a degenerate setting is dropped, not "missing"


def test_ties_share_min_rank():
    m = pd.DataFrame({"t:top1": [0.9, 0.8, 0.8, 0.1]}, index=pd.Index(list("abcd"), name="backbone"))
    assert list(rank(zscores(m))["rank"]) == [1, 2, 2, 4]


def test_bob_reference_against_scipy():
    ref = load_reference()
    assert set(ref.columns) >= {"backbone", "dataset", "metric", "value", "higher_is_better", "source"}
    assert ref["higher_is_better"].all() and (ref["source"] == "BoB").all()
    pivot = ref.pivot(index="backbone", columns="dataset", values="value")
    m = score_matrix(ref, metric="all")
    assert m.shape == (33, 8)
    z = zscores(m)
    for ds in pivot.columns:
        np.testing.assert_allclose(
            z[f"{ds}:MRR"].reindex(pivot.index), stats.zscore(pivot[ds], ddof=0), atol=1e-12
        )

    rho = task_correlations(m)
    expected = stats.spearmanr(pivot.to_numpy()).statistic
    order = [f"{ds}:MRR" for ds in pivot.columns]
    np.testing.assert_allclose(rho.loc[order, order].to_numpy(), expected, atol=1e-12)
    assert rho.attrs["n"][order[0]][order[1]] == 33

    # pairwise complete: drop some cells and compare each pair with spearmanr on the rows having both
    holes = pivot.copy()
    holes.iloc[:5, 0] = np.nan
    holes.iloc[3:9, 1] = np.nan
    rho2 = task_correlations(holes)
    both = holes.iloc[:, [0, 1]].dropna()
    assert rho2.iloc[0, 1] == pytest.approx(stats.spearmanr(both.iloc[:, 0], both.iloc[:, 1]).statistic)
    assert rho2.attrs["n"][holes.columns[0]][holes.columns[1]] == 33 - 9

    r = rank(z)
    overall = stats.zscore(pivot, ddof=0).mean(axis=1)  # one task type: the mean z over 8 datasets
    np.testing.assert_allclose(r["overall"].reindex(pivot.index), overall, atol=1e-12)
    np.testing.assert_array_equal(
        r["rank"].reindex(pivot.index).to_numpy(int), stats.rankdata(-overall, "min")
    )
    assert task_correlations(z, by="task_type").shape == (1, 1)


def test_load_reference_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        load_reference(tmp_path / "nope.csv")


def test_score_ci_coverage():
    rng = np.random.default_rng(1)
    data = rng.random((200, 300)) < 0.7
    cis = np.array([score_ci(row, n_boot=400, seed=i) for i, row in enumerate(data)])
    assert (cis[:, 0] <= cis[:, 1]).all()
    coverage = np.mean((cis[:, 0] <= 0.7) & (cis[:, 1] >= 0.7))
    assert 0.91 <= coverage <= 0.99, coverage
    assert score_ci(np.ones(50), n_boot=100) == (1.0, 1.0)


def _preds(correct: np.ndarray, labels: np.ndarray, setting: str) -> dict[str, np.ndarray]:
    return {"index": np.arange(len(labels)), "label": labels, "pred": np.where(correct, labels, labels + 1),
            "confidence": np.full(len(labels), 0.5), "setting": np.full(len(labels), setting)}  # fmt: skip


def test_bootstrap_synthetic_store(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    labels = rng.integers(0, 5, n)
    noise = rng.random((3, 2, n))
    p = {"best": 0.95, "twin1": 0.6, "twin2": 0.6, "weak": 0.3}
    with ResultStore(tmp_path / "r.db") as store:
        for bb, prob in p.items():
            draws = noise[{"best": 0, "weak": 2}.get(bb, 1)]  # twins: identical predictions
            for t, (task, protocol, setting) in enumerate(
                [("s-lin", "linear", "C=1"), ("s-knn", "knn", "k=20")]
            ):
                correct = draws[t] < prob
                preds = _preds(correct, labels, setting)
                if protocol == "knn":  # a second setting after the headline, as kNN writes them
                    other = _preds(~correct, labels, "k=1")
                    preds = {k: np.concatenate([preds[k], other[k]]) for k in preds}
                _record(store, bb, task, protocol, {"top1": correct.mean(), "top1@k=1": 1 - correct.mean()},
                        primary="top1", dataset="synth", predictions=preds)  # fmt: skip
            # ood: ID rows then two shifted sets of other sizes; top1@ood=mean is the mean of their accuracies
            sets = {"id": labels, "ood=a": labels[:120], "ood=b": labels[:80]}
            hits = {k: draws[0, : len(v)] < prob for k, v in sets.items()}
            parts = [_preds(hits[k], v, k) for k, v in sets.items()]
            accs = {f"top1@{k}": hits[k].mean() for k in ("ood=a", "ood=b")}
            ood_metrics = {"top1": hits["id"].mean(), **accs, "top1@ood=mean": np.mean(list(accs.values()))}
            preds = {k: np.concatenate([p_[k] for p_ in parts]) for k in parts[0]}
            _record(store, bb, "s-ood", "ood", ood_metrics, primary="top1@ood=mean", dataset="synth",
                    predictions=preds)  # fmt: skip
            # retrieval: one seed, no predictions → fixed; fewshot: 2 seeds → resampled over seeds
            _record(store, bb, "s-ret", "retrieval", {"mrr": prob}, primary="mrr", dataset="synth")
            for seed in (0, 1):
                _record(
                    store, bb, "s-few", "fewshot", {"top1": prob + 0.01 * seed}, primary="top1", seed=seed
                )
        results = store.results()

    out = bootstrap(results, n_boot=300, seed=0)
    assert list(out.index) == ["best", "twin1", "twin2", "weak"]
    assert (out.loc["best", "rank_low"], out.loc["best", "rank_high"]) == (1, 1)
    assert out.loc["best", "tied_with_best"] and not out.loc["twin1", "tied_with_best"]
    assert out.loc["twin1", "tie_group"] == out.loc["twin2", "tie_group"] == 2
    assert out.loc["twin1", "rank"] == out.loc["twin2", "rank"] == 2
    assert (out["overall_low"] <= out["overall"]).all() and (out["overall"] <= out["overall_high"]).all()
    assert out.attrs["resampling"]["s-lin:top1"]["predictions"] == list(p)
    assert out.attrs["resampling"]["s-few:top1"]["seeds"] == list(p)
    assert out.attrs["not_resampled"] == ["s-ret:mrr"]
    assert out.attrs["resampled"] == ["s-lin:top1", "s-knn:top1", "s-ood:top1@ood=mean", "s-few:top1"]
    assert out.attrs["notes"] == []
    # the point estimates are rank()'s
    point = rank(zscores(score_matrix(results)))
    np.testing.assert_allclose(out["overall"], point.loc[out.index, "overall"])
    # a non-headline setting is recomputed from its own rows
    sub = bootstrap(results, n_boot=20, metric=["top1@k=1"])
    assert sub.attrs["resampled"] == ["s-knn:top1@k=1"]
    assert out.equals(bootstrap(results, n_boot=300, seed=0))  # reproducible
    # an incomplete backbone: excluded with require_complete, flagged (not dropped) without
    partial = results[~((results["backbone"] == "weak") & (results["task"] == "s-ret")).to_numpy()]
    assert not bootstrap(partial, n_boot=20).loc["weak", "complete"]
    strict = bootstrap(partial, n_boot=20, require_complete=True)
    assert "weak" not in strict.index and strict.attrs["excluded"] == {"weak": ["s-ret:mrr"]}
    assert strict["rank_high"].max() <= 3


def test_bootstrap_fixed_and_mismatch(tmp_path):
    labels = np.arange(10) % 3
    with ResultStore(tmp_path / "r.db") as store:
        for bb, v in {"a": 0.9, "b": 0.5, "c": 0.2}.items():
            preds = _preds(np.arange(10) < 5, labels, "C=1")  # 0.5 correct: disagrees with a and c
            _record(store, bb, "f-lin", "linear", {"top1": v}, primary="top1", predictions=preds)
            _record(store, bb, "f-ret", "retrieval", {"mrr": v / 2}, primary="mrr")
        results = store.results()
    out = bootstrap(results, n_boot=50)
    assert out.attrs["resampling"]["f-lin:top1"] == {"predictions": ["b"], "seeds": [], "fixed": ["a", "c"]}
    assert out.attrs["partly_resampled"] == ["f-lin:top1"] and len(out.attrs["notes"]) == 2
    fixed = bootstrap(results[results["backbone"] != "b"], n_boot=50)  # nothing resampled
    assert fixed.attrs["not_resampled"] == ["f-lin:top1", "f-ret:mrr"]
    np.testing.assert_allclose(fixed["overall_low"], fixed["overall"])
    np.testing.assert_allclose(fixed["overall_high"], fixed["overall"])
    assert list(fixed["rank_low"]) == list(fixed["rank"]) == [1, 2]


def test_covariate_correlations_against_scipy():
    overall = [1.2, 0.9, 0.1, -0.3, 0.5, -1.0, 0.0, 0.7, -0.5]
    cards = [
        ("v1", "vit", 86e6, 400e6), ("v2", "vit", 22e6, 1.28e6), ("v3", "vit", 5e6, "unknown"),
        ("v4", "vit", 300e6, 14e6), ("v5", "vit", 86e6, 0), ("c1", "cnn", 25e6, 1.28e6),
        ("c2", "cnn", 11e6, 1.28e6), ("c3", "cnn", 88e6, 14e6), ("h1", "hybrid", 30e6, 1e6),
    ]  # fmt: skip
    results = pd.DataFrame({
        "backbone": [c[0] for c in cards],
        "card_json": [json.dumps({"family": f, "params": p, "pretraining_images": d}) for _, f, p, d in cards],
    })  # fmt: skip
    ranking = pd.DataFrame({"overall": overall}, index=[c[0] for c in cards])
    out = covariate_correlations(ranking, results).set_index(["family", "covariate"])
    assert list(out.index.get_level_values(0).unique()) == ["vit", "cnn", "other"]
    vit = stats.spearmanr([1.2, 0.9, 0.1, -0.3, 0.5], [86e6, 22e6, 5e6, 300e6, 86e6])
    assert out.loc[("vit", "params"), "rho"] == pytest.approx(vit.statistic)
    assert out.loc[("vit", "params"), "p_value"] == pytest.approx(vit.pvalue)
    data = stats.spearmanr([1.2, 0.9, -0.3], [400e6, 1.28e6, 14e6])  # "unknown" and 0 excluded
    assert out.loc[("vit", "pretraining_images"), "rho"] == pytest.approx(data.statistic)
    assert out.loc[("vit", "pretraining_images"), ["n", "n_excluded"]].tolist() == [3, 2]
    assert out.loc[("cnn", "params"), "rho"] == pytest.approx(
        stats.spearmanr([-1.0, 0.0, 0.7], [25, 11, 88]).statistic
    )
    assert out.loc[("vit", "params"), "bob_rho"] == BOB_COVARIATE_RHO["vit"]["params"] == 0.58
    assert math.isnan(out.loc[("other", "params"), "rho"]) and out.loc[("other", "params"), "n"] == 1


def test_compare_with_reference(tmp_path):
    ref = load_reference()
    cub = ref[ref["dataset"] == "CUB200"].sort_values("value", ascending=False)
    first, second = cub["value"].iloc[0], cub["value"].iloc[1]
    r50 = float(cub.loc[cub["backbone"] == "timm-resnet50", "value"].iloc[0])
    with ResultStore(tmp_path / "r.db") as store:
        mine = {"mrr": (first + second) / 2, "map": 0.5}
        _record(store, "mine", "bob-cub200-retrieval", "retrieval", mine, primary="mrr")
        card = {"family": "cnn", "extra": {"bob_id": "timm-resnet50"}}
        _record(store, "bob/resnet50", "bob-cub200-retrieval", "retrieval", {"mrr": r50 - 0.01}, primary="mrr",
                card=card)  # fmt: skip
        results = store.results()
    out = compare_with_reference(results, ref, {"bob-cub200-retrieval": ("CUB200", "MRR")}).set_index(
        "backbone"
    )
    assert out.loc["mine", "bob_rank"] == 2 and out.loc["mine", "bob_n"] == 33
    assert out.loc["mine", "bob_best"] == cub["backbone"].iloc[0] == "timm-convnext_xlarge_in22ft1k"
    assert out.loc["mine", "bob_best_value"] == pytest.approx(first)
    assert pd.isna(out.loc["mine", "bob_id"]) and math.isnan(out.loc["mine", "bob_value"])
    assert out.loc["bob/resnet50", "bob_value"] == pytest.approx(r50)
    assert out.loc["bob/resnet50", "diff"] == pytest.approx(-0.01)
    assert len(compare_with_reference(results, ref)) == 2  # the default mapping covers the bob tasks


def test_package_front_door_and_module_boundaries():
    """Import from ``bobench.analysis``; its modules share only public names and import without a cycle."""
    assert analysis.bootstrap is bootstrap and analysis.score_ci is score_ci
    assert all(getattr(analysis, name) is not None for name in analysis.__all__)
    assert analysis.REFERENCE_DIR.parent == Path(bobench.__file__).resolve().parent  # bobench/reference
    assert analysis.REFERENCE_DIR.name == "reference"
    assert (analysis.REFERENCE_DIR / "bob_retrieval_mrr.csv").is_file()  # package data, not a repo path
    package = Path(analysis.__file__).parent
    deps: dict[str, set[str]] = {}
    for file in package.glob("*.py"):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        assert "__getattr__" not in {getattr(n, "name", "") for n in tree.body}, file.name  # no lazy tricks
        deps[file.stem] = set()
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bobench")):
                continue
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{file.name} imports private {private} from {node.module}"
            if node.module.startswith("bobench.analysis."):
                deps[file.stem].add(node.module.rsplit(".", 1)[1])
            elif file.stem != "__init__":
                assert node.module != "bobench.analysis", f"{file.name} imports the package that imports it"
    done: set[str] = set()
    while len(done) < len(deps):  # peel off modules whose imports are all done: stuck means a cycle
        ready = {m for m, d in deps.items() if m not in done and d <= done}
        assert ready, f"import cycle among {sorted(set(deps) - done)}"
        done |= ready
