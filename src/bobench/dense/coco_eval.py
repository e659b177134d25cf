"""COCO box and mask AP for detection and instance segmentation, from in-memory dicts.

:func:`coco_metrics` scores COCO result dicts against a COCO instances dict with pycocotools' ``COCOeval``
(the reference) or with faster-coco-eval (same numbers, C++ matching; tested equal to 1e-9), and returns
the six standard AP numbers per IoU type as fractions in [0, 1]:

=============  =============  ==========================================
``box_AP``     ``mask_AP``    AP averaged over IoU 0.50:0.05:0.95
``box_AP50``   ``mask_AP50``  AP at IoU 0.50
``box_AP75``   ``mask_AP75``  AP at IoU 0.75
``box_APs``    ``mask_APs``   AP on small objects (area < 32²)
``box_APm``    ``mask_APm``   AP on medium objects (32² ≤ area < 96²)
``box_APl``    ``mask_APl``   AP on large objects (area ≥ 96²)
=============  =============  ==========================================

All are area ``all`` / ``maxDets=100`` except the size splits (area-restricted, ``maxDets=100``). Where no
ground truth falls in a split (pycocotools prints ``-1``) the value is **NaN**, not -1, so a mean over
tasks cannot silently absorb it. All higher-is-better. pycocotools divides by ``tp + fp + eps``, so its
perfect score is ``1 - 2e-16``, not exactly 1; compare with a tolerance.

:func:`predictions_from_outputs` turns torchvision detection outputs into the JSON-safe result dicts that
bobench stores, so a run can be re-scored later without the model.

Example:
    >>> gt = {"images": [{"id": 1, "height": 64, "width": 64}],
    ...       "categories": [{"id": 3, "name": "cat"}],
    ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 40, 40],
    ...                        "area": 1600, "iscrowd": 0}]}
    >>> preds = [{"image_id": 1, "category_id": 3, "score": 0.9, "bbox": [0, 0, 40, 40]}]
    >>> m = coco_metrics(gt, preds, iou_types=("bbox",), per_class=True)
    >>> m["box_AP"], m["box_APm"], m["box_AP/cat"], math.isnan(m["box_APs"])
    (1.0, 1.0, 1.0, True)
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bobench.registry import suggest

__all__ = ["BACKENDS", "IOU_TYPES", "STAT_NAMES", "coco_metrics", "predictions_from_outputs"]
__all__ += ["resolve_backend"]

BACKENDS = ("auto", "faster-coco-eval", "pycocotools")
IOU_TYPES = ("bbox", "segm")
# metric key prefix per IoU type: box_AP, mask_AP
PREFIX = {"bbox": "box", "segm": "mask"}
# names of COCOeval.stats[:6], in that order (the rest of stats are AR numbers, not reported)
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
BOX_DECIMALS = 2  # 1/100 px: far below annotation noise, and keeps stored predictions short


def resolve_backend(backend: str = "auto") -> str:
    """The evaluator ``backend`` names: ``"faster-coco-eval"`` or ``"pycocotools"``.

    ``"auto"`` picks faster-coco-eval when it is importable, else pycocotools (both give the same numbers).

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`.
        ImportError: the forced backend is not installed (with the pip line that installs it).
    """
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown COCO evaluation backend {backend!r}; choose one of {', '.join(BACKENDS)}."
            + suggest(str(backend), list(BACKENDS))
        )
    if backend == "auto":
        try:
            import faster_coco_eval  # noqa: F401
        except ImportError:
            return "pycocotools"
        return "faster-coco-eval"
    return backend


def _backend_classes(backend: str) -> tuple[Any, Any]:
    """``(COCO, COCOeval)`` classes of a resolved backend; both mirror pycocotools' API."""
    try:
        if backend == "faster-coco-eval":
            from faster_coco_eval import COCO, COCOeval_faster

            return COCO, COCOeval_faster
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    except ImportError as e:
        package = "faster-coco-eval" if backend == "faster-coco-eval" else "pycocotools"
        raise ImportError(f"COCO evaluation backend {backend!r} needs `pip install {package}`") from e


def _check_gt(gt: Mapping[str, Any], iou_types: Sequence[str]) -> dict[str, Any]:
    """A validated copy of ``gt`` the evaluators may mutate (both add keys to, or convert, annotations)."""
    missing = [k for k in ("images", "annotations", "categories") if k not in gt]
    if missing:
        raise ValueError(
            f"COCO ground truth lacks {', '.join(missing)}; it must be an instances dict with "
            "'images', 'annotations' and 'categories' (as in instances_val2017.json)"
        )
    annotations = []
    for ann in gt["annotations"]:
        need = ["image_id", "category_id", "bbox", "area", *(["segmentation"] if "segm" in iou_types else [])]
        lacking = [k for k in need if k not in ann]
        if lacking:
            raise ValueError(
                f"COCO ground-truth annotation id={ann.get('id')} lacks {', '.join(lacking)}; "
                f"{'segm needs segmentation, ' if 'segmentation' in lacking else ''}the size splits need area"
            )
        # absent iscrowd means "not a crowd" (the COCO default); both evaluators read it unguarded
        annotations.append({"iscrowd": 0, **ann})
    if len({a.get("id") for a in annotations}) != len(annotations) or any("id" not in a for a in annotations):
        raise ValueError(
            "COCO ground-truth annotations need unique 'id' fields (the evaluators index by them)"
        )
    return {**gt, "annotations": annotations}


def _results_for(
    gt: Mapping[str, Any], predictions: Sequence[Mapping[str, Any]], iou_type: str
) -> list[dict[str, Any]]:
    """Fresh result dicts carrying only the fields ``iou_type`` scores (``loadRes`` mutates what it gets)."""
    sizes = {img["id"]: [img.get("height"), img.get("width")] for img in gt["images"]}
    categories = {c["id"] for c in gt["categories"]}
    out = []
    for i, p in enumerate(predictions):
        key = "bbox" if iou_type == "bbox" else "segmentation"
        for field in ("image_id", "category_id", "score", key):
            if field not in p:
                raise ValueError(f"prediction {i} lacks {field!r}, which {iou_type} evaluation needs")
        if p["image_id"] not in sizes:
            raise ValueError(f"prediction {i} has image_id={p['image_id']}, which is not in the ground truth")
        # pycocotools would silently skip an unknown category: that is a label-mapping bug, not a miss
        if p["category_id"] not in categories:
            raise ValueError(
                f"prediction {i} has category_id={p['category_id']}, not among the ground-truth "
                f"categories {sorted(categories)}; check the label -> category mapping"
            )
        r = {"image_id": p["image_id"], "category_id": p["category_id"], "score": float(p["score"])}
        if iou_type == "bbox":
            r["bbox"] = [float(v) for v in p["bbox"]]
        else:
            seg = p["segmentation"]
            if not isinstance(seg, Mapping) or "counts" not in seg or "size" not in seg:
                raise ValueError(f"prediction {i}: segm needs 'segmentation' as an RLE dict {{size, counts}}")
            if list(seg["size"]) != sizes[p["image_id"]]:
                raise ValueError(
                    f"prediction {i}: mask size {list(seg['size'])} differs from image {p['image_id']}'s "
                    f"[height, width] {sizes[p['image_id']]}"
                )
            # no bbox here on purpose: given one, loadRes takes the box area as the instance area, so the
            # mask APs/APm/APl splits would use box size (detectron2 drops it for the same reason)
            r["segmentation"] = {"size": list(seg["size"]), "counts": seg["counts"]}
        out.append(r)
    return out


def _load_results(coco_gt: Any, coco_cls: Any, results: list[dict[str, Any]]) -> Any:
    """``coco_gt.loadRes(results)``, also for no results (pycocotools' loadRes indexes ``results[0]``)."""
    if results:
        return coco_gt.loadRes(results)
    # an empty result set scores 0 wherever ground truth exists, in both backends
    coco_dt = coco_cls()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt


def _nan_if_missing(value: float) -> float:
    # COCOeval writes -1 where nothing was evaluable (no ground truth in that split)
    return math.nan if value < 0 else float(value)


def _per_class_ap(evaluator: Any, names: Mapping[int, str]) -> dict[str, float]:
    """``{category name: AP}`` from ``evaluator.eval["precision"]`` (detectron2's per-category AP).

    ``precision`` is ``[T iou thresholds, R recall points, K categories, A area ranges, M maxDets]``; a
    category's AP is the mean over T and R of entries > -1 at area ``all`` and the largest maxDets, as
    ``COCOeval.summarize`` computes the overall AP. No ground truth of the category -> NaN.
    """
    precision = np.asarray(evaluator.eval["precision"])
    params = evaluator.params
    area = list(params.areaRngLbl).index("all")
    out = {}
    for k, cat_id in enumerate(params.catIds):
        p = precision[:, :, k, area, -1]
        p = p[p > -1]
        out[names[cat_id]] = float(np.mean(p)) if p.size else math.nan
    return out


def coco_metrics(
    gt: Mapping[str, Any],
    predictions: Sequence[Mapping[str, Any]],
    iou_types: Sequence[str] = IOU_TYPES,
    backend: str = "auto",
    per_class: bool = False,
) -> dict[str, float]:
    """COCO AP of ``predictions`` against ``gt``, per IoU type, as fractions in [0, 1].

    Args:
        gt: a COCO instances dict: ``images`` (``id``, ``height``, ``width``), ``annotations`` (``id``,
            ``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``area``, optional ``iscrowd`` (default
            0), and ``segmentation`` (polygons or RLE) when ``"segm"`` is asked) and ``categories``
            (``id``, ``name``). Not modified.
        predictions: COCO result dicts: ``image_id``, ``category_id``, ``score``, ``bbox`` [x, y, w, h]
            for bbox and ``segmentation`` (an RLE dict ``{"size": [h, w], "counts": str}``) for segm, as
            :func:`predictions_from_outputs` makes. Not modified. May be empty (every AP is then 0.0
            where ground truth exists).
        iou_types: any of ``"bbox"`` (keys ``box_*``) and ``"segm"`` (keys ``mask_*``).
        backend: ``"auto"`` (faster-coco-eval if importable, else pycocotools), ``"faster-coco-eval"`` or
            ``"pycocotools"`` (the reference implementation).
        per_class: also return ``box_AP/<category name>`` and ``mask_AP/<category name>`` (AP over IoU
            0.50:0.95, area all, maxDets 100; NaN for a category without ground truth).

    Returns:
        ``{"box_AP", "box_AP50", "box_AP75", "box_APs", "box_APm", "box_APl"}`` for bbox and the same
        with ``mask_`` for segm (plus per-class keys if asked). A split without ground truth is NaN
        (pycocotools' -1).

    Raises:
        ValueError: an unknown backend or IoU type, a malformed ground truth, or a prediction naming an
            image or category the ground truth lacks, missing a field, or with a mask of the wrong size.
    """
    types = list(dict.fromkeys(iou_types))
    for t in types:
        if t not in IOU_TYPES:
            raise ValueError(
                f"unknown IoU type {t!r}; choose from {', '.join(IOU_TYPES)}" + suggest(t, list(IOU_TYPES))
            )
    coco_cls, eval_cls = _backend_classes(resolve_backend(backend))
    gt = _check_gt(gt, types)
    names = {c["id"]: str(c.get("name", c["id"])) for c in gt["categories"]}
    out: dict[str, float] = {}
    # pycocotools prints progress and timings on stdout; it would break our progress bars
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_cls()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        for iou_type in types:
            coco_dt = _load_results(coco_gt, coco_cls, _results_for(gt, predictions, iou_type))
            evaluator = eval_cls(coco_gt, coco_dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            prefix = PREFIX[iou_type]
            for name, value in zip(STAT_NAMES, evaluator.stats[: len(STAT_NAMES)], strict=True):
                out[f"{prefix}_{name}"] = _nan_if_missing(value)
            if per_class:
                for cat, ap in _per_class_ap(evaluator, names).items():
                    out[f"{prefix}_AP/{cat}"] = ap
    return out


def _numpy(x: Any) -> np.ndarray:
    """A host numpy array from a torch tensor (any device, any float dtype) or an array-like."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()  # numpy has no bfloat16
        return x.numpy()
    return np.asarray(x)


def predictions_from_outputs(
    image_ids: Sequence[int],
    outputs: Sequence[Mapping[str, Any]],
    label_to_category: Mapping[int, int],
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """COCO result dicts (plain, JSON-safe python types) from torchvision detection outputs.

    Args:
        image_ids: the COCO image id of each output, in order.
        outputs: per image, torchvision's detection output: ``boxes`` [N, 4] XYXY in pixels, ``scores``
            [N], ``labels`` [N] (contiguous model labels) and optionally ``masks`` [N, 1, H, W] (or
            [N, H, W]) of per-pixel probabilities. Torch tensors on any device, or numpy arrays.
        label_to_category: model label -> COCO ``category_id``.
        mask_threshold: a pixel belongs to the instance when its probability is ``> mask_threshold``
            (torchvision's reference evaluation binarises at ``> 0.5``).

    Returns:
        One dict per detection: ``image_id`` (int), ``category_id`` (int), ``score`` (float), ``bbox``
        [x, y, w, h] (floats rounded to 0.01 px) and, when the output has masks, ``segmentation``
        ``{"size": [H, W], "counts": str}`` (compressed RLE). ``json.dumps`` takes it as is.

    Raises:
        ValueError: lengths that disagree, a label missing from ``label_to_category``, or bad shapes.

    Example:
        >>> out = {"boxes": np.array([[10.0, 20.0, 50.0, 80.0]]), "scores": np.array([0.75]),
        ...        "labels": np.array([1])}
        >>> predictions_from_outputs([42], [out], {1: 18})
        [{'image_id': 42, 'category_id': 18, 'score': 0.75, 'bbox': [10.0, 20.0, 40.0, 60.0]}]
    """
    if len(image_ids) != len(outputs):
        raise ValueError(f"got {len(image_ids)} image ids for {len(outputs)} outputs; need one per output")
    results: list[dict[str, Any]] = []
    for image_id, out in zip(image_ids, outputs, strict=True):
        boxes = _numpy(out["boxes"]).astype(np.float64).reshape(-1, 4)
        scores = _numpy(out["scores"]).astype(np.float64).reshape(-1)
        labels = _numpy(out["labels"]).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(
                f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels; "
                "need one of each per detection"
            )
        rles = _encode_masks(out["masks"], mask_threshold, len(boxes), image_id) if "masks" in out else None
        corners = np.round(boxes, BOX_DECIMALS)
        for i, label in enumerate(labels.tolist()):
            if label not in label_to_category:
                raise ValueError(
                    f"image {image_id}: model label {label} has no COCO category in label_to_category "
                    f"(which maps {sorted(label_to_category)})"
                )
            x1, y1, x2, y2 = corners[i].tolist()
            # width from the rounded corners, rounded again: x2 - x1 leaves float fuzz like 39.999999
            bbox = [x1, y1, round(x2 - x1, BOX_DECIMALS), round(y2 - y1, BOX_DECIMALS)]
            det = {
                "image_id": int(image_id),
                "category_id": int(label_to_category[label]),
                "score": float(scores[i]),
                "bbox": bbox,
            }
            if rles is not None:
                det["segmentation"] = rles[i]
            results.append(det)
    return results


def _encode_masks(masks: Any, threshold: float, n: int, image_id: int) -> list[dict[str, Any]]:
    """Compressed RLE ``{"size": [H, W], "counts": str}`` of each mask binarised at ``> threshold``."""
    from pycocotools import mask as mask_utils

    # threshold before the host copy: a bool mask moves a quarter of the bytes of a float one
    binary = _numpy(masks > threshold)
    if binary.ndim == 4 and binary.shape[1] == 1:
        binary = binary[:, 0]
    if binary.ndim != 3 or len(binary) != n:
        raise ValueError(
            f"image {image_id}: masks must be [N, 1, H, W] or [N, H, W] with N={n} detections, "
            f"got shape {tuple(binary.shape)}"
        )
    out = []
    for m in binary:
        # pycocotools' encoder reads column-major uint8 memory
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        out.append({"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")})
    return out
