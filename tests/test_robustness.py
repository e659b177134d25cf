"""Effective robustness: the logit-space line over backbones, residuals, input handling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bobench.analysis import effective_robustness
from bobench.metrics import Metric
from bobench.store import Cell, ResultStore

A, B = 0.8, -0.5
OOD = "top1@ood=mean"


def _logit(p):
    return np.log(p) - np.log1p(-p)


def _expit(x):
    return 1 / (1 + np.exp(-x))


def _table(acc: dict[str, tuple[float, float]], task: str = "t") -> pd.DataFrame:
    """Long results rows, as ResultStore.results() has them: one row per (backbone, metric)."""
    rows = []
    for bb, (i, o) in acc.items():
        rows += [(bb, task, "top1", i, "ok"), (bb, task, OOD, o, "ok")]
    return pd.DataFrame(rows, columns=["backbone", "task", "metric", "value", "status"])


def _on_line(ids, offset=None) -> dict[str, tuple[float, float]]:
    offset = offset or {}
    return {f"bb{k}": (i, float(_expit(A * _logit(i) + B + offset.get(k, 0.0)))) for k, i in enumerate(ids)}


def test_exact_line_has_zero_residuals() -> None:
    er = effective_robustness(_table(_on_line([0.55, 0.65, 0.75, 0.85])), "t")
    assert er.attrs["a"] == pytest.approx(A) and er.attrs["b"] == pytest.approx(B)
    assert er.attrs["n"] == 4 and er.attrs["r2"] == pytest.approx(1.0)
    np.testing.assert_allclose(er["residual_logit"], 0, atol=1e-12)
    np.testing.assert_allclose(er["effective_robustness"], 0, atol=1e-12)
    np.testing.assert_allclose(er["ood_predicted"], er["ood"], atol=1e-12)


def test_one_backbone_above_the_line() -> None:
    ids = [0.55, 0.65, 0.75, 0.85, 0.7]
    acc = _on_line(ids, offset={4: 0.3})
    er = effective_robustness(_table(acc), "t").set_index("backbone")
    x = _logit(np.array(ids))
    y = _logit(np.array([acc[f"bb{k}"][1] for k in range(5)]))
    a, b = np.polyfit(x, y, 1)  # least squares over ALL backbones, the outlier included
    assert er.attrs["a"] == pytest.approx(a, rel=1e-12) and er.attrs["b"] == pytest.approx(b, rel=1e-12)
    # OLS moves the line towards the outlier: its residual is 0.3 (1 - h_44) and the others' -0.3 h_k4,
    # with h = X (X'X)^-1 X' the hat matrix of the fit.
    X = np.column_stack([x, np.ones_like(x)])
    h = X @ np.linalg.solve(X.T @ X, X.T)
    expected = 0.3 * (np.eye(5)[4] - h[:, 4])
    np.testing.assert_allclose(er.loc[[f"bb{k}" for k in range(5)], "residual_logit"], expected, atol=1e-12)
    assert er.index[0] == "bb4"  # sorted by decreasing effective robustness
    ood = np.array([acc[f"bb{k}"][1] for k in range(5)])
    np.testing.assert_allclose(
        er.loc[[f"bb{k}" for k in range(5)], "effective_robustness"], ood - _expit(a * x + b), atol=1e-12
    )
    # Fitted on the four on-line backbones only, the fifth is exactly 0.3 logits above the line.
    on_line = {k: v for k, v in acc.items() if k != "bb4"}
    er4 = effective_robustness(_table(on_line), "t")
    above = _logit(acc["bb4"][1]) - (er4.attrs["a"] * _logit(acc["bb4"][0]) + er4.attrs["b"])
    assert above == pytest.approx(0.3, abs=1e-12)


def test_linear_transform_and_metric_choice() -> None:
    acc = {"a": (0.5, 0.3), "b": (0.6, 0.45), "c": (0.9, 0.6), "d": (0.7, 0.5)}
    er = effective_robustness(_table(acc), "t", transform="linear")
    x, y = np.array([v[0] for v in acc.values()]), np.array([v[1] for v in acc.values()])
    a, b = np.polyfit(x, y, 1)
    assert er.attrs["a"] == pytest.approx(a) and er.attrs["b"] == pytest.approx(b)
    assert "residual_logit" not in er and er.attrs["transform"] == "linear"
    got = er.set_index("backbone").loc[list(acc), "effective_robustness"]
    np.testing.assert_allclose(got, y - (a * x + b), atol=1e-12)
    # Clipping: an accuracy of exactly 0 or 1 stays finite under the logit.
    acc["e"] = (1.0, 0.0)
    assert np.isfinite(effective_robustness(_table(acc), "t")["residual_logit"]).all()


def test_rows_filtered_and_averaged() -> None:
    df = _table(_on_line([0.55, 0.65, 0.75, 0.85]))
    extra = pd.DataFrame(
        [
            ("bb0", "t", "top1", 0.95, "ok"),  # a second seed of bb0: averaged with the first
            ("bb9", "t", "", np.nan, "failed"),  # a failed cell: ignored, reported as dropped
            ("bb8", "t", "top1", 0.7, "ok"),  # no OOD score: dropped
            ("bb1", "other", OOD, 0.01, "ok"),  # another task: ignored
        ],
        columns=df.columns,
    )
    er = effective_robustness(pd.concat([df, extra], ignore_index=True), "t").set_index("backbone")
    assert er.loc["bb0", "id"] == pytest.approx((0.55 + 0.95) / 2)
    assert er.attrs["dropped"] == ["bb8", "bb9"] and er.attrs["n"] == 4


def test_from_a_real_store(tmp_path) -> None:
    acc = _on_line([0.55, 0.65, 0.75, 0.85], offset={1: 0.2})
    with ResultStore(tmp_path / "r.db") as store:
        for bb, (i, o) in acc.items():
            cell = Cell(bb, "imagenet-ood", "imagenet", "ood", seed=0, config_hash=bb)
            metrics = [Metric("top1", i, True), Metric(OOD, o, True), Metric("nll", 1.0, False)]
            store.record(cell, metrics, config={}, provenance={})
        er = effective_robustness(store.results(), "imagenet-ood")
    assert list(er.columns[:5]) == ["backbone", "id", "ood", "ood_predicted", "effective_robustness"]
    assert er["backbone"].iloc[0] == "bb1" and er.attrs["n"] == 4


def test_runs_of_an_older_task_config_are_not_averaged_in(tmp_path) -> None:
    """bb0 ran the task before a version bump (another config_hash) with other accuracies: only its
    current run counts, as in the leaderboard."""
    acc = _on_line([0.55, 0.65, 0.75, 0.85])
    with ResultStore(tmp_path / "r.db") as store:
        old = Cell("bb0", "imagenet-ood", "imagenet", "ood", seed=0, config_hash="v1")
        store.record(old, [Metric("top1", 0.99, True), Metric(OOD, 0.01, True)], config={}, provenance={})
        for bb, (i, o) in acc.items():
            cell = Cell(bb, "imagenet-ood", "imagenet", "ood", seed=0, config_hash="v2")
            store.record(cell, [Metric("top1", i, True), Metric(OOD, o, True)], config={}, provenance={})
        er = effective_robustness(store.results(), "imagenet-ood").set_index("backbone")
    assert er.loc["bb0", "id"] == pytest.approx(0.55) and er.attrs["a"] == pytest.approx(A)
    np.testing.assert_allclose(er["effective_robustness"], 0, atol=1e-9)


def test_errors() -> None:
    two = _table(_on_line([0.6, 0.7]))
    with pytest.raises(ValueError, match="at least 3 backbones"):
        effective_robustness(two, "t")
    with pytest.raises(ValueError, match="at least 3 backbones"):
        effective_robustness(_table(_on_line([0.6, 0.7, 0.8])), "no-such-task")
    with pytest.raises(ValueError, match="percentages"):
        effective_robustness(_table({"a": (60.0, 40.0), "b": (70.0, 50.0), "c": (80.0, 55.0)}), "t")
    with pytest.raises(ValueError, match="same"):
        effective_robustness(_table({"a": (0.6, 0.4), "b": (0.6, 0.5), "c": (0.6, 0.55)}), "t")
    with pytest.raises(ValueError, match="transform"):
        effective_robustness(two, "t", transform="probit")
    with pytest.raises(ValueError, match="lacks column"):
        effective_robustness(two.drop(columns="value"), "t")
