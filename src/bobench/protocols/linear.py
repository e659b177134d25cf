"""Linear probe: multinomial logistic regression on standardised frozen features, a whole
regularisation path in one call.

Objective, the one sklearn's ``LogisticRegression(C=C)`` minimises (so values of C are comparable),
divided by ``C N``::

    min over W [K, D], b [K]:   mean_i CE(softmax(W z_i + b), y_i) + ||W||^2 / (2 C N)

``z = (x - mean) / std`` with the train split's statistics (:func:`standardization`), ``N`` training
rows, ``K`` the classes present in them (an absent class keeps its column with probability 0), bias
unpenalised; larger C = weaker regularisation. Default grid: 10 values of C log-spaced over
``[1e-4, 1e2]`` (:func:`default_Cs`).

Solver: full-batch L-BFGS (:class:`~bobench.protocols.lbfgs.LBFGS`), strongest regularisation first,
each C warm-started from the previous solution *and* curvature memory. A fit stops when a quasi-Newton
step lowers the objective by at most ``tol`` times its value. Loss and gradient are sums over row chunks of
``batch_size`` rows (float32 matmuls, float64 softmax and sums): the same function for every chunk
size up to float rounding, and exactly the same for a given chunk size whether the split is cached or
streamed. A split whose float32 size exceeds ``memory_budget_gb`` is never loaded: every evaluation
streams its memory-mapped shards (``iter_shards``); below the budget it is read once into a tensor on
the device and reused.

Selection: highest val top-1 (ties: the smaller C); without a val split, highest stratified k-fold
top-1 on train (folds seeded by ``seed``, standardised with the label-free statistics of all of
train). The test split is scored once, with the chosen C fitted on **train only** (no train+val refit).

Example:
    >>> models = fit_path(ArrayFeatures(X, y), default_Cs(), n_classes=5)  # X [600, 64], 10 models
    >>> predict_proba(models[3], X_test).shape                              # X_test [200, 64]
    (200, 5)
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bobench.calibration import apply_temperature, fit_temperature
from bobench.metrics import DEFAULT as DEFAULT_METRICS
from bobench.metrics import METRICS, Metric, check_metric_names, classification_metrics
from bobench.protocols.base import (
    ArrayFeatures,
    Features,
    ProbeData,
    ProtocolResult,
    check_param_keys,
    is_int,
    is_positive_number,
)
from bobench.protocols.lbfgs import LBFGS

__all__ = ["DEFAULTS", "LinearModel", "default_Cs", "fit_path", "fit_selected", "predict_logits"]
__all__ += ["predict_proba", "resolve_params", "run", "score_logits", "select", "standardization"]

DEFAULTS: dict[str, Any] = {
    "C_min": 1e-4,
    "C_max": 1e2,
    "num_C": 10,
    "max_iter": 1000,  # L-BFGS iterations per value of C
    "tol": 1e-7,  # stop when a quasi-Newton step lowers the objective by at most tol * objective
    "kfold": 3,
    "device": "cpu",
    "memory_budget_gb": 4.0,  # per split: above it the split is streamed from its shards
    "batch_size": 16384,  # rows per chunk of a loss/gradient evaluation
    "metrics": list(DEFAULT_METRICS),
}
_PARALLEL_WORK = 2**24  # multiply-adds of one pass (N D K) below which one CPU thread is faster
_STATS_ROWS = 4096  # fixed chunk of the standardisation statistics: they never depend on batch_size


@dataclass(frozen=True)
class LinearModel:
    """One point of a fitted path: ``probs = softmax(((x - mean) / scale) @ weight.T + bias)`` over
    ``classes``, scattered into ``n_classes`` columns (the others get probability 0)."""

    C: float
    weight: np.ndarray  # [K, D] float32
    bias: np.ndarray  # [K] float32
    classes: np.ndarray  # [K] int64: the class ids present in the training rows
    n_classes: int
    mean: np.ndarray  # [D] float64
    scale: np.ndarray  # [D] float64, floored (see standardization)
    n_iter: int  # L-BFGS iterations for this C, after the warm start
    converged: bool  # False when max_iter stopped the fit


def default_Cs(C_min: float = 1e-4, C_max: float = 1e2, num_C: int = 10) -> np.ndarray:
    """``num_C`` values of C log-spaced over ``[C_min, C_max]``, ascending (strongest regularisation first)."""
    return np.geomspace(C_min, C_max, num_C)


def standardization(features: Features) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and population std ``(mean [D], scale [D])`` float64, in one streaming pass.

    Chunks merge by Chan et al.'s pairwise update (no cancelling ``E[x^2] - E[x]^2``). The std is floored
    at 1e-4 times the root-mean-square std (1 if all dimensions are constant), so a near-constant
    dimension is not blown up into noise.
    """
    n, mean, m2 = 0, np.zeros(features.dim), np.zeros(features.dim)
    for X, _ in features.iter_shards():
        for i in range(0, len(X), _STATS_ROWS):
            x = np.asarray(X[i : i + _STATS_ROWS], dtype=np.float64)
            nb, mb = len(x), x.mean(axis=0)
            delta, total = mb - mean, n + nb
            mean += delta * (nb / total)
            m2 += ((x - mb) ** 2).sum(axis=0) + delta**2 * (n * nb / total)
            n = total
    if n == 0:
        raise ValueError("cannot standardise an empty split")
    std = np.sqrt(m2 / n)
    rms = float(np.sqrt(np.mean(std**2)))
    return mean, np.maximum(std, 1e-4 * rms) if rms > 0 else np.ones_like(std)


class _Split:
    """One split as standardised float32 chunks on ``device``: cached there, or streamed from shards.
    Chunks start at multiples of ``batch_size`` whatever the shard layout, so both give the same sums."""

    def __init__(self, features: Features, mean, scale, device, batch_size: int, budget_gb: float) -> None:
        self.features, self.n, self.device, self.batch_size = features, features.n, device, batch_size
        self.labels = torch.from_numpy(np.asarray(features.labels, dtype=np.int64)).to(device)
        self._mean = torch.from_numpy(np.asarray(mean, np.float32)).to(device)
        self._inv_scale = torch.from_numpy(np.asarray(1.0 / scale, np.float32)).to(device)
        self.cached: torch.Tensor | None = None
        if features.n * features.dim * 4 <= budget_gb * 2**30:
            self.cached = torch.empty((features.n, features.dim), dtype=torch.float32, device=device)
            for start, z in self._stream():
                self.cached[start : start + len(z)] = z

    def _stream(self) -> Iterator[tuple[int, torch.Tensor]]:
        pieces: list[np.ndarray] = []
        pos = 0
        for X, _ in self.features.iter_shards():
            i = 0
            while i < len(X):
                take = min(len(X) - i, self.batch_size - pos % self.batch_size)
                pieces.append(X[i : i + take])
                i, pos = i + take, pos + take
                if pos % self.batch_size == 0:
                    yield pos - self.batch_size, self._standardise(pieces)
                    pieces = []
        if pieces:
            yield pos - sum(map(len, pieces)), self._standardise(pieces)

    def _standardise(self, pieces: list[np.ndarray]) -> torch.Tensor:
        # np.concatenate copies out of the read-only memory maps (torch refuses non-writable arrays).
        x = torch.from_numpy(np.concatenate(pieces).astype(np.float32, copy=False))
        return x.to(self.device).sub_(self._mean).mul_(self._inv_scale)

    def chunks(self, rows: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(z [B, D], labels [B])`` in sample order, keeping only ``rows`` (a bool mask) if given."""
        if self.cached is None:
            source = self._stream()
        else:
            source = ((s, self.cached[s : s + self.batch_size]) for s in range(0, self.n, self.batch_size))
        for start, z in source:
            y = self.labels[start : start + len(z)]
            if rows is not None:
                keep = rows[start : start + len(z)]
                z, y = z[keep], y[keep]
            if len(y):
                yield z, y


@contextmanager
def _cpu_threads(device: torch.device, n: int) -> Iterator[None]:
    """Run torch CPU ops with ``n`` threads inside the block (no-op on other devices)."""
    old = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if device.type == "cpu":
            torch.set_num_threads(old)


def _loss_grad(split: _Split, rows, position, theta: torch.Tensor, lam: float, n: float):
    """``(objective, gradient [K, D + 1])`` at ``theta = [W | b]`` (float64), summed over chunks."""
    D = theta.shape[1] - 1
    W32, b32 = theta[:, :D].float(), theta[:, D].float()
    loss = torch.zeros((), dtype=torch.float64, device=theta.device)
    gWt = torch.zeros((D, len(theta)), dtype=torch.float64, device=theta.device)
    gb = torch.zeros(len(theta), dtype=torch.float64, device=theta.device)
    for z, y in split.chunks(rows):
        t = position[y][:, None]
        # Matmuls (D-long dot products) in float32; the softmax on [B, K] logits in float64 costs K/D of
        # them and keeps small residuals and the loss exact enough for a tight line search.
        logp = torch.log_softmax(torch.addmm(b32, z, W32.t()).double(), dim=1)
        loss -= logp.gather(1, t).sum()
        residual = logp.exp_().scatter_add_(
            1, t, torch.full(t.shape, -1.0, dtype=torch.float64, device=t.device)
        )
        gWt += z.t() @ residual.float()  # float32 product ([D, K] is faster than [K, D]), float64 sums
        gb += residual.sum(dim=0)
    W = theta[:, :D]
    grad = torch.cat([gWt.t() / n + lam * W, gb[:, None] / n], dim=1)
    return float(loss / n + lam * (W * W).sum() / 2), grad


def _fit(split: _Split, rows, Cs, max_iter, tol, n_classes, mean, scale) -> list[LinearModel]:
    """Solve the path on ``split`` (restricted to the ``rows`` mask) for ascending ``Cs``, warm-started."""
    device, D = split.device, split.features.dim
    classes = torch.unique(split.labels if rows is None else split.labels[rows])
    K = len(classes)
    position = torch.full((n_classes,), -1, dtype=torch.long, device=device)  # class id -> column
    position[classes] = torch.arange(K, device=device)
    counts = torch.zeros(K, dtype=torch.float64, device=device)
    for _, y in split.chunks(rows):
        counts += torch.bincount(position[y], minlength=K)
    n = float(counts.sum())
    # float64 parameters: L-BFGS needs loss and gradient differences finer than float32 resolves.
    theta = torch.zeros((K, D + 1), dtype=torch.float64, device=device)
    prior = torch.log(counts / n)
    theta[:, D] = prior - prior.mean()  # the C -> 0 solution (W = 0, b = log priors) as the start
    wmask = torch.ones_like(theta)
    wmask[:, D] = 0
    opt = LBFGS(wmask.ravel())
    # Threads pay only for big matmuls: on vectors of K (D + 1) numbers and small chunks, workers that
    # meet at a barrier per operation cost more than they save (badly so on shared cores).
    threads = torch.get_num_threads() if n * D * K >= _PARALLEL_WORK else 1
    models, class_ids, x, f, g = [], classes.cpu().numpy(), theta.ravel(), None, None
    for C in Cs:
        lam = 1.0 / (C * n)

        def fg(v: torch.Tensor, lam: float = lam) -> tuple[float, torch.Tensor]:
            with _cpu_threads(device, threads):
                f, g = _loss_grad(split, rows, position, v.view(K, D + 1), lam, n)
            return f, g.ravel()

        with _cpu_threads(device, 1):
            if f is None:
                f, g = fg(x)
            else:  # the data term is unchanged: only the penalty moves, no pass over the data needed
                f += (lam - opt.lam) * float((x * x * opt.wmask).sum()) / 2
                g = g + (lam - opt.lam) * x * opt.wmask
            opt.set_lam(lam)
            x, f, g, n_iter, converged = opt.minimise(fg, x, f, g, tol, max_iter)
        W, b = x.view(K, D + 1)[:, :D].float().cpu().numpy(), x.view(K, D + 1)[:, D].float().cpu().numpy()
        models.append(LinearModel(float(C), W, b, class_ids, n_classes, mean, scale, n_iter, converged))
    return models


def _correct(split: _Split, models: Sequence[LinearModel], rows=None) -> np.ndarray:
    """Correct predictions of each model on ``split`` (``rows`` only), all in one pass."""
    params = [
        (torch.from_numpy(m.weight).to(split.device), torch.from_numpy(m.bias).to(split.device))
        for m in models
    ]
    classes = [torch.as_tensor(m.classes, device=split.device) for m in models]
    correct = np.zeros(len(models), dtype=np.int64)
    for z, y in split.chunks(rows):
        for i, (W, b) in enumerate(params):
            correct[i] += int((classes[i][torch.addmm(b, z, W.t()).argmax(dim=1)] == y).sum())
    return correct


def _logits(split: _Split, model: LinearModel, rows=None) -> np.ndarray:
    """Logits ``[n, n_classes]`` float32 of ``model`` on ``split`` (``rows`` only, in order); ``-inf`` in
    the columns of classes absent from its training rows, so that they get probability 0."""
    W, b = torch.from_numpy(model.weight).to(split.device), torch.from_numpy(model.bias).to(split.device)
    n = split.n if rows is None else int(rows.sum())
    out, start = np.full((n, model.n_classes), -np.inf, dtype=np.float32), 0
    for z, _ in split.chunks(rows):
        out[start : start + len(z), model.classes] = torch.addmm(b, z, W.t()).cpu().numpy()
        start += len(z)
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    """float64 softmax of float32 logits, row by row (the probabilities every score is computed from)."""
    return torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()


def score_logits(
    logits: np.ndarray, labels: np.ndarray, names: Sequence[str], temperature: float
) -> tuple[list[Metric], np.ndarray]:
    """Metrics ``names`` of ``softmax(logits)``, the ``*_ts`` ones of ``softmax(logits / temperature)``.

    Returns:
        ``(metrics, probs)``, ``probs`` the untempered ``[N, C]`` probabilities (predictions come from
        them; a temperature changes no argmax).
    """
    probs = _softmax(logits)
    # The tempered copy costs another [N, C] float64 array: only when a *_ts metric asks for it.
    scaled = any(METRICS[name].temperature_scaled for name in names)
    probs_ts = apply_temperature(logits, temperature) if scaled else None
    return classification_metrics(probs, labels, names, probs_ts=probs_ts), probs


def fit_path(
    train: Features,
    Cs: Sequence[float],
    n_classes: int,
    *,
    max_iter: int = DEFAULTS["max_iter"],
    tol: float = DEFAULTS["tol"],
    device: str | torch.device = "cpu",
    batch_size: int = DEFAULTS["batch_size"],
    memory_budget_gb: float = DEFAULTS["memory_budget_gb"],
) -> list[LinearModel]:
    """Fit the probe for every C of an ascending path on ``train`` (``ArrayFeatures(X, y)`` for arrays).

    Args:
        train: features to fit, standardised with their own statistics (:func:`standardization`).
        Cs: values of C, strictly ascending (strongest regularisation first); each fit warm-starts the next.
        n_classes: width of the predicted probabilities; labels must lie in ``[0, n_classes)``.
        max_iter, tol: stopping rule per C (L-BFGS iterations; relative decrease of the objective).
        device: where the matmuls run. batch_size: rows per chunk (changes nothing beyond rounding).
        memory_budget_gb: above it the features are streamed from their shards on every evaluation.

    Returns:
        One :class:`LinearModel` per C, in the order of ``Cs``.

    Raises:
        ValueError: ``Cs`` not positive and strictly ascending, or labels out of range.
    """
    Cs = _check_Cs(Cs)
    _check_labels(train, n_classes, "train")
    device = torch.device(device)
    mean, scale = standardization(train)
    split = _Split(train, mean, scale, device, batch_size, memory_budget_gb)
    return _fit(split, None, Cs, max_iter, tol, n_classes, mean, scale)


def predict_logits(
    model: LinearModel,
    features: Features | np.ndarray,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = DEFAULTS["batch_size"],
    memory_budget_gb: float = DEFAULTS["memory_budget_gb"],
) -> np.ndarray:
    """Logits ``[N, n_classes]`` float32 of ``model`` on raw (unstandardised) features ``[N, D]``;
    ``-inf`` for the classes absent from its training rows."""
    if isinstance(features, np.ndarray):
        features = ArrayFeatures(features, np.zeros(len(features), dtype=np.int64))
    split = _Split(features, model.mean, model.scale, torch.device(device), batch_size, memory_budget_gb)
    return _logits(split, model)


def predict_proba(model: LinearModel, features: Features | np.ndarray, **kw: Any) -> np.ndarray:
    """Probabilities ``[N, n_classes]`` float64: the softmax of :func:`predict_logits` (same keywords)."""
    return _softmax(predict_logits(model, features, **kw))


def select(scores: Sequence[float]) -> int:
    """Index of the best score along an ascending-C path; ties go to the first (strongest regularisation)."""
    return int(np.argmax(np.asarray(scores)))  # argmax returns the first maximum


def _stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold id per row: each class shuffled and dealt round-robin, continuing where the last left off."""
    rng = np.random.default_rng(seed)
    fold, offset = np.empty(len(labels), dtype=np.int64), 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = (offset + np.arange(len(idx))) % k
        offset += len(idx)
    return fold


def _check_labels(features: Features, n_classes: int, name: str) -> None:
    labels = np.asarray(features.labels)
    if features.n == 0:
        raise ValueError(f"the {name} split is empty")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"{name} labels must lie in [0, {n_classes}), got [{labels.min()}, {labels.max()}]")


def _check_Cs(Cs: Any) -> np.ndarray:
    Cs = np.asarray(Cs, dtype=np.float64).ravel()
    if len(Cs) == 0 or not np.all(np.isfinite(Cs)) or np.any(Cs <= 0):
        raise ValueError(f"Cs must be a non-empty list of positive finite numbers, got {Cs.tolist()}")
    if np.any(np.diff(Cs) <= 0):
        raise ValueError(f"Cs must be strictly ascending (strongest regularisation first), got {Cs.tolist()}")
    return Cs


def resolve_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``params`` against :data:`DEFAULTS`; return them complete, ``Cs`` resolved (sorted,
    unique) and ``device`` a ``torch.device``.

    Raises:
        ValueError: an unknown key (naming the allowed ones), or a value of the wrong type or range.
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
        p["Cs"] = _check_Cs(np.unique(np.asarray(params["Cs"], dtype=np.float64)))
    elif p["C_min"] > p["C_max"]:
        raise ValueError(f"C_min {p['C_min']} must not exceed C_max {p['C_max']}")
    else:
        p["Cs"] = np.unique(default_Cs(p["C_min"], p["C_max"], p["num_C"]))
    p["metrics"] = check_metric_names(p["metrics"])
    from bobench.device import resolve_placement

    p["device"] = resolve_placement(str(p["device"])).device  # the one place the device is chosen
    if p["device"].type == "mps":
        raise ValueError("the linear probe accumulates in float64, which MPS lacks; use device 'cpu'")
    return p


def fit_selected(data: ProbeData, p: Mapping[str, Any], seed: int) -> tuple[LinearModel, dict[str, Any]]:
    """The probe :func:`run` scores: the path fitted on train, C chosen on val (or by k-fold on train),
    and a temperature fitted on held-out logits of the chosen C. Never reads the test split.

    The temperature (:func:`bobench.calibration.fit_temperature`) is fitted on the val logits of the
    chosen model; without val, on the out-of-fold logits of the chosen C (each train row scored by the
    fold model that did not see it: held-out, and no extra fit).

    Args:
        data: as in :func:`run`. p: parameters resolved by :func:`resolve_params`. seed: seeds the folds.

    Returns:
        ``(model, info)``, ``info`` as documented in :func:`run` (without ``n_test``).
    """
    Cs, device, bs, budget = p["Cs"], p["device"], p["batch_size"], p["memory_budget_gb"]
    for name in ("train",) + (("val",) if data.val is not None else ()):
        _check_labels(getattr(data, name), data.n_classes, name)
    t0 = time.perf_counter()
    mean, scale = standardization(data.train)
    train = _Split(data.train, mean, scale, device, bs, budget)
    fit_args = (p["max_iter"], p["tol"], data.n_classes, mean, scale)
    n_iter = 0
    if data.val is not None:
        models = _fit(train, None, Cs, *fit_args)
        val = _Split(data.val, mean, scale, device, bs, budget)
        val_top1 = _correct(val, models) / data.val.n
        held_out = _logits(val, models[select(val_top1)]), np.asarray(data.val.labels)
    else:
        if data.train.n < p["kfold"]:
            raise ValueError(f"kfold={p['kfold']} needs at least {p['kfold']} train samples")
        fold = torch.from_numpy(_stratified_folds(np.asarray(data.train.labels), p["kfold"], seed)).to(device)
        correct, fold_models = np.zeros(len(Cs), dtype=np.int64), []
        for k in range(p["kfold"]):
            fold_models.append(_fit(train, fold != k, Cs, *fit_args))
            n_iter += sum(m.n_iter for m in fold_models[-1])
            correct += _correct(train, fold_models[-1], fold == k)
        val_top1 = correct / data.train.n
        # Out-of-fold logits of the chosen C (fold paths kept: K x D floats a model) feed the temperature.
        oof = np.empty((data.train.n, data.n_classes), dtype=np.float32)
        for k, path in enumerate(fold_models):
            oof[(fold == k).cpu().numpy()] = _logits(train, path[select(val_top1)], fold == k)
        held_out = oof, np.asarray(data.train.labels)
        # Refit on all of train, walking the path only up to the chosen C (the warm starts it needs).
        models = _fit(train, None, Cs[: select(val_top1) + 1], *fit_args)
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


def run(data: ProbeData, params: Mapping[str, Any], seed: int) -> ProtocolResult:
    """Fit the path on train, choose C on val (or by k-fold on train), score test once.

    Args:
        data: train/val/test features; ``val`` None selects C by stratified k-fold on train.
        params: any of :data:`DEFAULTS`; ``Cs`` (an explicit list) replaces ``C_min``/``C_max``/``num_C``.
        seed: seeds the k-fold split; the fit itself is deterministic.

    Returns:
        Test metrics (``params["metrics"]``; the ``*_ts`` ones under the fitted temperature), per-sample
        test predictions (one setting, ``C=<value>``), and ``info``: ``C``, ``Cs``, ``val_top1`` (val, or
        pooled k-fold, top-1 per C), ``selection`` (``val`` | ``kfold``), ``temperature`` and
        ``temperature_fit`` (``val`` | ``kfold out-of-fold``: the logits it was fitted on, see
        :func:`fit_selected`), ``n_iter`` (all L-BFGS iterations), ``n_iter_path`` and ``converged`` (per
        C of the final path: up to the chosen C after k-fold), ``fit_seconds`` (everything but test
        scoring), ``streamed`` (train), ``device`` and sample counts.

    Raises:
        ValueError: bad params, an empty split, or labels outside ``[0, n_classes)``.
    """
    p = resolve_params(params)
    for name in ("train", "test") + (("val",) if data.val is not None else ()):
        _check_labels(getattr(data, name), data.n_classes, name)  # all before any work
    model, info = fit_selected(data, p, seed)
    kw = {"device": p["device"], "batch_size": p["batch_size"], "memory_budget_gb": p["memory_budget_gb"]}
    labels = np.asarray(data.test.labels, dtype=np.int64)
    metrics, probs = score_logits(
        predict_logits(model, data.test, **kw), labels, p["metrics"], info["temperature"]
    )
    pred = probs.argmax(axis=1)
    predictions = {"index": np.arange(len(labels)), "label": labels, "pred": pred}
    predictions["confidence"] = probs[np.arange(len(pred)), pred]
    predictions["setting"] = np.full(len(labels), f"C={model.C:.4g}")
    return ProtocolResult(metrics, predictions, {**info, "n_test": data.test.n})
