"""Segmentation files, without torch: mask files, the ``segfolder`` layout, and the embedded sets.

A segfolder is ``ROOT/images/<split>/**/<name>.<ext>`` (any of :data:`~bobench.data.manifest.
IMAGE_EXTENSIONS`) with ``ROOT/masks/<split>/**/<name>.png``: single-channel PNGs of class indices
``0..K-1`` and :data:`IGNORE_INDEX` (255) for unlabelled pixels; the K class names come from
``ROOT/classes.txt`` (line k names mask value k) or a ``classes=`` option. Each split is its own folder.

Mask files (:func:`read_mask`) are such PNGs (a palette PNG is read by index, never by colour), or SBD's
``cls/*.mat`` (``GTcls.Segmentation``); the class tables of the published sets (ADE20K, VOC,
Cityscapes) and their label maps (raw mask value -> class index) are here too, importable without torch.

The embedded sets are the embedded dense sets' exact instance masks as class maps:

* ``mnist-seg``: ``mnist-det`` with each pixel labelled by the digit covering it (11 classes:
  ``background``, ``0``..``9``);
* ``nuclei-seg``: ``nuclei`` with each pixel labelled ``background`` or ``nucleus``.

A semantic mask is the union of the image's instance masks, each painted with its COCO category id
(= its class index here, class 0 being background); the dense sets' instances never overlap (digits are
pasted at disjoint places, nuclei come from one label image), so the union is exact. One difference to
know: ``nuclei`` leaves out slivers of under 16 px that a tile edge cuts from a nucleus, so in
``nuclei-seg`` those pixels are background.

Each set is built once from the cached dense set (:func:`~bobench.data.dense_embedded.write_embedded`)
and written, atomically as ``write_embedded`` does, in the ``segfolder`` layout under
``$BOBENCH_CACHE/datasets/<name>-v<version>/``: ``images/<split>/NNNNN.png`` (the dense set's files,
copied), ``masks/<split>/NNNNN.png`` (8-bit class indices), ``classes.txt`` and ``digest.json`` (per
split, a sha256 over the decoded pixels of every image and mask, which the manifest hash uses, so the
hash is the same on every machine). This module imports only numpy at the top (no torch, no PIL).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bobench.data.dense_embedded import DENSE_CATALOG, datasets_cache_root, write_embedded
from bobench.data.errors import DatasetError
from bobench.data.manifest import IMAGE_EXTENSIONS
from bobench.data.schemes import parse_scheme_spec

SCHEMES: dict[str, tuple[str, ...]] = {  # scheme -> the options it accepts
    "ade20k": ("check_sizes",),
    "voc": ("sbd", "check_sizes"),
    "cityscapes-seg": ("check_sizes",),
    "segfolder": ("classes", "check_sizes"),
}


def split_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``"voc:/data?sbd=/s"`` -> ``("voc", "/data", {"sbd": "/s"})``; a bare name has scheme ``""``.

    Raises:
        DatasetError: an option the scheme does not accept.
    """
    return parse_scheme_spec(spec, SCHEMES, "segmentation")


IGNORE_INDEX = 255  # the mask value of unlabelled pixels, in every segmentation dataset
FOLDER_LAYOUT = "a segfolder is ROOT/images/<split>/<name>.<jpg|png|...> and ROOT/masks/<split>/<name>.png"
DIGEST_FILE = "digest.json"  # written last into the temporary folder: its presence marks a complete set


# ADE20K's objectInfo150 order: class k - 1 is annotation value k.
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column",
    "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
# Cityscapes label id -> train id, cityscapesscripts' labels.py table; every other id is ignored.
CITYSCAPES_TRAIN_IDS: dict[str, tuple[int, int]] = {
    "road": (7, 0), "sidewalk": (8, 1), "building": (11, 2), "wall": (12, 3), "fence": (13, 4),
    "pole": (17, 5), "traffic light": (19, 6), "traffic sign": (20, 7), "vegetation": (21, 8),
    "terrain": (22, 9), "sky": (23, 10), "person": (24, 11), "rider": (25, 12), "car": (26, 13),
    "truck": (27, 14), "bus": (28, 15), "train": (31, 16), "motorcycle": (32, 17), "bicycle": (33, 18),
}  # fmt: skip
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(CITYSCAPES_TRAIN_IDS)


def ade20k_label_map() -> np.ndarray:
    """ADE20K's reduce-zero-label as a lookup table: 0 (unlabelled) -> 255, k -> k - 1 for k in 1..150,
    any other value -1 (invalid)."""
    lut = np.full(256, -1, dtype=np.int16)
    lut[0], lut[1 : len(ADE20K_CLASSES) + 1] = IGNORE_INDEX, np.arange(len(ADE20K_CLASSES))
    return lut


def cityscapes_label_map() -> np.ndarray:
    """Cityscapes label id -> train id (:data:`CITYSCAPES_TRAIN_IDS`) as a lookup table; every other
    id -> 255."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.int16)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.values():
        lut[label_id] = train_id
    return lut


MASK_MODES = ("P", "L", "1", "I", "I;16", "I;16L", "I;16B")  # single-channel PNG modes: values are indices


def identity_map(n_classes: int) -> np.ndarray:
    """The label map of masks that hold class indices ``0..n_classes-1`` and 255 (ignore)."""
    lut = np.full(256, -1, dtype=np.int16)
    lut[:n_classes] = np.arange(n_classes)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def read_mask(path: str) -> np.ndarray:
    """The raw values of a mask file: a single-channel PNG (a palette PNG by index, not colour), or an
    SBD ``.mat`` (``GTcls.Segmentation``).

    Raises:
        DatasetError: naming the file, when it is missing, unreadable, or a colour image.
    """
    from PIL import Image

    if path.endswith(".mat"):
        return _read_sbd_mat(path)
    try:
        with Image.open(path) as im:
            mode, values = im.mode, np.array(im) if im.mode in MASK_MODES else None
    except FileNotFoundError:
        raise DatasetError(
            f"mask {path} no longer exists: the dataset changed after it was loaded."
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read mask {path} ({type(exc).__name__}: {exc}); replace it.") from None
    if values is None:
        raise DatasetError(
            f"mask {path} is a {mode} image; a mask is a single-channel PNG of class indices (8-bit grey "
            "or palette, read by index): convert colour-coded masks to indices first."
        )
    return values.astype(np.uint8) if values.dtype == bool else values


def _read_sbd_mat(path: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        mat = loadmat(path, variable_names=["GTcls"])
    except FileNotFoundError:
        raise DatasetError(
            f"SBD mask {path} no longer exists: the dataset changed after it was loaded."
        ) from None
    except Exception as exc:  # scipy's MATLAB readers raise many unrelated types on a damaged file
        raise DatasetError(
            f"cannot read SBD mask {path} ({type(exc).__name__}: {exc}); replace it."
        ) from None
    try:
        return np.asarray(mat["GTcls"]["Segmentation"][0, 0])
    except (KeyError, IndexError, ValueError, TypeError):
        raise DatasetError(
            f"SBD mask {path} has no GTcls.Segmentation; SBD's cls/*.mat files hold a GTcls struct."
        ) from None


def mask_size(path: str) -> tuple[int, int]:
    """``(width, height)`` of a mask, from the PNG header (an SBD ``.mat`` is read whole)."""
    from PIL import Image

    if path.endswith(".mat"):
        h, w = read_mask(path).shape[:2]
        return w, h
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read mask {path} ({type(exc).__name__}: {exc}); replace it.") from None


def folder_classes(root: str, option: str | None = None) -> list[str]:
    """A segfolder's class names: ``option`` split at commas if given, else ``root/classes.txt``.

    Raises:
        DatasetError: no classes.txt and no option, or not 1 to 255 unique names.
    """
    if option is not None:
        classes = [c.strip() for c in option.split(",") if c.strip()]
    else:
        path = os.path.join(root, "classes.txt")
        if not os.path.isfile(path):
            raise DatasetError(
                f"segfolder {root} has no classes.txt; write one class name per line there (line k is "
                "mask value k), or give them as segfolder:/path?classes=background,road,..."
            )
        with open(path, encoding="utf-8") as f:
            classes = [line.strip() for line in f if line.strip()]
    if not 1 <= len(classes) <= IGNORE_INDEX or len(set(classes)) != len(classes):
        raise DatasetError(
            f"segfolder {root}: classes {classes} must be 1 to 255 unique names (255 is the ignore value)."
        )
    return classes


def list_segfolder(root: str, split: str) -> tuple[list[str], list[str], list[str]]:
    """``(names, image paths, mask paths)`` of one split of a segfolder, sorted by name; paths relative
    to ``root``, names the image paths relative to the split folder without extension (``sub/x``).

    Raises:
        DatasetError: a missing split folder (named, with the layout), or two images sharing a name.
    """
    image_dir = os.path.join(root, "images", split)
    for path in (image_dir, os.path.join(root, "masks", split)):
        if not os.path.isdir(path):
            raise DatasetError(f"segfolder {split} folder {path} does not exist; {FOLDER_LAYOUT}.")
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(image_dir):
        dirnames.sort()
        for f in filenames:
            stem, ext = os.path.splitext(os.path.relpath(os.path.join(dirpath, f), image_dir))
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            stem = stem.replace(os.sep, "/")
            if stem in found:
                raise DatasetError(
                    f"segfolder {image_dir}: {found[stem]} and {stem}{ext} share one mask name."
                )
            found[stem] = f"{stem}{ext}"
    names = sorted(found)
    return names, [f"images/{split}/{found[n]}" for n in names], [f"masks/{split}/{n}.png" for n in names]


@dataclass(frozen=True)
class SegInfo:
    """Catalog entry of an embedded segmentation set; known without building it.

    ``derived_from`` names the dense set and the version of it this definition was made from: a test
    checks them against :data:`~bobench.data.dense_embedded.DENSE_CATALOG`, so bumping a dense set's
    version without bumping this one's (which would serve stale masks from the cache) fails.
    """

    name: str
    description: str
    classes: tuple[str, ...]
    split_sizes: dict[str, int]
    image_size: int
    source: str
    license: str
    version: int
    derived_from: tuple[str, int]

    def to_dict(self) -> dict[str, Any]:
        """Plain data: name, description, classes, n_classes, split_sizes, image_size, source, license,
        version."""
        out = {k: v for k, v in self.__dict__.items() if k != "derived_from"}
        out["classes"] = list(self.classes)
        out["n_classes"] = len(self.classes)
        return out


def _derived(
    name: str, version: int, dense: tuple[str, int], classes: tuple[str, ...], description: str
) -> SegInfo:
    info = DENSE_CATALOG[dense[0]]  # sizes, source and license are the dense set's
    return SegInfo(
        name, description, classes, dict(info.split_sizes), info.image_size,
        f"bobench embedded {dense[0]} v{dense[1]} ({info.source})", info.license, version, dense,
    )  # fmt: skip


SEG_CATALOG: dict[str, SegInfo] = {
    "mnist-seg": _derived(
        "mnist-seg",
        1,
        ("mnist-det", 1),
        ("background", *(str(d) for d in range(10))),
        "1-4 MNIST digits pasted on 96 px crops of scikit-image photos; each pixel labelled with the "
        "digit covering it (exact masks), 11 classes with background",
    ),
    "nuclei-seg": _derived(
        "nuclei-seg",
        1,
        ("nuclei", 1),
        ("background", "nucleus"),
        "128 px tiles of a fluorescence microscopy image, nucleus vs background from hand-annotated "
        "nucleus masks; splits are disjoint row bands",
    ),
}


def list_segmentation_datasets() -> list[dict[str, Any]]:
    """Describe the embedded segmentation sets (no build, no torch).

    Returns:
        One dict per set: ``name``, ``description``, ``classes``, ``n_classes``, ``split_sizes``,
        ``image_size``, ``source``, ``license``, ``version``.
    """
    return [info.to_dict() for info in SEG_CATALOG.values()]


def semantic_masks(coco: dict[str, Any]) -> dict[int, np.ndarray]:
    """``{image id: uint8 [H, W] mask}`` from a COCO dict with RLE segmentations: 0 where no instance is,
    else the covering instance's ``category_id`` (later annotations win where instances overlap)."""
    import pycocotools.mask as mask_utils

    out = {img["id"]: np.zeros((img["height"], img["width"]), dtype=np.uint8) for img in coco["images"]}
    for ann in coco["annotations"]:
        seg = ann["segmentation"]
        rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
        out[ann["image_id"]][mask_utils.decode(rle).astype(bool)] = ann["category_id"]
    return out


def write_segmentation_embedded(name: str, cache_root: str | os.PathLike[str] | None = None) -> Path:
    """Build ``name`` (from its dense set, itself built on first use) unless it is there; return its folder.

    Raises:
        DatasetError: ``name`` is not an embedded segmentation set, or the dense set's source is missing.
    """
    from PIL import Image

    if name not in SEG_CATALOG:
        raise DatasetError(
            f"unknown embedded segmentation set {name!r}; use one of {', '.join(SEG_CATALOG)}."
        )
    info = SEG_CATALOG[name]
    parent = Path(cache_root) if cache_root is not None else datasets_cache_root()
    folder = parent / f"{name}-v{info.version}"
    if (folder / DIGEST_FILE).is_file():
        return folder
    dense = write_embedded(info.derived_from[0], cache_root)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=parent))
    try:
        digests = {}
        for split in info.split_sizes:
            coco = json.loads((dense / "annotations" / f"{split}.json").read_text(encoding="utf-8"))
            masks = semantic_masks(coco)
            sha = hashlib.sha256()
            for sub in ("images", "masks"):
                (tmp / sub / split).mkdir(parents=True)
            for img in sorted(coco["images"], key=lambda im: im["id"]):
                stem = Path(img["file_name"]).stem
                shutil.copyfile(dense / "images" / img["file_name"], tmp / "images" / split / f"{stem}.png")
                Image.fromarray(masks[img["id"]]).save(tmp / "masks" / split / f"{stem}.png")
                pixels = np.asarray(Image.open(tmp / "images" / split / f"{stem}.png").convert("RGB"))
                sha.update(f"{stem}\0{pixels.shape}\0".encode())
                sha.update(np.ascontiguousarray(pixels).data)
                sha.update(np.ascontiguousarray(masks[img["id"]]).data)
            digests[split] = sha.hexdigest()
        (tmp / "classes.txt").write_text("\n".join(info.classes) + "\n", encoding="utf-8")
        (tmp / DIGEST_FILE).write_text(json.dumps({"splits": digests}, sort_keys=True), encoding="utf-8")
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: its copy is identical
            if not (folder / DIGEST_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def split_digest(folder: str | os.PathLike[str], split: str) -> str:
    """The pixel digest :func:`write_segmentation_embedded` recorded for ``split`` of the set in ``folder``."""
    return json.loads((Path(folder) / DIGEST_FILE).read_text(encoding="utf-8"))["splits"][split]
