"""Linear probe: against sklearn, batch-size and streaming independence, determinism, k-fold, params."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from bobench.options import RunOptions
from bobench.protocols import get_protocol, linear
from bobench.protocols.base import ArrayFeatures, ProbeData

N_CLASSES = 5
TIGHT = {"tol": 1e-13, "max_iter": 2000}  # below float noise: stops where no decrease is measurable


def _blobs(n: int, seed: int, d: int = 64, spread: float = 1.2) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian blobs with uneven per-dimension offsets and scales (as raw features are)."""
    layout = np.random.default_rng(1234)
    means = layout.normal(size=(N_CLASSES, d)) * spread / np.sqrt(d) * 3
    scales, offsets = layout.lognormal(0, 1, d), layout.normal(size=d) * 3
    rng = np.random.default_rng(seed)
    y = rng.integers(0, N_CLASSES, n)
    return ((means[y] + rng.normal(size=(n, d))) * scales + offsets).astype(np.float32), y


@pytest.fixture(scope="module")
def blobs() -> ProbeData:
    (xtr, ytr), (xva, yva), (xte, yte) = _blobs(600, 1), _blobs(300, 2), _blobs(300, 3)
    return ProbeData(ArrayFeatures(xtr, ytr), ArrayFeatures(xte, yte), ArrayFeatures(xva, yva), N_CLASSES)


def _standardised(data: ProbeData) -> tuple[np.ndarray, np.ndarray]:
    mean, scale = linear.standardization(data.train)
    return ((data.train.X - mean) / scale), ((data.test.X - mean) / scale)


def _sklearn(z: np.ndarray, y: np.ndarray, C: float) -> LogisticRegression:
    return LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(z, y)


def test_registered_and_chosen_accuracy_matches_sklearn(blobs: ProbeData) -> None:
    assert get_protocol("linear") is linear.run
    res = linear.run(blobs, {}, seed=0)
    info = res.info
    assert info["selection"] == "val" and len(info["Cs"]) == len(info["val_top1"]) == 10
    assert info["C"] == info["Cs"][int(np.argmax(info["val_top1"]))]
    ztr, zte = _standardised(blobs)
    ref = _sklearn(ztr, blobs.train.y, info["C"]).score(zte, blobs.test.y)
    top1 = {m.name: m.value for m in res.metrics}["top1"]
    assert 0.6 < top1 < 0.99  # overlapping blobs: a real probe, neither trivial nor broken
    assert abs(top1 - ref) <= 0.01
    assert [m.name for m in res.metrics] == ["top1", "top5", "balanced_acc", "ece", "nll"]
    pred = res.predictions
    assert set(pred) == {"index", "label", "pred", "confidence", "setting"}
    assert all(len(v) == blobs.test.n for v in pred.values())
    assert np.mean(pred["pred"] == pred["label"]) == pytest.approx(top1)
    assert set(pred["setting"]) == {f"C={info['C']:.4g}"}


@pytest.mark.parametrize("C", [1e-2, 1.0])
def test_probabilities_match_sklearn_at_fixed_C(blobs: ProbeData, C: float) -> None:
    model = linear.fit_path(blobs.train, [C], N_CLASSES, **TIGHT)[0]
    ztr, zte = _standardised(blobs)
    ref = _sklearn(ztr, blobs.train.y, C)
    probs = linear.predict_proba(model, blobs.test.X)
    assert probs.shape == (blobs.test.n, N_CLASSES)
    assert np.abs(probs - ref.predict_proba(zte)).max() < 1e-3


@pytest.mark.parametrize("C", [1e-2, 1.0])
def test_fewer_rows_than_dims_are_solved_in_their_span_as_sklearn_solves_them(C: float) -> None:
    """40 rows of 200 dims (a few-shot subset): the path runs on the rows' QR factor and maps back."""
    (x, y), (xt, yt) = _blobs(40, 5, d=200), _blobs(100, 6, d=200)
    data = ProbeData(ArrayFeatures(x, y), ArrayFeatures(xt, yt), None, N_CLASSES)
    model = linear.fit_path(data.train, [C], N_CLASSES, **TIGHT)[0]
    assert model.weight.shape == (N_CLASSES, 200) and model.converged
    ztr, zte = _standardised(data)
    ref = _sklearn(ztr, y, C)
    assert np.abs(linear.predict_proba(model, xt) - ref.predict_proba(zte)).max() < 1e-3
    # the optimum lies in the span of the training rows: nothing of W is left outside it
    coef, *_ = np.linalg.lstsq(ztr.T.astype(np.float64), model.weight.T.astype(np.float64), rcond=None)
    outside = model.weight.T - ztr.T @ coef
    assert np.abs(outside).max() < 1e-5 * np.abs(model.weight).max()


def test_multilabel_with_fewer_rows_than_dims_is_sklearn_per_label() -> None:
    (x, y), (xt, _) = _multilabel(30, 7, d=128), _multilabel(50, 8, d=128)
    model = linear.fit_path(ArrayFeatures(x, y), [0.5], N_LABELS, **TIGHT)[0]
    mean, scale = linear.standardization(ArrayFeatures(x, y))
    probs = linear.predict_proba(model, xt)
    for j in range(N_LABELS):
        ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit((x - mean) / scale, y[:, j])
        assert np.abs(probs[:, j] - ref.predict_proba((xt - mean) / scale)[:, 1]).max() < 1e-4


def test_a_whole_path_at_the_default_tol_is_within_1e_5_of_sklearns_optimum() -> None:
    """Ill-conditioned features (covariance eigenvalues over six decades, as pooled CNN features have): at
    every C of the default path, warm-started and extrapolated, the default stopping rule ends within a
    1e-5 relative objective gap of sklearn's float64 solve at tol 1e-12 (measured: at most 4.4e-7;
    1.3e-6 with the single-small-step rule and no extrapolation)."""
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(96, 96)) * np.geomspace(1, 1e-3, 96)[:, None]
    y = rng.integers(0, N_CLASSES, 600)
    centres = rng.normal(size=(N_CLASSES, 96)) @ basis
    x = (centres[y] + rng.normal(size=(600, 96)) @ basis).astype(np.float32)
    Cs = linear.default_Cs()
    models = linear.fit_path(ArrayFeatures(x, y), Cs, N_CLASSES)
    mean, scale = linear.standardization(ArrayFeatures(x, y))
    z = (x - mean) / scale

    def objective(W: np.ndarray, b: np.ndarray, C: float) -> float:  # sklearn's, divided by C N
        logp = torch.log_softmax(torch.from_numpy(z @ W.T.astype(np.float64) + b), dim=1).numpy()
        return -logp[np.arange(len(y)), y].mean() + (W.astype(np.float64) ** 2).sum() / (2 * C * len(y))

    for model, C in zip(models, Cs, strict=True):
        ref = LogisticRegression(C=C, tol=1e-12, max_iter=20_000).fit(z, y)
        best = objective(ref.coef_, ref.intercept_, C)
        assert model.converged and (objective(model.weight, model.bias, C) - best) / best <= 1e-5


def test_separable_features_are_solved() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(4, 16) * 10
    y = rng.integers(0, 4, 400)
    x = (centres[y] + rng.normal(size=(400, 16))).astype(np.float32)
    data = ProbeData(ArrayFeatures(x[:200], y[:200]), ArrayFeatures(x[300:], y[300:]), None, 4)
    res = linear.run(data, {}, seed=0)
    assert {m.name: m.value for m in res.metrics}["top1"] >= 0.99


def _same(a, b, atol: float) -> None:
    assert a.info["C"] == b.info["C"]
    np.testing.assert_array_equal(a.predictions["pred"], b.predictions["pred"])
    np.testing.assert_allclose(a.predictions["confidence"], b.predictions["confidence"], atol=atol)
    np.testing.assert_allclose(a.info["val_top1"], b.info["val_top1"], atol=1e-12)


def test_batch_size_does_not_change_results(blobs: ProbeData) -> None:
    streamed = {"memory_budget_gb": 1e-9}
    small = linear.run(blobs, {**streamed, "batch_size": 7}, seed=0)
    large = linear.run(blobs, {**streamed, "batch_size": 1000}, seed=0)
    assert small.info["streamed"] and large.info["streamed"]
    _same(small, large, atol=1e-4)
    models = [linear.fit_path(blobs.train, [0.1], N_CLASSES, batch_size=bs, **TIGHT)[0] for bs in (7, 1000)]
    np.testing.assert_allclose(
        linear.predict_proba(models[0], blobs.test.X),
        linear.predict_proba(models[1], blobs.test.X),
        atol=1e-4,
    )


def test_a_cached_split_and_the_same_chunks_streamed_walk_the_same_path(blobs: ProbeData) -> None:
    """The cached split's chunks, prepared once per path, and the streamed ones, made at every evaluation
    with the same boundaries, give the same sums: the same iterates, bit for bit."""
    kw = {"batch_size": 64, "max_iter": 200, "tol": 1e-8}
    cached = linear.fit_path(blobs.train, [1e-2, 1.0], N_CLASSES, memory_budget_gb=1.0, **kw)
    streamed = linear.fit_path(blobs.train, [1e-2, 1.0], N_CLASSES, memory_budget_gb=1e-9, **kw)
    for a, b in zip(cached, streamed, strict=True):
        assert a.n_iter == b.n_iter > 0
        np.testing.assert_array_equal(a.weight, b.weight)
        np.testing.assert_array_equal(a.bias, b.bias)


def test_streaming_matches_in_memory(blobs: ProbeData) -> None:
    sharded = ProbeData(
        ArrayFeatures(blobs.train.X, blobs.train.y, shard_size=97),
        ArrayFeatures(blobs.test.X, blobs.test.y, shard_size=50),
        ArrayFeatures(blobs.val.X, blobs.val.y, shard_size=64),
        N_CLASSES,
    )
    streamed = linear.run(sharded, {"memory_budget_gb": 1e-9, "batch_size": 40}, seed=0)
    in_memory = linear.run(blobs, {}, seed=0)
    assert streamed.info["streamed"] and not in_memory.info["streamed"]
    _same(streamed, in_memory, atol=1e-4)


def test_deterministic_for_a_seed(blobs: ProbeData) -> None:
    no_val = ProbeData(blobs.train, blobs.test, None, N_CLASSES)
    a, b = (linear.run(no_val, {"num_C": 8}, seed=3) for _ in range(2))
    assert [m.value for m in a.metrics] == [m.value for m in b.metrics]
    for key in a.predictions:
        np.testing.assert_array_equal(a.predictions[key], b.predictions[key])
    assert a.info["val_top1"] == b.info["val_top1"] and a.info["C"] == b.info["C"]


def test_kfold_selection_when_val_is_none(blobs: ProbeData) -> None:
    no_val = ProbeData(blobs.train, blobs.test, None, N_CLASSES)
    res = linear.run(no_val, {"Cs": [1e-3, 1e-2, 0.1, 1.0], "kfold": 4}, seed=0)
    info = res.info
    assert info["selection"] == "kfold" and len(info["val_top1"]) == 4
    chosen = int(np.argmax(info["val_top1"]))
    assert info["C"] == info["Cs"][chosen]
    assert len(info["n_iter_path"]) == chosen + 1  # the refit walks the path up to the chosen C only
    assert {m.name: m.value for m in res.metrics}["top1"] > 0.6
    # The refit on all of train equals a direct fit at the chosen C.
    direct = linear.fit_path(blobs.train, info["Cs"][: chosen + 1], N_CLASSES)[-1]
    np.testing.assert_array_equal(
        linear.predict_proba(direct, blobs.test.X).argmax(1), res.predictions["pred"]
    )


def test_stratified_folds_balance_classes() -> None:
    labels = np.repeat(np.arange(3), [30, 7, 2])
    folds = linear.stratified_folds(labels, 3, seed=0)
    for c, count in zip(range(3), [30, 7, 2], strict=True):
        per_fold = np.bincount(folds[labels == c], minlength=3)
        assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == count
    assert not np.array_equal(folds, linear.stratified_folds(labels, 3, seed=1))


def test_class_absent_from_train_is_never_predicted(blobs: ProbeData) -> None:
    keep = blobs.train.y != 3
    data = ProbeData(
        ArrayFeatures(blobs.train.X[keep], blobs.train.y[keep]), blobs.test, blobs.val, N_CLASSES
    )
    res = linear.run(data, {"num_C": 8}, seed=0)
    assert 3 not in set(res.predictions["pred"])
    model = linear.fit_path(data.train, [0.1], N_CLASSES)[0]
    probs = linear.predict_proba(model, blobs.test.X)
    assert probs.shape[1] == N_CLASSES and np.all(probs[:, 3] == 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_select_prefers_stronger_regularisation_on_ties() -> None:
    assert linear.select([0.5, 0.8, 0.8, 0.7]) == 1


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"lr": 0.1}, r"unknown linear-probe parameter\(s\) \['lr'\]; allowed: Cs, C_min"),
        ({"Cs": [0.1, 1], "num_C": 5}, "either Cs or num_C"),
        ({"Cs": [0.1, -1]}, "positive"),
        ({"Cs": []}, "non-empty"),
        ({"C_min": 10, "C_max": 1}, "must not exceed"),
        ({"tol": 0}, "tol must be a positive number"),
        ({"max_iter": 1.5}, "max_iter must be an integer"),
        ({"batch_size": True}, "batch_size must be an integer"),
        ({"kfold": 1}, "kfold must be an integer >= 2"),
        ({"metrics": ["top_1"]}, "Did you mean: top1"),
        ({"num_C": 0}, "num_C must be an integer >= 1"),
        ({"device": "cpu"}, r"unknown linear-probe parameter\(s\) \['device'\].*run option.*--device"),
    ],
)
def test_bad_params(blobs: ProbeData, params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        linear.run(blobs, params, seed=0)


def test_device_is_a_run_option(blobs: ProbeData) -> None:
    default = linear.run(blobs, {"num_C": 3}, seed=0)  # no options: the CPU, as a library call
    on_cpu = linear.run(blobs, {"num_C": 3}, seed=0, options=RunOptions(device="cpu"))
    assert default.info["device"] == on_cpu.info["device"] == "cpu"
    assert [(m.name, m.value) for m in on_cpu.metrics] == [(m.name, m.value) for m in default.metrics]
    for key, col in default.predictions.items():
        np.testing.assert_array_equal(on_cpu.predictions[key], col)
    assert {k: v for k, v in on_cpu.info.items() if k != "fit_seconds"} == {
        k: v for k, v in default.info.items() if k != "fit_seconds"
    }
    with pytest.raises(ValueError, match="MPS lacks"):  # the solver's float64: a clear error, not a crash
        linear.run(blobs, {}, seed=0, options=RunOptions(device="mps"))
    with pytest.raises(ValueError, match="MPS lacks"):
        linear.fit_path(blobs.train, [1.0], N_CLASSES, device="mps")
    if not torch.cuda.is_available():  # asked for CUDA without one: an error, never the CPU instead
        with pytest.raises(ValueError, match="no CUDA GPU"):
            linear.run(blobs, {}, seed=0, options=RunOptions(device="cuda"))


def test_auto_device_skips_mps(blobs: ProbeData, monkeypatch: pytest.MonkeyPatch) -> None:
    # On a Mac "auto" picks MPS (extraction uses it); the float64 solver then takes the CPU instead.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    res = linear.run(blobs, {"Cs": [1.0]}, seed=0, options=RunOptions(device="auto"))
    assert res.info["device"] == "cpu"


def test_labels_out_of_range(blobs: ProbeData) -> None:
    data = ProbeData(blobs.train, blobs.test, blobs.val, n_classes=3)
    with pytest.raises(ValueError, match=r"train labels must lie in \[0, 3\)"):
        linear.run(data, {}, seed=0)


@pytest.mark.slow
def test_real_feature_files(tmp_path) -> None:
    from bobench import create_backbone, load_dataset
    from bobench.features import ExtractOptions, FeatureStore

    store = FeatureStore(tmp_path)
    backbone = create_backbone("random/mobilenetv2_100")
    options = ExtractOptions(image_size=32, num_workers=0, progress=False, shard_size=256)
    train, test = (
        store.get_or_extract(backbone, load_dataset("digits", s), options) for s in ("train", "test")
    )
    assert len(train.manifest["shards"]) > 1  # several memory-mapped shards to stream
    data = ProbeData(train, test, None, n_classes=10)
    params = {"Cs": [1e-3, 1e-2, 1e-1], "kfold": 3, "batch_size": 100}
    in_memory = linear.run(data, params, seed=0)
    streamed = linear.run(data, {**params, "memory_budget_gb": 1e-9}, seed=0)
    assert streamed.info["streamed"] and not in_memory.info["streamed"]
    # Same chunks (multiples of batch_size, across the 256-row shard files): the very same numbers.
    _same(streamed, in_memory, atol=0)
    assert {m.name: m.value for m in in_memory.metrics}["top1"] > 0.5  # random-init features work on digits


# ------------------------------------------------------------------------------------------ multi-label

N_LABELS = 4


def _multilabel(n: int, seed: int, d: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Raw features with uneven offsets and scales; each label drawn from its own logistic model."""
    layout = np.random.default_rng(4321)
    W, b = layout.normal(size=(N_LABELS, d)), layout.normal(size=N_LABELS) - 0.5
    scales, offsets = layout.lognormal(0, 1, d), layout.normal(size=d) * 3
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d))
    p = 1 / (1 + np.exp(-(z @ W.T * 2 / np.sqrt(d) + b)))
    return (z * scales + offsets).astype(np.float32), (rng.random((n, N_LABELS)) < p).astype(np.int64)


@pytest.fixture(scope="module")
def multilabel() -> ProbeData:
    (xtr, ytr), (xva, yva), (xte, yte) = _multilabel(400, 1), _multilabel(200, 2), _multilabel(200, 3)
    return ProbeData(
        ArrayFeatures(xtr, ytr), ArrayFeatures(xte, yte), ArrayFeatures(xva, yva), N_LABELS, list("abcd")
    )


@pytest.mark.parametrize("C", [1e-2, 1.0])
def test_multilabel_probe_is_sklearn_binary_logistic_regression_per_label(
    multilabel: ProbeData, C: float
) -> None:
    from sklearn.metrics import roc_auc_score

    model = linear.fit_path(multilabel.train, [C], N_LABELS, **TIGHT)[0]
    assert model.multilabel and model.weight.shape == (N_LABELS, 32)
    ztr, zte = _standardised(multilabel)
    probs = linear.predict_proba(model, multilabel.test.X)
    assert probs.shape == (multilabel.test.n, N_LABELS)
    for j in range(N_LABELS):
        ref = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(ztr, multilabel.train.y[:, j])
        ref_p = ref.predict_proba(zte)[:, 1]
        assert np.abs(probs[:, j] - ref_p).max() < 1e-4
        y = multilabel.test.y[:, j]
        assert roc_auc_score(y, probs[:, j]) == pytest.approx(roc_auc_score(y, ref_p), abs=1e-3)


def test_multilabel_run_selects_on_val_mean_auroc_and_scores_with_sklearn(multilabel: ProbeData) -> None:
    from sklearn.metrics import roc_auc_score

    res = linear.run(multilabel, {}, seed=0)
    info, got = res.info, {m.name: m.value for m in res.metrics}
    assert info["selection"] == "val" and len(info["val_mean_auroc"]) == 10 and "temperature" not in info
    assert info["C"] == info["Cs"][int(np.argmax(info["val_mean_auroc"]))]
    assert list(got) == ["mean_auroc", "mean_ap", *(f"auroc@label={n}" for n in "abcd")]
    pred = res.predictions
    assert set(pred) == {"index", "label_name", "label", "score", "pred", "setting"}
    assert all(len(v) == multilabel.test.n * N_LABELS for v in pred.values())
    scores = pred["score"].reshape(-1, N_LABELS)  # one row per sample per label, sample-major
    np.testing.assert_array_equal(pred["label"].reshape(-1, N_LABELS), multilabel.test.y)
    assert list(pred["label_name"][:N_LABELS]) == list("abcd") and pred["index"][N_LABELS] == 1
    ref = [roc_auc_score(multilabel.test.y[:, j], scores[:, j]) for j in range(N_LABELS)]
    assert [got[f"auroc@label={n}"] for n in "abcd"] == pytest.approx(ref, abs=1e-9)
    assert got["mean_auroc"] == pytest.approx(np.mean(ref)) and 0.7 < got["mean_auroc"] < 0.99
    # the same C refitted by sklearn, label by label, scores the same AUROC
    ztr, zte = _standardised(multilabel)
    sk = [
        roc_auc_score(
            multilabel.test.y[:, j],
            LogisticRegression(C=info["C"], tol=1e-10, max_iter=10_000)
            .fit(ztr, multilabel.train.y[:, j])
            .decision_function(zte),
        )
        for j in range(N_LABELS)
    ]
    assert got["mean_auroc"] == pytest.approx(np.mean(sk), abs=2e-3)


def test_multilabel_kfold_and_metric_kinds(multilabel: ProbeData, blobs: ProbeData) -> None:
    data = ProbeData(multilabel.train, multilabel.test, None, N_LABELS, list("abcd"))
    res = linear.run(data, {"num_C": 4, "metrics": ["mean_auroc"]}, seed=0)
    assert res.info["selection"] == "kfold" and [m.name for m in res.metrics][:2] == [
        "mean_auroc",
        "auroc@label=a",
    ]
    assert res.info["C"] == res.info["Cs"][int(np.argmax(res.info["val_mean_auroc"]))]
    with pytest.raises(ValueError, match=r"\['top1'\] do not apply to these multi-label targets"):
        linear.run(data, {"metrics": ["top1"]}, seed=0)
    with pytest.raises(ValueError, match=r"\['mean_auroc'\] do not apply to these single-label targets"):
        linear.run(blobs, {"metrics": ["mean_auroc"]}, seed=0)
    bad = ProbeData(multilabel.train, ArrayFeatures(multilabel.test.X, multilabel.test.y * 2), None, N_LABELS)
    with pytest.raises(ValueError, match=r"test labels must be \[N, 4\] zeros and ones"):
        linear.run(bad, {}, seed=0)
