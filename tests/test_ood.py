"""OOD protocol: the linear probe scored on shifted sets, class-subset masking, names and predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bobench.metrics import balanced_acc, ece, nll
from bobench.options import RunOptions
from bobench.protocols import get_protocol, linear, ood
from bobench.protocols.base import ArrayFeatures, OodSet, ProbeData

K, D = 5, 16
PARAMS = {"num_C": 4}


def _clusters(n: int, seed: int, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class clusters (fixed centres), overlapping enough that the probe is not perfect."""
    centres = np.random.default_rng(7).normal(size=(K, D)) * spread
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    return (centres[y] + rng.normal(size=(n, D))).astype(np.float32), y


def _set(X: np.ndarray, y: np.ndarray, classes) -> OodSet:
    return OodSet(ArrayFeatures(X, y), np.asarray(y), np.asarray(classes))


@pytest.fixture(scope="module")
def data() -> ProbeData:
    (xtr, ytr), (xva, yva), (xte, yte) = _clusters(500, 1), _clusters(300, 2), _clusters(400, 3)
    sub = np.isin(yte, [1, 3])
    sets = {
        "shifted": _set(xte + 0.6, yte, np.arange(K)),  # covariate shift: every feature offset
        "sub13": _set(xte[sub] + 0.6, yte[sub], [1, 3]),  # only classes 1 and 3, as ImageNet-A's 200
        "same": _set(xte, yte, np.arange(K)),  # the ID test set itself
    }
    train, val, test = ArrayFeatures(xtr, ytr), ArrayFeatures(xva, yva), ArrayFeatures(xte, yte)
    return ProbeData(train, test, val, K, extras={"ood": sets})


@pytest.fixture(scope="module")
def result(data: ProbeData):
    return ood.run(data, PARAMS, seed=0)


def _metrics(res) -> dict[str, float]:
    return {m.name: m.value for m in res.metrics}


def test_registered_names_and_directions(result) -> None:
    assert get_protocol("ood") is ood.run
    names = [m.name for m in result.metrics]
    for s in ("shifted", "sub13", "same"):
        for base in ("top1", "balanced_acc", "ece", "nll"):
            assert f"{base}@ood={s}" in names
    assert names[0] == "top1" and names[-1] == "top1@ood=mean"
    better = {m.name: m.higher_is_better for m in result.metrics}
    assert better["top1@ood=mean"] and better["balanced_acc@ood=sub13"] and better["top1@ood=shifted"]
    assert not better["ece@ood=sub13"] and not better["nll@ood=shifted"]
    m = _metrics(result)
    assert m["top1@ood=mean"] == pytest.approx(
        np.mean([m[f"top1@ood={s}"] for s in ("shifted", "sub13", "same")])
    )
    assert 0.5 < m["top1"] < 0.99 and m["top1@ood=shifted"] < m["top1"]  # a real probe, and a real shift


def test_same_as_id_gives_id_metrics(result) -> None:
    m = _metrics(result)
    for base in ("top1", "top5", "balanced_acc", "ece", "nll"):
        assert m[f"{base}@ood=same"] == m[base]


def test_masked_subset_matches_hand_computation(data: ProbeData, result) -> None:
    model, info = linear.fit_selected(data, linear.resolve_params(PARAMS), seed=0)
    assert info["C"] == result.info["C"]
    s = data.extras["ood"]["sub13"]
    probs = linear.predict_proba(model, s.features.X)  # unmasked, all five classes
    restricted = probs[:, [1, 3]] / probs[:, [1, 3]].sum(axis=1, keepdims=True)
    pred = np.array([1, 3])[restricted.argmax(axis=1)]
    m = _metrics(result)
    assert m["top1@ood=sub13"] == pytest.approx(np.mean(pred == s.labels), abs=1e-12)
    # Masking changes predictions: some rows predicted as another class than 1 or 3 without it.
    assert np.mean(probs.argmax(axis=1) == s.labels) < m["top1@ood=sub13"]
    full = np.zeros_like(probs)
    full[:, [1, 3]] = restricted
    assert m["nll@ood=sub13"] == pytest.approx(nll(full, s.labels), rel=1e-9)
    assert m["ece@ood=sub13"] == pytest.approx(ece(full, s.labels), abs=1e-9)
    assert m["balanced_acc@ood=sub13"] == pytest.approx(balanced_acc(full, s.labels))
    rows = result.predictions["setting"] == "ood=sub13"
    np.testing.assert_array_equal(result.predictions["pred"][rows], pred)
    assert set(result.predictions["pred"][rows]) <= {1, 3}
    assert result.info["ood"]["sub13"] == {"n": len(s.labels), "n_classes": 2, "masked": True}


def test_predictions_table(data: ProbeData, result) -> None:
    pred = result.predictions
    assert set(pred) == {"index", "label", "pred", "confidence", "setting"}
    sizes = {"id": data.test.n, **{f"ood={k}": len(v.labels) for k, v in data.extras["ood"].items()}}
    assert {s: int(np.sum(pred["setting"] == s)) for s in sizes} == sizes
    assert len(pred["index"]) == sum(sizes.values())
    assert all(len(v) == len(pred["index"]) for v in pred.values())
    rows = pred["setting"] == "id"
    assert np.mean(pred["pred"][rows] == pred["label"][rows]) == pytest.approx(_metrics(result)["top1"])
    assert "temperature" in result.info and result.info["ood"]["shifted"]["masked"] is False


def test_per_class_mean_accuracy_tiny_case() -> None:
    # Far-apart clusters: the probe is certain at each class centre, so every prediction is known.
    centres = np.eye(3, 4, dtype=np.float32) * 20
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    X = centres[y] + rng.normal(size=(len(y), 4)).astype(np.float32)
    tiny_X = centres[[0, 0, 0, 1, 2, 2]]  # the fourth row is labelled 0 but sits on class 1
    tiny = _set(tiny_X, np.array([0, 0, 0, 0, 2, 2]), np.arange(3))
    d = ProbeData(
        ArrayFeatures(X, y), ArrayFeatures(X, y), ArrayFeatures(X, y), 3, extras={"ood": {"tiny": tiny}}
    )
    m = _metrics(ood.run(d, {"Cs": [1.0]}, seed=0))
    assert m["top1@ood=tiny"] == pytest.approx(5 / 6)
    assert m["balanced_acc@ood=tiny"] == pytest.approx((3 / 4 + 2 / 2) / 2)  # mean over classes 0 and 2


def test_kfold_and_extra_metrics(data: ProbeData) -> None:
    d = ProbeData(data.train, data.test, None, K, extras={"ood": {"sub13": data.extras["ood"]["sub13"]}})
    res = ood.run(d, {**PARAMS, "metrics": ["top1", "nll", "nll_ts"]}, seed=0)
    names = [m.name for m in res.metrics]
    assert names[:3] == ["top1", "nll", "nll_ts"] and "nll_ts@ood=sub13" in names
    assert res.info["selection"] == "kfold" and res.info["temperature_fit"] == "kfold out-of-fold"


def test_errors(data: ProbeData) -> None:
    plain = ProbeData(data.train, data.test, data.val, K)
    with pytest.raises(ValueError, match="`ood:` mapping"):
        ood.run(plain, PARAMS, seed=0)
    s = data.extras["ood"]["sub13"]
    bad = {
        "mean": s,  # reserved for the average
        "x": OodSet(s.features, s.labels, np.array([1])),  # a label outside the set's classes
        "y": OodSet(s.features, s.labels[:-1], s.classes),  # lengths differ
        "z": OodSet(s.features, s.labels, np.array([1, 3, 9])),  # not an ID class
    }
    for name, o in bad.items():
        with pytest.raises(ValueError, match="OOD set"):
            ood.run(ProbeData(data.train, data.test, data.val, K, extras={"ood": {name: o}}), PARAMS, seed=0)
    # A set whose classes never occur in train cannot be scored under its mask.
    no4 = ~np.isin(data.train.y, [4])
    four = data.test.y == 4
    d = ProbeData(
        data.train.subset(np.flatnonzero(no4)),
        data.test,
        data.val,
        K,
        extras={"ood": {"only4": _set(data.test.X[four], data.test.y[four], [4])}},
    )
    with pytest.raises(ValueError, match="none of its classes"):
        ood.run(d, PARAMS, seed=0)


def test_accepted_classes_count_as_correct(data: ProbeData) -> None:
    """ObjectNet-style sets: a prediction of any class accepted for the label is a hit."""
    plain = ood.run(data, PARAMS, seed=0)
    X, y = data.test.load()
    accept = {c: np.array([c, (c + 1) % K]) for c in range(K)}  # each class also accepts the next one
    sets = {"same": OodSet(ArrayFeatures(X, y), np.asarray(y), np.arange(K), accept)}
    res = ood.run(ProbeData(data.train, data.test, data.val, K, extras={"ood": sets}), PARAMS, seed=0)
    pred = plain.predictions["pred"][: len(y)]  # ID rows come first
    by_hand = np.mean([p in (t, (t + 1) % K) for p, t in zip(pred, y, strict=True)])
    assert _metrics(res)["top1@ood=same"] == pytest.approx(by_hand)
    assert _metrics(res)["top1@ood=same"] > _metrics(plain)["top1"]


def test_device_is_a_run_option(data: ProbeData, result) -> None:
    with pytest.raises(ValueError, match=r"\['device'\].*is a run option.*--device"):
        ood.run(data, {**PARAMS, "device": "cpu"}, seed=0)
    on_cpu = ood.run(data, PARAMS, seed=0, options=RunOptions(device="cpu"))  # the default: same result
    assert on_cpu.metrics == result.metrics and on_cpu.info["device"] == result.info["device"] == "cpu"
    for key, col in result.predictions.items():
        np.testing.assert_array_equal(on_cpu.predictions[key], col)
    with pytest.raises(ValueError, match="MPS lacks"):
        ood.run(data, PARAMS, seed=0, options=RunOptions(device="mps"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            ood.run(data, PARAMS, seed=0, options=RunOptions(device="cuda"))
