"""Classification metrics from predicted probabilities, and the registry that names them.

Every metric takes ``probs [N, C]`` (rows are probability vectors, summing to 1) and integer
``labels [N]`` in ``[0, C)``, and returns a Python float. :data:`METRICS` maps each stable name to its
function and its ``higher_is_better``; :func:`classification_metrics` turns probabilities into the
:class:`Metric` rows a protocol returns. numpy only: scoring never imports torch.

The ``*_ts`` metrics (``ece_ts``, ``ece_em_ts``, ``nll_ts``) are their base metric computed on
temperature-scaled probabilities (:mod:`bobench.calibration`); only a protocol that fits a temperature
(linear, ood) can report them, passing those probabilities as ``probs_ts``.

Multi-label metrics (:func:`multilabel_metrics`: ``mean_auroc``, ``mean_ap`` and ``auroc@label=<name>``)
take ``scores [N, L]`` (any monotone score per label: logits or probabilities) and 0/1 ``targets
[N, L]``; they are computed by scikit-learn (imported only then), label by label.

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

__all__ = ["DEFAULT", "METRICS", "MULTILABEL_DEFAULT", "Metric", "MetricDef", "balanced_acc"]
__all__ += ["check_metric_names", "classification_metrics", "ece", "ece_em", "mean_ap", "mean_auroc"]
__all__ += ["multilabel_metrics", "nll", "top1", "top5", "top_k", "undefined_labels"]

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


def _check_multilabel(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape or len(scores) == 0:
        raise ValueError(
            f"multi-label metrics need scores [N, L] and targets [N, L], N > 0; got {scores.shape} and "
            f"{targets.shape}"
        )
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("multi-label targets must be 0 or 1")
    if not np.isfinite(scores).all():
        raise ValueError("multi-label scores must be finite")
    return scores, targets.astype(np.int64, copy=False)


_NEEDS = {"auroc": "a positive and a negative", "ap": "a positive"}  # for a defined AUROC / AP


def _defined(targets: np.ndarray, kind: str) -> np.ndarray:
    """``[L]`` bool: the label's AUROC (``kind="auroc"``) or average precision (``"ap"``) is defined."""
    positives = np.asarray(targets).sum(axis=0)
    return (positives > 0) & (positives < len(targets)) if kind == "auroc" else positives > 0


def _per_label(scores: np.ndarray, targets: np.ndarray, kind: str) -> np.ndarray:
    """``[L]`` float64 ROC AUC (``kind="auroc"``) or average precision (``"ap"``); NaN where undefined."""
    from sklearn.metrics import average_precision_score, roc_auc_score  # only multi-label tasks pay

    scores, targets = _check_multilabel(scores, targets)
    fn = roc_auc_score if kind == "auroc" else average_precision_score
    out = np.full(targets.shape[1], np.nan)
    for j in np.flatnonzero(_defined(targets, kind)):
        out[j] = fn(targets[:, j], scores[:, j])
    return out


def _mean(scores: np.ndarray, targets: np.ndarray, kind: str) -> float:
    values = _per_label(scores, targets, kind)
    if np.isnan(values).all():
        raise ValueError(
            f"{kind} is undefined for every label: each needs {_NEEDS[kind]} among the targets scored; "
            "score on a larger split"
        )
    return float(np.nanmean(values))


def mean_auroc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over labels of ``sklearn.metrics.roc_auc_score``, leaving out labels whose targets hold one
    class only (undefined; :func:`undefined_labels` names them). ValueError if no label has both."""
    return _mean(scores, targets, "auroc")


def mean_ap(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over labels of ``sklearn.metrics.average_precision_score``, leaving out labels without a
    positive target (undefined). ValueError if no label has one."""
    return _mean(scores, targets, "ap")


def undefined_labels(targets: np.ndarray, names: Sequence[str]) -> dict[str, list[str]]:
    """The labels left out of the means: ``{"auroc": [one class only], "ap": [no positive]}``."""
    return {
        kind: [n for n, ok in zip(names, _defined(targets, kind), strict=True) if not ok] for kind in _NEEDS
    }


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
        fn: ``fn(probs [N, C], labels [N]) -> float``; multi-label: ``fn(scores [N, L], targets [N, L])``.
        higher_is_better: the direction recorded with every score.
        description: one line for listings and reports.
        temperature_scaled: ``fn`` is applied to temperature-scaled probabilities (``probs_ts`` of
            :func:`classification_metrics`), not to the raw ones.
        multilabel: ``fn`` scores multi-label targets (:func:`multilabel_metrics`), not classes.
    """

    fn: Callable[[np.ndarray, np.ndarray], float]
    higher_is_better: bool
    description: str
    temperature_scaled: bool = False
    multilabel: bool = False


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
    # multi-label (per label, then averaged); multilabel_metrics adds auroc@label=<name> per label
    "mean_auroc": MetricDef(
        mean_auroc,
        True,
        "mean over labels of the ROC AUC (labels with one class in the targets left out)",
        multilabel=True,
    ),
    "mean_ap": MetricDef(
        mean_ap,
        True,
        "mean over labels of the average precision (labels without a positive left out)",
        multilabel=True,
    ),
}

#: What a classification protocol reports unless its task asks for other metrics.
DEFAULT: tuple[str, ...] = ("top1", "top5", "balanced_acc", "ece", "nll")
#: What a multi-label protocol reports (plus ``auroc@label=<name>`` per label) unless asked otherwise.
MULTILABEL_DEFAULT: tuple[str, ...] = ("mean_auroc", "mean_ap")


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
    multi = [name for name in names if METRICS[name].multilabel]
    if multi:
        raise ValueError(
            f"metric(s) {multi} score multi-label targets [N, L]; these labels are single-label classes: "
            f"use {', '.join(n for n in DEFAULT)}"
        )
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


def multilabel_metrics(
    scores: np.ndarray,
    targets: np.ndarray,
    names: Sequence[str],
    metrics: Sequence[str] = MULTILABEL_DEFAULT,
    *,
    per_label: bool = True,
) -> list[Metric]:
    """Score a multi-label prediction: each metric in ``metrics``, then ``auroc@label=<name>`` per label.

    A label whose test targets hold one class only has no ROC AUC: it gets no ``auroc@label`` row and is
    left out of ``mean_auroc`` (likewise a label without a positive for ``mean_ap``); never a NaN, which
    the store refuses. :func:`undefined_labels` says which labels were left out.

    Args:
        scores: ``[N, L]`` scores, higher meaning more likely positive (logits or probabilities).
        targets: ``[N, L]`` 0/1 targets.
        names: the ``L`` label names, in column order.
        metrics: registered multi-label metric names (``mean_auroc``, ``mean_ap``), in output order.
        per_label: also return ``auroc@label=<name>`` (higher is better) for every defined label.

    Returns:
        :class:`Metric` rows: ``metrics`` in order, then the per-label AUROCs in label order.

    Raises:
        ValueError: malformed inputs, a name that is not a multi-label metric, ``len(names) != L``, or a
            mean undefined for every label.

    Example:
        >>> t = np.array([[1, 0], [0, 0], [1, 1], [0, 1]])
        >>> [(m.name, m.value) for m in multilabel_metrics(t * 2.0 - 1, t, ["a", "b"])][:3]
        [('mean_auroc', 1.0), ('mean_ap', 1.0), ('auroc@label=a', 1.0)]
    """
    metrics = check_metric_names(metrics)
    single = [name for name in metrics if not METRICS[name].multilabel]
    if single:
        raise ValueError(
            f"metric(s) {single} score single-label classes; multi-label targets take "
            f"{', '.join(n for n, d in METRICS.items() if d.multilabel)}"
        )
    scores, targets = _check_multilabel(scores, targets)
    if len(names) != targets.shape[1]:
        raise ValueError(f"{len(names)} label names for {targets.shape[1]} target columns")
    out = [
        Metric(name, METRICS[name].fn(scores, targets), METRICS[name].higher_is_better) for name in metrics
    ]
    if per_label:
        auroc = _per_label(scores, targets, "auroc")  # NaN where undefined: those get no row
        out += [
            Metric(f"auroc@label={n}", float(auroc[j]), True) for j, n in enumerate(names) if auroc[j] >= 0
        ]
    return out
