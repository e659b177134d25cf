"""COCO box / mask AP (bobench.dense.coco_eval) against known answers.

Known answers: perfect predictions score 1; a tiny case whose APs are worked out by hand from COCO's
101-point interpolated precision; pycocotools (the reference) and faster-coco-eval agree to 1e-9 on a
seeded random-ish set; no predictions score 0; torchvision-style outputs round-trip through JSON to AP 1.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from fractions import Fraction

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from bobench.dense.coco_eval import coco_metrics, predictions_from_outputs, resolve_backend

BACKENDS = ["pycocotools", "faster-coco-eval"]
KEYS = [f"{p}_{s}" for p in ("box", "mask") for s in ("AP", "AP50", "AP75", "APs", "APm", "APl")]


def _draw(shape: tuple, h: int, w: int) -> np.ndarray:
    """A uint8 [h, w] mask of ``("rect", x, y, bw, bh)`` or ``("ellipse", cx, cy, rx, ry)``."""
    kind, a, b, c, d = shape
    if kind == "rect":
        m = np.zeros((h, w), np.uint8)
        m[int(b) : int(b + d), int(a) : int(a + c)] = 1
        return m
    yy, xx = np.mgrid[:h, :w]
    return (((xx - a) / c) ** 2 + ((yy - b) / d) ** 2 <= 1).astype(np.uint8)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _gt(images: list[tuple[int, int, int]], objects: list[tuple], categories: dict[int, str]) -> dict:
    """COCO instances dict; ``objects`` are ``(image_id, category_id, shape[, iscrowd])``."""
    sizes = {i: (h, w) for i, h, w in images}
    anns = []
    for n, (image_id, cat, shape, *crowd) in enumerate(objects, start=1):
        rle = _rle(_draw(shape, *sizes[image_id]))
        anns.append(
            {
                "id": n,
                "image_id": image_id,
                "category_id": cat,
                "segmentation": rle,
                "area": float(mask_utils.area(rle)),  # COCO's area is the mask's
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": crowd[0] if crowd else 0,
            }
        )
    return {
        "images": [{"id": i, "height": h, "width": w} for i, h, w in images],
        "annotations": anns,
        "categories": [{"id": c, "name": n} for c, n in categories.items()],
    }


# Three images, non-contiguous category ids, and small (< 32² px), medium and large (>= 96² px) objects of
# each kind so that every AP split is defined.
IMAGES = [(1, 96, 128), (2, 160, 200), (3, 240, 240)]
CATEGORIES = {1: "cat", 2: "dog", 5: "car"}
OBJECTS = [
    (1, 1, ("rect", 5, 5, 20, 20)),  # small, 400 px
    (1, 2, ("ellipse", 80, 50, 25, 20)),  # medium, ~1571 px
    (1, 5, ("rect", 40, 60, 10, 30)),  # small, 300 px
    (2, 1, ("ellipse", 100, 80, 60, 55)),  # large, ~10367 px
    (2, 2, ("rect", 165, 5, 30, 40)),  # medium, 1200 px
    (2, 1, ("rect", 2, 140, 15, 15)),  # small, 225 px
    (3, 5, ("rect", 10, 10, 120, 100)),  # large, 12000 px
    (3, 5, ("ellipse", 190, 60, 30, 25)),  # medium, ~2356 px
    (3, 2, ("rect", 20, 160, 25, 30)),  # small, 750 px
]


def _multi_gt() -> dict:
    return _gt(IMAGES, OBJECTS, CATEGORIES)


def _as_predictions(gt: dict) -> list[dict]:
    return [
        {k: a[k] for k in ("image_id", "category_id", "bbox", "segmentation")} | {"score": 1.0}
        for a in gt["annotations"]
    ]


def _close(a: dict, b: dict, tol: float) -> bool:
    assert a.keys() == b.keys()
    return all((math.isnan(a[k]) and math.isnan(b[k])) or abs(a[k] - b[k]) <= tol for k in a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_predictions_score_one(backend):
    gt = _multi_gt()
    metrics = coco_metrics(gt, _as_predictions(gt), backend=backend, per_class=True)
    assert sorted(k for k in metrics if "/" not in k) == sorted(KEYS)
    # approx: pycocotools divides by (tp + fp + machine epsilon), so a perfect precision is 1 - 1e-16
    assert [metrics[k] for k in KEYS] == pytest.approx([1.0] * len(KEYS), abs=1e-12)
    for prefix in ("box", "mask"):
        assert [metrics[f"{prefix}_AP/{n}"] for n in CATEGORIES.values()] == pytest.approx(
            [1.0] * 3, abs=1e-12
        )


# The hand-made case: one 320x320 image, one class, two 100x100 ground-truth boxes (area 10000: "large"),
# and three detections, also given as rectangle masks of the same geometry (so mask IoUs equal box IoUs):
#   A = GT1 exactly                      score 0.9  IoU 1.00
#   B = [220, 200, 50, 50], no overlap   score 0.8  a false positive (area 2500)
#   C = [200, 0, 100, 62] inside GT2     score 0.7  IoU 6200 / 10000 = 0.62 (area 6200)
HAND_GT = _gt(
    [(1, 320, 320)],
    [(1, 7, ("rect", 0, 0, 100, 100)), (1, 7, ("rect", 200, 0, 100, 100))],
    {7: "widget"},
)
HAND_DETS = [
    {
        "image_id": 1,
        "category_id": 7,
        "score": s,
        "bbox": list(map(float, r[1:])),
        "segmentation": _rle(_draw(r, 320, 320)),
    }
    for s, r in [
        (0.9, ("rect", 0, 0, 100, 100)),
        (0.8, ("rect", 220, 200, 50, 50)),
        (0.7, ("rect", 200, 0, 100, 62)),
    ]
]


def _ap101(recall: list[Fraction], precision: list[Fraction]) -> Fraction:
    """COCO's AP at one IoU threshold: the mean, over the 101 recall points r = 0, 0.01, ..., 1, of the
    interpolated precision max{precision_i : recall_i >= r} (0 when no detection reaches r)."""
    points = [Fraction(i, 100) for i in range(101)]
    return (
        sum(
            (
                max((p for rc, p in zip(recall, precision, strict=True) if rc >= r), default=Fraction(0))
                for r in points
            ),
            Fraction(0),
        )
        / 101
    )


def test_hand_computed_ap():
    # In score order A, B, C with 2 ground truths:
    # * IoU thresholds 0.50, 0.55, 0.60 (C matches, 0.62 >= t): TP, FP, TP
    #     recall 1/2, 1/2, 1;  precision 1, 1/2, 2/3;  interpolated 1, 2/3, 2/3
    #     r in {0, ..., 0.50} (51 points) -> 1;  r in {0.51, ..., 1} (50 points) -> 2/3
    #     AP_t = (51 * 1 + 50 * 2/3) / 101 = 253/303 ~ 0.83498
    # * IoU thresholds 0.65, ..., 0.95 (7 of them; only A matches): TP, FP, FP
    #     recall 1/2, 1/2, 1/2;  precision 1, 1/2, 1/3
    #     r <= 0.50 (51 points) -> 1;  r > 0.50 (50 points) -> 0 (never reached)
    #     AP_t = 51/101 ~ 0.50495
    # AP50 = 253/303, AP75 = 51/101, AP = (3 * 253/303 + 7 * 51/101) / 10 = 610/1010 = 61/101 ~ 0.60396
    # APl (GT area 10000 >= 96²): an unmatched detection outside the range is ignored, not a FP, so B (2500)
    #   always drops out and C (6200) drops out where unmatched:
    #     t <= 0.60: TP, TP -> precision 1 at every r -> 1;   t >= 0.65: TP only -> 51/101
    #   APl = (3 * 1 + 7 * 51/101) / 10 = 660/1010 = 66/101 ~ 0.65347
    # APs, APm: no ground truth that size -> NaN (pycocotools' -1)
    one, half = Fraction(1), Fraction(1, 2)
    ap_low = _ap101([half, half, one], [one, half, Fraction(2, 3)])
    ap_high = _ap101([half, half, half], [one, half, Fraction(1, 3)])
    assert (ap_low, ap_high) == (Fraction(253, 303), Fraction(51, 101))  # the helper agrees with the prose
    expected = {
        "AP50": Fraction(253, 303),
        "AP75": Fraction(51, 101),
        "AP": Fraction(61, 101),
        "APl": Fraction(66, 101),
    }
    assert (3 * ap_low + 7 * ap_high) / 10 == expected["AP"]
    for backend in BACKENDS:
        m = coco_metrics(HAND_GT, HAND_DETS, backend=backend, per_class=True)
        for prefix in ("box", "mask"):
            for name, value in expected.items():
                assert m[f"{prefix}_{name}"] == pytest.approx(float(value), abs=1e-12), (
                    backend,
                    prefix,
                    name,
                )
            assert math.isnan(m[f"{prefix}_APs"]) and math.isnan(m[f"{prefix}_APm"])
            assert m[f"{prefix}_AP/widget"] == pytest.approx(61 / 101, abs=1e-12)


def _random_predictions(seed: int) -> list[dict]:
    """Jittered copies of the GT (some relabelled, some duplicated, some missed) plus random false positives."""
    rng = np.random.default_rng(seed)
    sizes = {i: (h, w) for i, h, w in IMAGES}
    cats = list(CATEGORIES)
    shapes = []
    for image_id, cat, (kind, *params), *_ in OBJECTS:
        for _ in range(rng.integers(0, 3)):  # 0 (a miss), 1 or 2 (a duplicate) detections of this object
            jitter = [max(1.0, p + rng.uniform(-4, 4)) for p in params]
            wrong = rng.random() < 0.15
            shapes.append((image_id, int(rng.choice(cats)) if wrong else cat, (kind, *jitter)))
    for image_id, h, w in IMAGES:
        for _ in range(3):
            kind = str(rng.choice(["rect", "ellipse"]))
            a, b = rng.uniform(0, w - 10), rng.uniform(0, h - 10)
            shapes.append(
                (image_id, int(rng.choice(cats)), (kind, a, b, rng.uniform(4, 40), rng.uniform(4, 40)))
            )
    preds = []
    for image_id, cat, shape in shapes:
        rle = _rle(_draw(shape, *sizes[image_id]))
        if mask_utils.area(rle) == 0:
            continue
        box = mask_utils.toBbox(rle) + rng.uniform(-1.5, 1.5, 4)  # boxes not exactly the masks' boxes
        preds.append(
            {
                "image_id": image_id,
                "category_id": cat,
                "score": float(rng.uniform(0.05, 1.0)),  # continuous: no ties to order differently
                "bbox": [float(v) for v in box],
                "segmentation": rle,
            }
        )
    return preds


def test_backends_agree():
    gt = _multi_gt()
    # a crowd region too: matching to crowds is a separate code path in both evaluators
    gt["annotations"].append(
        {
            **_gt([(3, 240, 240)], [(3, 2, ("rect", 150, 150, 60, 60), 1)], CATEGORIES)["annotations"][0],
            "id": 99,
        }
    )
    for seed in range(3):
        preds = _random_predictions(seed)
        ref = coco_metrics(gt, preds, backend="pycocotools", per_class=True)
        fast = coco_metrics(gt, preds, backend="faster-coco-eval", per_class=True)
        assert _close(ref, fast, 1e-9), (seed, ref, fast)
        # a real test: scores strictly between 0 and 1, not all equal
        assert 0.1 < ref["box_AP"] < 0.95 and 0.1 < ref["mask_AP"] < 0.95 and ref["box_AP"] != ref["mask_AP"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_predictions_score_zero(backend):
    m = coco_metrics(_multi_gt(), [], backend=backend, per_class=True)
    assert all(m[k] == 0.0 for k in m)
    hand = coco_metrics(HAND_GT, [], backend=backend)
    assert hand["box_AP"] == hand["mask_APl"] == 0.0 and math.isnan(hand["box_APs"])


def test_mask_size_splits_use_mask_area():
    # GT: a medium ellipse (~1571 px); a false positive ellipse scored higher whose box is 10000 px ("large")
    # but whose mask is ~7854 px ("medium"). Scored by mask area the FP counts in mask_APm:
    # FP, TP -> recall 0, 1; precision 0, 1/2 -> interpolated 1/2 at every r -> APm = 0.5 (1.0 by box area).
    gt = _gt([(1, 240, 240)], [(1, 1, ("ellipse", 40, 40, 25, 20))], {1: "cat"})
    dets = [(0.9, ("ellipse", 150, 150, 50, 50)), (0.5, ("ellipse", 40, 40, 25, 20))]
    preds = []
    for score, shape in dets:
        rle = _rle(_draw(shape, 240, 240))
        preds.append({"image_id": 1, "category_id": 1, "score": score, "segmentation": rle,
                      "bbox": [float(v) for v in mask_utils.toBbox(rle)]})  # fmt: skip
    for backend in BACKENDS:
        assert coco_metrics(gt, preds, iou_types=("segm",), backend=backend)["mask_APm"] == pytest.approx(
            0.5, abs=1e-12
        )


def test_predictions_from_outputs_round_trip():
    torch = pytest.importorskip("torch")
    gt = _multi_gt()
    label_to_category = {1: 1, 2: 2, 3: 5}  # torchvision-style contiguous labels (0 is background)
    category_to_label = {c: label for label, c in label_to_category.items()}
    rng = np.random.default_rng(0)
    image_ids, outputs = [], []
    for image_id, *_ in IMAGES:
        anns = [a for a in gt["annotations"] if a["image_id"] == image_id]
        masks = np.stack([mask_utils.decode(a["segmentation"]) for a in anns]).astype(np.float32)
        x, y, bw, bh = np.array([a["bbox"] for a in anns]).T
        image_ids.append(image_id)
        outputs.append(
            {
                "boxes": torch.tensor(np.stack([x, y, x + bw, y + bh], 1), dtype=torch.float32),
                "scores": torch.tensor(rng.uniform(0.5, 1.0, len(anns)), dtype=torch.float32),
                "labels": torch.tensor(
                    [category_to_label[a["category_id"]] for a in anns], dtype=torch.int64
                ),
                # probabilities 0.7 inside, 0.4 outside: the 0.5 threshold recovers the GT mask exactly
                "masks": torch.from_numpy(0.4 + 0.3 * masks)[:, None],
            }
        )
    preds = predictions_from_outputs(image_ids, outputs, label_to_category)
    assert len(preds) == len(OBJECTS)
    assert json.loads(json.dumps(preds)) == preds  # plain python types only
    assert {type(v) for p in preds for v in (p["image_id"], p["category_id"])} == {int}
    assert preds[0]["bbox"] == gt["annotations"][0]["bbox"]
    assert preds[0]["segmentation"] == gt["annotations"][0]["segmentation"]
    m = coco_metrics(gt, json.loads(json.dumps(preds)))
    assert [m[k] for k in KEYS] == pytest.approx([1.0] * len(KEYS), abs=1e-12)
    # a threshold above every probability empties the masks: mask AP 0, box AP untouched
    empty = coco_metrics(
        gt, predictions_from_outputs(image_ids, outputs, label_to_category, mask_threshold=0.8)
    )
    assert empty["mask_AP"] == 0.0 and empty["box_AP"] == pytest.approx(1.0, abs=1e-12)


def test_predictions_from_outputs_rejects_unmapped_label():
    out = {"boxes": np.zeros((1, 4)), "scores": np.ones(1), "labels": np.array([4])}
    with pytest.raises(ValueError, match="label 4"):
        predictions_from_outputs([1], [out], {1: 1})


def test_inputs_not_modified_and_errors_actionable(monkeypatch):
    gt, preds = _multi_gt(), _random_predictions(0)
    before = copy.deepcopy((gt, preds))
    coco_metrics(gt, preds, backend="pycocotools")
    coco_metrics(gt, preds, backend="faster-coco-eval")
    assert (gt, preds) == before
    with pytest.raises(ValueError, match=r"auto, faster-coco-eval, pycocotools"):
        coco_metrics(gt, preds, backend="pycoco")
    with pytest.raises(ValueError, match="category_id=9"):
        coco_metrics(gt, [{**preds[0], "category_id": 9}])
    with pytest.raises(ValueError, match="lacks annotations"):
        coco_metrics({"images": [], "categories": []}, preds)
    assert resolve_backend("auto") in ("faster-coco-eval", "pycocotools")
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # makes the import fail
    assert resolve_backend("auto") == "pycocotools"
