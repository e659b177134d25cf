"""Detection datasets: the front door :func:`load_detection_dataset`, and the Sim10k and Cityscapes readers.

Spec strings (options after ``?`` as ``key=value&...``)::

    coco:/data/coco                          COCO 2017 layout: annotations/instances_{train,val}2017.json
                                             and {train,val}2017/; split train -> train2017, val and
                                             test -> val2017 (the test-dev labels are not public)
    cocojson:/data/x/instances.json          one COCO json; ``images=`` the image folder (default: the
                                             json's folder); ``split=`` the split the file is (default:
                                             any split asked for gets this file)
    sim10k:/data/sim10k                      VOC layout, class car; seeded split (val_fraction=0.1,
                                             test_fraction=0.1, seed=0 by default)
    cityscapes:/data/cityscapes              gtFine polygons, class car; train -> train, val and
                                             test -> val (test labels are not public)
    nuclei | mnist-det                       embedded dense sets (:mod:`bobench.data.dense_embedded`)

Sim10k and Cityscapes are converted to a COCO dict in memory, so evaluation reads ``coco_gt`` as for
COCO, and both give ``car`` label 1, so a model trained on Sim10k is tested on Cityscapes as is.
This module imports neither torch nor the readers' dependencies at the top.
"""

from __future__ import annotations

import glob
import json
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bobench.data.errors import DatasetError
from bobench.data.schemes import need_path, parse_scheme_spec
from bobench.data.splits import SPLITS, split_params, stratified_split
from bobench.registry import suggest

if TYPE_CHECKING:
    from bobench.data.coco import DetectionDataset, Transforms

SCHEMES: dict[str, tuple[str, ...]] = {  # scheme -> the options it accepts
    "coco": (),
    "cocojson": ("images", "split"),
    "sim10k": ("val_fraction", "test_fraction", "seed"),
    "cityscapes": (),
}
CAR = [{"id": 1, "name": "car", "supercategory": "vehicle"}]  # label 1 in both Sim10k and Cityscapes


def split_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``"sim10k:/data?seed=1"`` -> ``("sim10k", "/data", {"seed": "1"})``; a bare name has scheme ``""``.

    Raises:
        DatasetError: an option the scheme does not accept.
    """
    return parse_scheme_spec(spec, SCHEMES, "detection")


def load_detection_dataset(
    spec: str, split: str = "train", transforms: Transforms | None = None
) -> DetectionDataset:
    """Load one split of a detection / instance segmentation dataset (the module docstring lists specs).

    Args:
        spec: e.g. ``"coco:/data/coco"``, ``"cocojson:/x/inst.json?images=/x/img"``,
            ``"sim10k:/data/sim10k"``, ``"cityscapes:/data/cityscapes"``, ``"nuclei"``, ``"mnist-det"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        transforms: ``(image, target) -> (image, target)``, e.g. a ``torchvision.transforms.v2`` pipeline.

    Returns:
        A :class:`~bobench.data.coco.DetectionDataset` (targets in torchvision's detection format).

    Raises:
        DatasetError: an unknown scheme or option, a missing path (named, with the expected layout), or
            a malformed annotation file.

    Example:
        >>> ds = load_detection_dataset("mnist-det", split="val")
        >>> len(ds), ds.classes[:3], ds[0][0].shape
        (100, ['0', '1', '2'], torch.Size([3, 96, 96]))
    """
    from bobench.data import dense_embedded

    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}.{suggest(split, list(SPLITS))} Use train, val or test.")
    scheme, path, options = split_spec(spec)
    if scheme in ("", "embedded") and path in dense_embedded.DENSE_CATALOG:
        return dense_embedded.load_embedded_detection(path, split, transforms)
    known = [*SCHEMES, *dense_embedded.DENSE_CATALOG]
    if scheme not in SCHEMES:
        raise DatasetError(
            f"unknown detection dataset {spec!r}.{suggest(scheme or path, known)} "
            f"Use one of {', '.join(f'{s}:/path' for s in SCHEMES)}, or an embedded name: "
            f"{', '.join(dense_embedded.DENSE_CATALOG)}."
        )
    if not path:
        raise DatasetError(f"detection spec {spec!r} has no path; write {scheme}:/path/to/data.")
    if scheme == "coco":
        return _load_coco2017(path, split, transforms)
    if scheme == "cocojson":
        return _load_cocojson(path, split, options, transforms)
    from bobench.data.coco import DetectionDataset

    if scheme == "sim10k":
        gt, params = sim10k_coco(path, split, **_fractions(spec, options))
        source = f"Sim10k annotations {os.path.join(path, 'Annotations')} (as COCO)"
        return DetectionDataset(
            gt, path, source=source, kind="sim10k", split=split, split_params=params, transforms=transforms
        )
    folder = "train" if split == "train" else "val"
    gt = cityscapes_coco(path, folder)
    source = f"Cityscapes annotations {os.path.join(path, 'gtFine', folder)} (as COCO)"
    return DetectionDataset(gt, path, source=source, kind="cityscapes", split=split, transforms=transforms)


def _load_coco2017(root: str, split: str, transforms: Transforms | None) -> DetectionDataset:
    name = "train2017" if split == "train" else "val2017"
    fix = "the COCO 2017 layout is ROOT/annotations/instances_{train,val}2017.json and ROOT/{train,val}2017/"
    need_path(root, "COCO root", fix)
    json_path = need_path(
        os.path.join(root, "annotations", f"instances_{name}.json"), "COCO annotations", fix
    )
    images = need_path(os.path.join(root, name), "COCO image folder", fix)
    return _from_json(json_path, images, "coco", split, transforms)


def _from_json(
    json_path: str, images: str, kind: str, split: str, transforms: Transforms | None
) -> DetectionDataset:
    """The dataset of one COCO instances json over its image folder (the json's digest hashed)."""
    from bobench.data.coco import DetectionDataset, read_coco_json

    gt, digest = read_coco_json(json_path)
    return DetectionDataset(
        gt, images, source=f"COCO json {json_path}", kind=kind, split=split, json_sha256=digest,
        transforms=transforms,
    )  # fmt: skip


def _load_cocojson(
    json_path: str, split: str, options: dict[str, str], transforms: Transforms | None
) -> DetectionDataset:
    declared = options.get("split")
    if declared is not None and declared not in SPLITS:
        raise DatasetError(f"cocojson option split={declared!r} is not one of train, val, test.")
    if declared is not None and declared != split:
        raise DatasetError(
            f"{json_path} is declared as the {declared!r} split (split={declared}); asked for {split!r}. "
            "Give that split its own cocojson spec."
        )
    need_path(json_path, "COCO json", "give the path of an instances json (cocojson:/path/instances.json)")
    images = options.get("images") or os.path.dirname(os.path.abspath(json_path))
    need_path(
        images, "image folder", "set ?images=/path/to/images to the folder of the json's file_name paths"
    )
    return _from_json(json_path, images, "cocojson", split, transforms)


def _fractions(spec: str, options: dict[str, str]) -> dict[str, Any]:
    try:
        out = {
            "val_fraction": float(options.get("val_fraction", 0.1)),
            "test_fraction": float(options.get("test_fraction", 0.1)),
            "seed": int(options.get("seed", 0)),
        }
    except ValueError as exc:
        raise DatasetError(
            f"detection spec {spec!r}: {exc}; fractions are numbers, seed an integer."
        ) from None
    if not (0 <= out["val_fraction"] < 1 and 0 <= out["test_fraction"] < 1 and out["seed"] >= 0):
        raise DatasetError(f"detection spec {spec!r}: fractions must be in [0, 1) and seed >= 0.")
    return out


def _xml_number(obj: ET.Element, tag: str, xml_path: str) -> float:
    node = obj.find(tag)
    try:
        value = float(node.text)  # type: ignore[union-attr, arg-type]
    except (AttributeError, TypeError, ValueError):
        raise DatasetError(
            f"Sim10k annotation {xml_path}: missing or non-numeric <{tag}>; fix the file."
        ) from None
    if not math.isfinite(value):
        raise DatasetError(f"Sim10k annotation {xml_path}: <{tag}> is {value}; fix the file.")
    return value


def sim10k_coco(
    root: str, split: str, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One split of Sim10k (``root/Annotations/*.xml``, ``root/JPEGImages/*.jpg``) as a COCO dict.

    Only ``car`` objects are kept (category id 1), as BoB's Sim10k -> Cityscapes protocol does;
    ``motorbike`` and ``person`` boxes are not annotations of this dataset. VOC boxes are taken as
    ``(xmin, ymin, xmax, ymax)`` pixel edges, COCO ``bbox = [xmin, ymin, xmax - xmin, ymax - ymin]`` (as
    mmdetection reads VOC). Sim10k has no official split: images are split by a seeded shuffle of their
    file stems (:func:`~bobench.data.splits.stratified_split`, one class), independent of listing order.

    Returns:
        ``(coco dict, split parameters)``.

    Raises:
        DatasetError: a missing folder, an unreadable or malformed xml (named), an xml without image.
    """
    fix = "Sim10k's layout is ROOT/Annotations/<stem>.xml and ROOT/JPEGImages/<stem>.jpg"
    need_path(os.path.join(root, "JPEGImages"), "Sim10k image folder", fix)
    xmls = sorted(
        glob.glob(
            os.path.join(need_path(os.path.join(root, "Annotations"), "Sim10k annotations", fix), "*.xml")
        )
    )
    if not xmls:
        raise DatasetError(f"Sim10k annotations folder {root}/Annotations has no .xml files; {fix}.")
    stems = [os.path.splitext(os.path.basename(p))[0] for p in xmls]
    codes = stratified_split(
        np.zeros(len(stems), dtype=np.int64), ["image"], val_fraction, test_fraction, seed, keys=stems
    )
    images, annotations = [], []
    for xml_path, stem, code in zip(xmls, stems, codes, strict=True):
        if SPLITS[code] != split:
            continue
        try:
            tree = ET.parse(xml_path).getroot()
        except (ET.ParseError, OSError) as exc:
            raise DatasetError(
                f"Sim10k annotation {xml_path} cannot be parsed ({exc}); fix or remove it."
            ) from None
        image_id = len(images) + 1
        file_name = (
            f"JPEGImages/{stem}.jpg"  # VOC's rule (torchvision's VOCDetection): <filename> is not used
        )
        size = tree.find("size")
        if size is not None:
            width, height = (
                int(_xml_number(size, "width", xml_path)),
                int(_xml_number(size, "height", xml_path)),
            )
        else:  # read the header only
            from PIL import Image

            with Image.open(need_path(os.path.join(root, file_name), "Sim10k image", fix)) as im:
                width, height = im.size
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in tree.iter("object"):
            if (obj.findtext("name") or "").strip() != "car":
                continue
            box = obj.find("bndbox")
            if box is None:
                raise DatasetError(
                    f"Sim10k annotation {xml_path}: an <object> has no <bndbox>; fix the file."
                )
            x0, y0, x1, y1 = (_xml_number(box, t, xml_path) for t in ("xmin", "ymin", "xmax", "ymax"))
            if x1 < x0 or y1 < y0:
                raise DatasetError(
                    f"Sim10k annotation {xml_path}: box {x0, y0, x1, y1} has xmax < xmin or ymax < ymin."
                )
            w, h = x1 - x0, y1 - y0
            ann = {
                "image_id": image_id,
                "category_id": 1,
                "bbox": [x0, y0, w, h],
                "area": w * h,
                "iscrowd": 0,
            }
            annotations.append({"id": len(annotations) + 1, **ann})
    gt = {"images": images, "annotations": annotations, "categories": [dict(c) for c in CAR]}
    return gt, split_params(val_fraction, test_fraction, seed)


def _crop_rle(crop: np.ndarray, x0: int, y0: int, height: int, width: int) -> dict[str, Any]:
    """Compressed RLE of a ``height x width`` mask that is zero outside ``crop`` (placed at ``x0, y0``).

    COCO RLE runs go down columns, so the runs of the crop's column strip, with the columns left and
    right of it added to the first and last zero runs, are the full mask's; this costs ``height x crop
    width``, not a full image per instance (a 2048 px Cityscapes frame has dozens of cars).
    """
    import pycocotools.mask as mask_utils

    strip = np.zeros((height, crop.shape[1]), dtype=np.uint8)
    strip[y0 : y0 + crop.shape[0]] = crop
    flat = strip.ravel(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat[0]:
        counts.insert(0, 0)  # runs start with zeros
    counts[0] += x0 * height
    right = (width - x0 - crop.shape[1]) * height
    if len(counts) % 2:
        counts[-1] += right
    elif right:
        counts.append(right)
    return mask_utils.frPyObjects({"counts": counts, "size": [height, width]}, height, width)


def _visible_cars(objects: list[dict], height: int, width: int, where: str) -> list[tuple[dict, bool]]:
    """Compressed RLEs of the cars' visible pixels, with ``is_crowd``, as Cityscapes draws them: polygons
    are painted in file order, so a later object (car or not) hides what it covers; fully hidden cars
    have no pixel and are left out, as in Cityscapes' own ``instanceIds`` images."""
    from PIL import Image, ImageDraw

    polys = []
    for obj in objects:
        try:
            poly = np.asarray(obj["polygon"], dtype=np.float64).reshape(-1, 2)
        except (KeyError, TypeError, ValueError):
            raise DatasetError(
                f"Cityscapes polygons {where}: object {obj.get('label')!r} has no [[x, y], ...] polygon."
            ) from None
        # Cityscapes' json2instanceImg skips deleted objects and license plates (label id -1).
        skip = obj.get("deleted") or obj.get("label") == "license plate" or len(poly) < 3
        polys.append(None if skip else poly)
    out = []
    for i, obj in enumerate(objects):
        if obj.get("label") not in ("car", "cargroup") or polys[i] is None:
            continue
        lo = np.maximum(np.floor(polys[i].min(0)).astype(int), 0)
        hi = np.minimum(np.ceil(polys[i].max(0)).astype(int) + 1, [width, height])
        if (hi <= lo).any():
            continue  # entirely outside the image: nothing drawn
        canvas = Image.new("L", tuple(int(v) for v in hi - lo), 0)
        draw = ImageDraw.Draw(canvas)
        draw.polygon([tuple(p) for p in polys[i] - lo], fill=1)
        for later in polys[i + 1 :]:  # only objects drawn after this one can hide it
            if later is not None and (later.max(0) >= lo).all() and (later.min(0) < hi).all():
                draw.polygon([tuple(p) for p in later - lo], fill=0)
        crop = np.asarray(canvas, dtype=np.uint8)
        if crop.any():
            out.append((_crop_rle(crop, int(lo[0]), int(lo[1]), height, width), obj["label"] == "cargroup"))
    return out


def cityscapes_coco(root: str, split: str, cache: bool = True) -> dict[str, Any]:
    """Cityscapes ``split`` (``"train"`` or ``"val"``) as a COCO dict with one category, ``car`` (id 1).

    Reads ``root/gtFine/<split>/<city>/*_gtFine_polygons.json`` and pairs each with
    ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png``. Each ``car`` polygon becomes an instance whose
    mask is its visible pixels (later polygons occlude earlier ones, as in Cityscapes' instance images),
    stored as compressed RLE with the box and area of those pixels; ``cargroup`` becomes a crowd region.
    Rasterising costs about 13 ms per 2048x1024 file holding 10 cars (synthetic files, 2-core build
    machine), so about 40 s for the 2,975 train files; with ``cache`` the result is kept under
    ``$BOBENCH_CACHE/datasets/cityscapes-coco/``, keyed by each polygons file's path, size and mtime
    (a hit costs one ``stat()`` per file and one json read).

    Raises:
        DatasetError: a missing folder, a polygons json that is not JSON or lacks ``imgWidth``,
            ``imgHeight`` or ``objects`` (named).
    """
    import pycocotools.mask as mask_utils

    fix = (
        "Cityscapes' layout is ROOT/gtFine/{train,val}/<city>/*_gtFine_polygons.json and ROOT/leftImg8bit/..."
    )
    gt_dir = need_path(os.path.join(root, "gtFine", split), "Cityscapes annotations folder", fix)
    need_path(os.path.join(root, "leftImg8bit", split), "Cityscapes image folder", fix)
    files = sorted(glob.glob(os.path.join(gt_dir, "*", "*_gtFine_polygons.json")))
    if not files:
        raise DatasetError(f"Cityscapes folder {gt_dir} has no <city>/*_gtFine_polygons.json files; {fix}.")
    cached = _cityscapes_cache(gt_dir, split, files) if cache else None
    if cached is not None and cached.is_file():
        try:
            with open(cached, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):  # a damaged cache entry is rebuilt, never trusted
            pass
    images, annotations = [], []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            height, width, objects = int(data["imgHeight"]), int(data["imgWidth"]), list(data["objects"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(
                f"Cityscapes polygons {path} is unreadable or malformed ({exc!r}); fix or restore it."
            ) from None
        city = os.path.basename(os.path.dirname(path))
        stem = os.path.basename(path)[: -len("_gtFine_polygons.json")]
        image_id = len(images) + 1
        file_name = f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for rle, crowd in _visible_cars(objects, height, width, path):
            ann = {
                "image_id": image_id,
                "category_id": 1,
                "iscrowd": int(crowd),
                "area": float(mask_utils.area(rle)),
            }
            seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            annotations.append({"id": len(annotations) + 1, **ann, "bbox": bbox, "segmentation": seg})
    gt = {"images": images, "annotations": annotations, "categories": [dict(c) for c in CAR]}
    if cached is not None:
        _write_atomic(cached, json.dumps(gt))
    return gt


CITYSCAPES_CACHE_VERSION = 1  # bump when cityscapes_coco's output for the same files would change


def _cityscapes_cache(gt_dir: str, split: str, files: list[str]) -> Path:
    """Where the converted ``split`` is cached: keyed by every polygons file's path relative to
    ``gt_dir``, size and ``mtime_ns`` (as the image manifests are), so an edited file is a miss."""
    import hashlib

    from bobench.data.dense_embedded import datasets_cache_root

    h = hashlib.sha256(f"cityscapes-coco-v{CITYSCAPES_CACHE_VERSION}\0{split}".encode())
    for path in files:
        st = os.stat(path)
        h.update(f"\0{os.path.relpath(path, gt_dir)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return datasets_cache_root() / "cityscapes-coco" / f"{split}-{h.hexdigest()[:32]}.json"


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary sibling; a cache that cannot be written is skipped."""
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        pass
