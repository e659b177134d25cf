"""Readers for published out-of-distribution (OOD) classification sets, as their releases extract.

Every ImageNet-derived set here is test-only: all its images are in split ``"test"`` and ``"train"`` or
``"val"`` raise :class:`~bobench.data.errors.DatasetError`. Class names are ImageNet wnids
(``n01440764``), so an OOD runner can map them by name onto a probe trained on an ImageNet folder whose
class folders are wnids, and mask logits to the OOD set's classes (e.g. ImageNet-A's 200).

The wnid lists come from the class lists timm ships (``timm/data/_info/*.txt``), read as files from
timm's install folder, so timm (and torch) are never imported. Folders are listed with ``os.scandir``,
sorted, and no image is decoded; hidden entries (``.name``) and non-image files (``README.txt``) are
ignored, and images must sit directly inside their class folder.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from bobench.data.errors import DatasetError
from bobench.data.manifest import IMAGE_EXTENSIONS, FileItems
from bobench.data.spec import DatasetSpec
from bobench.data.splits import SPLITS, seeded_split_names, split_params, stratified_split
from bobench.registry import suggest

VISDA_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bus", "car", "horse", "knife",
    "motorcycle", "person", "plant", "skateboard", "train", "truck",
)  # fmt: skip
"""VisDA-2017 classification classes, in label-index order (the labels of its ``image_list.txt``)."""


# ----------------------------------------------------------------------------------------- class lists


@functools.cache
def _timm_list(filename: str) -> tuple[str, ...]:
    # find_spec locates the installed package without importing it (importing timm imports torch).
    spec = find_spec("timm")
    folder = Path(spec.origin).parent / "data" / "_info" if spec and spec.origin else None
    if folder is None or not (folder / filename).is_file():
        raise DatasetError(
            f"the ImageNet class list {filename} ships with timm, which is missing or too old here; "
            "install timm (pip install 'timm>=1.0')."
        )
    return tuple(line.strip() for line in (folder / filename).read_text().splitlines() if line.strip())


def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in the standard (sorted) label order."""
    return _timm_list("imagenet_synsets.txt")


def imagenet_a_wnids() -> tuple[str, ...]:
    """ImageNet-A's 200 wnids, in the order of timm's ``imagenet_a_synsets.txt``."""
    return _timm_list("imagenet_a_synsets.txt")


def imagenet_r_wnids() -> tuple[str, ...]:
    """ImageNet-R's 200 wnids, in the order of timm's ``imagenet_r_synsets.txt``."""
    return _timm_list("imagenet_r_synsets.txt")


# -------------------------------------------------------------------------------------------- helpers


def require_test_split(spec: DatasetSpec, split: str, what: str) -> None:
    """Raise a :class:`DatasetError` unless ``split`` is ``"test"`` (``what`` names the set)."""
    if split != "test":
        raise DatasetError(
            f"{what} ({spec.path}) is a test-only OOD set and has no {split!r} split; load split='test' "
            "and train the probe on an in-distribution dataset."
        )


def list_subdirs(folder: str) -> list[str]:
    """Sorted names of the non-hidden folders directly inside ``folder``."""
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    except OSError as exc:
        raise DatasetError(f"cannot list folder {folder} ({exc.strerror}); check the path.") from exc


def list_images(folder: str, prefix: str) -> list[str]:
    """Sorted ``prefix + name`` of the image files directly inside ``folder``."""
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file()]
    except OSError as exc:
        raise DatasetError(f"cannot list folder {folder} ({exc.strerror}); check the path.") from exc
    return [prefix + n for n in sorted(names) if not n.startswith(".")]


def dataset_root(
    spec: DatasetSpec, layout: str, is_class: Callable[[str], bool], wrappers: tuple[str, ...]
) -> str:
    """``spec.path``, or its one wrapper folder (``sketch/``) when the class folders live in there."""
    root = os.fspath(spec.path or "")
    if not os.path.isdir(root):
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder; expected {layout}.")
    subdirs = list_subdirs(root)
    inner = [d for d in subdirs if d in wrappers]
    if len(inner) == 1 and not any(map(is_class, subdirs)):
        return os.path.join(root, inner[0])
    return root


def _scan_classes(root: str, label_of: dict[str, int], layout: str) -> tuple[list[str], np.ndarray]:
    """Every image of ``root/<folder>/``, labelled ``label_of[folder]``; other folders are errors."""
    folders = list_subdirs(root)
    if not folders:
        raise DatasetError(f"dataset folder {root} has no class folders; expected {layout}.")
    stray = [f for f in folders if f not in label_of]
    if stray:
        raise DatasetError(
            f"folder {os.path.join(root, stray[0])} is not a class of this dataset"
            f"{suggest(stray[0], list(label_of))} (expected {layout}); remove or move it."
        )
    paths: list[str] = []
    labels: list[int] = []
    for folder in folders:
        found = list_images(os.path.join(root, folder), f"{folder}/")
        if not found:
            raise DatasetError(
                f"class folder {os.path.join(root, folder)} holds no images (looked for "
                f"{' '.join(IMAGE_EXTENSIONS)}); the release may be partly extracted, extract it again."
            )
        paths += found
        labels += [label_of[folder]] * len(found)
    return paths, np.array(labels, dtype=np.int64)


def _fixed_classes(spec: DatasetSpec, classes: tuple[str, ...]) -> list[str]:
    if spec.classes is not None and tuple(spec.classes) != classes:
        raise DatasetError(
            f"{spec.kind} dataset {spec.path} has fixed classes ({len(classes)} wnids); drop 'classes'."
        )
    return list(classes)


def _wnid_folders(
    spec: DatasetSpec, split: str, what: str, wnids: tuple[str, ...], wrapper: str
) -> FileItems:
    require_test_split(spec, split, what)
    layout = f"{spec.path}/<wnid>/<image> with the {len(wnids)} {what} wnid folders"
    index = {w: i for i, w in enumerate(wnids)}
    root = dataset_root(spec, layout, index.__contains__, (wrapper,))
    paths, labels = _scan_classes(root, index, layout)
    return FileItems(root, paths, labels, _fixed_classes(spec, wnids), split_params=None)


# ------------------------------------------------------------------------------------ ImageNet family


def read_imagenet_v2(spec: DatasetSpec, split: str) -> FileItems:
    """ImageNetV2 (Recht et al. 2019): ``<path>/<class index 0..999>/<hash>.jpeg``.

    The tarballs extract to ``imagenetv2-matched-frequency-format-val/`` (or ``-threshold0.7-``,
    ``-top-images-``); a folder's NAME is the class index in the standard 1000-class order, mapped to
    its wnid. ``<path>`` is that folder, or its parent when it holds exactly one such folder.
    Classes: the 1000 ImageNet wnids in standard order. Test split only.
    """
    require_test_split(spec, split, "ImageNetV2")
    wnids = imagenet_wnids()
    layout = f"{spec.path}/<class index 0..999>/<image> (e.g. imagenetv2-matched-frequency-format-val/)"
    root = os.fspath(spec.path or "")
    if not os.path.isdir(root):
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder; expected {layout}.")
    subdirs = list_subdirs(root)
    if not any(d.isdigit() for d in subdirs):
        inner = [d for d in subdirs if any(s.isdigit() for s in list_subdirs(os.path.join(root, d)))]
        if len(inner) != 1:
            found = f"it holds several ({', '.join(inner)}); pick one" if inner else "none found"
            raise DatasetError(
                f"{root} is not an ImageNetV2 folder: expected {layout}, or a parent of exactly one such "
                f"folder ({found})."
            )
        root = os.path.join(root, inner[0])
    # "7" and "007" both name class 7; anything else (not a number, >= 1000) is a stray folder.
    label_of = {d: int(d) for d in list_subdirs(root) if d.isdigit() and int(d) < len(wnids)}
    paths, labels = _scan_classes(root, label_of, layout)
    return FileItems(root, paths, labels, _fixed_classes(spec, wnids), split_params=None)


def read_imagenet_sketch(spec: DatasetSpec, split: str) -> FileItems:
    """ImageNet-Sketch (Wang et al. 2019): ``<path>/sketch/<wnid>/*.JPEG`` or ``<path>/<wnid>/*.JPEG``.

    Only ImageNet-1k wnid folders are allowed. Classes: the 1000 wnids in standard order (a partial
    copy keeps all 1000, so labels stay aligned with an ImageNet probe). Test split only.
    """
    return _wnid_folders(spec, split, "ImageNet-Sketch", imagenet_wnids(), "sketch")


def read_imagenet_a(spec: DatasetSpec, split: str) -> FileItems:
    """ImageNet-A (Hendrycks et al. 2021): ``<path>/<wnid>/*.jpg``, 200 wnid folders and a README.txt.

    ``<path>`` may also be the folder holding ``imagenet-a/``. Classes: timm's
    ``imagenet_a_synsets.txt`` (200 wnids, in that file's order); a folder not in it is an error. An
    ImageNet-1k probe is scored on these by masking its logits to the 200 classes. Test split only.
    """
    return _wnid_folders(spec, split, "ImageNet-A", imagenet_a_wnids(), "imagenet-a")


def read_imagenet_r(spec: DatasetSpec, split: str) -> FileItems:
    """ImageNet-R (Hendrycks et al. 2021): ``<path>/<wnid>/*.jpg``, 200 wnid folders and a README.txt.

    As :func:`read_imagenet_a`, with timm's ``imagenet_r_synsets.txt`` and ``imagenet-r/``.
    """
    return _wnid_folders(spec, split, "ImageNet-R", imagenet_r_wnids(), "imagenet-r")


# -------------------------------------------------------------------------------------------- VisDA


def _line_problem(parts: list[str], seen: set[str]) -> str | None:
    """Why a split ``image_list.txt`` line is malformed, or ``None``."""
    n = len(VISDA_CLASSES)
    if len(parts) != 2:
        return "expected '<relative path> <label>'"
    rel, label = parts
    if not (label.isdigit() and int(label) < n):
        return f"label {label!r} is not an integer in 0..{n - 1}"
    if rel.startswith(("/", "\\")) or ".." in rel.replace("\\", "/").split("/"):
        return f"path {rel!r} must be relative and stay inside the list's folder"
    if rel in seen:
        return f"path {rel!r} is listed twice"
    # Images sit in folders named after their class: a mismatch means shifted labels.
    top = rel.split("/", 1)[0]
    if top in VISDA_CLASSES and top != VISDA_CLASSES[int(label)]:
        return f"path {rel!r} is in folder {top!r} but label {label} is {VISDA_CLASSES[int(label)]!r}"
    return None


def _read_image_list(list_path: str, prefix: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(paths, labels, line numbers)`` of a VisDA ``image_list.txt`` (``<relative path> <label>``)."""
    paths: list[str] = []
    labels: list[int] = []
    numbers: list[int] = []
    seen: set[str] = set()
    with open(list_path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            problem = _line_problem(parts, seen)
            if problem:
                raise DatasetError(f"VisDA list {list_path} line {number}: {problem}; fix or drop the line.")
            seen.add(parts[0])
            paths.append(prefix + parts[0])
            labels.append(int(parts[1]))
            numbers.append(number)
    if not paths:
        raise DatasetError(f"VisDA list {list_path} lists no images; extract the release again.")
    return paths, np.array(labels, dtype=np.int64), np.array(numbers, dtype=np.int64)


def read_visda(spec: DatasetSpec, split: str) -> FileItems:
    """VisDA-2017 classification (Peng et al. 2017), one domain at a time (option ``domain``).

    Layout: ``<path>/train/image_list.txt`` (synthetic renders) and ``<path>/validation/image_list.txt``
    (real photos), lines ``<path relative to that folder> <label 0..11>``. Classes: :data:`VISDA_CLASSES`.

    * ``domain=synthetic`` (default): train/val/test by the seeded stratified split of the synthetic
      list (``spec.val_fraction``, ``spec.test_fraction``, ``spec.seed``), recorded in ``split_params``.
    * ``domain=real``: every real image is in ``test``; ``train``/``val`` raise. Train a probe on the
      synthetic domain and score it here for the synthetic-to-real shift.

    Raises:
        DatasetError: an unknown domain, a missing list, a malformed line (naming file and line
            number), or a split the domain does not have.
    """
    domain = spec.option("domain", "synthetic")
    folders = {"synthetic": "train", "real": "validation"}
    if domain not in folders:
        raise DatasetError(
            f"visda domain={domain!r} is unknown{suggest(str(domain), list(folders))}; use synthetic or real."
        )
    root = os.fspath(spec.path or "")
    sub = folders[domain]
    list_path = os.path.join(root, sub, "image_list.txt")
    if not os.path.isfile(list_path):
        raise DatasetError(
            f"VisDA list {list_path} does not exist; expected {root}/train/image_list.txt (synthetic) and "
            f"{root}/validation/image_list.txt (real), as the VisDA-2017 classification tarballs extract."
        )
    paths, labels, numbers = _read_image_list(list_path, f"{sub}/")
    classes = list(VISDA_CLASSES)
    if domain == "real":
        if split != "test":
            raise DatasetError(
                f"VisDA domain=real ({root}) is test-only and has no {split!r} split; load split='test', "
                "or domain=synthetic for train/val."
            )
        return FileItems(root, paths, labels, classes, None, manifest=list_path, lines=numbers)
    available = seeded_split_names(spec.val_fraction, spec.test_fraction)
    if split not in available:
        raise DatasetError(
            f"VisDA {root} has no {split!r} split (a zero fraction makes none); available: {', '.join(available)}."
        )
    params = split_params(spec.val_fraction, spec.test_fraction, spec.seed)
    keep = np.flatnonzero(stratified_split(labels, classes, **params, keys=paths) == SPLITS.index(split))
    return FileItems(
        root, [paths[i] for i in keep], labels[keep], classes, params, manifest=list_path, lines=numbers[keep]
    )
