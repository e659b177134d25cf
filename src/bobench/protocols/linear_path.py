"""The linear probe's model and solver: multinomial logistic regression on standardised frozen
features, a whole regularisation path in one call. The protocol around it (choosing C, scoring) is
:mod:`bobench.protocols.linear`.

Objective, the one sklearn's ``LogisticRegression(C=C)`` minimises (so values of C are comparable),
divided by ``C N``::

    min over W [K, D], b [K]:   mean_i CE(softmax(W z_i + b), y_i) + ||W||^2 / (2 C N)

Multi-label targets (labels ``[N, L]`` 0/1, e.g. CheXpert): one independent binary logistic regression
per label, each sklearn's binary ``LogisticRegression(C=C)`` objective divided by ``C N``::

    min over w_l [D], b_l:   mean_i BCE(sigmoid(w_l . z_i + b_l), y_il) + ||w_l||^2 / (2 C N)

The ``L`` objectives share no parameter, so they are solved as one sum (one pass over the data per
evaluation for all labels), whose minimiser is every label's own minimiser.

``z = (x - mean) / std`` with the train split's statistics (:func:`standardization`), ``N`` training
rows, ``K`` the classes present in them (an absent class keeps its column with probability 0), bias
unpenalised; larger C = weaker regularisation. Default grid: 10 values of C log-spaced over
``[1e-4, 1e2]`` (:func:`default_Cs`).

Solver: full-batch L-BFGS (:class:`~bobench.protocols.lbfgs.LBFGS`), strongest regularisation first,
each C warm-started from the previous solution, its curvature memory and the path extrapolated through the
last two solutions. A fit stops when two quasi-Newton steps in a row each lower the objective by at most
``tol`` times its value. Loss and gradient: sums over chunks of ``batch_size`` rows (float32 matmuls,
float64 softmax and sums), the same function for every chunk size up to float rounding, and exactly the
same for a given chunk size whether the split is cached or streamed. A split whose float32 size exceeds
``memory_budget_gb`` is never loaded: every evaluation streams its memory-mapped shards (``iter_shards``);
below the budget it is read once into a tensor on the device and reused (:class:`StandardisedSplit`).

Example:
    >>> models = fit_path(ArrayFeatures(X, y), default_Cs(), n_classes=5)  # X [600, 64], 10 models
    >>> predict_proba(models[3], X_test).shape                              # X_test [200, 64]
    (200, 5)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bobench.protocols.base import ArrayFeatures, Features, compute_device
from bobench.protocols.lbfgs import LBFGS

__all__ = ["BATCH_SIZE", "MAX_ITER", "MEMORY_BUDGET_GB", "SOLVER_NAME", "TOL", "LinearModel"]
__all__ += ["StandardisedSplit"]
__all__ += ["check_Cs", "check_labels", "count_correct", "default_Cs", "fit_path", "fit_split"]
__all__ += ["predict_logits", "predict_proba", "sigmoid", "softmax", "split_logits", "standardization"]

MAX_ITER = 1000  # L-BFGS steps per value of C
TOL = 1e-7  # stop when 2 quasi-Newton steps in a row each lower the objective by <= tol * objective
MEMORY_BUDGET_GB = 4.0  # per split: above it the split is streamed from its shards
BATCH_SIZE = 16384  # rows per chunk of a loss/gradient evaluation
_PARALLEL_WORK = 2**24  # multiply-adds of one pass (N D K) below which one CPU thread is faster
_STATS_ROWS = 4096  # fixed chunk of the standardisation statistics: they never depend on batch_size
SOLVER_NAME = "linear probe"  # names the float64 solver in compute_device's MPS error


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
    n_iter: int  # L-BFGS steps for this C after the warm start (the path extrapolation counts as one)
    converged: bool  # False when max_iter stopped the fit
    multilabel: bool = False  # K = L independent sigmoids (probs = sigmoid(logits)); classes = arange(L)


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


class StandardisedSplit:
    """One split as standardised float32 chunks on ``device``: cached there, or streamed from shards.
    Chunks start at multiples of ``batch_size`` whatever the shard layout, so both give the same sums."""

    def __init__(
        self,
        features: Features,
        mean: np.ndarray,
        scale: np.ndarray,
        device: torch.device,
        batch_size: int,
        budget_gb: float,
    ) -> None:
        self.features, self.n, self.device, self.batch_size = features, features.n, device, batch_size
        self.labels = torch.from_numpy(np.asarray(features.labels, dtype=np.int64)).to(device)
        self._mean = torch.from_numpy(np.asarray(mean, np.float32)).to(device)
        self._inv_scale = torch.from_numpy(np.asarray(1.0 / scale, np.float32)).to(device)
        self.cached: torch.Tensor | None = None
        if features.n * features.dim * 4 <= budget_gb * 2**30:
            self.cached = torch.empty((features.n, features.dim), dtype=torch.float32, device=device)
            for start, z in self._stream():
                self.cached[start : start + len(z)] = z

    @property
    def multilabel(self) -> bool:
        """``[N, L]`` 0/1 labels: ``L`` independent binary probes."""
        return self.labels.ndim == 2

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
    """Run torch CPU ops with ``n`` threads inside the block (no-op on other devices, or when already so)."""
    old = torch.get_num_threads()
    change = device.type == "cpu" and old != n
    if change:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(old)


def _prepared(split: StandardisedSplit, rows, position) -> Iterator[tuple]:
    """``(z, y, t, minus_one)`` per chunk: ``t`` each row's column ``[B, 1]`` and a ``[B, 1]`` tensor of -1
    (what the softmax gradient scatters), or None twice for multi-label (``position`` None)."""
    for z, y in split.chunks(rows):
        if position is None:
            yield z, y, None, None
        else:
            t = position[y][:, None]
            yield z, y, t, torch.full(t.shape, -1.0, dtype=torch.float64, device=t.device)


def _loss_grad(
    split: StandardisedSplit, rows, position, theta: torch.Tensor, lam: float, n: float, prepared=None
):
    """``(objective, gradient [K, D + 1])`` at ``theta = [W | b]`` (float64), summed over chunks;
    ``position`` None: multi-label (a binary cross-entropy per column). ``prepared``: the chunks of
    :func:`_prepared`, made once per path when they are views of a cached split (the same sums)."""
    D = theta.shape[1] - 1
    W32, b32 = theta[:, :D].float(), theta[:, D].float()
    # sums start from the first chunk's terms (0 + x is x: the same numbers without three zero tensors)
    loss = gW = gb = None
    for z, y, t, minus_one in prepared if prepared is not None else _prepared(split, rows, position):
        # Matmuls (D-long dot products) in float32; the softmax on [B, K] logits in float64 costs K/D of
        # them and keeps small residuals and the loss exact enough for a tight line search.
        s = torch.addmm(b32, z, W32.t()).double()
        if position is None:  # multi-label: softplus(s) - y s is the BCE of sigmoid(s), its gradient p - y
            part = (torch.nn.functional.softplus(s) - y * s).sum()
            residual = torch.sigmoid(s) - y
        else:
            logp = torch.log_softmax(s, dim=1)
            part = logp.gather(1, t).sum().neg_()
            residual = logp.exp_().scatter_add_(1, t, minus_one)
        # float32 product, float64 sums. [K, B] @ [B, D], not z.t() @ residual: for few classes the
        # [D, B] @ [B, K] form runs 3-16x slower on CPU (K = 10: 13.7 vs 2.4 ms on 3,000 x 1,280), and
        # at K = 100-1,000 the two are even (benchmarks/bench_linear.py, BENCHMARKS.md P2).
        gw = residual.t().float() @ z
        if loss is None:
            loss, gW, gb = part, gw.double(), residual.sum(dim=0)
        else:
            loss, gW, gb = loss + part, gW.add_(gw), gb.add_(residual.sum(dim=0))
    if loss is None:  # no rows
        loss = torch.zeros((), dtype=torch.float64, device=theta.device)
        gW = torch.zeros((len(theta), D), dtype=torch.float64, device=theta.device)
        gb = torch.zeros(len(theta), dtype=torch.float64, device=theta.device)
    W = theta[:, :D]
    grad = torch.cat([gW / n + lam * W, gb[:, None] / n], dim=1)
    return float(loss / n + lam * (W * W).sum() / 2), grad


def fit_split(
    split: StandardisedSplit,
    rows: torch.Tensor | None,
    Cs: np.ndarray,
    max_iter: int,
    tol: float,
    n_classes: int,
    mean: np.ndarray,
    scale: np.ndarray,
) -> list[LinearModel]:
    """Solve the path on ``split`` (restricted to the ``rows`` bool mask) for ascending ``Cs``,
    warm-started; ``mean`` and ``scale`` (the split's standardisation) are recorded in each model.

    With N rows, at most half the D dimensions and at most 100 per class (few-shot subsets, small datasets),
    the path is solved in the rows' span: ``Z^T = Q R`` (thin QR, float64), the fit runs on ``R^T`` ``[N, N]``
    and each ``W' [K, N]`` maps back as ``W = W' Q^T``. The same optimum (a component of ``W`` outside the span
    changes no logit and only adds penalty, and ``||W|| = ||W'||``), with every evaluation and every
    L-BFGS vector ``D / N`` times smaller."""
    n_rows = split.n if rows is None else int(rows.sum())
    basis = None
    # the QR costs 2 D N^2 once, each evaluation saves about 4 N K (D - N) and a path takes hundreds
    if 0 < 2 * n_rows <= split.features.dim and n_rows <= 100 * n_classes:
        z, y = (torch.cat(parts) for parts in zip(*split.chunks(rows), strict=True))
        basis, r = torch.linalg.qr(z.double().t())  # [D, N] orthonormal columns, [N, N] upper triangular
        span = ArrayFeatures(r.t().float().cpu().numpy(), y.cpu().numpy())
        ident = np.zeros(n_rows), np.ones(n_rows)  # already standardised: (x - 0) * 1 is exact
        split, rows = StandardisedSplit(span, *ident, split.device, split.batch_size, np.inf), None
    class_ids, path = _walk_path(split, rows, Cs, max_iter, tol, n_classes)
    models, numpy32 = [], lambda t: t.float().cpu().numpy()
    for C, theta, n_iter, converged in path:
        W = numpy32(theta[:, :-1] if basis is None else theta[:, :-1] @ basis.t())
        args = (class_ids, n_classes, mean, scale, n_iter, converged, split.multilabel)
        models.append(LinearModel(C, W, numpy32(theta[:, -1]), *args))
    return models


def _walk_path(split: StandardisedSplit, rows, Cs, max_iter: int, tol: float, n_classes: int) -> tuple:
    """The class ids present, and per C ``(C, theta [K, D + 1] float64, n_iter, converged)``."""
    device, D = split.device, split.features.dim
    if split.multilabel:
        classes, position = torch.arange(n_classes, device=device), None
        counts, n = torch.zeros(n_classes, dtype=torch.float64, device=device), 0.0
        for _, y in split.chunks(rows):
            counts, n = counts + y.sum(dim=0), n + len(y)
        # The C -> 0 solution (W = 0, b = logit of the positive rate), clipped for a one-class label.
        rate = (counts / n).clamp(0.5 / n, 1 - 0.5 / n)
        prior = torch.log(rate / (1 - rate))
    else:
        classes = torch.unique(split.labels if rows is None else split.labels[rows])
        position = torch.full((n_classes,), -1, dtype=torch.long, device=device)  # class id -> column
        position[classes] = torch.arange(len(classes), device=device)
        counts = torch.zeros(len(classes), dtype=torch.float64, device=device)
        for _, y in split.chunks(rows):
            counts += torch.bincount(position[y], minlength=len(classes))
        n = float(counts.sum())
        prior = torch.log(counts / n)
        prior = prior - prior.mean()  # the C -> 0 solution (W = 0, b = log priors) as the start
    K = len(classes)
    # float64 parameters: L-BFGS needs loss and gradient differences finer than float32 resolves.
    theta = torch.zeros((K, D + 1), dtype=torch.float64, device=device)
    theta[:, D] = prior
    wmask = torch.ones_like(theta)
    wmask[:, D] = 0
    opt = LBFGS(wmask.ravel())
    # Threads pay only for big matmuls: on vectors of K (D + 1) numbers and small chunks, workers that
    # meet at a barrier per operation cost more than they save (badly so on shared cores).
    threads = torch.get_num_threads() if n * D * K >= _PARALLEL_WORK else 1
    # a cached split without a row mask: its chunks are views, prepared once for the whole path
    prepared = list(_prepared(split, None, position)) if split.cached is not None and rows is None else None
    path, class_ids, x, f, g = [], classes.cpu().numpy(), theta.ravel(), None, None
    for C in Cs:
        lam = 1.0 / (C * n)

        def fg(v: torch.Tensor, lam: float = lam) -> tuple[float, torch.Tensor]:
            with _cpu_threads(device, threads):
                f, g = _loss_grad(split, rows, position, v.view(K, D + 1), lam, n, prepared)
            return f, g.ravel()

        with _cpu_threads(device, 1):
            if f is None:
                f, g = fg(x)
            else:  # the data term is unchanged: only the penalty moves, no pass over the data needed
                f += (lam - opt.lam) * float((x * x * opt.wmask).sum()) / 2
                g = g + (lam - opt.lam) * x * opt.wmask
            opt.set_lam(lam)
            x, f, g, n_iter, converged = opt.minimise(fg, x, f, g, tol, max_iter)
        path.append((float(C), x.view(K, D + 1), n_iter, converged))
    return class_ids, path


def count_correct(split: StandardisedSplit, models: Sequence[LinearModel], rows=None) -> np.ndarray:
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


def split_logits(split: StandardisedSplit, model: LinearModel, rows=None) -> np.ndarray:
    """Logits ``[n, n_classes]`` float32 of ``model`` on ``split`` (``rows`` only, in order); ``-inf`` in
    the columns of classes absent from its training rows, so that they get probability 0."""
    W, b = torch.from_numpy(model.weight).to(split.device), torch.from_numpy(model.bias).to(split.device)
    n = split.n if rows is None else int(rows.sum())
    out, start = np.full((n, model.n_classes), -np.inf, dtype=np.float32), 0
    for z, _ in split.chunks(rows):
        out[start : start + len(z), model.classes] = torch.addmm(b, z, W.t()).cpu().numpy()
        start += len(z)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """float64 softmax of float32 logits, row by row (the probabilities every score is computed from)."""
    return torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """float64 sigmoid of float32 logits, element-wise (a multi-label model's probabilities)."""
    return torch.sigmoid(torch.from_numpy(logits).double()).numpy()


def fit_path(
    train: Features,
    Cs: Sequence[float],
    n_classes: int,
    *,
    max_iter: int = MAX_ITER,
    tol: float = TOL,
    device: str | torch.device = "cpu",
    batch_size: int = BATCH_SIZE,
    memory_budget_gb: float = MEMORY_BUDGET_GB,
) -> list[LinearModel]:
    """Fit the probe for every C of an ascending path on ``train`` (``ArrayFeatures(X, y)`` for arrays);
    ``[N, L]`` 0/1 labels fit ``L`` independent binary probes (``n_classes = L``).

    Args:
        train: features to fit, standardised with their own statistics (:func:`standardization`).
        Cs: values of C, strictly ascending (strongest regularisation first); each fit warm-starts the next.
        n_classes: width of the predicted probabilities; labels must lie in ``[0, n_classes)``.
        max_iter, tol: stopping rule per C (L-BFGS steps; relative decrease of the objective per step).
        device: where the matmuls run (a device name as for ``--device``; MPS lacks the float64 the
            solver needs). batch_size: rows per chunk (changes nothing beyond rounding).
        memory_budget_gb: above it the features are streamed from their shards on every evaluation.

    Returns:
        One :class:`LinearModel` per C, in the order of ``Cs``.

    Raises:
        ValueError: ``Cs`` not positive and strictly ascending, labels out of range, or a device that
            cannot run the solver.
    """
    Cs = check_Cs(Cs)
    check_labels(train, n_classes, "train", multilabel=np.ndim(train.labels) == 2)
    device = compute_device(device, SOLVER_NAME)
    mean, scale = standardization(train)
    split = StandardisedSplit(train, mean, scale, device, batch_size, memory_budget_gb)
    return fit_split(split, None, Cs, max_iter, tol, n_classes, mean, scale)


def predict_logits(
    model: LinearModel,
    features: Features | np.ndarray,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = BATCH_SIZE,
    memory_budget_gb: float = MEMORY_BUDGET_GB,
) -> np.ndarray:
    """Logits ``[N, n_classes]`` float32 of ``model`` on raw (unstandardised) features ``[N, D]``;
    ``-inf`` for the classes absent from its training rows."""
    if isinstance(features, np.ndarray):
        features = ArrayFeatures(features, np.zeros(len(features), dtype=np.int64))
    dev = compute_device(device)  # float32 matmuls only: any device
    split = StandardisedSplit(features, model.mean, model.scale, dev, batch_size, memory_budget_gb)
    return split_logits(split, model)


def predict_proba(model: LinearModel, features: Features | np.ndarray, **kw: Any) -> np.ndarray:
    """Probabilities ``[N, n_classes]`` float64: the softmax of :func:`predict_logits` (same keywords);
    for a multi-label model the sigmoid, ``[N, L]`` independent probabilities of each label."""
    logits = predict_logits(model, features, **kw)
    return sigmoid(logits) if model.multilabel else softmax(logits)


def check_labels(features: Features, n_classes: int, name: str, multilabel: bool = False) -> None:
    """Raise ValueError if split ``name`` is empty or has labels outside ``[0, n_classes)``; with
    ``multilabel``, unless its labels are ``[N, n_classes]`` zeros and ones."""
    labels = np.asarray(features.labels)
    if features.n == 0:
        raise ValueError(f"the {name} split is empty")
    if multilabel or labels.ndim != 1:
        if not multilabel:
            raise ValueError(
                f"the {name} split has multi-label targets {labels.shape}; this probe needs one class per "
                "sample (the linear protocol handles multi-label targets)"
            )
        if labels.shape != (features.n, n_classes) or not np.isin(labels, (0, 1)).all():
            raise ValueError(f"{name} labels must be [N, {n_classes}] zeros and ones, got {labels.shape}")
        return
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"{name} labels must lie in [0, {n_classes}), got [{labels.min()}, {labels.max()}]")


def check_Cs(Cs: Any) -> np.ndarray:
    """``Cs`` as a float64 vector; ValueError unless non-empty, positive, finite and strictly ascending."""
    Cs = np.asarray(Cs, dtype=np.float64).ravel()
    if len(Cs) == 0 or not np.all(np.isfinite(Cs)) or np.any(Cs <= 0):
        raise ValueError(f"Cs must be a non-empty list of positive finite numbers, got {Cs.tolist()}")
    if np.any(np.diff(Cs) <= 0):
        raise ValueError(f"Cs must be strictly ascending (strongest regularisation first), got {Cs.tolist()}")
    return Cs
