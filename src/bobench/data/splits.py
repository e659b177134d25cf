"""Seeded, stratified train/val/test splitting that does not depend on file-system order."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""Split names, in the order of their integer codes (0, 1, 2) used by :func:`stratified_split`."""


def split_params(val_fraction: float, test_fraction: float, seed: int) -> dict[str, float | int]:
    """The parameters of a seeded split, as recorded in a manifest hash."""
    return {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed}


def seeded_split_names(val_fraction: float, test_fraction: float) -> list[str]:
    """The splits a seeded split can fill: train always, val and test when their fraction is > 0."""
    return ["train"] + [s for s, f in (("val", val_fraction), ("test", test_fraction)) if f > 0]


def _class_seed(name: str) -> int:
    # Seeding each class from its *name* (not its index) keeps every other class's split unchanged when a
    # class is added or removed.
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def _eval_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    # Round half up per class (Python's round() is banker's rounding), then give back images until the
    # class keeps at least one training image: a class absent from train could never be learned.
    n_test = int(np.floor(n * test_fraction + 0.5))
    n_val = int(np.floor(n * val_fraction + 0.5))
    overflow = n_test + n_val - (n - 1)
    if overflow > 0:
        take = min(overflow, n_val)
        n_val -= take
        n_test -= overflow - take
    return max(n_val, 0), max(n_test, 0)


def stratified_split(
    labels: np.ndarray,
    class_names: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    keys: Sequence[str] | None = None,
) -> np.ndarray:
    """Assign every item to train (0), val (1) or test (2), class by class.

    Within each class the items are sorted by ``keys`` (file paths; default: their index), then
    shuffled by a generator seeded from ``(seed, class name)``; the first ``round(n * test_fraction)``
    go to test, the next ``round(n * val_fraction)`` to val, the rest to train. The result depends only
    on the set of (key, label) pairs and the seed, never on the order the items were listed in, and every
    non-empty class keeps at least one training item.

    Args:
        labels: ``[N]`` integer class indices into ``class_names``.
        class_names: names of the classes; they seed the per-class shuffles.
        val_fraction: share of each class sent to val, in ``[0, 1)``.
        test_fraction: share of each class sent to test, in ``[0, 1)``.
        seed: non-negative integer seed.
        keys: ``[N]`` unique sort keys (e.g. relative paths); ``None`` uses the item indices.

    Returns:
        ``[N]`` uint8 array of split codes, indices into :data:`SPLITS`.

    Example:
        >>> codes = stratified_split(np.array([0] * 10 + [1] * 5), ["a", "b"], 0.2, 0.2, seed=0)
        >>> np.bincount(codes).tolist()
        [9, 3, 3]
    """
    labels = np.asarray(labels, dtype=np.int64)
    order = (
        np.arange(len(labels)) if keys is None else np.array(sorted(range(len(labels)), key=keys.__getitem__))
    )
    # A stable sort by label keeps the key order inside each class.
    order = order[np.argsort(labels[order], kind="stable")]
    sorted_labels = labels[order]
    bounds = np.searchsorted(sorted_labels, np.arange(len(class_names) + 1))
    codes = np.zeros(len(labels), dtype=np.uint8)
    for c, name in enumerate(class_names):
        members = order[bounds[c] : bounds[c + 1]]
        if len(members) == 0:
            continue
        n_val, n_test = _eval_counts(len(members), val_fraction, test_fraction)
        shuffled = members[np.random.default_rng([seed, _class_seed(name)]).permutation(len(members))]
        codes[shuffled[:n_test]] = 2
        codes[shuffled[n_test : n_test + n_val]] = 1
    return codes
