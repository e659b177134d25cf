"""Scoring a segmentation model by its dataset-level confusion matrix, from images or from cached maps.

:func:`score` runs a predictor image by image (the uncached path); :func:`score_cached` runs the head on
cached maps (:class:`~bobench.map_set.MapSet`) a batch at a time and compares each image's logits, resized
to its original size, with its original mask. The masks a split is scored against are read by
:class:`KeptMasks`: DataLoader workers decode them the first time, and they are kept in memory for the
next scorings of the same split (val is scored every epoch) when they fit :data:`KEEP_MASKS_BYTES`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bobench.options import RunOptions

__all__ = ["KEEP_MASKS_BYTES", "KeptMasks", "labels_of", "score", "score_cached"]

#: masks of one split kept in memory across scorings up to this many bytes (one byte per pixel up to 254
#: classes); larger splits (ADE20K's or Cityscapes' val) are decoded again at every scoring
KEEP_MASKS_BYTES = 256 << 20


def labels_of(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class ``[B, H, W]`` of ``[B, K, H, W]`` logits, on the CPU (``max(1).indices``: the same
    first-maximum labels as ``argmax(1)``, which is about 6x slower on the CPU over a small class axis)."""
    return logits.max(1).indices.cpu()


class _Masks(torch.utils.data.Dataset):
    """Original masks of ``dataset``'s items ``indices`` (read alone: no image is decoded)."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset.load_mask(self.indices[i])


class KeptMasks:
    """The original masks of ``dataset``'s items ``indices``, in that order, for repeated scorings.

    Iterating reads them with ``workers`` DataLoader workers; a complete pass whose masks fit ``budget``
    bytes (stored as uint8 up to 254 classes, so that the ignore value 255 stays apart, else int16/int32)
    is kept, and later passes come from memory.
    A pass stopped early (an error) keeps nothing.
    """

    def __init__(self, dataset: Any, indices: np.ndarray, n_classes: int, budget: int = KEEP_MASKS_BYTES):
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        self.dtype = torch.uint8 if n_classes < 255 else torch.int16 if n_classes < 32767 else torch.int32
        self.budget = int(budget)
        self.kept: list[torch.Tensor] | None = None

    def iterate(self, workers: int) -> Iterator[torch.Tensor]:
        """Each mask in order (int64 from the dataset, or the kept copy in the smallest dtype)."""
        if self.kept is not None:
            yield from self.kept
            return
        loader = torch.utils.data.DataLoader(
            _Masks(self.dataset, self.indices), batch_size=None, num_workers=workers
        )
        keep: list[torch.Tensor] | None = []
        size = 0
        for mask in loader:
            if keep is not None:
                size += mask.numel() * self.dtype.itemsize
                if size <= self.budget:
                    keep.append(mask.to(self.dtype))
                else:
                    keep = None
            yield mask
        if keep is not None and len(keep) == len(self.indices):
            self.kept = keep


def score_cached(
    seg: nn.Module, maps: Any, masks: KeptMasks, n_classes: int, options: RunOptions, description: str
) -> dict:
    """Confusion-matrix scores of ``seg``'s head on cached maps (a :class:`~bobench.map_set.MapSet` of
    ``masks.dataset``) of the items ``masks.indices``, at each image's original size: the head runs on a
    batch of maps at the cached input size, then each image's logits are resized (never cropped) to its
    original size and compared with its original mask, as the uncached path's ``whole`` evaluation does
    from the image."""
    from bobench.data.errors import worker_errors_unwrapped
    from bobench.dense.seg_metrics import ConfusionMatrix
    from bobench.device import resolve_placement
    from bobench.distributed import loader_workers
    from bobench.progress import progress_bar

    placement = resolve_placement(options.device, options.precision)
    size = int(maps.image_size)
    cm = ConfusionMatrix(n_classes, ignore_index=255)
    workers = loader_workers(options.num_workers, placement.device.type)
    indices = np.asarray(masks.indices, dtype=np.int64)
    was_training = seg.training
    seg.eval()
    step = max(1, options.batch_size)
    try:
        with (
            progress_bar(description, total=len(indices), enabled=options.progress) as bar,
            worker_errors_unwrapped(),
        ):
            originals = masks.iterate(workers)
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                with torch.inference_mode(), placement.autocast_context():
                    batch = [m.to(placement.device) for m in maps.batch(chunk)]
                    logits = seg.forward_maps(batch, (size, size)).float()
                sizes = [tuple(int(v) for v in maps.sizes[j]) for j in chunk]
                truth = [next(originals) for _ in chunk]
                same = [b for b, hw in enumerate(sizes) if hw == (size, size)]
                if same:  # one update for the images the cache did not resize
                    cm.update(labels_of(logits[same]), torch.stack([truth[b] for b in same]))
                for b, (h, w) in enumerate(sizes):
                    if (h, w) != (size, size):
                        one = F.interpolate(
                            logits[b : b + 1], size=(h, w), mode="bilinear", align_corners=False
                        )
                        cm.update(labels_of(one), truth[b][None])
                bar.advance(len(chunk))
            for _ in originals:  # finish the pass, so that KeptMasks keeps it
                pass
    finally:
        seg.train(was_training)
    return cm.compute()


def score(model: nn.Module, dataset: Any, n_classes: int, options: RunOptions, description: str) -> dict:
    """Confusion-matrix scores (:meth:`ConfusionMatrix.compute`) of ``model`` on ``dataset``, one image at a
    time (``model`` maps one item's input to ``[1, K, H, W]`` scores at the mask's size)."""
    from bobench.dense.seg_metrics import ConfusionMatrix
    from bobench.training import predict_batches

    cm = ConfusionMatrix(n_classes, ignore_index=255)
    for out, mask in predict_batches(model, dataset, options, description=description, batch_size=1):
        cm.update(labels_of(out), mask)
    return cm.compute()
