"""Datasets: a :class:`DatasetSpec` (string, dict or YAML) -> a torch ``Dataset`` with class names, a
split and a manifest hash.

``import bobench.data`` and :func:`list_datasets` do not import torch; :class:`ImageDataset` (and torch)
are imported on first use, as are :class:`SegmentationDataset` and :func:`load_segmentation_dataset`.

Example:
    >>> from bobench.data import load_dataset
    >>> ds = load_dataset("imagefolder:/data/pets?val_fraction=0.2&seed=1", split="val")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bobench.data.dense_embedded import list_detection_datasets
from bobench.data.dense_readers import load_detection_dataset
from bobench.data.errors import DatasetError
from bobench.data.loading import list_datasets, load_dataset
from bobench.data.manifest import IMAGE_EXTENSIONS
from bobench.data.seg_files import list_segmentation_datasets
from bobench.data.spec import DatasetSpec
from bobench.data.splits import SPLITS

if TYPE_CHECKING:
    from bobench.data.coco import DetectionDataset
    from bobench.data.dataset import ImageDataset
    from bobench.data.segmentation import SegmentationDataset, load_segmentation_dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "DatasetError",
    "DatasetSpec",
    "DetectionDataset",
    "ImageDataset",
    "SegmentationDataset",
    "list_datasets",
    "list_detection_datasets",
    "list_segmentation_datasets",
    "load_dataset",
    "load_detection_dataset",
    "load_segmentation_dataset",
]


def __getattr__(name: str) -> Any:
    if name == "ImageDataset":  # lazily, because it imports torch
        from bobench.data.dataset import ImageDataset

        return ImageDataset
    if name == "DetectionDataset":  # likewise
        from bobench.data.coco import DetectionDataset

        return DetectionDataset
    if name in ("SegmentationDataset", "load_segmentation_dataset"):  # likewise (torch at its top)
        from bobench.data import segmentation

        return getattr(segmentation, name)
    raise AttributeError(f"module 'bobench.data' has no attribute {name!r}")
