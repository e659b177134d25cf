"""Temperature scaling: recovery of a known temperature, -inf logits, bounds, and its use in the linear probe."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from bobench.calibration import T_BOUNDS, apply_temperature, fit_temperature, temperature_nll
from bobench.metrics import METRICS, classification_metrics
from bobench.protocols import linear
from bobench.protocols.base import ArrayFeatures, ProbeData


def _sampled(T_true: float, n: int = 20_000, c: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels drawn from softmax(z / T_true): T_true is the population-optimal temperature."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 3
    p = apply_temperature(z, T_true)
    return z, (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)


@pytest.mark.parametrize("T_true", [2.5, 1.0, 0.5])
def test_recovers_known_temperature(T_true: float) -> None:
    z, y = _sampled(T_true)
    assert fit_temperature(z, y) == pytest.approx(T_true, rel=0.05)


def test_is_the_nll_minimiser() -> None:
    # The root of the slope in 1/T is the minimum a generic bounded search over log T finds.
    z, y = _sampled(2.5, n=3000)
    fitted = fit_temperature(z, y)
    ref = minimize_scalar(
        lambda log_t: temperature_nll(z, y, float(np.exp(log_t))),
        bounds=(-4, 4),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert fitted == pytest.approx(float(np.exp(ref.x)), rel=1e-6)
    assert temperature_nll(z, y, fitted) <= temperature_nll(z, y, 1.0)
    assert fit_temperature(z.astype(np.float32), y) == pytest.approx(fitted, rel=1e-5)  # dtype is no matter


def test_minus_inf_logits() -> None:
    z, y = _sampled(2.0, n=4000)
    # A column that is -inf everywhere is a class that cannot be predicted: nothing changes.
    wide = np.concatenate([z, np.full((len(z), 1), -np.inf)], axis=1)
    assert fit_temperature(wide, y) == pytest.approx(fit_temperature(z, y), rel=1e-9)
    # Rows whose label logit is -inf cost inf at every T: they are ignored, not allowed to break the fit.
    z2 = z.copy()
    z2[:100, 0] = -np.inf
    keep = ~((np.arange(len(y)) < 100) & (y == 0))
    assert fit_temperature(z2, y) == pytest.approx(fit_temperature(z2[keep], y[keep]), rel=1e-9)
    assert np.isfinite(temperature_nll(z2, y, 2.0))
    probs = apply_temperature(z2, 3.0)
    assert np.all(probs[:100, 0] == 0) and np.allclose(probs.sum(axis=1), 1)


def test_degenerate_cases() -> None:
    z = np.array([[5.0, 0.0], [0.0, 5.0], [4.0, 1.0]])
    assert fit_temperature(z, np.array([0, 1, 0])) == T_BOUNDS[0]  # all right: ever sharper is better
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0  # nothing to fit on
    one = np.array([[1.0, -np.inf], [-np.inf, 2.0]])  # probability 1 at any temperature
    assert fit_temperature(one, np.array([0, 1])) == 1.0
    with pytest.raises(ValueError, match="finite or -inf"):
        fit_temperature(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="labels must lie"):
        fit_temperature(z, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(z, 0.0)


def test_argmax_and_accuracy_unchanged() -> None:
    z, y = _sampled(2.5, n=2000)
    for T in (0.1, 0.7, 2.5, 40.0):
        probs = apply_temperature(z, T)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0)
        np.testing.assert_array_equal(probs.argmax(axis=1), z.argmax(axis=1))
        raw = classification_metrics(apply_temperature(z, 1.0), y, ["top1", "top5", "balanced_acc"])
        assert classification_metrics(probs, y, ["top1", "top5", "balanced_acc"]) == raw


def test_ts_metrics_registered_and_need_scaled_probs() -> None:
    for name, bins in (("ece_ts", "15 equal-width"), ("ece_em_ts", "15 equal-mass"), ("nll_ts", "")):
        d = METRICS[name]
        assert d.temperature_scaled and not d.higher_is_better and bins in d.description
    probs = apply_temperature(np.array([[2.0, 0.0], [0.0, 1.0]]), 1.0)
    with pytest.raises(ValueError, match="temperature-scaled"):
        classification_metrics(probs, np.array([0, 1]), ["top1", "ece_ts"])
    (m,) = classification_metrics(probs, np.array([0, 1]), ["nll_ts"], probs_ts=probs)
    assert m.value == classification_metrics(probs, np.array([0, 1]), ["nll"])[0].value


def _overconfident(val: bool) -> ProbeData:
    """Few train rows in many dimensions, barely regularised: a probe whose logits are far too large."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(4, 48)) * 0.35

    def draw(n: int) -> ArrayFeatures:
        y = rng.integers(0, 4, n)
        return ArrayFeatures((means[y] + rng.normal(size=(n, 48))).astype(np.float32), y)

    return ProbeData(draw(120), draw(1000), draw(600) if val else None, n_classes=4)


@pytest.mark.parametrize("val", [True, False])
def test_linear_probe_reports_temperature_scaled_metrics(val: bool) -> None:
    data = _overconfident(val)
    names = ["top1", "ece", "ece_em", "nll", "ece_ts", "ece_em_ts", "nll_ts"]
    res = linear.run(data, {"Cs": [1e3], "metrics": names}, seed=0)
    m = {x.name: x.value for x in res.metrics}
    assert [x.name for x in res.metrics] == names
    assert res.info["temperature_fit"] == ("val" if val else "kfold out-of-fold")
    assert res.info["temperature"] > 1.5  # over-confident: scaling must soften
    assert m["ece_ts"] < m["ece"] and m["ece_em_ts"] < m["ece_em"] and m["nll_ts"] < m["nll"]
    # The temperature moves no prediction: recompute the tempered probabilities and compare.
    model, info = linear.fit_selected(data, linear.resolve_params({"Cs": [1e3]}), seed=0)
    assert info["temperature"] == res.info["temperature"]
    logits = linear.predict_logits(model, data.test)
    tempered = apply_temperature(logits, info["temperature"])
    np.testing.assert_array_equal(tempered.argmax(axis=1), res.predictions["pred"])
    assert np.mean(tempered.argmax(axis=1) == data.test.y) == m["top1"]
    assert classification_metrics(tempered, data.test.y, ["ece"])[0].value == pytest.approx(m["ece_ts"])
    if val:  # fitted on the val logits of the chosen model, exactly
        assert info["temperature"] == fit_temperature(linear.predict_logits(model, data.val), data.val.y)
