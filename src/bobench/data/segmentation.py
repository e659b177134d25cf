"""Semantic segmentation data: the front door :func:`load_segmentation_dataset`, the readers of the
published layouts, and :class:`SegmentationDataset`.

Spec strings (options after ``?`` as ``key=value&...``; every file scheme also takes ``check_sizes``)::

    ade20k:/data/ade             ADEChallengeData2016 (the folder, or one holding it): images/{training,
                                 validation}/*.jpg + annotations/{training,validation}/*.png; 150 classes,
                                 reduce-zero-label (0 -> ignore 255, k -> k - 1)
    voc:/data/VOCdevkit          VOC2012 (VOCdevkit/VOC2012 or a folder holding it): ImageSets/Segmentation/
                                 {train,val}.txt, JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette
                                 PNGs, read by index); background + 20 classes, 255 = ignore border.
                                 ``sbd=/data/benchmark_RELEASE/dataset`` adds SBD's cls/*.mat to train
    cityscapes-seg:/data/cs      gtFine/<split>/<city>/*_gtFine_labelIds.png + leftImg8bit/<split>/<city>/
                                 *_leftImg8bit.png; label ids -> the 19 train ids, every other id -> 255
    segfolder:/data/x            images/<split>/**/<name>.<ext> + masks/<split>/**/<name>.png of indices
                                 0..K-1 and 255; ``classes=a,b,c`` or ROOT/classes.txt (see seg_files)
    mnist-seg | nuclei-seg       embedded sets (:mod:`bobench.data.seg_files`)

Splits: ADE20K, VOC and Cityscapes publish no test labels, so ``test`` reads their official val set
(ADE ``validation``, VOC ``val.txt``, Cityscapes ``val``) and ``val`` raises :class:`DatasetError`: a
val split equal to test would let model selection see the test set; the protocol holds val out of train
instead (``bobench.trained`` does so on that error). ``train`` reads the official train set (VOC with
``sbd=``: the standard 10,582-image "trainaug": VOC train ids with their VOC masks, plus every SBD
train+val id that is not a VOC train or val id, with its SBD mask). ``segfolder`` reads each split from its
own folder, and raises for a missing one. The embedded sets have all three splits.

Checks: at load each image and mask is ``stat()``-ed (a missing file is named); when an item is read
(both files are decoded then anyway) its sizes are compared and mask values checked, so a bad mask fails
the first epoch that reads it, naming the file and the value. ``check_sizes=true`` (or
:meth:`SegmentationDataset.check_sizes`) compares every pair's sizes at load from the file headers: two
header reads per item (an SBD ``.mat`` is read whole), seconds for ADE20K on a local disk, more on a
network file system, so it is opt-in, as the classification reader's ``skip_bad_images`` is.

This module imports torch at the top, as :mod:`bobench.data.coco` does; ``import bobench.data`` loads it
on first use of :class:`SegmentationDataset` or :func:`load_segmentation_dataset`.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bobench.data import seg_files
from bobench.data.errors import DatasetError
from bobench.data.images import open_rgb
from bobench.data.manifest import ManifestHasher, PathTable, regular_file_stat
from bobench.data.schemes import need_path
from bobench.data.seg_files import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    IGNORE_INDEX,
    SCHEMES,
    VOC_CLASSES,
    ade20k_label_map,
    cityscapes_label_map,
    identity_map,
    mask_size,
    read_mask,
    split_spec,
)
from bobench.data.splits import SPLITS
from bobench.registry import suggest

# skipping an image silently would change the ground truth; the user decides
BAD_IMAGE_FIX = "replace the file, or remove the image and its mask from the dataset"

Transforms = Callable[[Any, Any], tuple[Any, Any]]


class SegmentationDataset(Dataset):
    """One split of a semantic segmentation dataset; files are decoded per item, nothing is held in RAM.

    ``dataset[i] -> (image, mask)``: ``image`` float32 ``[3, H, W]`` RGB in ``[0, 1]``; ``mask`` int64
    ``[H, W]`` of class indices ``0..n_classes-1`` (``classes[k]``) and ``ignore_index`` (255) for
    unlabelled pixels, after the dataset's label map (e.g. ADE20K's reduce-zero-label).

    Attributes:
        classes: class names, index order. ``n_classes``: their number. ``ignore_index``: 255.
        names: per item, a stable identity (VOC/ADE ids, ``city/stem`` for Cityscapes, the relative path
            without extension for ``segfolder``), e.g. to key per-image feature caches.
        root, split, source, kind: the dataset folder, the split asked for, where the items came from
            (messages start with it), and the reader.
        manifest_hash: sha256 over kind, split, classes, the label map and every item's image and mask
            (path relative to ``root``, size, ``mtime_ns``: editing or touching a mask changes it); for the
            embedded sets over the pixel digest recorded when they were built, the same on every machine.
        transforms: ``transforms(image, mask) -> (image, mask)``, called with ``image`` a
            ``tv_tensors.Image`` and ``mask`` a ``tv_tensors.Mask``, so ``torchvision.transforms.v2``
            geometric transforms move the mask with the image, with nearest interpolation (e.g.
            ``v2.RandomResizedCrop``, ``v2.RandomHorizontalFlip``); pad with
            ``fill={tv_tensors.Image: 0, tv_tensors.Mask: 255}`` so padding is ignored, not class 0.
            Plain tensors come out (the mask as int64).

    Raises (on reading an item):
        DatasetError: a mask whose size differs from its image's, or that holds a value that is neither
            a class index nor the ignore value after the label map (naming the file, the value and its
            row and column), or an unreadable file.
    """

    def __init__(
        self,
        root: str,
        names: Sequence[str],
        images: Sequence[str],
        masks: Sequence[str],
        classes: Sequence[str],
        *,
        source: str,
        kind: str,
        split: str,
        label_map: np.ndarray | None = None,
        value_note: str | None = None,
        content_digest: str | None = None,
        transforms: Transforms | None = None,
        check_sizes: bool = False,
    ) -> None:
        """``stat()`` every file once and hash the manifest.

        Args:
            root: dataset folder; ``images`` and ``masks``: paths, absolute or relative to it.
            label_map: ``[V]`` int lookup table, raw mask value -> class index, 255, or -1 (invalid);
                default: values ``0..K-1`` and 255 are valid as they are.
            value_note: what the raw values should be, for the out-of-range message.
            content_digest: a digest of every item's pixels (embedded sets): hashed instead of the
                files' sizes and times.
            check_sizes: compare every pair's sizes now, from the file headers.

        Raises:
            DatasetError: an empty split, a missing image or mask file (named), or with ``check_sizes``
                a mask of another size than its image.
        """
        if not names:
            raise DatasetError(f"{source}: the {split} split has no images.")
        self.root, self.split, self.source, self.kind = root, split, source, kind
        self.classes, self.n_classes, self.ignore_index = list(classes), len(classes), IGNORE_INDEX
        self.transforms = transforms
        self.names = list(names)
        self._images = PathTable([os.path.join(root, p) for p in images])
        self._masks = PathTable([os.path.join(root, p) for p in masks])
        self._lut = identity_map(len(classes)) if label_map is None else np.asarray(label_map, np.int16)
        self._note = value_note or f"neither a class index 0..{len(classes) - 1} nor the ignore value 255"
        hasher = ManifestHasher(f"segmentation:{kind}", split, self.classes, None)
        hasher.add_json("label_map", self._lut.tolist())
        if content_digest is not None:
            hasher.add_json("content_sha256", [content_digest, list(names)])
        for i in range(len(names)):
            for path, tag in zip(self.paths(i), ("image", "mask"), strict=True):
                info = regular_file_stat(path)
                if info is None:
                    raise DatasetError(
                        f"{source}: {tag} {path} of item {names[i]!r} does not exist or is not a file."
                    )
                if content_digest is None:
                    rel = os.path.relpath(path, root).replace(os.sep, "/")
                    hasher.add_file(rel, info.st_size, info.st_mtime_ns, tag)
        self.manifest_hash = hasher.hexdigest()
        if check_sizes:
            self.check_sizes()

    def __len__(self) -> int:
        return len(self.names)

    def paths(self, i: int) -> tuple[str, str]:
        """``(image file, mask file)`` of item ``i``."""
        return self._images[i], self._masks[i]

    def _size_error(self, i: int, image_size: tuple[int, int], mask_size: tuple[int, int]) -> DatasetError:
        image, mask = self.paths(i)
        return DatasetError(
            f"{self.source}: mask {mask} is {mask_size[0]}x{mask_size[1]} px but its image {image} is "
            f"{image_size[0]}x{image_size[1]} px; a mask must have its image's size: fix or replace the pair."
        )

    def check_sizes(self) -> None:
        """Compare every image's and mask's size from their headers (no pixel decode).

        Raises:
            DatasetError: the first pair whose sizes differ (naming both files), or an unreadable file.
        """
        for i in range(len(self)):
            image, mask = self.paths(i)
            try:
                with Image.open(image) as im:
                    size = im.size
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                size = open_rgb(image, fix=BAD_IMAGE_FIX).size  # raises the reader's error naming the file
            if (m := mask_size(mask)) != size:
                raise self._size_error(i, size, m)

    def map_labels(self, raw: np.ndarray, path: str) -> np.ndarray:
        """Raw mask values -> int64 class indices / ``ignore_index`` through the label map.

        Raises:
            DatasetError: a value the map does not accept, naming ``path``, the value, its row and column.
        """
        lut = self._lut
        if raw.dtype == np.uint8 and len(lut) >= 256:
            mapped = lut[raw]
            bad = mapped < 0
        else:  # 16/32-bit masks: values past the table (or negative) are invalid, not wrapped around
            inside = (raw >= 0) & (raw < len(lut))
            mapped = lut[np.where(inside, raw, 0)]
            bad = ~inside | (mapped < 0)
        if bad.any():
            y, x = (int(v) for v in np.argwhere(bad)[0])
            raise DatasetError(
                f"{self.source}: mask {path} holds value {int(raw[y, x])} (row {y}, column {x}), "
                f"{self._note}; fix the mask, or load it with the classes it was made for."
            )
        return mapped.astype(np.int64)

    def load_mask(self, i: int) -> torch.Tensor:
        """Item ``i``'s mask alone (int64 ``[H, W]``), without decoding its image (no size check).

        Raises:
            DatasetError: an unreadable mask or an invalid value (see the class).
        """
        mask_path = self.paths(i)[1]
        return torch.from_numpy(self.map_labels(read_mask(mask_path), mask_path))

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``i`` before ``transforms``.

        Raises:
            DatasetError: an unreadable file, a size mismatch, or an invalid mask value (see the class).
        """
        image_path, mask_path = self.paths(i)
        pil = open_rgb(image_path, fix=BAD_IMAGE_FIX)
        raw = read_mask(mask_path)
        if raw.shape[:2] != (pil.size[1], pil.size[0]) or raw.ndim != 2:
            raise self._size_error(i, pil.size, (raw.shape[1], raw.shape[0]))
        image = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        return image, torch.from_numpy(self.map_labels(raw, mask_path))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(i)
        if self.transforms is None:
            return image, mask
        from torchvision import tv_tensors

        image, mask = self.transforms(tv_tensors.Image(image), tv_tensors.Mask(mask))
        # Plain tensors out: a tv_tensor would carry its metadata into the model and into collate.
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return (
            f"SegmentationDataset({self.kind}, split={self.split!r}, n={len(self)}, "
            f"classes={self.n_classes}, hash={self.manifest_hash[:12]})"
        )


def _official(scheme: str, split: str, test_folder: str) -> None:
    if split == "val":
        raise DatasetError(
            f"{scheme} has no val split here: its official val set ({test_folder}) is the test split, "
            "as the test labels are not public; hold a val split out of train instead."
        )


def load_segmentation_dataset(
    spec: str, split: str = "train", transforms: Transforms | None = None
) -> SegmentationDataset:
    """Load one split of a semantic segmentation dataset (the module docstring lists specs and splits).

    Args:
        spec: e.g. ``"ade20k:/data/ade"``, ``"voc:/data/VOCdevkit?sbd=/data/benchmark_RELEASE/dataset"``,
            ``"cityscapes-seg:/data/cityscapes"``, ``"segfolder:/data/x?classes=bg,road"``, ``"mnist-seg"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        transforms: ``(image, mask) -> (image, mask)``, e.g. a ``torchvision.transforms.v2`` pipeline.

    Raises:
        DatasetError: an unknown scheme (with close names) or option, a missing folder (named, with the
            expected layout), a ``val`` split of a set whose val is its test split, a missing file.

    Example:
        >>> ds = load_segmentation_dataset("mnist-seg", split="val")
        >>> len(ds), ds.classes[:3], ds[0][1].shape
        (100, ['background', '0', '1'], torch.Size([96, 96]))
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}.{suggest(split, list(SPLITS))} Use train, val or test.")
    scheme, path, options = split_spec(spec)
    if scheme in ("", "embedded") and path in seg_files.SEG_CATALOG:
        folder = str(seg_files.write_segmentation_embedded(path))
        classes = seg_files.SEG_CATALOG[path].classes
        digest = seg_files.split_digest(folder, split)
        return _segfolder(
            folder, split, classes, f"embedded:{path}", transforms=transforms, content_digest=digest
        )
    if scheme not in SCHEMES:
        known = [*SCHEMES, *seg_files.SEG_CATALOG]
        raise DatasetError(
            f"unknown segmentation dataset {spec!r}.{suggest(scheme or path, known)} Use one of "
            f"{', '.join(f'{s}:/path' for s in SCHEMES)}, or an embedded name: "
            f"{', '.join(seg_files.SEG_CATALOG)}."
        )
    if not path:
        raise DatasetError(f"segmentation spec {spec!r} has no path; write {scheme}:/path/to/data.")
    check = options.get("check_sizes", "false").strip().lower()
    if check not in ("true", "false", "1", "0", "yes", "no"):
        raise DatasetError(f"segmentation spec {spec!r}: check_sizes={check!r} is not true or false.")
    kw: dict[str, Any] = {"transforms": transforms, "check_sizes": check in ("true", "1", "yes")}
    if scheme == "ade20k":
        return _ade20k(path, split, **kw)
    if scheme == "voc":
        return _voc(path, split, options.get("sbd"), **kw)
    if scheme == "cityscapes-seg":
        return _cityscapes(path, split, **kw)
    return _segfolder(path, split, seg_files.folder_classes(path, options.get("classes")), "segfolder", **kw)


def _ade20k(root: str, split: str, **kw: Any) -> SegmentationDataset:
    layout = "ADE20K's layout is ADEChallengeData2016/{images,annotations}/{training,validation}/"
    _official("ade20k", split, "validation")
    nested = os.path.join(root, "ADEChallengeData2016")
    root = nested if os.path.isdir(nested) else need_path(root, "ADE20K root", layout)
    folder = "training" if split == "train" else "validation"
    image_dir = need_path(os.path.join(root, "images", folder), "ADE20K image folder", layout)
    need_path(os.path.join(root, "annotations", folder), "ADE20K annotation folder", layout)
    names = sorted(n[:-4] for n in os.listdir(image_dir) if n.lower().endswith(".jpg"))
    return SegmentationDataset(
        root, names, [f"images/{folder}/{n}.jpg" for n in names],
        [f"annotations/{folder}/{n}.png" for n in names], ADE20K_CLASSES,
        source=f"ADE20K {root} ({folder})", kind="ade20k", split=split, label_map=ade20k_label_map(),
        value_note="not an ADE20K label (0 = unlabelled, 1..150 = the classes)", **kw,
    )  # fmt: skip


def _read_ids(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip()]


def _voc(root: str, split: str, sbd: str | None, **kw: Any) -> SegmentationDataset:
    layout = "VOC's layout is VOC2012/{ImageSets/Segmentation/{train,val}.txt,JPEGImages,SegmentationClass}"
    _official("voc", split, "ImageSets/Segmentation/val.txt")
    for sub in ("", "VOC2012", os.path.join("VOCdevkit", "VOC2012")):
        if os.path.isdir(os.path.join(root, sub, "ImageSets", "Segmentation")):
            root = os.path.join(root, sub).rstrip(os.sep)
            break
    lists = os.path.join(need_path(root, "VOC root", layout), "ImageSets", "Segmentation")
    val = _read_ids(need_path(os.path.join(lists, "val.txt"), "VOC list", layout))
    listed = "val" if split == "test" else "train"
    ids = (
        val if split == "test" else _read_ids(need_path(os.path.join(lists, "train.txt"), "VOC list", layout))
    )
    source = f"Pascal VOC 2012 {root} ({listed}.txt)"
    masks = {i: f"SegmentationClass/{i}.png" for i in ids}
    images = {i: f"JPEGImages/{i}.jpg" for i in ids}
    if split == "train" and sbd:
        sbd_layout = "give sbd= SBD's benchmark_RELEASE/dataset folder, which holds cls/<id>.mat"
        for sub in ("", "dataset", os.path.join("benchmark_RELEASE", "dataset")):
            if os.path.isdir(os.path.join(sbd, sub, "cls")):
                sbd = os.path.join(sbd, sub).rstrip(os.sep)
                break
        cls = need_path(os.path.join(sbd, "cls"), "SBD folder", sbd_layout)
        held = set(val) | set(ids)  # VOC val never enters train; VOC's own masks (with borders) win
        for name in sorted(f[:-4] for f in os.listdir(cls) if f.endswith(".mat")):
            if name not in held:
                masks[name] = os.path.join(cls, f"{name}.mat")
                jpg = os.path.join(root, "JPEGImages", f"{name}.jpg")
                images[name] = jpg if os.path.exists(jpg) else os.path.join(sbd, "img", f"{name}.jpg")
        source += f" + SBD {sbd} (cls, less VOC val: trainaug)"
    names = sorted(masks)
    return SegmentationDataset(
        root, names, [images[n] for n in names], [masks[n] for n in names], VOC_CLASSES,
        source=source, kind="voc", split=split,
        value_note="neither a VOC class index (0..20) nor the ignore value 255", **kw,
    )  # fmt: skip


def _cityscapes(root: str, split: str, **kw: Any) -> SegmentationDataset:
    layout = "Cityscapes' layout is ROOT/{gtFine,leftImg8bit}/{train,val}/<city>/"
    _official("cityscapes-seg", split, "gtFine/val")
    folder = "train" if split == "train" else "val"
    gt_dir = need_path(os.path.join(root, "gtFine", folder), "Cityscapes annotations folder", layout)
    need_path(os.path.join(root, "leftImg8bit", folder), "Cityscapes image folder", layout)
    suffix = "_gtFine_labelIds.png"
    files = sorted(glob.glob(os.path.join(glob.escape(gt_dir), "*", f"*{suffix}")))
    if not files:
        raise DatasetError(f"Cityscapes folder {gt_dir} has no <city>/*{suffix} files; {layout}.")
    names = [f"{os.path.basename(os.path.dirname(p))}/{os.path.basename(p)[: -len(suffix)]}" for p in files]
    return SegmentationDataset(
        root, names, [f"leftImg8bit/{folder}/{n}_leftImg8bit.png" for n in names],
        [f"gtFine/{folder}/{n}{suffix}" for n in names], CITYSCAPES_CLASSES,
        source=f"Cityscapes {root} (gtFine/{folder} label ids -> train ids)", kind="cityscapes-seg",
        split=split, label_map=cityscapes_label_map(), value_note="not a Cityscapes label id (0..255)", **kw,
    )  # fmt: skip


def _segfolder(root: str, split: str, classes: Sequence[str], kind: str, **kw: Any) -> SegmentationDataset:
    names, images, masks = seg_files.list_segfolder(root, split)
    source = f"segmentation folder {root} ({split})"
    return SegmentationDataset(
        root, names, images, masks, classes, source=source, kind=kind, split=split, **kw
    )
