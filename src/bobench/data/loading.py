"""``load_dataset`` (the front door) and ``list_datasets``; torch is imported only by ``load_dataset``."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bobench.data.embedded import CATALOG, build_embedded
from bobench.data.errors import DatasetError
from bobench.data.manifest import FileItems, ManifestHasher, label_key, regular_file_stat
from bobench.data.spec import DatasetSpec
from bobench.data.splits import SPLITS
from bobench.registry import suggest

if TYPE_CHECKING:
    from bobench.data.dataset import ImageDataset


def list_datasets() -> list[dict[str, Any]]:
    """Describe the embedded datasets without building them (and without importing torch).

    Returns:
        One dict per dataset: ``name``, ``description``, ``n_classes``, ``split_sizes`` (train/val/test
        counts), ``image_size`` (side in px), ``source`` and ``license``.
    """
    return [info.to_dict() for info in CATALOG.values()]


def load_dataset(
    spec: str | Mapping[str, Any] | DatasetSpec | os.PathLike[str],
    split: str = "train",
    transform: Callable[[Any], Any] | None = None,
) -> ImageDataset:
    """Load one split of a dataset; the one front door for every reader.

    No image is decoded here: files are listed and ``stat()``-ed once each (and header-checked with
    ``skip_bad_images``). The returned ``manifest_hash`` is a sha256 over the class names, the split
    name, the parameters of any seeded split that decided membership, and, for every item in dataset
    order, its label (for a multi-label dataset its 0/1 row, and the header says multi-label) and identity
    plus content fingerprint: for files, the path relative to the dataset
    root (or CSV folder) with its size and ``mtime_ns`` (so hashing an ImageNet-size folder costs one
    ``stat()`` per file, and editing or touching an image changes the hash, while moving the root does
    not); for embedded data, the pixel bytes.

    Args:
        spec: anything :meth:`DatasetSpec.parse` accepts, e.g. ``"patches13"``, ``"imagefolder:/data"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: applied to each PIL RGB image by ``__getitem__`` (e.g. a torchvision transform).

    Returns:
        An :class:`~bobench.data.dataset.ImageDataset`.

    Raises:
        DatasetError: a bad spec, a missing path, an empty class folder, a bad CSV, a missing image, an
            unknown or empty split; each message names the file or folder and the fix.

    Example:
        >>> ds = load_dataset("patches13", split="test")
        >>> len(ds), len(ds.classes), ds.load_image(0).size
        (156, 13, (64, 64))
    """
    spec = DatasetSpec.parse(spec)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}.{suggest(split, list(SPLITS))} Use train, val or test.")
    if spec.kind == "embedded":
        dataset = _load_embedded(spec, split, transform)
    else:
        dataset = _load_files(spec, split, read_file_items(spec, split), transform)
    if len(dataset) == 0:
        skipped = f" ({dataset.n_skipped} unreadable images were skipped)" if dataset.n_skipped else ""
        raise DatasetError(
            f"split {split!r} of dataset {spec.path or spec.name} has no images{skipped}; add images, or "
            "raise val_fraction/test_fraction if the classes are too small for a seeded split to fill it."
        )
    return dataset


def read_file_items(spec: DatasetSpec, split: str) -> FileItems:
    """The files, labels and classes of ``split`` of a file-backed ``spec`` (imagefolder, csv or a
    registered reader), as its reader lists them; no image is opened and torch is not imported.

    Raises:
        DatasetError: as the reader does (a missing path, a bad CSV, an unknown split ...).
    """
    if spec.kind == "imagefolder":
        from bobench.data.folder import read_imagefolder

        return read_imagefolder(spec, split)
    if spec.kind == "csv":
        from bobench.data.csvfile import read_csv_manifest

        return read_csv_manifest(spec, split)
    from bobench.data.readers import READERS

    return READERS.load(spec.kind)(spec, split)


def _load_embedded(spec: DatasetSpec, split: str, transform: Callable[[Any], Any] | None) -> ImageDataset:
    from bobench.data.dataset import ArraySource, ImageDataset

    data = build_embedded(spec.name)
    indices = data.split_indices(split)
    images, targets = data.images[indices], data.targets[indices]
    hasher = ManifestHasher(f"embedded:{spec.name}", split, data.classes, None)
    hasher.add_arrays(images, targets)
    source = ArraySource(spec.name, images, indices)
    return ImageDataset(spec, split, data.classes, targets, hasher.hexdigest(), source, transform=transform)


@dataclass(frozen=True)
class HashedItems:
    """What :func:`hash_file_items` found: the kept items' positions, their targets and crop boxes, the
    skipped ``(path, reason)`` pairs and the manifest hash of the kept items."""

    keep: np.ndarray
    targets: np.ndarray
    boxes: np.ndarray | None
    skipped: list[tuple[str, str]]
    manifest_hash: str


def hash_file_items(spec: DatasetSpec, split: str, items: FileItems) -> HashedItems:
    """Check ``items`` (as listed by :func:`read_file_items`) and hash them for the cache key: each file's
    path, size and mtime with its label, the split's classes and parameters, crop boxes and extras; with
    ``skip_bad_images`` unreadable files are left out. Opens no image but those it checks; torch-free.

    Raises:
        DatasetError: a file gone, bad targets, or a skipped image in a split with crop boxes.
    """
    from bobench.data.images import check_image

    targets = _check_targets(spec, items)
    multilabel = targets.ndim == 2
    # One digit string per row ("01001") for a multi-label dataset; single-label hashing is unchanged.
    labels = [label_key(row) for row in targets.tolist()] if multilabel else targets
    hasher = ManifestHasher(spec.kind, split, items.classes, items.split_params, multilabel=multilabel)
    keep: list[int] = []
    skipped: list[tuple[str, str]] = []
    for i, rel in enumerate(items.paths):
        path = os.path.join(items.root, rel)
        info = regular_file_stat(path)
        if info is None:
            fix = (
                "fix the path (relative paths start at the CSV's folder) or drop the row"
                if items.lines is not None
                else "it vanished while the folder was listed; load the dataset again"
            )
            raise DatasetError(f"{items.where(i)}: image {path} does not exist or is not a file; {fix}.")
        if spec.skip_bad_images:
            reason = check_image(path)
            if reason is not None:
                skipped.append((rel, reason))
                continue
        label = labels[i] if multilabel else int(labels[i])
        hasher.add_file(rel, info.st_size, info.st_mtime_ns, label)
        keep.append(i)
    index = np.array(keep, dtype=np.int64)
    boxes = None
    if items.boxes is not None:
        if skipped:
            raise DatasetError(
                f"{spec.kind} dataset {spec.path}: skip_bad_images cannot drop items of a split with crop "
                "boxes (the protocol's ground truth refers to every item); fix or replace the bad images."
            )
        boxes = np.asarray(items.boxes, dtype=np.float64)[index]
        hasher.add_json("boxes", [[None if np.isnan(v) else float(v) for v in row] for row in boxes])
    if items.extras:
        hasher.add_json("extras", items.extras)
    return HashedItems(index, targets[index], boxes, skipped, hasher.hexdigest())


def _load_files(
    spec: DatasetSpec, split: str, items: FileItems, transform: Callable[[Any], Any] | None
) -> ImageDataset:
    from bobench.data.dataset import FileSource, ImageDataset

    hashed = hash_file_items(spec, split, items)
    source = FileSource(items.root, [items.paths[i] for i in hashed.keep], boxes=hashed.boxes)
    return ImageDataset(
        spec,
        split,
        items.classes,
        hashed.targets,
        hashed.manifest_hash,
        source,
        skipped=hashed.skipped,
        transform=transform,
        extras=items.extras,
    )


def _check_targets(spec: DatasetSpec, items: FileItems) -> np.ndarray:
    """``items.targets`` as int64, after checking a multi-label matrix is ``[N, len(classes)]`` and 0/1."""
    targets = np.asarray(items.targets, dtype=np.int64)
    if targets.ndim == 2 and (targets.shape[1] != len(items.classes) or not np.isin(targets, (0, 1)).all()):
        raise DatasetError(
            f"{spec.kind} reader for {spec.path} returned multi-label targets {targets.shape} that are not "
            f"[N, {len(items.classes)}] zeros and ones; the reader must map its labels to 0/1 per class."
        )
    if targets.ndim not in (1, 2) or len(targets) != len(items.paths):
        raise DatasetError(
            f"{spec.kind} reader for {spec.path} returned targets {targets.shape} for {len(items.paths)} "
            "items; a reader returns [N] class indices or [N, L] 0/1 labels."
        )
    return targets
