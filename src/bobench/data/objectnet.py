"""Reader for ObjectNet (Barbu et al. 2019) as released: its ImageNet-overlap classes, labelled by wnid.

See :func:`read_objectnet`. Shares the ImageNet class lists and folder helpers of
:mod:`bobench.data.ood_readers`.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import numpy as np

from bobench.data.errors import DatasetError
from bobench.data.manifest import FileItems
from bobench.data.ood_readers import (
    dataset_root,
    imagenet_wnids,
    list_images,
    list_subdirs,
    require_test_split,
)
from bobench.data.spec import DatasetSpec

_OBJECTNET_FILES = {
    "folders": ("folder_to_objectnet_label.json",),
    "overlap": ("objectnet_to_imagenet_1k.json",),
    "names": ("imagenet_to_label_2012_v2", "imagenet_to_label_2012_v2.txt"),
}
_OBJECTNET_PYTORCH = "pytorch_to_imagenet_2012_id.json"


def _mapping_file(mappings: str, key: str) -> str:
    for name in _OBJECTNET_FILES[key]:
        if os.path.isfile(os.path.join(mappings, name)):
            return os.path.join(mappings, name)
    wanted = " and ".join(" or ".join(names) for names in _OBJECTNET_FILES.values())
    raise DatasetError(
        f"ObjectNet mappings folder {mappings} lacks {' or '.join(_OBJECTNET_FILES[key])}; it must hold "
        f"{wanted} (as in objectnet-1.0/mappings/ of the release)."
    )


def _load_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path} ({exc}); restore it from the ObjectNet release.") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path} must hold a JSON object; restore it from the ObjectNet release.")
    return data


def _imagenet_name_to_wnids(mappings: str) -> dict[str, list[str]]:
    """ImageNet class name (one line per class of ``imagenet_to_label_2012_v2``) -> its wnid(s)."""
    wnids = imagenet_wnids()
    path = _mapping_file(mappings, "names")
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\r\n").strip() for line in f]
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) != len(wnids) or not all(lines):
        raise DatasetError(f"{path} must hold {len(wnids)} non-empty lines (one ImageNet class name each).")
    # The release orders these lines by its own ImageNet ids and ships pytorch_to_imagenet_2012_id.json
    # ({standard index: line}); without that file the lines are taken to be in the standard order.
    line_to_index = list(range(len(wnids)))
    pytorch = os.path.join(mappings, _OBJECTNET_PYTORCH)
    if os.path.isfile(pytorch):
        try:
            pairs = {int(i): int(line) for i, line in _load_json(pytorch).items()}
            for index, line in pairs.items():
                line_to_index[line] = index
        except (ValueError, TypeError, IndexError) as exc:
            raise DatasetError(f"{pytorch} must map standard indices to line numbers ({exc}).") from exc
    out: dict[str, list[str]] = {}
    for line, name in enumerate(lines):
        out.setdefault(name, []).append(wnids[line_to_index[line]])
    return out


def _image_size(path: str) -> tuple[int, int]:
    """``(width, height)`` from the file header: 24 bytes for a PNG, Pillow's lazy header read else."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        from PIL import Image

        with Image.open(path) as img:
            return img.size
    except Exception as exc:  # Pillow raises many unrelated types for a bad header
        raise DatasetError(f"cannot read the size of image {path} ({exc}); replace the file.") from exc


def read_objectnet(spec: DatasetSpec, split: str) -> FileItems:
    """ObjectNet (Barbu et al. 2019), restricted to the classes that overlap ImageNet-1k.

    Layout (the ``objectnet-1.0/`` release; ``<path>`` may also be its parent)::

        <path>/images/<objectnet folder>/*.png
        <path>/mappings/folder_to_objectnet_label.json   {folder: ObjectNet label}
        <path>/mappings/objectnet_to_imagenet_1k.json    {ObjectNet label: "imagenet name; other name"}
        <path>/mappings/imagenet_to_label_2012_v2        1000 lines, one ImageNet class name each
        <path>/mappings/pytorch_to_imagenet_2012_id.json optional {standard index: line of the above}

    Only ObjectNet classes listed in ``objectnet_to_imagenet_1k.json`` are kept (113 in the release).
    One ObjectNet class can map to several ImageNet classes, so:

    * ``classes`` are the ImageNet wnids that any kept class maps to, in standard ImageNet order (mask
      the probe's logits to these, as the ObjectNet protocol does);
    * each image is labelled with the FIRST wnid its ObjectNet class maps to;
    * ``extras["objectnet_to_imagenet"]`` = ``{objectnet folder: [wnids]}`` and
      ``extras["label_sets"]`` = ``{label wnid: [acceptable wnids]}`` (the union over the ObjectNet
      classes labelled with that wnid). The ObjectNet protocol counts a prediction of ANY wnid of an
      image's set as correct; plain accuracy on ``targets`` alone under-counts it. Per-class sets keep
      the hashed extras small (a per-image list would be ~18k entries).

    The release frames every image with a 1 px red border, which the standard evaluation crops: each
    item gets the crop box ``(1, 1, w - 1, h - 1)``, its size read from the PNG header (24 bytes per
    file, no decoding). Because the boxes are per-item ground truth, ``skip_bad_images`` cannot drop
    items of this set. Test split only.

    Raises:
        DatasetError: a missing images/ or mappings file (naming what was looked for), an image folder
            absent from ``folder_to_objectnet_label.json``, or an ImageNet name that is unknown or
            names two classes.
    """
    require_test_split(spec, split, "ObjectNet")
    layout = f"{spec.path}/images/<folder>/*.png and {spec.path}/mappings/"
    root = dataset_root(spec, layout, lambda d: d in ("images", "mappings"), ("objectnet-1.0",))
    images_dir, mappings = os.path.join(root, "images"), os.path.join(root, "mappings")
    if not os.path.isdir(images_dir) or not os.path.isdir(mappings):
        raise DatasetError(f"{root} is not an ObjectNet release: expected {layout}.")
    folder_label = _load_json(_mapping_file(mappings, "folders"))
    overlap_file = _mapping_file(mappings, "overlap")
    overlap = _load_json(overlap_file)
    name_to_wnids = _imagenet_name_to_wnids(mappings)
    wnids = imagenet_wnids()
    position = {w: i for i, w in enumerate(wnids)}

    to_imagenet: dict[str, list[str]] = {}
    for folder in list_subdirs(images_dir):
        if folder not in folder_label:
            raise DatasetError(
                f"image folder {os.path.join(images_dir, folder)} is not in folder_to_objectnet_label.json"
                "; remove it or restore the mappings from the release."
            )
        names = overlap.get(str(folder_label[folder]))
        if names is None:
            continue  # an ObjectNet-only class: not scored against an ImageNet probe
        mapped: list[str] = []
        for name in filter(None, (n.strip() for n in str(names).split(";"))):
            found = name_to_wnids.get(name)
            if found is None or len(found) != 1:
                why = "is not a line of imagenet_to_label_2012_v2" if found is None else "names two classes"
                raise DatasetError(f"{overlap_file}: ImageNet class {name!r} {why}; fix the mappings.")
            mapped.append(found[0])
        if mapped:
            to_imagenet[folder] = mapped
    if not to_imagenet:
        raise DatasetError(f"{images_dir} has no folder of a class that overlaps ImageNet; check the path.")

    classes = sorted({w for ws in to_imagenet.values() for w in ws}, key=position.__getitem__)
    index = {w: i for i, w in enumerate(classes)}
    label_sets: dict[str, set[str]] = {}
    paths: list[str] = []
    labels: list[int] = []
    for folder, mapped in to_imagenet.items():
        label_sets.setdefault(mapped[0], set()).update(mapped)
        found = list_images(os.path.join(images_dir, folder), f"images/{folder}/")
        paths += found
        labels += [index[mapped[0]]] * len(found)
    sizes = np.array([_image_size(os.path.join(root, p)) for p in paths], dtype=np.float64).reshape(-1, 2)
    boxes = np.column_stack([np.ones(len(paths)), np.ones(len(paths)), sizes - 1.0])
    extras = {
        "objectnet_to_imagenet": to_imagenet,
        "label_sets": {w: sorted(s, key=position.__getitem__) for w, s in label_sets.items()},
    }
    return FileItems(root, paths, np.array(labels, dtype=np.int64), classes, None, boxes=boxes, extras=extras)
