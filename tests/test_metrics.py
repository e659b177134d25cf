"""Classification metrics against hand-computed values and sklearn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, log_loss, top_k_accuracy_score

from bobench import metrics
from bobench.metrics import METRICS, Metric, classification_metrics

# 4 samples, 3 classes. argmax: 0, 1, 2, 0; labels 0, 1, 1, 2 -> samples 0 and 1 correct.
PROBS = np.array(
    [
        [0.6, 0.3, 0.1],
        [0.2, 0.7, 0.1],
        [0.1, 0.4, 0.5],
        [0.9, 0.05, 0.05],
    ]
)
LABELS = np.array([0, 1, 1, 2])


def _random_probs(n: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * 2
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True), rng.integers(0, c, n)


def test_hand_computed_values() -> None:
    assert metrics.top1(PROBS, LABELS) == pytest.approx(0.5)
    # top-2: sample 2 (label 1 has the 2nd highest prob) joins; sample 3 (label 2 is tied last) does not.
    assert metrics.top_k(PROBS, LABELS, 2) == pytest.approx(0.75)
    assert metrics.top5(PROBS, LABELS) == pytest.approx(1.0)  # k = min(5, 3): every label is in the top 3
    # recall: class 0 1/1, class 1 1/2, class 2 0/1
    assert metrics.balanced_acc(PROBS, LABELS) == pytest.approx((1 + 0.5 + 0) / 3)
    expected_nll = -(np.log(0.6) + np.log(0.7) + np.log(0.4) + np.log(0.05)) / 4
    assert metrics.nll(PROBS, LABELS) == pytest.approx(expected_nll)


def test_ece_hand_computed() -> None:
    # confidences 0.6, 0.7, 0.5, 0.9; hits 1, 1, 0, 0. 15 equal-width bins of width 1/15:
    # 0.5 -> bin (7/15, 8/15], 0.6 -> (8/15, 9/15], 0.7 -> (10/15, 11/15], 0.9 -> (13/15, 14/15]:
    # one sample per bin, so ECE = mean |hit - conf| = (0.4 + 0.3 + 0.5 + 0.9) / 4.
    assert metrics.ece(PROBS, LABELS) == pytest.approx((0.4 + 0.3 + 0.5 + 0.9) / 4)
    # With 2 equal-width bins [0, .5], (.5, 1]: bin 1 = {0.5: miss}, bin 2 = {0.6, 0.7, 0.9: 2 hits}.
    two_bins = 1 / 4 * abs(0 - 0.5) + 3 / 4 * abs(2 / 3 - (0.6 + 0.7 + 0.9) / 3)
    assert metrics.ece(PROBS, LABELS, n_bins=2) == pytest.approx(two_bins)
    # Equal mass, 2 bins: sorted confidences 0.5, 0.6 | 0.7, 0.9 with hits 0, 1 | 1, 0.
    em = 2 / 4 * abs(0.5 - 0.55) + 2 / 4 * abs(0.5 - 0.8)
    assert metrics.ece_em(PROBS, LABELS, n_bins=2) == pytest.approx(em)


def test_ece_edges() -> None:
    # A confidence exactly on a bin edge belongs to the lower bin; exactly 1.0 to the last bin.
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    assert metrics.ece(probs, np.array([0, 1]), n_bins=2) == pytest.approx((0 + 0.5) / 2)
    assert metrics.ece_em(probs, np.array([0, 1]), n_bins=15) == pytest.approx(0.25)  # 2 bins of 1


@pytest.mark.parametrize("seed", [0, 1])
def test_against_sklearn(seed: int) -> None:
    probs, labels = _random_probs(500, 7, seed)
    assert metrics.balanced_acc(probs, labels) == pytest.approx(
        balanced_accuracy_score(labels, probs.argmax(axis=1))
    )
    for k in (1, 3, 5):
        ours = metrics.top_k(probs, labels, k)
        assert ours == pytest.approx(top_k_accuracy_score(labels, probs, k=k, labels=np.arange(7)))
    assert metrics.top1(probs, labels) == pytest.approx(metrics.top_k(probs, labels, 1))
    assert metrics.nll(probs, labels) == pytest.approx(log_loss(labels, probs, labels=np.arange(7)))


def test_calibrated_predictor_has_small_ece_and_overconfident_large() -> None:
    rng = np.random.default_rng(0)
    n, c = 200_000, 4
    conf = rng.uniform(1 / c, 1.0, n)  # confidence of the predicted class (class 0)
    correct = rng.uniform(size=n) < conf  # Bernoulli(conf): calibrated by construction
    probs = np.empty((n, c))
    probs[:, 0] = conf
    probs[:, 1:] = ((1 - conf) / (c - 1))[:, None]
    labels = np.where(correct, 0, rng.integers(1, c, n))
    assert metrics.ece(probs, labels) < 0.01
    assert metrics.ece_em(probs, labels) < 0.01
    # Over-confident: same predictions, correctness at a much lower rate than the stated confidence.
    labels_over = np.where(rng.uniform(size=n) < conf * 0.6, 0, rng.integers(1, c, n))
    assert metrics.ece(probs, labels_over) > 0.2
    assert metrics.ece_em(probs, labels_over) > 0.2


def test_nll_clips_zero_probability() -> None:
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    assert metrics.nll(probs, np.array([1, 0])) == pytest.approx((-np.log(1e-12) - np.log(0.5)) / 2)


def test_classification_metrics_registry() -> None:
    out = classification_metrics(PROBS, LABELS)
    assert [m.name for m in out] == ["top1", "top5", "balanced_acc", "ece", "nll"]
    assert all(isinstance(m, Metric) and isinstance(m.value, float) for m in out)
    assert {m.name: m.higher_is_better for m in out} == {
        "top1": True,
        "top5": True,
        "balanced_acc": True,
        "ece": False,
        "nll": False,
    }
    assert classification_metrics(PROBS, LABELS, ["ece_em"])[0].value == pytest.approx(
        metrics.ece_em(PROBS, LABELS)
    )
    for name, definition in METRICS.items():
        assert definition.description, name


def test_unknown_metric_suggests() -> None:
    with pytest.raises(ValueError, match=r"unknown metric 'top_1'\. Did you mean: top1"):
        classification_metrics(PROBS, LABELS, ["top_1"])
    with pytest.raises(ValueError, match="list of names"):
        classification_metrics(PROBS, LABELS, "top1")


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="probs"):
        metrics.top1(PROBS[0], LABELS)
    with pytest.raises(ValueError, match="lie in"):
        metrics.top1(PROBS, np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="at least one"):
        metrics.top1(np.zeros((0, 3)), np.zeros(0, dtype=int))


# ------------------------------------------------------------------------------------------ multi-label


def test_multilabel_metrics_match_sklearn_and_skip_undefined_labels() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    targets = (rng.random((50, 4)) < 0.4).astype(int)
    targets[:, 3] = 1  # one class only: AUROC undefined, AP defined (= 1)
    scores = targets + rng.normal(size=(50, 4))
    out = metrics.multilabel_metrics(scores, targets, ["w", "x", "y", "z"])
    got = {m.name: m.value for m in out}
    ref = [roc_auc_score(targets[:, j], scores[:, j]) for j in range(3)]
    assert [m.name for m in out] == [
        "mean_auroc",
        "mean_ap",
        "auroc@label=w",
        "auroc@label=x",
        "auroc@label=y",
    ]
    assert got["mean_auroc"] == pytest.approx(np.mean(ref))
    assert [got[f"auroc@label={n}"] for n in "wxy"] == pytest.approx(ref)
    assert got["mean_ap"] == pytest.approx(
        np.mean([average_precision_score(targets[:, j], scores[:, j]) for j in range(4)])
    )
    assert all(m.higher_is_better and np.isfinite(m.value) for m in out)
    assert metrics.undefined_labels(targets, list("wxyz")) == {"auroc": ["z"], "ap": []}
    # auroc is rank-based: logits and their sigmoid score the same
    sig = metrics.multilabel_metrics(1 / (1 + np.exp(-scores)), targets, list("wxyz"), ["mean_auroc"])
    assert sig[0].value == pytest.approx(got["mean_auroc"])


def test_multilabel_metric_errors() -> None:
    t = np.array([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match=r"undefined for every label"):
        metrics.multilabel_metrics(np.zeros((2, 2)), np.ones((2, 2), dtype=int), ["a", "b"])
    with pytest.raises(ValueError, match=r"\['top1'\] score single-label classes"):
        metrics.multilabel_metrics(np.zeros((2, 2)), t, ["a", "b"], ["top1"])
    with pytest.raises(ValueError, match=r"\['mean_auroc'\] score multi-label targets"):
        classification_metrics(PROBS, LABELS, ["top1", "mean_auroc"])
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.multilabel_metrics(np.zeros((2, 2)), t * 2, ["a", "b"])
    with pytest.raises(ValueError, match="1 label names for 2"):
        metrics.multilabel_metrics(np.zeros((2, 2)), t, ["a"])
    assert metrics.check_metric_names(["mean_auroc", "mean_ap"]) == ["mean_auroc", "mean_ap"]
