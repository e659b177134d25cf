"""``ImageDataset``: the torch ``Dataset`` every reader produces.

This is the one module of :mod:`bobench.data` that imports torch at the top; the package loads it
only when a dataset is loaded.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bobench.data.images import open_rgb
from bobench.data.manifest import PathTable
from bobench.data.spec import DatasetSpec


class FileSource:
    """Images stored as files: paths relative to ``root`` (or absolute), decoded on demand.

    ``boxes`` (``[N, 4]`` ``x0, y0, x1, y1`` pixels, NaN rows for none) crops an image as it is loaded,
    e.g. the query regions of the revisitop protocol.
    """

    def __init__(self, root: str, paths: Sequence[str], boxes: np.ndarray | None = None) -> None:
        self.root = root
        self._paths = PathTable(paths)
        self._boxes = boxes

    def item_id(self, i: int) -> str:
        return self._paths[i]

    def path(self, i: int) -> str:
        return os.path.join(self.root, self._paths[i])

    def load(self, i: int) -> Image.Image:
        img = open_rgb(self.path(i))
        if self._boxes is not None and not np.isnan(self._boxes[i]).any():
            x0, y0, x1, y1 = (float(v) for v in self._boxes[i])
            img = img.crop((round(x0), round(y0), round(x1), round(y1)))
        return img


class ArraySource:
    """Images held in memory as a ``[N, H, W, 3]`` uint8 array (embedded datasets)."""

    root = None

    def __init__(self, name: str, images: np.ndarray, indices: np.ndarray) -> None:
        self._name = name
        self._images = images
        self._indices = indices  # positions in the full embedded dataset, used as stable item ids

    def item_id(self, i: int) -> str:
        return f"{self._name}:{int(self._indices[i])}"

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self._images[i])  # [H, W, 3] uint8 -> RGB


class ImageDataset(Dataset):
    """One split of a dataset: ``dataset[i] -> (transform(image) or PIL RGB image, int label)``, or for
    a multi-label dataset ``(image, float32 tensor [L] of 0/1)`` (what ``BCEWithLogitsLoss`` takes).

    Build it with :func:`bobench.data.load_dataset`, not directly. It holds no decoded images (only
    paths, or the small embedded arrays), so it pickles cheaply into DataLoader workers.

    Attributes:
        spec: the :class:`DatasetSpec` it was loaded from.
        split: ``"train"``, ``"val"`` or ``"test"``.
        classes: class names; ``targets`` index into it. Multi-label: the ``L`` label names, in
            target-column order.
        targets: ``[N]`` int64 labels, in dataset order; multi-label: ``[N, L]`` int64 0/1.
        multilabel: True when ``targets`` is ``[N, L]`` (e.g. CheXpert's 5 findings).
        manifest_hash: sha256 hex of the items, labels, class names, split and split parameters (see
            :func:`bobench.data.load_dataset` for exactly what is covered).
        skipped: ``(item, reason)`` for each image dropped by ``skip_bad_images``.
        transform: applied to the PIL image in ``__getitem__``; may be replaced at any time.
        extras: protocol data from the reader beside class labels (e.g. ``retrieval_gt``); ``{}``.

    Example:
        >>> from bobench.data import load_dataset
        >>> ds = load_dataset("digits", split="val")
        >>> len(ds), ds.classes[:3], ds[0][0].size
        (359, ['0', '1', '2'], (8, 8))
    """

    def __init__(
        self,
        spec: DatasetSpec,
        split: str,
        classes: Sequence[str],
        targets: np.ndarray,
        manifest_hash: str,
        source: FileSource | ArraySource,
        skipped: Sequence[tuple[str, str]] = (),
        transform: Callable[[Image.Image], Any] | None = None,
        extras: dict[str, Any] | None = None,
    ) -> None:
        self.spec = spec
        self.extras = dict(extras or {})
        self.split = split
        self.classes = list(classes)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.manifest_hash = manifest_hash
        self.skipped = list(skipped)
        self.transform = transform
        self._source = source

    @property
    def multilabel(self) -> bool:
        """True when every image has a 0/1 target per label (``targets`` ``[N, L]``)."""
        return self.targets.ndim == 2

    @property
    def n_skipped(self) -> int:
        """How many unreadable images ``skip_bad_images`` dropped."""
        return len(self.skipped)

    @property
    def root(self) -> str | None:
        """The folder relative item paths resolve against; ``None`` for embedded data."""
        return self._source.root

    def __len__(self) -> int:
        return len(self.targets)

    def _check(self, i: int) -> int:
        i = operator.index(i)
        n = len(self.targets)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for a dataset of {n} images")
        return i % n

    def load_image(self, i: int) -> Image.Image:
        """Image ``i`` as a PIL RGB image, without the transform.

        Raises:
            DatasetError: naming the file, when it cannot be read.
        """
        return self._source.load(self._check(i))

    def item_id(self, i: int) -> str:
        """A stable identifier of item ``i``: its path relative to the root, or ``name:index``."""
        return self._source.item_id(self._check(i))

    def __getitem__(self, i: int) -> tuple[Any, int | torch.Tensor]:
        image = self.load_image(i)
        if self.transform is not None:
            image = self.transform(image)
        if self.multilabel:
            return image, torch.from_numpy(self.targets[i].astype(np.float32))
        return image, int(self.targets[i])

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.spec.kind}:{self.spec.name}, split={self.split!r}, n={len(self)}, "
            f"{'labels' if self.multilabel else 'classes'}={len(self.classes)}, skipped={self.n_skipped}, hash={self.manifest_hash[:12]})"
        )
