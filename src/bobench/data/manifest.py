"""What a file reader hands to the loader, a compact path table, and the manifest hash."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MANIFEST_FORMAT = "bobench-manifest/1"  # bump when the hashed fields change, so old cache keys miss
# Image file extensions read from folders (torchvision/timm's set), matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class FileItems:
    """The items of one split of a file dataset, as a reader lists them (nothing opened or stat()ed yet).

    Attributes:
        root: folder that relative paths resolve against.
        paths: POSIX paths in dataset order, relative to ``root`` (absolute only if a CSV says so).
        targets: ``[N]`` int64 class indices, or for a multi-label dataset ``[N, L]`` 0/1 (one column
            per label, e.g. CheXpert's findings).
        classes: class names, in label-index order (label names, in column order, when multi-label).
        split_params: the parameters of the seeded split that decided membership (hashed with the
            items), or ``None`` when folders or a CSV column define the split.
        manifest: the CSV file the items came from, for error messages; ``None`` for folders.
        lines: ``[N]`` CSV line numbers, for error messages; ``None`` for folders.
        boxes: ``[N, 4]`` float crop boxes ``(x0, y0, x1, y1)`` in pixels applied when an image is
            loaded (NaN rows: no crop), e.g. revisitop's query regions; ``None``: no crops.
        extras: protocol data a reader provides beside class labels (e.g. ``retrieval_gt``), handed
            to protocols as ``ProbeData.extras``; must be JSON-serialisable (it is hashed).
    """

    root: str
    paths: list[str]
    targets: np.ndarray
    classes: list[str]
    split_params: dict | None
    manifest: str | None = None
    lines: np.ndarray | None = None
    boxes: np.ndarray | None = None
    extras: dict | None = None

    def where(self, i: int) -> str:
        """Where item ``i`` was declared, for error messages."""
        if self.lines is None:
            return f"dataset folder {self.root}"
        return f"CSV manifest {self.manifest} line {int(self.lines[i])}"


class PathTable:
    """An immutable sequence of strings held in two numpy arrays.

    A list of a million ``str`` objects is copied page by page into every forked DataLoader worker as
    their reference counts are touched (pytorch/pytorch#13246); two flat arrays are not.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        encoded = [p.encode("utf-8") for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._data[self._offsets[i] : self._offsets[i + 1]].tobytes().decode("utf-8")


def regular_file_stat(path: str) -> os.stat_result | None:
    """``os.stat(path)`` of a regular file; None when it is missing, unreadable or not a file."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info if stat.S_ISREG(info.st_mode) else None


def label_key(target: int | Sequence[int] | np.ndarray) -> int | str:
    """How an item's label enters the hash: the class index, or a 0/1 row as a digit string (``"01001"``)."""
    if np.ndim(target) == 0:
        return int(target)  # type: ignore[arg-type]
    return "".join(str(int(v)) for v in target)  # type: ignore[union-attr]


class ManifestHasher:
    """Incremental sha256 over a dataset's header and its items, in dataset order.

    The header holds the format version, kind, split name, class names and, when a seeded split decided
    membership, its parameters; a multi-label dataset's header also says so (``"targets": "multilabel"``;
    single-label headers are unchanged, so their hashes, and the caches keyed by them, stay valid). Paths
    must be relative to the dataset root, so that moving or renaming the root leaves the hash unchanged.
    """

    def __init__(
        self,
        kind: str,
        split: str,
        classes: Sequence[str],
        split_params: dict | None,
        multilabel: bool = False,
    ) -> None:
        header = {
            "format": MANIFEST_FORMAT,
            "kind": kind,
            "split": split,
            "classes": list(classes),
            "split_params": split_params,
        }
        if multilabel:
            header["targets"] = "multilabel"
        self._sha = hashlib.sha256(json.dumps(header, sort_keys=True).encode("utf-8") + b"\n")

    def add_file(self, path: str, size: int, mtime_ns: int, label: int | str) -> None:
        """One file item: its identity (path), cheap content fingerprint (size, mtime) and label (a
        class index, or a multi-label row as :func:`label_key` writes it)."""
        # NUL cannot occur in a path, so the fields cannot run into one another.
        self._sha.update(f"{path}\0{size}\0{mtime_ns}\0{label}\n".encode())

    def add_arrays(self, images: np.ndarray, labels: np.ndarray) -> None:
        """All in-memory items at once: shape, pixel bytes and labels."""
        self._sha.update(repr((images.shape, str(images.dtype))).encode("utf-8"))
        self._sha.update(np.ascontiguousarray(images).data)
        self._sha.update(np.ascontiguousarray(labels, dtype="<i8").data)

    def add_json(self, tag: str, obj: object) -> None:
        """Anything else that defines the split's content (crop boxes, ground truth), as JSON."""
        self._sha.update(f"{tag}\0".encode() + json.dumps(obj, sort_keys=True).encode("utf-8") + b"\n")

    def hexdigest(self) -> str:
        """The sha256 hex digest of everything added so far."""
        return self._sha.hexdigest()
