"""What every protocol receives and returns.

A protocol is one evaluation method (linear probe, kNN, few-shot, ...). Frozen-feature protocols take
cached features (:class:`Features`: anything with ``n``, ``dim``, ``labels``, ``iter_shards()`` and
``load()``, i.e. a :class:`bobench.features.FeatureSet` or an in-memory :class:`ArrayFeatures`) and
return a :class:`ProtocolResult`. Each protocol module exposes::

    run(data: ProbeData, params: Mapping[str, Any], seed: int, options: RunOptions | None = None)
        -> ProtocolResult

* ``params``: *what* is computed, from the task (part of its config hash). Unknown keys raise
  ValueError (:func:`check_param_keys`); the run options below are never params.
* ``seed``: seeds whatever the protocol draws (folds, few-shot subsets); deterministic ones ignore it.
* ``options``: *how* it runs (:class:`bobench.options.RunOptions`; the protocols read ``device``),
  chosen once at the edge (``--device``) and resolved by :func:`run_device`. None (a library call)
  keeps the protocol's own default device: ``cpu`` for the linear probe (and so few-shot's probe and
  OOD), ``auto`` for kNN and retrieval.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from bobench.metrics import Metric
from bobench.options import RunOptions
from bobench.registry import suggest

if TYPE_CHECKING:
    import torch

#: CLI flags of the run options a task might try to set as parameters
_RUN_OPTION_FLAGS = {"device": "--device", "precision": "--precision", "num_workers": "--workers"}
# batch_size is left out: in some protocols' params it is their own chunk size (rows per block)
_RUN_OPTION_FIELDS = tuple(f.name for f in fields(RunOptions) if f.name != "batch_size")


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
class TrainData:
    """The splits a trained protocol works on: image datasets without transforms (the protocol sets
    its own train and eval transforms). ``val`` None: the protocol holds a val split out of train.

    Attributes:
        train, val, test: :class:`~bobench.data.ImageDataset` (or compatible) splits.
        classes: class (or, multi-label, label) names; targets index into them.
        multilabel: targets are ``[L]`` 0/1 vectors instead of class indices.
        image_size: the task's input size override.
    """

    train: Any
    val: Any | None
    test: Any
    classes: list[str]
    multilabel: bool = False
    #: the task's input size override (None: the backbone card's)
    image_size: int | None = None
    #: shifted test sets ``{name: dataset}`` (the task's ``ood``), scored by the trained model too
    ood: dict[str, Any] = field(default_factory=dict)
    #: the run's cache folder (``--cache-dir``), for protocols that cache frozen outputs (segmentation's
    #: feature maps under ``<cache_dir>/maps``); None: the default cache
    cache_dir: str | None = None

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def split_train_val(
    data: TrainData, val_fraction: float, seed: int
) -> tuple[np.ndarray, Any, np.ndarray, dict]:
    """``(train indices, val dataset, val indices, info)`` of a trained protocol's data.

    The dataset's own val split when it has one; else ``val_fraction`` of train held out, drawn with
    ``seed`` (so each seed of a cell holds out its own images). ``info`` records the source and sizes.

    Raises:
        ValueError: train is too small to hold a val split out of it.
    """
    n = len(data.train)
    info: dict[str, Any] = {"val_source": "dataset" if data.val is not None else "held out of train"}
    if data.val is not None:
        index = np.arange(n)
        val_base, val_index = data.val, np.arange(len(data.val))
    else:
        order = np.random.default_rng([seed, 104729]).permutation(n)
        n_val = max(1, round(float(val_fraction) * n))
        if n - n_val < 1:
            raise ValueError(f"the train split has {n} images: too few to hold out a val split")
        index, val_index = np.sort(order[n_val:]), np.sort(order[:n_val])
        val_base = data.train
    info["n_train"], info["n_val"], info["n_test"] = len(index), len(val_index), len(data.test)
    return index, val_base, val_index, info


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
    """Raise ValueError naming every key of ``params`` that is not in ``allowed``, with a suggestion;
    for a run option (``device``, ``precision``, ...) the suggestion is where to set it instead."""
    unknown = [k for k in params if k not in allowed]
    if not unknown:
        return
    options = [k for k in unknown if k in _RUN_OPTION_FIELDS]
    if options:
        where = ", ".join(
            f"{_RUN_OPTION_FLAGS[k]} (RunOptions.{k})" if k in _RUN_OPTION_FLAGS else f"RunOptions.{k}"
            for k in options
        )
        names = " and ".join(repr(k) for k in options)
        one = len(options) == 1
        are, it = (
            ("is a run option, not a task parameter", "it")
            if one
            else ("are run options, not task parameters", "them")
        )
        hint = (
            f" {names} {are}: remove {it} from the task and choose {where} when"
            " running (how a task runs must not change its config hash)."
        )
    else:
        hint = suggest(str(unknown[0]), [str(a) for a in allowed])
    raise ValueError(f"unknown {what} parameter(s) {unknown}; allowed: {', '.join(allowed)}.{hint}")


def compute_device(device: str | torch.device, float64: str | None = None) -> torch.device:
    """Resolve a device name (``auto`` | ``cpu`` | ``cuda[:N]`` | ``mps``) for protocol compute.

    :func:`bobench.device.resolve_placement` chooses (``auto``: CUDA, then MPS, then the CPU) and
    refuses a CUDA device on a machine without one: never a silent fallback.

    Args:
        device: the device name, or an already resolved ``torch.device``.
        float64: for a computation that needs float64 (the linear solver, the kNN vote), its name:
            MPS, which lacks float64, is then refused when asked for by name, and ``auto`` takes the
            CPU instead of it (``auto`` means the best device that can run it).

    Raises:
        ValueError: an unknown device, CUDA without a CUDA GPU, or MPS for a float64 computation.
    """
    from bobench.device import resolve_placement  # imports torch: only when a protocol runs

    dev = resolve_placement(str(device)).device
    if dev.type == "mps" and float64 is not None:
        if str(device) == "auto":
            return resolve_placement("cpu").device
        raise ValueError(
            f"the {float64} accumulates in float64, which MPS lacks; use --device auto (which runs it "
            "on the CPU) or --device cpu"
        )
    return dev


def run_device(options: RunOptions | None, default: str, float64: str | None = None) -> torch.device:
    """The device a protocol's ``run`` computes on: ``options.device``, or ``default`` when
    ``options`` is None (a library call), resolved by :func:`compute_device` (same ``float64``).

    Example:
        >>> run_device(RunOptions(device="cpu"), "auto")
        device(type='cpu')
    """
    return compute_device(default if options is None else options.device, float64)


def is_int(x: Any) -> bool:
    """An integer parameter value (numpy integers yes, bools no)."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def is_positive_number(x: Any) -> bool:
    """A finite number > 0 (bools no)."""
    return not isinstance(x, bool) and isinstance(x, int | float) and 0 < x < float("inf")
