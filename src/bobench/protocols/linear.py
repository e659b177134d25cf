"""Linear-probe protocol: fit the regularisation path on train, choose C, score test once.

The model, its objective and the L-BFGS path solver (streamed row chunks, memory budget) live in
:mod:`bobench.protocols.linear_path`; this module chooses C, fits the temperature and scores. Its
public names are re-exported here (``from bobench.protocols.linear import fit_path`` keeps working).

Selection: highest val top-1 (ties: the smaller C); without a val split, highest stratified k-fold
top-1 on train (folds seeded by ``seed``, standardised with the label-free statistics of all of
train). The test split is scored once, with the chosen C fitted on **train only** (no train+val refit).

Multi-label features (labels ``[N, L]`` 0/1, ``n_classes = L``, e.g. CheXpert's 5 findings): one
independent binary logistic regression per label (:mod:`~bobench.protocols.linear_path`), one C for
all labels chosen by the highest val ``mean_auroc`` (without val: its mean over held-out seeded random
folds), scored with :func:`bobench.metrics.multilabel_metrics` (``mean_auroc``,
``mean_ap`` and ``auroc@label=<name>``); no temperature is fitted (:func:`fit_selected_multilabel`).

Device: ``options.device`` (:class:`bobench.options.RunOptions`, ``--device``), never a parameter; the
CPU when :func:`run` gets no options. The solver needs float64, which MPS lacks: ``mps`` is refused,
and ``auto`` takes the CPU where it would pick MPS.

Example:
    >>> data = ProbeData(ArrayFeatures(X, y), ArrayFeatures(Xt, yt), None, n_classes=5)  # Xt [200, 64]
    >>> res = run(data, {}, seed=0, options=RunOptions(device="cpu"))
    >>> res.info["selection"], len(res.info["Cs"]), res.predictions["pred"].shape
    ('kfold', 10, (200,))
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from bobench.calibration import apply_temperature, fit_temperature
from bobench.metrics import DEFAULT as DEFAULT_METRICS
from bobench.metrics import (
    METRICS,
    MULTILABEL_DEFAULT,
    Metric,
    check_metric_names,
    classification_metrics,
    mean_auroc,
    multilabel_metrics,
    undefined_labels,
)
from bobench.options import RunOptions
from bobench.protocols.base import (
    ProbeData,
    ProtocolResult,
    check_param_keys,
    compute_device,
    is_int,
    is_positive_number,
    run_device,
)
from bobench.protocols.linear_path import (
    BATCH_SIZE,
    MAX_ITER,
    MEMORY_BUDGET_GB,
    SOLVER_NAME,
    TOL,
    LinearModel,
    StandardisedSplit,
    check_Cs,
    check_labels,
    count_correct,
    default_Cs,
    fit_path,
    fit_split,
    predict_logits,
    predict_proba,
    sigmoid,
    softmax,
    split_logits,
    standardization,
)

__all__ = ["DEFAULTS", "LinearModel", "default_Cs", "fit_path", "fit_selected", "fit_selected_multilabel"]
__all__ += ["predict_logits"]
__all__ += ["predict_proba", "resolve_params", "run", "score_logits", "select", "standardization"]
__all__ += ["SOLVER_NAME", "stratified_folds"]

DEFAULTS: dict[str, Any] = {
    "C_min": 1e-4,
    "C_max": 1e2,
    "num_C": 10,
    "max_iter": MAX_ITER,  # L-BFGS steps per value of C
    "tol": TOL,  # stop when 2 quasi-Newton steps in a row each lower the objective by <= tol * objective
    "kfold": 3,
    "memory_budget_gb": MEMORY_BUDGET_GB,  # per split: above it the split is streamed from its shards
    "batch_size": BATCH_SIZE,  # rows per chunk of a loss/gradient evaluation
    "metrics": list(DEFAULT_METRICS),
}


def score_logits(
    logits: np.ndarray, labels: np.ndarray, names: Sequence[str], temperature: float
) -> tuple[list[Metric], np.ndarray]:
    """Metrics ``names`` of ``softmax(logits)``, the ``*_ts`` ones of ``softmax(logits / temperature)``.

    Returns:
        ``(metrics, probs)``, ``probs`` the untempered ``[N, C]`` probabilities (predictions come from
        them; a temperature changes no argmax).
    """
    probs = softmax(logits)
    # The tempered copy costs another [N, C] float64 array: only when a *_ts metric asks for it.
    scaled = any(METRICS[name].temperature_scaled for name in names)
    probs_ts = apply_temperature(logits, temperature) if scaled else None
    return classification_metrics(probs, labels, names, probs_ts=probs_ts), probs


def select(scores: Sequence[float]) -> int:
    """Index of the best score along an ascending-C path; ties go to the first (strongest regularisation)."""
    return int(np.argmax(np.asarray(scores)))  # argmax returns the first maximum


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold id per row: each class shuffled and dealt round-robin, continuing where the last left off."""
    rng = np.random.default_rng(seed)
    fold, offset = np.empty(len(labels), dtype=np.int64), 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = (offset + np.arange(len(idx))) % k
        offset += len(idx)
    return fold


def resolve_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``params`` against :data:`DEFAULTS`; return them complete, ``Cs`` resolved (sorted,
    unique).

    Raises:
        ValueError: an unknown key (naming the allowed ones; ``device`` and the other run options are
            refused with where to set them instead), or a value of the wrong type or range.
    """
    check_param_keys(params, ["Cs", *DEFAULTS], "linear-probe")
    grid = [k for k in ("C_min", "C_max", "num_C") if k in params]
    if "Cs" in params and grid:
        raise ValueError(f"give either Cs or {'/'.join(grid)}, not both")
    p = {**DEFAULTS, **params}
    for key, low in (("num_C", 1), ("max_iter", 1), ("kfold", 2), ("batch_size", 1)):
        if not is_int(p[key]) or p[key] < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {p[key]!r}")
    for key in ("C_min", "C_max", "tol", "memory_budget_gb"):
        if not is_positive_number(p[key]):
            raise ValueError(f"{key} must be a positive number, got {p[key]!r}")
    if "Cs" in params:
        p["Cs"] = check_Cs(np.unique(np.asarray(params["Cs"], dtype=np.float64)))
    elif p["C_min"] > p["C_max"]:
        raise ValueError(f"C_min {p['C_min']} must not exceed C_max {p['C_max']}")
    else:
        p["Cs"] = np.unique(default_Cs(p["C_min"], p["C_max"], p["num_C"]))
    p["metrics"] = check_metric_names(p["metrics"])
    return p


def fit_selected(
    data: ProbeData, p: Mapping[str, Any], seed: int, device: str | torch.device = "cpu"
) -> tuple[LinearModel, dict[str, Any]]:
    """The probe :func:`run` scores: the path fitted on train, C chosen on val (or by k-fold on train),
    and a temperature fitted on held-out logits of the chosen C. Never reads the test split.

    The temperature (:func:`bobench.calibration.fit_temperature`) is fitted on the val logits of the
    chosen model; without val, on the out-of-fold logits of the chosen C (each train row scored by the
    fold model that did not see it: held-out, and no extra fit).

    Args:
        data: as in :func:`run`. p: parameters resolved by :func:`resolve_params`. seed: seeds the folds.
        device: where the solver runs (a device name as for ``--device``, or a ``torch.device``).

    Returns:
        ``(model, info)``, ``info`` as documented in :func:`run` (without ``n_test``).
    """
    Cs, bs, budget = p["Cs"], p["batch_size"], p["memory_budget_gb"]
    device = compute_device(device, SOLVER_NAME)
    for name in ("train",) + (("val",) if data.val is not None else ()):
        check_labels(getattr(data, name), data.n_classes, name)
    t0 = time.perf_counter()
    mean, scale = standardization(data.train)
    train = StandardisedSplit(data.train, mean, scale, device, bs, budget)
    fit_args = (p["max_iter"], p["tol"], data.n_classes, mean, scale)
    n_iter = 0
    if data.val is not None:
        models = fit_split(train, None, Cs, *fit_args)
        val = StandardisedSplit(data.val, mean, scale, device, bs, budget)
        val_top1 = count_correct(val, models) / data.val.n
        held_out = split_logits(val, models[select(val_top1)]), np.asarray(data.val.labels)
    else:
        if data.train.n < p["kfold"]:
            raise ValueError(f"kfold={p['kfold']} needs at least {p['kfold']} train samples")
        fold = torch.from_numpy(stratified_folds(np.asarray(data.train.labels), p["kfold"], seed)).to(device)
        correct, fold_models = np.zeros(len(Cs), dtype=np.int64), []
        for k in range(p["kfold"]):
            fold_models.append(fit_split(train, fold != k, Cs, *fit_args))
            n_iter += sum(m.n_iter for m in fold_models[-1])
            correct += count_correct(train, fold_models[-1], fold == k)
        val_top1 = correct / data.train.n
        # Out-of-fold logits of the chosen C (fold paths kept: K x D floats a model) feed the temperature.
        oof = np.empty((data.train.n, data.n_classes), dtype=np.float32)
        for k, path in enumerate(fold_models):
            oof[(fold == k).cpu().numpy()] = split_logits(train, path[select(val_top1)], fold == k)
        held_out = oof, np.asarray(data.train.labels)
        # Refit on all of train, walking the path only up to the chosen C (the warm starts it needs).
        models = fit_split(train, None, Cs[: select(val_top1) + 1], *fit_args)
    model = models[select(val_top1)]
    n_iter += sum(m.n_iter for m in models)
    info = {
        "C": model.C,
        "Cs": Cs.tolist(),
        "val_top1": np.asarray(val_top1, dtype=float).tolist(),
        "selection": "val" if data.val is not None else "kfold",
        "temperature": fit_temperature(*held_out),
        "temperature_fit": "val" if data.val is not None else "kfold out-of-fold",
        "n_iter": int(n_iter),
        "n_iter_path": [m.n_iter for m in models],
        "converged": [m.converged for m in models],
        "fit_seconds": time.perf_counter() - t0,
        "streamed": train.cached is None,
        "device": str(device),
        "n_train": data.train.n,
        "n_val": data.val.n if data.val is not None else None,
    }
    return model, info


def fit_selected_multilabel(
    data: ProbeData, p: Mapping[str, Any], seed: int, device: str | torch.device = "cpu"
) -> tuple[LinearModel, dict[str, Any]]:
    """:func:`fit_selected` for multi-label features: the path of ``L`` independent binary probes fitted
    on train, one C chosen by the highest ``mean_auroc`` on val, or without val by its mean over ``kfold``
    seeded random folds of train, each scored by the path fitted on the others (then refitted on all of
    train). Never reads the test split.

    Returns:
        ``(model, info)``: ``info`` as :func:`fit_selected`'s with ``val_mean_auroc`` (per C) in place of
        ``val_top1`` and no temperature.
    """
    Cs, bs, budget = p["Cs"], p["batch_size"], p["memory_budget_gb"]
    device = compute_device(device, SOLVER_NAME)
    for name in ("train",) + (("val",) if data.val is not None else ()):
        check_labels(getattr(data, name), data.n_classes, name, multilabel=True)
    t0 = time.perf_counter()
    mean, scale = standardization(data.train)
    train = StandardisedSplit(data.train, mean, scale, device, bs, budget)
    fit_args = (p["max_iter"], p["tol"], data.n_classes, mean, scale)
    n_iter = 0
    if data.val is not None:
        models = fit_split(train, None, Cs, *fit_args)
        val = StandardisedSplit(data.val, mean, scale, device, bs, budget)
        targets = np.asarray(data.val.labels)
        score = [mean_auroc(split_logits(val, m), targets) for m in models]
    else:
        if data.train.n < p["kfold"]:
            raise ValueError(f"kfold={p['kfold']} needs at least {p['kfold']} train samples")
        # One "class": folds are a seeded permutation dealt round-robin (no stratification by label set).
        fold_np = stratified_folds(np.zeros(data.train.n, dtype=np.int64), p["kfold"], seed)
        fold = torch.from_numpy(fold_np).to(device)
        # AUROC per held-out fold, then averaged: pooling the folds' scores would rank by each fold
        # model's bias and penalise strong regularisation.
        targets, score = np.asarray(data.train.labels), np.zeros(len(Cs))
        for k in range(p["kfold"]):
            path = fit_split(train, fold != k, Cs, *fit_args)
            n_iter += sum(m.n_iter for m in path)
            for c, m in enumerate(path):
                score[c] += mean_auroc(split_logits(train, m, fold == k), targets[fold_np == k]) / p["kfold"]
        models = fit_split(train, None, Cs[: select(score) + 1], *fit_args)
    model = models[select(score)]
    n_iter += sum(m.n_iter for m in models)
    info = {
        "C": model.C,
        "Cs": Cs.tolist(),
        "val_mean_auroc": [float(v) for v in score],
        "selection": "val" if data.val is not None else "kfold",
        "n_iter": int(n_iter),
        "n_iter_path": [m.n_iter for m in models],
        "converged": [m.converged for m in models],
        "fit_seconds": time.perf_counter() - t0,
        "streamed": train.cached is None,
        "device": str(device),
        "n_train": data.train.n,
        "n_val": data.val.n if data.val is not None else None,
    }
    return model, info


def _metric_names(params: Mapping[str, Any], p: Mapping[str, Any], multilabel: bool) -> list[str]:
    """The metrics to compute: the task's, or the default of the target kind; ValueError on a mismatch."""
    names = list(p["metrics"]) if "metrics" in params or not multilabel else list(MULTILABEL_DEFAULT)
    wrong = [n for n in names if METRICS[n].multilabel != multilabel]
    if wrong:
        kind, use = ("multi-label", MULTILABEL_DEFAULT) if multilabel else ("single-label", DEFAULT_METRICS)
        raise ValueError(
            f"metric(s) {wrong} do not apply to these {kind} targets; use metrics from {', '.join(use)}"
        )
    return names


def _run_multilabel(
    data: ProbeData, params: Mapping[str, Any], p: dict[str, Any], seed: int, device: torch.device
) -> ProtocolResult:
    names = _metric_names(params, p, multilabel=True)
    for name in ("train", "test") + (("val",) if data.val is not None else ()):
        check_labels(getattr(data, name), data.n_classes, name, multilabel=True)  # all before any work
    labels = list(data.classes) or [str(j) for j in range(data.n_classes)]
    model, info = fit_selected_multilabel(data, p, seed, device)
    kw = {"device": device, "batch_size": p["batch_size"], "memory_budget_gb": p["memory_budget_gb"]}
    logits = predict_logits(model, data.test, **kw)
    targets = np.asarray(data.test.labels, dtype=np.int64)
    metrics = multilabel_metrics(logits, targets, labels, names)
    n, L = targets.shape
    score = sigmoid(logits).ravel()  # row-major: sample 0's L labels, then sample 1's, ...
    predictions = {
        "index": np.repeat(np.arange(n), L),
        "label_name": np.tile(np.array(labels, dtype=object), n),
        "label": targets.ravel(),
        "score": score,
        "pred": (score >= 0.5).astype(np.int64),
        "setting": np.full(n * L, f"C={model.C:.4g}"),
    }
    left_out = undefined_labels(targets, labels)
    info = {**info, "labels": labels, "auroc_undefined": left_out["auroc"], "ap_undefined": left_out["ap"]}
    return ProtocolResult(metrics, predictions, {**info, "n_test": data.test.n})


def run(
    data: ProbeData, params: Mapping[str, Any], seed: int, options: RunOptions | None = None
) -> ProtocolResult:
    """Fit the path on train, choose C on val (or by k-fold on train), score test once.

    Args:
        data: train/val/test features; ``val`` None selects C by stratified k-fold on train.
        params: any of :data:`DEFAULTS`; ``Cs`` (an explicit list) replaces ``C_min``/``C_max``/``num_C``.
        seed: seeds the k-fold split; the fit itself is deterministic.
        options: run options; the solver runs on ``options.device`` (None: the CPU).

    Multi-label features (labels ``[N, L]``): see the module docstring; the metrics default to
    ``mean_auroc`` and ``mean_ap``, always followed by ``auroc@label=<name>`` per label whose test
    targets hold both classes (a label that does not is left out of every AUROC and named in
    ``info["auroc_undefined"]``; likewise ``info["ap_undefined"]``). Predictions are one row per test
    sample per label, in sample-major order: ``index``, ``label_name``, ``label`` (its 0/1 target),
    ``score`` (the predicted probability of 1), ``pred`` (``score >= 0.5``) and ``setting``
    (``C=<value>``); ``info`` has ``val_mean_auroc`` per C instead of ``val_top1``, ``labels``, and no
    temperature.

    Returns:
        Test metrics (``params["metrics"]``; the ``*_ts`` ones under the fitted temperature), per-sample
        test predictions (one setting, ``C=<value>``), and ``info``: ``C``, ``Cs``, ``val_top1`` (val, or
        pooled k-fold, top-1 per C), ``selection`` (``val`` | ``kfold``), ``temperature`` and
        ``temperature_fit`` (``val`` | ``kfold out-of-fold``: the logits it was fitted on, see
        :func:`fit_selected`), ``n_iter`` (all L-BFGS iterations), ``n_iter_path`` and ``converged`` (per
        C of the final path: up to the chosen C after k-fold), ``fit_seconds`` (everything but test
        scoring), ``streamed`` (train), ``device`` and sample counts.

    Raises:
        ValueError: bad params (``device`` among them: a run option), an empty split, labels outside
            ``[0, n_classes)``, or a device that cannot run the solver (no CUDA GPU; MPS).
    """
    p = resolve_params(params)
    device = run_device(options, "cpu", SOLVER_NAME)
    if np.ndim(data.train.labels) == 2:
        return _run_multilabel(data, params, p, seed, device)
    p["metrics"] = _metric_names(params, p, multilabel=False)
    for name in ("train", "test") + (("val",) if data.val is not None else ()):
        check_labels(getattr(data, name), data.n_classes, name)  # all before any work
    model, info = fit_selected(data, p, seed, device)
    kw = {"device": device, "batch_size": p["batch_size"], "memory_budget_gb": p["memory_budget_gb"]}
    labels = np.asarray(data.test.labels, dtype=np.int64)
    metrics, probs = score_logits(
        predict_logits(model, data.test, **kw), labels, p["metrics"], info["temperature"]
    )
    pred = probs.argmax(axis=1)
    predictions = {"index": np.arange(len(labels)), "label": labels, "pred": pred}
    predictions["confidence"] = probs[np.arange(len(pred)), pred]
    predictions["setting"] = np.full(len(labels), f"C={model.C:.4g}")
    return ProtocolResult(metrics, predictions, {**info, "n_test": data.test.n})
