"""ImageFolder reader: ``root/<class>/<image>``, or ``root/{train,val,test}/<class>/<image>``.

Folders are listed with ``os.scandir`` and nothing is opened, so listing an ImageNet-size tree costs one
directory read per folder. Entries whose names start with ``.`` are ignored; class folders are searched
recursively and symlinked folders are followed (once each).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import numpy as np

from bobench.data.errors import DatasetError
from bobench.data.manifest import IMAGE_EXTENSIONS, FileItems
from bobench.data.spec import DatasetSpec
from bobench.data.splits import SPLITS, seeded_split_names, split_params, stratified_split
from bobench.registry import suggest


def _subdirs(folder: str) -> list[str]:
    with _scandir(folder) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())


@contextlib.contextmanager
def _scandir(folder: str) -> Iterator[Iterator[os.DirEntry[str]]]:
    """``os.scandir`` whose failure (permissions, a vanished folder) names the folder."""
    try:
        entries = os.scandir(folder)
    except OSError as exc:
        raise DatasetError(
            f"cannot list folder {folder} ({exc.strerror}); check that it is readable."
        ) from exc
    with entries:
        yield entries


def _list_images(class_dir: str, prefix: str) -> list[str]:
    """Sorted POSIX paths ``prefix + relative path`` of every image below ``class_dir``."""
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    stack = [(class_dir, prefix)]
    while stack:
        folder, rel = stack.pop()
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:  # a symlink loop would otherwise never end
            continue
        seen.add((info.st_dev, info.st_ino))
        with _scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    stack.append((entry.path, f"{rel}{entry.name}/"))
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                    found.append(rel + entry.name)
    found.sort()
    return found


def _resolve_classes(spec: DatasetSpec, folder_names: set[str], where: str) -> list[str]:
    if spec.classes is None:
        return sorted(folder_names)
    extra = sorted(folder_names - set(spec.classes))
    if extra:
        raise DatasetError(
            f"class folder {extra[0]!r} in {where} is not in the declared classes "
            f"({', '.join(spec.classes[:10])}{', ...' if len(spec.classes) > 10 else ''})."
            f"{suggest(extra[0], list(spec.classes))} Add it to 'classes' or remove the folder."
        )
    return list(spec.classes)


def _scan(
    base: str, class_names: Sequence[str], classes: list[str], prefix: str
) -> tuple[list[str], np.ndarray]:
    index = {name: i for i, name in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    # Folder-name order (not label order): items come out in sorted path order even with declared classes.
    for name in sorted(class_names):
        class_paths = _list_images(os.path.join(base, name), f"{prefix}{name}/")
        if not class_paths:
            raise DatasetError(
                f"class folder {os.path.join(base, name)} contains no images (looked for "
                f"{' '.join(IMAGE_EXTENSIONS)}); add images to it or remove it."
            )
        paths += class_paths
        labels += [index[name]] * len(class_paths)
    return paths, np.array(labels, dtype=np.int64)


def _unknown_split(spec: DatasetSpec, split: str, available: list[str], layout: str) -> DatasetError:
    return DatasetError(
        f"dataset {spec.path} has no {split!r} split ({layout}); available splits: {', '.join(available)}."
    )


def read_imagefolder(spec: DatasetSpec, split: str) -> FileItems:
    """List the items of ``split`` of the folder dataset ``spec``.

    Layouts: if ``root`` has any of ``train/``, ``val/``, ``test/``, each defines that split (classes are
    the sorted union of their class folders); a missing ``val/`` is carved from ``train/`` by a seeded
    stratified split with ``spec.val_fraction``. Otherwise ``root`` holds class folders and all three
    splits are made by a seeded stratified split (see :func:`bobench.data.splits.stratified_split`).

    Raises:
        DatasetError: missing root, no class folders, an empty class folder, a class folder outside the
            declared classes, stray folders beside split folders, or a split that does not exist.
    """
    root = os.fspath(spec.path or "")
    if not os.path.isdir(root):
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder; check the path.")
    subdirs = _subdirs(root)
    split_dirs = [s for s in SPLITS if s in subdirs]
    if not split_dirs:
        if not subdirs:
            raise DatasetError(
                f"dataset folder {root} has no class folders; expected {root}/<class>/<image> "
                f"or {root}/train/<class>/<image>."
            )
        classes = _resolve_classes(spec, set(subdirs), root)
        available = seeded_split_names(spec.val_fraction, spec.test_fraction)
        if split not in available:
            raise _unknown_split(spec, split, available, "a zero fraction makes no split")
        paths, labels = _scan(root, subdirs, classes, "")
        params = split_params(spec.val_fraction, spec.test_fraction, spec.seed)
        codes = stratified_split(labels, classes, **params, keys=paths)
        return _select(root, paths, labels, classes, codes == SPLITS.index(split), params)

    stray = sorted(set(subdirs) - set(SPLITS))
    if stray:
        raise DatasetError(
            f"dataset folder {root} mixes split folders ({', '.join(split_dirs)}) with other folders "
            f"({', '.join(stray[:5])}); move class folders into train/, val/ or test/."
        )
    class_dirs = {s: _subdirs(os.path.join(root, s)) for s in split_dirs}
    for s, names in class_dirs.items():
        if not names:
            raise DatasetError(
                f"split folder {os.path.join(root, s)} has no class folders; add {s}/<class>/<image> "
                "or remove it."
            )
    classes = _resolve_classes(spec, set().union(*class_dirs.values()), root)
    carve = "train" in split_dirs and "val" not in split_dirs and spec.val_fraction > 0
    available = [s for s in SPLITS if s in split_dirs or (s == "val" and carve)]
    if split not in available:
        raise _unknown_split(spec, split, available, "from its split folders")
    if carve and split in ("train", "val"):
        paths, labels = _scan(os.path.join(root, "train"), class_dirs["train"], classes, "train/")
        codes = stratified_split(labels, classes, spec.val_fraction, 0.0, spec.seed, keys=paths)
        params = {"val_fraction": spec.val_fraction, "seed": spec.seed, "carved_from": "train"}
        return _select(root, paths, labels, classes, codes == SPLITS.index(split), params)
    paths, labels = _scan(os.path.join(root, split), class_dirs[split], classes, f"{split}/")
    return FileItems(root, paths, labels, classes, split_params=None)


def _select(
    root: str, paths: list[str], labels: np.ndarray, classes: list[str], mask: np.ndarray, params: dict
) -> FileItems:
    keep = np.flatnonzero(mask)
    return FileItems(root, [paths[i] for i in keep], labels[keep], classes, split_params=params)
