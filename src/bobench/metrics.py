"""Classification metrics from predicted probabilities, and the registry that names them.

Every metric takes ``probs [N, C]`` (rows are probability vectors, summing to 1) and integer
``labels [N]`` in ``[0, C)``, and returns a Python float. :data:`METRICS` maps each stable name to its
function and its ``higher_is_better``; :func:`classification_metrics` turns probabilities into the
:class:`Metric` rows a protocol returns. numpy only: scoring never imports torch.

The ``*_ts`` metrics (``ece_ts``, ``ece_em_ts``, ``nll_ts``) are their base metric computed on
temperature-scaled probabilities (:mod:`bobench.calibration`); only a protocol that fits a temperature
(linear, ood) can report them, passing those probabilities as ``probs_ts``.

Ties: the predicted class is ``argmax`` (the lowest class index among equal probabilities), and top-k
ranks classes by ``(-prob, class index)``, so ``top_k(k=1) == top1`` always.

Example:
    >>> probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1]])
    >>> [(m.name, round(m.value, 3)) for m in classification_metrics(probs, np.array([0, 2]))][:2]
    [('top1', 0.5), ('top5', 1.0)]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bobench.registry import suggest

__all__ = [
    "DEFAULT",
    "METRICS",
    "Metric",
    "MetricDef",
    "balanced_acc",
    "check_metric_names",
    "classification_metrics",
    "ece",
    "ece_em",
    "nll",
    "top1",
    "top5",
    "top_k",
]

NLL_EPS = 1e-12  # probabilities are clipped here before the log, so one sure mistake costs 27.6 nats
ECE_BINS = 15  # Guo et al. (2017), "On Calibration of Modern Neural Networks"


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.ndim != 1 or len(probs) != len(labels):
        raise ValueError(f"metrics need probs [N, C] and labels [N]; got {probs.shape} and {labels.shape}")
    if len(labels) == 0:
        raise ValueError("metrics need at least one sample")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}), got [{labels.min()}, {labels.max()}]")
    return probs, labels.astype(np.int64, copy=False)


def top_k(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of samples whose label is among the ``k`` most probable classes (``k`` capped at C).

    A class ranks above the label if its probability is higher, or equal with a lower class index.
    """
    probs, labels = _check(probs, labels)
    rows = np.arange(len(labels))
    p_true = probs[rows, labels][:, None]
    lower_index = np.arange(probs.shape[1])[None, :] < labels[:, None]
    above = (probs > p_true) | ((probs == p_true) & lower_index)
    return float(np.mean(above.sum(axis=1) < min(k, probs.shape[1])))


def top1(probs: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of ``argmax`` predictions."""
    probs, labels = _check(probs, labels)
    return float(np.mean(probs.argmax(axis=1) == labels))


def top5(probs: np.ndarray, labels: np.ndarray) -> float:
    """Top-k accuracy with ``k = min(5, C)`` (see :func:`top_k`)."""
    return top_k(probs, labels, 5)


def balanced_acc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean per-class recall of ``argmax`` predictions, over the classes present in ``labels``.

    Equals ``sklearn.metrics.balanced_accuracy_score`` (whose ``adjusted=False``).
    """
    probs, labels = _check(probs, labels)
    return balanced_acc_of_predictions(probs.argmax(axis=1), labels)


def balanced_acc_of_predictions(pred: np.ndarray, labels: np.ndarray) -> float:
    """:func:`balanced_acc` for hard predictions (protocols such as kNN that vote rather than score)."""
    labels = np.asarray(labels, dtype=np.int64)
    n_classes = int(max(labels.max(initial=0), np.asarray(pred).max(initial=0))) + 1
    correct = np.bincount(labels, weights=np.asarray(pred) == labels, minlength=n_classes)
    support = np.bincount(labels, minlength=n_classes)
    present = support > 0
    return float(np.mean(correct[present] / support[present]))


def _binned_gap(conf: np.ndarray, hit: np.ndarray, bin_of: np.ndarray, n_bins: int) -> float:
    """``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` = ``|sum_{i in B_b} (hit_i - conf_i)| / N``."""
    gap = np.bincount(bin_of, weights=hit - conf, minlength=n_bins)
    return float(np.abs(gap).sum() / len(conf))


def _confidence(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = probs.argmax(axis=1)
    return probs[np.arange(len(pred)), pred], (pred == labels).astype(np.float64)


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-1 prediction, with equal-width confidence bins.

    Binning: the confidence ``c = max_j probs[i, j]`` falls in bin ``b`` (``b = 1..n_bins``) when
    ``(b-1)/n_bins < c <= b/n_bins``; a confidence of exactly 0 goes to the first bin. Then
    ``ECE = sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)|``; empty bins contribute nothing.
    This is the estimator of Guo et al. (2017) with their default of 15 bins.
    """
    probs, labels = _check(probs, labels)
    conf, hit = _confidence(probs, labels)
    bin_of = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    return _binned_gap(conf, hit, bin_of, n_bins)


def ece_em(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error with equal-mass (adaptive) bins.

    Binning: samples are sorted by confidence (stable sort, so ties keep sample order) and cut into
    ``min(n_bins, N)`` consecutive bins whose sizes differ by at most one (``np.array_split``); the gap
    is then weighted exactly as in :func:`ece`. Equal mass keeps every bin populated when confidences
    crowd near 1, where equal-width bins put almost every sample in the last bin.
    """
    probs, labels = _check(probs, labels)
    conf, hit = _confidence(probs, labels)
    n = len(conf)
    bins = min(n_bins, n)
    order = np.argsort(conf, kind="stable")
    bin_of = np.empty(n, dtype=np.int64)
    bin_of[order] = np.repeat(np.arange(bins), [len(part) for part in np.array_split(order, bins)])
    return _binned_gap(conf, hit, bin_of, bins)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels, in nats, with probabilities clipped at 1e-12."""
    probs, labels = _check(probs, labels)
    p_true = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(p_true, NLL_EPS, 1.0))))


@dataclass(frozen=True)
class Metric:
    """One score of a cell, and which way is better (what protocols return and the store records)."""

    name: str
    value: float
    higher_is_better: bool


@dataclass(frozen=True)
class MetricDef:
    """A registered metric.

    Attributes:
        fn: ``fn(probs [N, C], labels [N]) -> float``.
        higher_is_better: the direction recorded with every score.
        description: one line for listings and reports.
        temperature_scaled: ``fn`` is applied to temperature-scaled probabilities (``probs_ts`` of
            :func:`classification_metrics`), not to the raw ones.
    """

    fn: Callable[[np.ndarray, np.ndarray], float]
    higher_is_better: bool
    description: str
    temperature_scaled: bool = False


#: Stable metric name → definition. Names are stored in the results table: never rename one.
METRICS: dict[str, MetricDef] = {
    "top1": MetricDef(top1, True, "top-1 accuracy"),
    "top5": MetricDef(top5, True, "top-5 accuracy (top-C when there are fewer than 5 classes)"),
    "balanced_acc": MetricDef(balanced_acc, True, "mean per-class recall over the classes present"),
    "ece": MetricDef(ece, False, "expected calibration error, 15 equal-width confidence bins"),
    "ece_em": MetricDef(ece_em, False, "expected calibration error, 15 equal-mass confidence bins"),
    "nll": MetricDef(nll, False, "mean negative log-likelihood (nats), probabilities clipped at 1e-12"),
    # Temperature scaling leaves the argmax, hence every accuracy, unchanged: only calibration metrics.
    "ece_ts": MetricDef(
        ece, False, "ece (15 equal-width bins) after temperature scaling fitted on held-out data", True
    ),
    "ece_em_ts": MetricDef(
        ece_em, False, "ece_em (15 equal-mass bins) after temperature scaling fitted on held-out data", True
    ),
    "nll_ts": MetricDef(nll, False, "nll (nats) after temperature scaling fitted on held-out data", True),
}

#: What a classification protocol reports unless its task asks for other metrics.
DEFAULT: tuple[str, ...] = ("top1", "top5", "balanced_acc", "ece", "nll")


def check_metric_names(names: Sequence[str]) -> list[str]:
    """Return ``names`` as a list after checking each is registered.

    Raises:
        ValueError: an unknown name (with did-you-mean suggestions), a duplicate, or a bare string.
    """
    if isinstance(names, str):
        raise ValueError(f"metrics must be a list of names, got the string {names!r}")
    names = list(names)
    for name in names:
        if name not in METRICS:
            raise ValueError(
                f"unknown metric {name!r}.{suggest(str(name), list(METRICS))} Known: {', '.join(METRICS)}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate metric names in {names}")
    return names


def classification_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str] = DEFAULT,
    *,
    probs_ts: np.ndarray | None = None,
) -> list[Metric]:
    """Score ``probs`` against ``labels`` with each metric in ``names``.

    Args:
        probs: ``[N, C]`` predicted probabilities (rows sum to 1).
        labels: ``[N]`` integer labels in ``[0, C)``.
        names: registered metric names (see :data:`METRICS`), in the order to return them.
        probs_ts: ``[N, C]`` the same predictions after temperature scaling; needed by (and only used
            for) the ``temperature_scaled`` metrics (``*_ts``).

    Returns:
        One :class:`Metric` per name, in order.

    Raises:
        ValueError: an unknown metric name (did-you-mean), malformed ``probs``/``labels``, or a ``*_ts``
            metric without ``probs_ts`` (a protocol that fits no temperature cannot report it).
    """
    names = check_metric_names(names)
    probs, labels = _check(probs, labels)
    scaled = [name for name in names if METRICS[name].temperature_scaled]
    if scaled and probs_ts is None:
        raise ValueError(
            f"metric(s) {scaled} need temperature-scaled probabilities (probs_ts), which this protocol does not fit"
        )
    if scaled:
        probs_ts, _ = _check(probs_ts, labels)
        if probs_ts.shape != probs.shape:
            raise ValueError(f"probs_ts {probs_ts.shape} must have the shape of probs {probs.shape}")
    out = []
    for name in names:
        d = METRICS[name]
        out.append(
            Metric(name, d.fn(probs_ts if d.temperature_scaled else probs, labels), d.higher_is_better)
        )
    return out
