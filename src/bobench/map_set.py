"""What :mod:`bobench.map_cache` stores: the resize rule, the on-disk constants and :class:`MapSet`, a
complete entry read back memory-mapped (see :mod:`bobench.map_cache` for the layout, key and guarantees).

**Input.** Every image is resized to a fixed ``S x S`` square (``image_size``) so that the maps of all
images stack into one array (:func:`resize_for_maps`): bilinear with antialiasing from the ``[0, 1]`` float
image, the mask with ``nearest-exact``. The aspect ratio is *not* kept: the head trains on the ``S x S``
masks stored with the maps, while scoring is on each image's *original* mask (upsample the ``S x S``
logits to ``sizes[i]``).

**Precision.** float16 storage rounds each value to 11 significant bits: a relative error of at most
``2**-11`` (about 4.9e-4) per value, absolute at most ``2**-25`` below float16's normal range (6.1e-5).
A value beyond float16's range (65504) raises, asking for ``dtype="float32"``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

FORMAT_VERSION = 1  # bump when the on-disk layout or the meaning of a key component changes
DTYPES: dict[str, type[np.floating]] = {"float16": np.float16, "float32": np.float32}
IGNORE_INDEX = 255
#: how an image and its mask become the ``S x S`` input; part of the key, so changing it here (with the
#: code in :func:`resize_for_maps`) can never hit entries made the old way
RESIZE_RULE = "square SxS; image bilinear antialias align_corners=False; mask nearest-exact"


def default_maps_dir() -> Path:
    """``$BOBENCH_CACHE/maps``, else ``~/.cache/bobench/maps``."""
    base = os.environ.get("BOBENCH_CACHE") or Path.home() / ".cache" / "bobench"
    return Path(base) / "maps"


def resize_for_maps(
    image: torch.Tensor, mask: torch.Tensor | None, image_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An item as the map cache feeds it to the backbone: both resized to ``image_size x image_size``.

    Args:
        image: float ``[3, H, W]`` in ``[0, 1]``; resized bilinearly with antialiasing (a convex
            combination of pixels, so it stays in ``[0, 1]``).
        mask: integer ``[H, W]`` of class indices and 255 (or None); resized with ``nearest-exact``.
        image_size: the side ``S``; the aspect ratio is not kept.

    Returns:
        ``(image float32 [3, S, S], mask uint8 [S, S] or None)``.

    Raises:
        ValueError: an image that is not ``[3, H, W]``, a mask of another size, or mask values outside
            ``0..255``.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image [3, H, W], got {tuple(image.shape)}")
    size = (int(image_size), int(image_size))
    image = image.float()
    if tuple(image.shape[-2:]) != size:
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    if mask is None:
        return image.contiguous(), None
    if mask.ndim != 2:
        raise ValueError(f"expected a mask [H, W], got {tuple(mask.shape)}")
    if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) > IGNORE_INDEX):
        raise ValueError(f"mask values must be class indices or {IGNORE_INDEX}, got {int(mask.max())}")
    if tuple(mask.shape) != size:
        # float32 holds 0..255 exactly, and every interpolate backend takes it
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0]
    return image.contiguous(), mask.to(torch.uint8).contiguous()


class ResizedForMaps(Dataset):
    """``dataset[i]`` resized for extraction, in the DataLoader workers: ``(image, mask, (H, W))``."""

    def __init__(self, dataset: Any, image_size: int) -> None:
        self.dataset = dataset
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, mask = self.dataset[i]
        if tuple(mask.shape[-2:]) != tuple(image.shape[-2:]):
            raise ValueError(
                f"item {i}: mask {tuple(mask.shape)} and image {tuple(image.shape)} differ in size"
            )
        hw = torch.tensor(image.shape[-2:], dtype=torch.int64)
        image, mask = resize_for_maps(image, mask, self.image_size)
        return image, mask, hw


@dataclass
class MapSet:
    """A complete cached extraction: read-only, memory-mapped (nothing is loaded until asked for).

    Attributes:
        key: the cache key. path: its folder. manifest: the manifest dict (see the module docstring).
        cache_hit: True when nothing had to be extracted in this call.

    A ``MapSet`` can be sent to DataLoader workers: pickling drops the open memory maps (each worker
    reopens the files), it never copies the arrays.

    Example:
        >>> ms = MapStore().get_or_extract(model, dataset, image_size=512)
        >>> idx = np.array([3, 1, 2])
        >>> logits = model.forward_maps([m.to(device) for m in ms.batch(idx)], (512, 512))  # [3, K, S, S]
        >>> loss = F.cross_entropy(logits.float(), ms.mask_batch(idx).to(device), ignore_index=255)
        >>> # scoring image i: F.interpolate(logits_i, size=tuple(ms.sizes[i]), mode="bilinear") vs its
        >>> # original mask (the dataset's own, not ms.masks)
    """

    key: str
    path: Path
    manifest: dict[str, Any]
    cache_hit: bool = False
    _maps: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _masks: np.ndarray | None = field(default=None, repr=False)
    _sizes: np.ndarray | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        # a pickled memmap carries its whole array; workers reopen the files instead
        state = dict(self.__dict__)
        state.update(_maps={}, _masks=None, _sizes=None)
        return state

    @property
    def n(self) -> int:
        """Number of images ``N``."""
        return int(self.manifest["n"])

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        """``(C, h, w)`` of each cached map, in the order of the model's ``in_index`` (finest first)."""
        return [(int(c), int(h), int(w)) for c, h, w in (m["shape"] for m in self.manifest["maps"])]

    @property
    def in_index(self) -> tuple[int, ...]:
        """Which of ``backbone.features`` the cached maps are."""
        return tuple(int(m["index"]) for m in self.manifest["maps"])

    @property
    def image_size(self) -> int:
        """The side ``S`` every image was resized to."""
        return int(self.manifest["image_size"])

    @property
    def dtype(self) -> str:
        """Storage dtype of the maps: ``"float16"`` or ``"float32"``."""
        return str(self.manifest["dtype"])

    @property
    def stats(self) -> dict[str, Any]:
        """Throughput of the extraction that produced these maps (wall time, img/s, device, precision...)."""
        return dict(self.manifest["stats"])

    def maps(self, j: int) -> np.ndarray:
        """The ``j``-th cached map of every image: an ``np.memmap`` ``[N, C_j, h_j, w_j]`` (read-only)."""
        if j not in self._maps:
            self._maps[j] = np.load(self.path / self.manifest["maps"][j]["file"], mmap_mode="r")
        return self._maps[j]

    @staticmethod
    def _rows(arr: np.ndarray, idx: Any) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) < 2 or bool(np.all(idx[1:] >= idx[:-1])):
            return arr[idx]
        # read in file order (sequential pages, kinder to the disk), then put back in the asked order
        order = np.argsort(idx, kind="stable")
        rows = arr[idx[order]]
        out = np.empty_like(rows)
        out[order] = rows
        return out

    def batch(self, idx: Sequence[int] | np.ndarray | torch.Tensor) -> list[torch.Tensor]:
        """The cached maps of images ``idx`` (any order, repeats allowed), in that order.

        Returns:
            one CPU tensor ``[len(idx), C_j, h_j, w_j]`` per map, in the storage dtype (float16 by
            default: :meth:`~bobench.dense.segmentation.SegmentationModel.forward_maps` casts to the
            head's dtype; move them to the head's device first). Fresh copies, writeable.
        """
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        return [torch.from_numpy(self._rows(self.maps(j), idx)) for j in range(len(self.shapes))]

    def item(self, i: int) -> list[torch.Tensor]:
        """The cached maps of image ``i``: one CPU tensor ``[C_j, h_j, w_j]`` per map, in the storage
        dtype (a dataset item: a DataLoader's collate stacks them into :meth:`batch`'s layout)."""
        return [torch.from_numpy(np.array(self.maps(j)[int(i)])) for j in range(len(self.shapes))]

    @property
    def masks(self) -> np.ndarray:
        """``np.memmap`` uint8 ``[N, S, S]``: the masks resized (nearest-exact) to the input, 255 = ignore."""
        if self._masks is None:
            self._masks = np.load(self.path / "masks.npy", mmap_mode="r")
        return self._masks

    def mask_batch(self, idx: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """int64 ``[len(idx), S, S]`` CPU targets of images ``idx`` (``ignore_index`` 255), for a loss."""
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        return torch.from_numpy(self._rows(self.masks, idx).astype(np.int64))

    @property
    def sizes(self) -> np.ndarray:
        """int64 ``[N, 2]``: each image's original ``(H, W)``, to upsample its logits to for scoring."""
        if self._sizes is None:
            self._sizes = np.load(self.path / "sizes.npy")
        return self._sizes
