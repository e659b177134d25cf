"""Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks").

One scalar ``T > 0`` divides every logit before the softmax: ``probs = softmax(logits / T)``. ``T > 1``
softens over-confident predictions, ``T < 1`` sharpens under-confident ones, and the predicted class
never changes (the argmax of ``logits / T`` is the argmax of ``logits``), so accuracy is untouched and
only the calibration metrics (ECE, NLL) move. ``T`` is fitted on held-out predictions (a validation
split, or out-of-fold predictions) by minimising their mean negative log-likelihood, then applied to the
test predictions.

Logits may hold ``-inf`` for classes a model cannot predict (a class absent from its training rows, or
one masked out as in ImageNet-A/R's 200-class evaluation); they keep probability 0 at every temperature.
numpy and scipy only.

Example:
    >>> T = fit_temperature(val_logits, val_labels)       # [N, C] float, [N] int
    >>> probs = apply_temperature(test_logits, T)          # [M, C], rows sum to 1
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq

__all__ = ["T_BOUNDS", "apply_temperature", "fit_temperature", "temperature_nll"]

#: Search interval of :func:`fit_temperature`. A held-out set the model fits perfectly pushes T to the
#: lower end (ever sharper is ever better); the bounds keep that degenerate case finite.
T_BOUNDS = (1e-2, 1e2)
_CHUNK = 1024  # rows per evaluation chunk: float64 temporaries of _CHUNK x C stay in cache
_RTOL = 1e-9  # relative tolerance on 1 / T


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels):
        raise ValueError(f"need logits [N, C] and labels [N]; got {logits.shape} and {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got [{labels.min()}, {labels.max()}]")
    if np.isnan(logits).any() or np.isposinf(logits).any():
        raise ValueError("logits must be finite or -inf (a class that cannot be predicted)")
    return logits, labels.astype(np.int64, copy=False)


def _informative(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose label logit is finite: a ``-inf`` label costs ``+inf`` at every T, so it cannot move
    the minimiser and would only turn the objective into ``inf``."""
    keep = np.isfinite(logits[np.arange(len(labels)), labels])
    return logits[keep], labels[keep]


def temperature_nll(logits: np.ndarray, labels: np.ndarray, T: float) -> float:
    """Mean NLL (nats) of ``softmax(logits / T)`` over the rows whose label logit is finite.

    Args:
        logits: ``[N, C]`` float; ``-inf`` marks a class with probability 0.
        labels: ``[N]`` integer labels in ``[0, C)``.
        T: temperature, > 0.

    Returns:
        The mean NLL; 0.0 when no row is informative.
    """
    return _Objective(*_informative(*_check(logits, labels)))(1.0 / T)[0]


class _Objective:
    """Mean NLL of ``softmax(beta * logits)`` and its slope in ``beta``, ``mean(E_p[z] - z_y)``."""

    def __init__(self, logits: np.ndarray, labels: np.ndarray) -> None:
        # Each row shifted by its max once, so every exponent is <= 0 (no overflow at any temperature),
        # and floored at a finite -1e30 so -inf gives exp(...) = 0 and 0 * z = 0 (never 0 * inf).
        self.z = np.empty(logits.shape, dtype=np.result_type(logits.dtype, np.float32))
        for i in range(0, len(labels), _CHUNK):
            chunk = logits[i : i + _CHUNK]
            self.z[i : i + _CHUNK] = np.maximum(chunk - chunk.max(axis=1, keepdims=True), -1e30)
        self.zy = self.z[np.arange(len(labels)), labels].astype(np.float64)
        self.n = max(len(labels), 1)
        self._memo: dict[float, tuple[float, float]] = {}

    def __call__(self, beta: float) -> tuple[float, float]:
        if beta not in self._memo:  # brentq re-evaluates the bracket ends that the bound checks did
            log_total = np.empty(len(self.zy))
            mean_z = np.empty(len(self.zy))
            for i in range(0, len(self.zy), _CHUNK):
                z = self.z[i : i + _CHUNK].astype(np.float64)
                e = np.exp(beta * z)
                total = e.sum(axis=1)
                log_total[i : i + _CHUNK] = np.log(total)
                mean_z[i : i + _CHUNK] = np.einsum("ij,ij->i", e, z) / total
            nll = float((log_total - beta * self.zy).sum()) / self.n
            self._memo[beta] = nll, float((mean_z - self.zy).sum()) / self.n
        return self._memo[beta]

    def slope(self, beta: float) -> float:
        return self(beta)[1]


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, *, bounds: tuple[float, float] = T_BOUNDS
) -> float:
    """The temperature minimising the mean NLL of ``softmax(logits / T)`` on held-out predictions.

    With ``beta = 1 / T`` the NLL is convex (a log-sum-exp of functions linear in ``beta``, minus a
    linear term), so its slope ``mean(E_p[z] - z_y)`` is non-decreasing and the minimiser is the slope's
    one root: Brent's bracketed root finder (``scipy.optimize.brentq``) on ``[1/T_max, 1/T_min]`` finds it
    deterministically, in 10-15 passes over the logits (a bounded search on the NLL alone took about
    three times as long; 50k x 1000 logits take ~4 s on one core). A slope of one sign over the whole
    bracket puts the minimum at the bound it points to.

    Args:
        logits: ``[N, C]`` held-out logits (any float dtype); ``-inf`` marks classes the model cannot
            predict. Rows whose label logit is ``-inf`` are ignored (they cost ``inf`` at every T).
        labels: ``[N]`` integer labels in ``[0, C)``.
        bounds: ``(T_min, T_max)`` searched, ``0 < T_min < T_max``.

    Returns:
        ``T`` as a float in ``bounds``; exactly 1.0 when no row can inform it (no rows, or every row has
        at most one finite logit, so its probability is 1 at any temperature).

    Raises:
        ValueError: malformed inputs, NaN or ``+inf`` logits, or bad bounds.
    """
    if not 0 < bounds[0] < bounds[1] < np.inf:
        raise ValueError(f"bounds must satisfy 0 < T_min < T_max < inf, got {bounds}")
    logits, labels = _informative(*_check(logits, labels))
    many = np.isfinite(logits).sum(axis=1) > 1
    logits, labels = logits[many], labels[many]
    if len(labels) == 0:
        return 1.0
    beta_lo, beta_hi = 1.0 / bounds[1], 1.0 / bounds[0]
    objective = _Objective(logits, labels)
    if objective.slope(beta_lo) >= 0:  # the NLL rises from the smallest beta on: the largest T is best
        return float(bounds[1])
    if objective.slope(beta_hi) <= 0:  # still falling at the largest beta: the smallest T is best
        return float(bounds[0])
    return float(1.0 / brentq(objective.slope, beta_lo, beta_hi, xtol=1e-12, rtol=_RTOL))


def apply_temperature(logits: np.ndarray, T: float) -> np.ndarray:
    """``softmax(logits / T)`` row-wise, float64 ``[N, C]``; ``-inf`` logits get probability 0.

    Raises:
        ValueError: ``T`` not a positive finite number, or a row without a finite logit.
    """
    if not 0 < T < np.inf:
        raise ValueError(f"the temperature must be a positive finite number, got {T}")
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"need logits [N, C], got shape {z.shape}")
    top = z.max(axis=1, keepdims=True)
    if not np.isfinite(top).all():
        raise ValueError("every row needs at least one finite logit (and no NaN or +inf)")
    e = np.exp((z - top) / T)
    return e / e.sum(axis=1, keepdims=True)


def vote_calibration(
    probs: np.ndarray, labels: np.ndarray, val_probs: np.ndarray, val_labels: np.ndarray
) -> list:
    """Calibration metrics of predicted probabilities that come without logits (e.g. kNN votes).

    ``log(probs)`` serves as logits (a class without any vote keeps probability 0), so temperature
    scaling raises the probabilities to the power ``1/T`` and renormalises; ``T`` is fitted on
    ``val_probs`` (skipped, with the ``*_ts`` metrics, when there is no val split).

    Returns:
        :class:`~bobench.store.Metric` rows ``ece``, ``ece_em``, ``nll`` and, with val, ``ece_ts``,
        ``ece_em_ts``, ``nll_ts`` (all lower is better).
    """
    from bobench.metrics import classification_metrics

    names = ["ece", "ece_em", "nll"]
    probs_ts = None
    if len(val_labels):
        with np.errstate(divide="ignore"):
            T = fit_temperature(np.log(val_probs), val_labels)
            probs_ts = apply_temperature(np.log(probs), T)
        names += ["ece_ts", "ece_em_ts", "nll_ts"]
    return classification_metrics(probs, labels, names, probs_ts=probs_ts)
