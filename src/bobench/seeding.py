"""Counter-based seeding: every random draw of a training run is a pure function of counters.

A seed is derived from ``(run seed, what, epoch, index, ...)`` by :func:`seed_for`, never carried from
one step to the next, so an interrupted run that resumes at any update draws exactly what the
uninterrupted run drew (:mod:`bobench.training` relies on it for bit-equal resume).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SeededDataset", "seed_all", "seed_for"]


def seed_for(*parts: Any) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes and runs)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_all(seed: int, device: torch.device | None = None) -> None:
    """Seed Python's, NumPy's and torch's global generators (the ones augmentations and mixup use).

    ``device`` says which of torch's generators draws: for a CPU device only the CPU generator is
    seeded, which is ~100x cheaper than :func:`torch.manual_seed` while no accelerator is initialised
    (it queues a lazy seed per backend, capturing a stack trace each time); this runs per sample in
    the loader workers and per step. ``None`` seeds every backend, as :func:`torch.manual_seed`.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if device is not None and device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


_CPU = torch.device("cpu")


class SeededDataset(Dataset):
    """``dataset`` whose item ``i`` in epoch ``epoch`` is drawn under the seed ``(seed, epoch, i)``.

    Random augmentations then depend only on the sample and the epoch, not on the worker process that
    loads it nor on where an interrupted epoch resumed. Set :attr:`epoch` before each epoch's loader is
    made (workers receive a copy of the dataset when the loader's iterator starts).
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        # augmentations draw on the CPU (a worker never touches the accelerator)
        seed_all(seed_for(self.seed, "sample", self.epoch, int(i)), _CPU)
        return self.dataset[i]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """Items ``indices`` (what a DataLoader fetches for one batch). A dataset that declares
        ``draws_random = False`` (its items never draw random numbers) is read without the per-item
        seeding, through its own ``__getitems__`` when it has one (e.g. one read of a memory map)."""
        if getattr(self.dataset, "draws_random", True):
            return [self[i] for i in indices]
        many = getattr(self.dataset, "__getitems__", None)
        return list(many(indices)) if many is not None else [self.dataset[i] for i in indices]
