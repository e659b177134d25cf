"""OOD classification: the linear probe trained in distribution, scored on shifted test sets.

The probe is exactly the linear protocol's (:func:`bobench.protocols.linear.fit_selected`: same
parameters, C chosen on val or by k-fold on train, temperature fitted on held-out in-distribution
logits). It then scores the in-distribution test split and every set of ``data.extras["ood"]``
(``{name: OodSet}``, labels already in the in-distribution label space; the runner builds it from the
task's ``ood:`` mapping).

Class subsets: a set whose ``classes`` are a strict subset of all classes (ImageNet-A and -R cover 200 of
ImageNet's 1000) is scored with the logits of the other classes set to ``-inf`` before the softmax, so
predictions and probabilities are restricted to its classes: the standard evaluation of Hendrycks et al.
(2021, "Natural Adversarial Examples"; "The Many Faces of Robustness"). Accuracy, calibration and the
predictions of such a set are all computed under that mask.

Several correct classes: a set with ``accept`` (ObjectNet, whose classes each map to one or more
ImageNet classes) counts a prediction of any accepted class as correct (Barbu et al. 2019): each row is
scored against the predicted class when it is accepted for the row's label, else against the label.

Metrics (stable names; the runner keeps those the task lists):

* in distribution: ``params["metrics"]`` as named (``top1`` always included), e.g. ``top1``, ``nll``;
* per set ``<name>``: ``top1@ood=<name>``, ``balanced_acc@ood=<name>`` (mean per-class accuracy over the
  classes present in the set: VisDA-2017's headline "per-class mean accuracy"), ``ece@ood=<name>``,
  ``nll@ood=<name>`` (calibration under shift), plus ``<metric>@ood=<name>`` for any other metric of
  ``params["metrics"]`` (``top5``, ``ece_ts``: the in-distribution temperature applied under shift, ...);
* ``top1@ood=mean``: the unweighted mean of the sets' ``top1@ood``.

Example (task YAML):
    dataset: imagenet
    protocol: ood
    ood: {imagenet-a: imagenet-a, imagenet-r: imagenet-r}
    metrics: [top1, top1@ood=imagenet-a, top1@ood=imagenet-r, top1@ood=mean]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bobench.metrics import Metric
from bobench.options import RunOptions
from bobench.protocols import linear
from bobench.protocols.base import OodSet, ProbeData, ProtocolResult, run_device

__all__ = ["SET_METRICS", "mask_logits", "run"]

#: Reported for every OOD set, whatever ``params["metrics"]`` says.
SET_METRICS: tuple[str, ...] = ("top1", "balanced_acc", "ece", "nll")


def mask_logits(logits: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``logits`` ``[N, C]`` with every column outside ``classes`` set to ``-inf`` (a copy), or
    ``logits`` itself when ``classes`` covers all ``C`` columns."""
    keep = np.zeros(logits.shape[1], dtype=bool)
    keep[np.asarray(classes, dtype=np.int64)] = True
    if keep.all():
        return logits
    return np.where(keep[None, :], logits, np.array(-np.inf, dtype=logits.dtype))


def _check_set(name: Any, s: Any, n_classes: int) -> None:
    """Raise ValueError unless ``s`` is a usable OodSet named ``name``."""
    if not isinstance(name, str) or not name or any(c in name for c in "@= ") or name == "mean":
        # The name becomes part of metric names (``top1@ood=<name>``); "mean" is the average's.
        raise ValueError(
            f"OOD set name {name!r} must be a non-empty string without '@', '=' or spaces, not 'mean'"
        )
    if not isinstance(s, OodSet):
        raise ValueError(f"OOD set {name!r} must be an OodSet, got {type(s).__name__}")
    labels, classes = np.asarray(s.labels), np.asarray(s.classes)
    if len(labels) != s.features.n or len(labels) == 0:
        raise ValueError(
            f"OOD set {name!r}: {len(labels)} labels for {s.features.n} feature rows (need equal, > 0)"
        )
    if classes.ndim != 1 or len(classes) == 0 or not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"OOD set {name!r}: classes must be a non-empty 1-D integer array")
    if classes.min() < 0 or classes.max() >= n_classes or len(np.unique(classes)) != len(classes):
        raise ValueError(
            f"OOD set {name!r}: classes must be distinct in-distribution indices in [0, {n_classes})"
        )
    if not np.issubdtype(labels.dtype, np.integer) or not np.isin(labels, classes).all():
        raise ValueError(
            f"OOD set {name!r}: every label must be one of its classes (in-distribution indices)"
        )


def _accepted(pred: np.ndarray, labels: np.ndarray, accept: Mapping[int, np.ndarray]) -> np.ndarray:
    """Labels to score against: the prediction where it is an accepted class for the label."""
    ok = np.array([p in accept.get(int(y), ()) for p, y in zip(pred.tolist(), labels.tolist(), strict=True)])
    return np.where(ok, pred, labels) if len(ok) else labels


def _rows(probs: np.ndarray, labels: np.ndarray, setting: str) -> dict[str, np.ndarray]:
    pred = probs.argmax(axis=1)
    return {
        "index": np.arange(len(labels)),
        "label": labels,
        "pred": pred,
        "confidence": probs[np.arange(len(pred)), pred],
        "setting": np.full(len(labels), setting),
    }


def run(
    data: ProbeData, params: Mapping[str, Any], seed: int, options: RunOptions | None = None
) -> ProtocolResult:
    """Train the linear probe in distribution; score the ID test split and every OOD set.

    Args:
        data: train/val/test features of the in-distribution dataset, and ``extras["ood"]``:
            ``{name: OodSet}`` (see :class:`~bobench.protocols.base.OodSet`).
        params: the linear protocol's (:data:`bobench.protocols.linear.DEFAULTS`); ``metrics`` names the
            in-distribution metrics and adds to the per-set ones (:data:`SET_METRICS`).
        seed: seeds the k-fold split when there is no val split.
        options: run options; the probe runs on ``options.device`` (None: the CPU, as
            :func:`bobench.protocols.linear.run`).

    Returns:
        The metrics listed in the module docstring; predictions for the ID test split (setting ``id``)
        then each set (``ood=<name>``; ``index`` is the row within its set); ``info``: the linear
        protocol's (``C``, ``temperature``, ...) plus ``ood``: per set ``n``, ``n_classes`` and ``masked``
        (whether predictions were restricted to its classes).

    Raises:
        ValueError: no ``ood`` sets in ``data.extras``, a malformed set, a set none of whose classes
            occur in train, bad params (``device`` is a run option), labels out of range, or a device
            that cannot run the probe.
    """
    sets = data.extras.get("ood")
    if not sets:
        raise ValueError(
            "the ood protocol needs shifted test sets: give the task an `ood:` mapping "
            "{name: dataset spec} (data.extras has no 'ood' sets)"
        )
    p = linear.resolve_params(params)
    device = run_device(options, "cpu", linear.SOLVER_NAME)
    for name, s in sets.items():
        _check_set(name, s, data.n_classes)
    labels = np.asarray(data.test.labels, dtype=np.int64)
    if data.test.n == 0 or labels.min() < 0 or labels.max() >= data.n_classes:
        raise ValueError(f"the test split must be non-empty with labels in [0, {data.n_classes})")
    model, info = linear.fit_selected(data, p, seed, device)
    T = info["temperature"]
    kw = {"device": device, "batch_size": p["batch_size"], "memory_budget_gb": p["memory_budget_gb"]}

    id_names = p["metrics"] if "top1" in p["metrics"] else ["top1", *p["metrics"]]
    metrics, probs = linear.score_logits(linear.predict_logits(model, data.test, **kw), labels, id_names, T)
    rows = [_rows(probs, labels, "id")]
    set_names = [*SET_METRICS, *(m for m in p["metrics"] if m not in SET_METRICS)]
    top1s, sizes = [], {}
    for name, s in sets.items():
        set_labels = np.asarray(s.labels, dtype=np.int64)
        logits = mask_logits(linear.predict_logits(model, s.features, **kw), s.classes)
        if not np.isfinite(logits).any(axis=1).all():
            raise ValueError(f"OOD set {name!r}: none of its classes occurs in the train split")
        if s.accept:
            set_labels = _accepted(logits.argmax(axis=1), set_labels, s.accept)
        scores, probs = linear.score_logits(logits, set_labels, set_names, T)
        metrics += [Metric(f"{m.name}@ood={name}", m.value, m.higher_is_better) for m in scores]
        top1s.append(scores[0].value)  # set_names starts with top1
        rows.append(_rows(probs, set_labels, f"ood={name}"))
        masked = len(s.classes) < data.n_classes
        sizes[name] = {"n": len(set_labels), "n_classes": len(s.classes), "masked": masked}
    metrics.append(Metric("top1@ood=mean", float(np.mean(top1s)), True))
    predictions = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    return ProtocolResult(metrics, predictions, {**info, "n_test": data.test.n, "ood": sizes})
