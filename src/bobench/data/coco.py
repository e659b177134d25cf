"""COCO-format detection and instance segmentation data: ``DetectionDataset`` over an instances json.

Every dense reader (COCO, Sim10k, Cityscapes, the embedded dense sets) ends here: it builds or reads a
COCO dict, and :class:`DetectionDataset` validates it once and decodes one image and its targets per
item, in torchvision's detection format. Like :mod:`bobench.data.dataset`, this module imports torch at
the top; :mod:`bobench.data.dense_readers` (the front door) imports it only when a dataset is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
from torch.utils.data import Dataset

from bobench.data.errors import DatasetError
from bobench.data.images import open_rgb
from bobench.data.manifest import ManifestHasher, regular_file_stat

# an annotated image cannot be skipped silently: its objects would vanish from the ground truth
BAD_IMAGE_FIX = "replace the file, or remove the image and its annotations from the annotation file"

Transforms = Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]


def read_coco_json(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """Read a COCO json file.

    Returns:
        ``(the parsed dict, sha256 hex of the file's bytes)``; the digest enters the manifest hash.

    Raises:
        DatasetError: the file is missing, or is not JSON (naming the line and column).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DatasetError(f"cannot read COCO json {path} ({exc.strerror}); check the path.") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"line {exc.lineno}, column {exc.colno}: {exc.msg}" if hasattr(exc, "lineno") else str(exc)
        raise DatasetError(
            f"COCO json {path} is not valid JSON ({where}); fix or re-export the file."
        ) from None
    return data, hashlib.sha256(raw).hexdigest()


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_segmentation(seg: object, height: int, width: int) -> str | None:
    """What is wrong with a COCO segmentation for an image of ``height x width``, or ``None``."""
    if isinstance(seg, list):
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(map(_number, poly)):
                return f"segmentation polygon {k} is not a list of numbers"
            if len(poly) % 2:
                return f"segmentation polygon {k} has an odd number ({len(poly)}) of coordinates"
        return None
    if not isinstance(seg, dict) or set(seg) < {"counts", "size"}:
        return "segmentation is neither a list of polygons nor an RLE dict with 'counts' and 'size'"
    if list(seg["size"]) != [height, width]:
        return f"RLE size {seg['size']} is not the image's [height, width] [{height}, {width}]"
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
            return f"uncompressed RLE counts are not non-negative ints summing to {height}*{width}"
    elif not isinstance(counts, str | bytes):
        return "RLE counts are neither a list of ints (uncompressed) nor a string (compressed)"
    return None


def segmentation_to_rle(seg: list | dict, height: int, width: int) -> dict[str, Any]:
    """One compressed RLE (pycocotools' format) for a COCO segmentation: polygons, or RLE of either kind.

    Polygons with fewer than 3 points enclose no area and are left out of the union: pycocotools would
    misread a 2-point polygon as a box (``frPyObjects`` dispatches on the first polygon's length).
    """
    if isinstance(seg, list):
        polys = [p for p in seg if len(p) >= 6]
        if not polys:
            return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, height, width)  # uncompressed -> compressed
    counts = seg["counts"]
    return {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _validate(data: object, source: str) -> tuple[dict[int, dict], dict[int, dict], dict[int, list[dict]]]:
    """Check a COCO dict; fill in ``iscrowd`` (0) and ``area`` (mask, else box area) where missing.

    An annotation with ``"ignore": 1`` (some converters' flag for a region to neither learn nor score) is
    made a crowd (``iscrowd = 1``): pycocotools' ``COCOeval`` would otherwise overwrite its ``ignore``
    with ``iscrowd`` and count it as a positive, and as a crowd it leaves training as crowds do.

    Returns:
        ``(images by id, categories by id, annotations by image id)``.
    """

    def fail(what: str, problem: str) -> DatasetError:
        return DatasetError(f"{source}: {what}: {problem}; fix or remove it.")

    if not isinstance(data, dict):
        raise DatasetError(
            f"{source}: the top level is not a JSON object; an instances file is "
            '{"images": [...], "annotations": [...], "categories": [...]}.'
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(
                f"{source} has no {key!r} list; an instances file (e.g. instances_val2017.json) "
                "has 'images', 'annotations' and 'categories'."
            )
    images: dict[int, dict] = {}
    for k, img in enumerate(data["images"]):
        what = f"image #{k} (id {img.get('id') if isinstance(img, dict) else None})"
        if not isinstance(img, dict) or not isinstance(img.get("id"), int) or img["id"] in images:
            raise fail(what, "missing, non-integer or duplicate 'id'")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise fail(what, "missing key 'file_name'")
        if not all(isinstance(img.get(d), int) and img[d] > 0 for d in ("width", "height")):
            raise fail(what, "'width' and 'height' must be positive integers")
        images[img["id"]] = img
    categories: dict[int, dict] = {}
    for k, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or cat["id"] in categories:
            raise fail(f"category #{k}", "missing, non-integer or duplicate 'id'")
        if not isinstance(cat.get("name"), str):
            raise fail(f"category id {cat['id']}", "missing key 'name'")
        categories[cat["id"]] = cat
    by_image: dict[int, list[dict]] = {}
    seen: set[int] = set()
    with_masks = any(isinstance(a, dict) and a.get("segmentation") for a in data["annotations"])
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), int) or ann["id"] in seen:
            raise fail(f"annotation #{k}", "missing, non-integer or duplicate 'id'")
        what = f"annotation id {ann['id']}"
        seen.add(ann["id"])
        for key in ("image_id", "category_id", "bbox"):
            if key not in ann:
                raise fail(what, f"missing key {key!r}")
        if ann["image_id"] not in images:
            raise fail(what, f"image_id {ann['image_id']!r} is not in 'images'")
        if ann["category_id"] not in categories:
            raise fail(what, f"category_id {ann['category_id']!r} is not in 'categories'")
        box = ann["bbox"]
        if not isinstance(box, list) or len(box) != 4 or not all(map(_number, box)):
            raise fail(what, f"bbox {box!r} is not 4 numbers [x, y, width, height]")
        if box[2] < 0 or box[3] < 0:
            raise fail(what, f"bbox {box!r} has a negative width or height")
        if ann.setdefault("iscrowd", 0) not in (0, 1):
            raise fail(what, f"iscrowd {ann['iscrowd']!r} is not 0 or 1")
        if ann.get("ignore", 0) not in (0, 1):
            raise fail(what, f"ignore {ann['ignore']!r} is not 0 or 1")
        if ann.get("ignore"):  # pycocotools overwrites 'ignore' with 'iscrowd': an ignored region is a crowd
            ann["iscrowd"] = 1
        img = images[ann["image_id"]]
        seg = ann.get("segmentation")
        if with_masks and not seg:
            raise fail(what, "no segmentation, while other annotations have one (masks need one each)")
        if seg and (problem := _check_segmentation(seg, img["height"], img["width"])):
            raise fail(what, problem)
        if "area" not in ann:  # COCOeval reads it for its area ranges
            rle = segmentation_to_rle(seg, img["height"], img["width"]) if seg else None
            ann["area"] = float(mask_utils.area(rle)) if rle else float(box[2] * box[3])
        elif not _number(ann["area"]) or ann["area"] < 0:
            raise fail(what, f"area {ann['area']!r} is not a non-negative number")
        by_image.setdefault(ann["image_id"], []).append(ann)
    return images, categories, by_image


class DetectionDataset(Dataset):
    """One split of a detection / instance segmentation dataset in torchvision's detection format.

    ``dataset[i] -> (image, target)``: ``image`` float32 ``[3, H, W]`` RGB in ``[0, 1]``, decoded from
    its file on each access (nothing is held in memory but the annotations); ``target`` a dict:

    * ``boxes``: float32 ``[N, 4]`` XYXY in absolute pixels (COCO's ``[x, y, w, h]`` -> ``[x, y, x+w, y+h]``);
    * ``labels``: int64 ``[N]`` in ``1..K`` (0 is torchvision's background), ``classes[label - 1]``;
    * ``masks``: uint8 ``[N, H, W]`` of 0/1, only when the json has segmentations (polygons, compressed
      or uncompressed RLE);
    * ``iscrowd``: int64 ``[N]``; ``area``: float32 ``[N]`` (the json's); ``image_id``: int (the json's).

    Crowd annotations are kept (evaluation needs them); images without annotations are kept with empty
    targets (``boxes [0, 4]``, ``masks [0, H, W]``). COCO has a few boxes of zero width or height: they
    are kept too, unless ``drop_degenerate`` is set, which a training loop needs (torchvision's detectors
    assert positive sizes). ``drop_crowd`` likewise leaves crowd regions out of the targets.

    Attributes:
        classes: category names in label order. ``label_to_category``: label -> json category id.
        coco_gt: the validated COCO dict (``iscrowd``/``area`` filled in where missing), to build a
            ``pycocotools.coco.COCO`` for evaluation. ``image_ids``: the json ids, in dataset order.
        root: the folder ``file_name`` paths resolve against. ``split``, ``kind``.
        manifest_hash: sha256 over kind, split, classes, split parameters, the json's digest, and every
            image's ``file_name``, size and ``mtime_ns``.
        transforms: ``transforms(image, target) -> (image, target)``, called with ``image`` a
            ``tv_tensors.Image``, ``boxes`` a ``tv_tensors.BoundingBoxes`` and ``masks`` a
            ``tv_tensors.Mask`` (so ``torchvision.transforms.v2`` works as is); plain tensors come out.
            Degenerate boxes and crowds are dropped before the transforms: add
            ``v2.SanitizeBoundingBoxes()`` for transforms that can empty a box.

    Example:
        >>> ds = DetectionDataset(gt, "/data/coco/val2017", source="COCO json x.json")  # doctest: +SKIP
        >>> image, target = ds[0]; image.shape, target["boxes"].shape, target["masks"].shape  # doctest: +SKIP
        (torch.Size([3, 480, 640]), torch.Size([7, 4]), torch.Size([7, 480, 640]))
    """

    def __init__(
        self,
        coco_gt: dict[str, Any],
        root: str | os.PathLike[str],
        *,
        source: str,
        kind: str = "cocojson",
        split: str = "train",
        json_sha256: str | None = None,
        split_params: dict[str, Any] | None = None,
        transforms: Transforms | None = None,
        drop_degenerate: bool = False,
        drop_crowd: bool = False,
    ) -> None:
        """Validate ``coco_gt`` and ``stat()`` every image file once.

        Args:
            coco_gt: the COCO dict (edited in place: missing ``iscrowd``/``area`` are filled in).
            root: folder of the images.
            source: where the dict came from, as messages start (``"COCO json /x/instances.json"``,
                ``"Sim10k annotations /data/sim10k/Annotations (as COCO)"``).
            kind: the reader, recorded in the manifest hash. ``split``: the split it is.
            json_sha256: digest of the json bytes; ``None`` hashes the dict as canonical JSON.
            split_params: the seeded split that chose the images, if one did (hashed).

        Raises:
            DatasetError: a malformed dict (naming the annotation or image id and the problem), or a
                missing image file (naming it).
        """
        images, categories, by_image = _validate(coco_gt, source)
        self.coco_gt = coco_gt
        self.root = os.fspath(root)
        self.kind, self.split, self.source = kind, split, source
        self.transforms = transforms
        self.drop_degenerate, self.drop_crowd = drop_degenerate, drop_crowd
        cat_ids = sorted(categories)
        self.classes = [categories[c]["name"] for c in cat_ids]
        self.label_to_category = {label: c for label, c in enumerate(cat_ids, start=1)}
        self._category_to_label = {c: label for label, c in self.label_to_category.items()}
        self.image_ids = sorted(images)  # torchvision's CocoDetection order
        self._images = images
        self._by_image = by_image
        self.has_masks = any(a.get("segmentation") for anns in by_image.values() for a in anns)
        if json_sha256 is None:
            json_sha256 = hashlib.sha256(
                json.dumps(coco_gt, sort_keys=True, default=str).encode("utf-8")
            ).hexdigest()
        hasher = ManifestHasher(f"detection:{kind}", split, self.classes, split_params)
        hasher.add_json("annotations_sha256", json_sha256)
        for image_id in self.image_ids:
            name = images[image_id]["file_name"]
            path = os.path.join(self.root, name)
            info = regular_file_stat(path)
            if info is None:
                raise DatasetError(
                    f"{source}: image id {image_id}: file {path} does not exist or is not a file; "
                    "point the images folder at the one holding the json's file_name paths."
                )
            hasher.add_file(name, info.st_size, info.st_mtime_ns, image_id)
        self.manifest_hash = hasher.hexdigest()

    def __len__(self) -> int:
        return len(self.image_ids)

    def path(self, i: int) -> str:
        """The image file of item ``i``."""
        return os.path.join(self.root, self._images[self.image_ids[i]]["file_name"])

    def annotations(self, i: int) -> list[dict[str, Any]]:
        """The json annotations of item ``i`` (all of them: no ``drop_*`` filter), in json order."""
        return list(self._by_image.get(self.image_ids[i], ()))

    def load(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Item ``i`` before ``transforms`` (with the ``drop_*`` filters applied).

        Raises:
            DatasetError: the file cannot be decoded, or its size is not the json's ``width x height``.
        """
        image_id = self.image_ids[i]
        info = self._images[image_id]
        h, w = info["height"], info["width"]
        pil = open_rgb(self.path(i), fix=BAD_IMAGE_FIX)
        if pil.size != (w, h):
            raise DatasetError(
                f"{self.source}: image id {image_id}: {self.path(i)} is {pil.size[0]}x{pil.size[1]} "
                f"px but the json says {w}x{h}; fix the json's width/height or replace the file."
            )
        image = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        anns = self._by_image.get(image_id, [])
        if self.drop_crowd:
            anns = [a for a in anns if not a["iscrowd"]]
        if self.drop_degenerate:
            anns = [a for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1).float()
        target: dict[str, Any] = {
            "boxes": boxes,
            "labels": torch.tensor(
                [self._category_to_label[a["category_id"]] for a in anns], dtype=torch.int64
            ),
            "iscrowd": torch.tensor([a["iscrowd"] for a in anns], dtype=torch.int64),
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            "image_id": image_id,
        }
        if self.has_masks:
            masks = np.zeros((len(anns), h, w), dtype=np.uint8)
            for k, a in enumerate(anns):
                masks[k] = mask_utils.decode(segmentation_to_rle(a["segmentation"], h, w))
            target["masks"] = torch.from_numpy(masks)
        return image, target

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = self.load(i)
        if self.transforms is None:
            return image, target
        from torchvision import tv_tensors

        wrapped = dict(target)
        wrapped["boxes"] = tv_tensors.BoundingBoxes(
            target["boxes"], format="XYXY", canvas_size=image.shape[-2:]
        )
        if "masks" in target:
            wrapped["masks"] = tv_tensors.Mask(target["masks"])
        image, wrapped = self.transforms(tv_tensors.Image(image), wrapped)
        # Plain tensors out: a tv_tensor would carry its metadata into the model and into collate.
        out = {
            k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in wrapped.items()
        }
        return image.as_subclass(torch.Tensor), out

    def __repr__(self) -> str:
        return (
            f"DetectionDataset({self.kind}, split={self.split!r}, n={len(self)}, "
            f"classes={len(self.classes)}, masks={self.has_masks}, hash={self.manifest_hash[:12]})"
        )


def collate_detection(batch: list[tuple[Any, Mapping[str, Any]]]) -> tuple[list[Any], list[Any]]:
    """DataLoader ``collate_fn`` for detection: ``(list of images, list of targets)``, sizes may differ."""
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)
