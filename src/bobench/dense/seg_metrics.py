"""Semantic segmentation metrics from one dataset-level confusion matrix: mIoU, mAcc, pixel accuracy.

The definitions are mmseg's (``mmseg.evaluation.metrics.IoUMetric``): counts are summed over the whole
dataset first, then per-class IoU ``TP / (TP + FP + FN)`` and accuracy ``TP / (TP + FN)``; ``mIoU`` averages
IoU over classes that occur in the ground truth *or* the predictions (a class absent from both has no IoU,
one predicted but absent from the ground truth scores 0), ``mAcc`` averages accuracy over classes present in
the ground truth. Values are fractions in ``[0, 1]`` (mmseg prints percentages).

Example:
    >>> cm = ConfusionMatrix(3)
    >>> cm.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 255]))
    >>> round(cm.compute()["mIoU"], 4)  # class 0: 1/1, class 1: 1/2, class 2: 0/1
    0.5
"""

from __future__ import annotations

import math
from typing import Any

import torch


class ConfusionMatrix:
    """An int64 ``[K, K]`` confusion matrix (rows: ground truth, columns: prediction) over a dataset.

    Args:
        n_classes: number of classes ``K``; labels are ``0..K-1``.
        ignore_index: target value whose pixels are skipped (255 as ADE20K / Cityscapes readers map
            "unlabelled" to); ``None`` skips nothing.

    The matrix lives on the device of the first ``update``'s inputs, so GPU evaluation never copies label
    maps to the host. Matrices merge by addition (:meth:`merge`, ``+``) and across DDP ranks
    (:meth:`all_reduce`).
    """

    def __init__(self, n_classes: int, ignore_index: int | None = 255) -> None:
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.n_classes = int(n_classes)
        self.ignore_index = ignore_index
        self.mat = torch.zeros(self.n_classes, self.n_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Zero the counts (the matrix keeps its device)."""
        self.mat.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count one batch.

        Args:
            pred: integer labels of any shape (e.g. ``logits.argmax(1)``, ``[B, H, W]``), in ``0..K-1``.
            target: integer labels of the same shape, in ``0..K-1`` or ``ignore_index``.

        Raises:
            ValueError: shapes differ, either tensor is not integer, or a label (other than
                ``ignore_index`` in ``target``) is outside ``0..K-1``; dataset readers must map such values
                (e.g. ADE20K's 0 = "other" → 255) before evaluation, so a stray one is a bug, not noise.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        for name, t in (("pred", pred), ("target", target)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"{name} must hold integer labels (take argmax of logits), got {t.dtype}")
        # int64 before any arithmetic: uint8 label maps would overflow target * K
        target = target.reshape(-1).long()
        pred = pred.reshape(-1).long().to(target.device)
        k = self.n_classes
        # ignored pixels go to an extra bin K*K rather than being cut out by boolean indexing, which
        # allocates and synchronises and made this the slowest step of a cached segmentation epoch
        ignored = target == self.ignore_index if self.ignore_index is not None else None
        for name, t in (("target", target), ("pred", pred)):
            bad = (t < 0) | (t >= k)
            if ignored is not None:
                bad &= ~ignored
            if bool(bad.any()):
                value = int(t[bad][0])
                note = f" or ignore_index {self.ignore_index}" if name == "target" else ""
                raise ValueError(
                    f"{name} holds label {value}, outside 0..{k - 1}{note}; map such values in the dataset reader"
                )
        index = target * k + pred
        if ignored is not None:
            index = index.masked_fill(ignored, k * k)
        if self.mat.device != target.device:
            self.mat = self.mat.to(target.device)
        self.mat += torch.bincount(index, minlength=k * k + 1)[: k * k].reshape(k, k)

    def _check_compatible(self, other: ConfusionMatrix) -> None:
        if (other.n_classes, other.ignore_index) != (self.n_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a {other.n_classes}-class matrix (ignore_index {other.ignore_index}) into a "
                f"{self.n_classes}-class one (ignore_index {self.ignore_index})"
            )

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts into this matrix (in place); returns ``self``.

        Raises:
            ValueError: class counts or ``ignore_index`` differ.
        """
        self._check_compatible(other)
        self.mat = self.mat + other.mat.to(self.mat.device)
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        out = ConfusionMatrix(self.n_classes, self.ignore_index)
        out.mat = self.mat.clone()
        return out.merge(other)

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the counts over all ranks when ``torch.distributed`` is initialised (else a no-op); returns
        ``self``. Every rank must call it. Under NCCL the matrix must be on this rank's GPU, which it is
        once ``update`` has seen GPU tensors."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)
        return self

    def compute(self) -> dict[str, Any]:
        """The metrics of the counts so far (see the module docstring for the definitions).

        Returns:
            ``{"mIoU": float, "mAcc": float, "pixel_acc": float, "per_class_iou": list[float],
            "per_class_acc": list[float], "pixels": int}``; excluded classes are NaN in the lists, and a
            mean over no class (nothing counted) is NaN.
        """
        mat = self.mat.double()
        tp = mat.diagonal()
        gt = mat.sum(dim=1)
        union = gt + mat.sum(dim=0) - tp
        nan = torch.tensor(math.nan, dtype=mat.dtype, device=mat.device)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
        total = mat.sum()
        return {
            "mIoU": float(iou.nanmean()),
            "mAcc": float(acc.nanmean()),
            "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
            "per_class_iou": iou.tolist(),
            "per_class_acc": acc.tolist(),
            "pixels": int(self.mat.sum()),
        }
