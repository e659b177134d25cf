"""What every protocol receives and returns.

A protocol is one evaluation method (linear probe, kNN, few-shot, ...). Frozen-feature protocols take
cached features (:class:`Features`: anything with ``n``, ``dim``, ``labels``, ``iter_shards()`` and
``load()``, i.e. a :class:`bobench.features.FeatureSet` or an in-memory :class:`ArrayFeatures`) and
return a :class:`ProtocolResult`. Each protocol module exposes ``run(data, params, seed)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from bobench.metrics import Metric
from bobench.registry import suggest


class Features(Protocol):
    """Features and labels of one split, readable in shards (memory-mapped) or whole."""

    @property
    def n(self) -> int: ...

    @property
    def dim(self) -> int: ...

    @property
    def labels(self) -> np.ndarray: ...

    def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...

    def load(self) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class ArrayFeatures:
    """In-memory :class:`Features` (tests, few-shot subsets, benchmarks).

    Args:
        X: ``[N, D]`` features. y: ``[N]`` integer labels. shard_size: rows per shard in ``iter_shards``.
    """

    X: np.ndarray
    y: np.ndarray
    shard_size: int = 8192

    def __post_init__(self) -> None:
        self.X = np.asarray(self.X, dtype=np.float32)
        self.y = np.asarray(self.y, dtype=np.int64)
        if self.X.ndim != 2 or len(self.X) != len(self.y):
            raise ValueError(f"ArrayFeatures needs X [N, D] and y [N]; got {self.X.shape} and {self.y.shape}")

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def dim(self) -> int:
        return self.X.shape[1]

    @property
    def labels(self) -> np.ndarray:
        return self.y

    def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(0, self.n, self.shard_size):
            yield self.X[i : i + self.shard_size], self.y[i : i + self.shard_size]

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        return self.X, self.y

    def subset(self, index: np.ndarray) -> ArrayFeatures:
        return ArrayFeatures(self.X[index], self.y[index], self.shard_size)


@dataclass
class ProbeData:
    """The splits a frozen-feature protocol works on. ``val`` may be None (then protocols that tune a
    hyper-parameter use k-fold cross-validation on ``train``)."""

    train: Features
    test: Features
    val: Features | None
    n_classes: int
    classes: list[str] = field(default_factory=list)
    #: protocol data beside labels: the test split's reader extras (e.g. ``retrieval_gt``) and, for
    #: OOD tasks, ``ood``: ``{name: OodSet}`` (see :class:`OodSet`)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class OodSet:
    """One shifted test set of an OOD task, with its labels in the in-distribution label space.

    Attributes:
        features: its features (extracted with the same backbone and preprocessing).
        labels: ``[N]`` labels mapped to the in-distribution class indices.
        classes: in-distribution class indices present in this set (e.g. ImageNet-A's 200): a probe's
            predictions are restricted to them by masking the other logits, as the benchmark defines.
        accept: for sets whose classes map to several in-distribution classes (ObjectNet's "chair" is
            several ImageNet chairs): label index → every index that counts as correct; None: only the
            label itself.
    """

    features: Features
    labels: np.ndarray
    classes: np.ndarray
    accept: dict[int, np.ndarray] | None = None


@dataclass
class ProtocolResult:
    """Output of one protocol run.

    Attributes:
        metrics: scores on the test split; names are stable strings (``top1``, ``top1@k=20``, ...), each
            with its ``higher_is_better``.
        predictions: per test sample (and per setting where a protocol scores several), as columns of
            equal length: ``index`` (row in the test split), ``label``, ``pred``, ``confidence`` and
            ``setting``. Kept beside the results store so new metrics need no rerun.
        info: chosen hyper-parameters, the validation curve, sample counts, timings.
    """

    metrics: list[Metric]
    predictions: dict[str, np.ndarray] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def check_param_keys(params: Mapping[str, Any], allowed: Sequence[str], what: str) -> None:
    """Raise ValueError naming every key of ``params`` that is not in ``allowed`` (with a suggestion)."""
    unknown = [k for k in params if k not in allowed]
    if unknown:
        hint = suggest(str(unknown[0]), [str(a) for a in allowed])
        raise ValueError(f"unknown {what} parameter(s) {unknown}; allowed: {', '.join(allowed)}.{hint}")


def is_int(x: Any) -> bool:
    """An integer parameter value (numpy integers yes, bools no)."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def is_positive_number(x: Any) -> bool:
    """A finite number > 0 (bools no)."""
    return not isinstance(x, bool) and isinstance(x, int | float) and 0 < x < float("inf")


class ProtocolFn(Protocol):
    def __call__(self, data: ProbeData, params: Mapping[str, Any], seed: int) -> ProtocolResult: ...
