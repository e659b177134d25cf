"""Detection / instance segmentation data: the COCO reader, Sim10k, Cityscapes and the embedded dense sets.

Every expected box, mask and count below is worked out by hand from the fixture (pixel rules: a
pycocotools polygon with integer corners covers ``[x0, x1) x [y0, y1)``; a PIL polygon, as Cityscapes
draws them, covers its boundary too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from bobench.data import DatasetError
from bobench.data.coco import DetectionDataset, collate_detection, read_coco_json
from bobench.data.dense_embedded import DENSE_CATALOG, build_mnist_det, build_nuclei, write_embedded
from bobench.data.dense_readers import load_detection_dataset

# A mask (10 x 20) for the compressed RLE annotation: rows 5..8, columns 10..14.
RLE_MASK = np.zeros((10, 20), dtype=np.uint8)
RLE_MASK[5:9, 10:15] = 1
# The crowd's mask, written as uncompressed (column-major) counts: rows 0..2 of columns 17..19.
CROWD_MASK = np.zeros((10, 20), dtype=np.uint8)
CROWD_MASK[0:3, 17:20] = 1


def _uncompressed(mask: np.ndarray) -> list[int]:
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    return [*counts, run]


def _coco() -> dict:
    rle = mask_utils.encode(np.asfortranarray(RLE_MASK))
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 20, "height": 10},
            {"id": 5, "file_name": "sub/empty.png", "width": 16, "height": 12},
            {"id": 3, "file_name": "c.png", "width": 8, "height": 8},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],  # labels: cat 1, dog 2
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [2, 2, 6, 4], "iscrowd": 0,
             "segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]]},  # no area: filled in from the mask (24)
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [10, 5, 5, 4], "area": 20.0, "iscrowd": 0,
             "segmentation": {"size": [10, 20], "counts": rle["counts"].decode("ascii")}},
            {"id": 12, "image_id": 1, "category_id": 3, "bbox": [17, 0, 3, 3], "area": 9.0, "iscrowd": 1,
             "segmentation": {"size": [10, 20], "counts": _uncompressed(CROWD_MASK)}},
            {"id": 13, "image_id": 3, "category_id": 7, "bbox": [3, 3, 0, 2], "area": 0.0,
             "segmentation": [[6, 6, 7, 7], [1, 1, 5, 1, 1, 5]]},  # degenerate box; a 2-point polygon first
        ],
    }  # fmt: skip


def _write_images(root: Path, coco: dict) -> None:
    rng = np.random.default_rng(0)
    for img in coco["images"]:
        path = root / img["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(img["height"], img["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    coco = _coco()
    _write_images(tmp_path / "images", coco)
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    return tmp_path


def _load(root: Path, **kw) -> DetectionDataset:
    return load_detection_dataset(f"cocojson:{root / 'instances.json'}?images={root / 'images'}", **kw)


def test_coco_items_match_hand_computed_targets(coco_dir: Path) -> None:
    ds = _load(coco_dir)
    assert ds.classes == ["cat", "dog"] and ds.label_to_category == {1: 3, 2: 7}
    assert ds.image_ids == [1, 3, 5] and len(ds) == 3 and ds.has_masks
    image, t = ds[0]
    pixels = np.array(Image.open(coco_dir / "images" / "a.png"))
    assert image.dtype == torch.float32 and image.shape == (3, 10, 20)
    assert torch.allclose(image, torch.from_numpy(pixels).permute(2, 0, 1) / 255.0)
    assert t["image_id"] == 1
    assert t["boxes"].tolist() == [[2, 2, 8, 6], [10, 5, 15, 9], [17, 0, 20, 3]]
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    assert t["labels"].tolist() == [1, 2, 1] and t["iscrowd"].tolist() == [0, 0, 1]
    assert t["area"].tolist() == [24.0, 20.0, 9.0]  # 24: filled in from the 6 x 4 polygon mask
    masks = t["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (3, 10, 20)
    rect = np.zeros((10, 20), dtype=np.uint8)
    rect[2:6, 2:8] = 1  # polygon (2,2)-(8,6): 24 pixels
    assert int(masks[0].sum()) == 24 and np.array_equal(masks[0].numpy(), rect)
    assert np.array_equal(masks[1].numpy(), RLE_MASK) and np.array_equal(masks[2].numpy(), CROWD_MASK)
    # the degenerate-box image: the 2-point polygon adds nothing; the triangle covers 3 + 2 + 1 pixels
    _, t3 = ds[1]
    assert t3["boxes"].tolist() == [[3, 3, 3, 5]] and int(t3["masks"].sum()) == 6
    _, empty = ds[2]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 12, 16)
    assert empty["labels"].shape == (0,) and empty["image_id"] == 5
    # coco_gt is the validated dict, ready for pycocotools
    assert ds.coco_gt["annotations"][0]["area"] == 24.0 and ds.coco_gt["annotations"][3]["iscrowd"] == 0


def test_an_ignored_region_is_a_crowd_for_training_and_for_coco_ap(tmp_path: Path) -> None:
    """Detections only on the normal object: with the ignored object counted, recall stops at 1/2 (AP
    about 0.5); honoured as a crowd, AP is 1. pycocotools alone would overwrite ``ignore`` with
    ``iscrowd`` (0) and count it."""
    from bobench.dense.coco_eval import coco_metrics

    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 20}],
        "categories": [{"id": 1, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100.0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [25, 5, 10, 10], "area": 100.0, "ignore": 1},
        ],
    }
    _write_images(tmp_path / "images", coco)
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    ds = _load(tmp_path)
    assert ds[0][1]["iscrowd"].tolist() == [0, 1]
    ds.drop_crowd = True
    assert ds[0][1]["boxes"].tolist() == [[2, 2, 12, 12]]
    found = [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "score": 0.9}]
    assert coco_metrics(ds.coco_gt, found, iou_types=("bbox",))["box_AP"] == pytest.approx(1.0)
    assert coco_metrics(coco, found, iou_types=("bbox",))["box_AP"] == pytest.approx(0.5, abs=0.01)  # raw
    coco["annotations"][1]["ignore"] = 2
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match=r"annotation id 2: ignore 2 is not 0 or 1"):
        _load(tmp_path)


def test_drop_flags_and_collate(coco_dir: Path) -> None:
    ds = _load(coco_dir)
    ds.drop_degenerate, ds.drop_crowd = True, True
    assert ds[0][1]["iscrowd"].tolist() == [0, 0] and ds[1][1]["boxes"].shape == (0, 4)
    assert ds[1][1]["masks"].shape == (0, 8, 8)
    images, targets = collate_detection([ds[0], ds[2]])
    assert [i.shape[1:] for i in images] == [(10, 20), (12, 16)] and targets[1]["image_id"] == 5


def test_transforms_v2_flip_moves_boxes_and_masks(coco_dir: Path) -> None:
    from torchvision.transforms import v2

    plain = _load(coco_dir)[0]
    image, t = _load(coco_dir, transforms=v2.RandomHorizontalFlip(p=1.0))[0]
    assert (
        type(image) is torch.Tensor and type(t["boxes"]) is torch.Tensor and type(t["masks"]) is torch.Tensor
    )
    assert t["boxes"].tolist() == [[12, 2, 18, 6], [5, 5, 10, 9], [0, 0, 3, 3]]  # x -> 20 - x
    assert torch.equal(t["masks"], plain[1]["masks"].flip(-1)) and torch.equal(image, plain[0].flip(-1))
    for box, mask in zip(t["boxes"][:3], t["masks"], strict=True):
        ys, xs = np.nonzero(mask.numpy())
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_manifest_hash_follows_files_and_json(coco_dir: Path) -> None:
    first = _load(coco_dir).manifest_hash
    assert _load(coco_dir).manifest_hash == first and len(first) == 64
    os.utime(coco_dir / "images" / "c.png", ns=(1, 1))
    assert _load(coco_dir).manifest_hash != first


def _broken(coco_dir: Path, edit) -> str:
    coco = _coco()
    edit(coco)
    (coco_dir / "instances.json").write_text(json.dumps(coco))
    with pytest.raises(DatasetError) as info:
        _load(coco_dir)
    return str(info.value)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c["annotations"][1].pop("bbox"), ["annotation id 11", "missing key 'bbox'"]),
        (lambda c: c["annotations"][0].update(bbox=[1, 2, 3]), ["annotation id 10", "not 4 numbers"]),
        (lambda c: c["annotations"][0].update(bbox=[1, 2, -3, 4]), ["annotation id 10", "negative width"]),
        (lambda c: c["annotations"][2].update(category_id=99), ["annotation id 12", "category_id 99"]),
        (lambda c: c["annotations"][3].update(image_id=42), ["annotation id 13", "image_id 42"]),
        (lambda c: c["annotations"][0].update(segmentation=[[1, 2, 3]]), ["annotation id 10", "odd number"]),
        (lambda c: c["annotations"][1]["segmentation"].update(size=[5, 5]), ["annotation id 11", "RLE size"]),
        (lambda c: c["annotations"][2]["segmentation"]["counts"].append(4), ["annotation id 12", "summing"]),
        (lambda c: c["annotations"][0].pop("segmentation"), ["annotation id 10", "no segmentation"]),
        (lambda c: c["annotations"][3].update(id=10), ["annotation #3", "duplicate 'id'"]),
        (lambda c: c["images"][0].pop("file_name"), ["image #0 (id 1)", "missing key 'file_name'"]),
        (lambda c: c.pop("annotations"), ["has no 'annotations' list"]),
    ],
)
def test_malformed_json_names_file_annotation_and_problem(coco_dir: Path, edit, expected: list[str]) -> None:
    message = _broken(coco_dir, edit)
    assert str(coco_dir / "instances.json") in message
    for part in expected:
        assert part in message


def test_not_json_missing_image_and_bad_specs(coco_dir: Path) -> None:
    path = coco_dir / "instances.json"
    path.write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(DatasetError, match=r"instances\.json is not valid JSON \(line 3, column 19"):
        read_coco_json(path)
    path.write_text(json.dumps(_coco()))
    (coco_dir / "images" / "c.png").write_bytes(b"not an image")
    ds = _load(coco_dir)
    with pytest.raises(
        DatasetError, match=r"cannot read image .*c\.png.*remove the image and its annotations"
    ) as err:
        ds[ds.image_ids.index(3)]
    assert "skip_bad_images" not in str(err.value)  # the detection readers take no such option
    (coco_dir / "images" / "c.png").unlink()
    with pytest.raises(DatasetError, match=r"image id 3: file .*images/c\.png does not exist"):
        _load(coco_dir)
    with pytest.raises(
        DatasetError, match=r"unknown detection dataset 'cocjson:/x'.*cocojson.*coco:/path.*nuclei"
    ):
        load_detection_dataset("cocjson:/x")
    with pytest.raises(DatasetError, match=r"COCO root /nope does not exist; the COCO 2017 layout"):
        load_detection_dataset("coco:/nope")
    with pytest.raises(DatasetError, match="unknown option 'imgs'"):
        load_detection_dataset(f"cocojson:{path}?imgs=/x")
    with pytest.raises(DatasetError, match=r"declared as the 'val' split"):
        load_detection_dataset(f"cocojson:{path}?split=val", split="train")


def test_coco2017_layout(tmp_path: Path) -> None:
    coco = _coco()
    _write_images(tmp_path / "val2017", coco)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    ds = load_detection_dataset(f"coco:{tmp_path}", split="test")  # test -> val2017
    assert len(ds) == 3 and ds.kind == "coco" and ds.root == str(tmp_path / "val2017")
    with pytest.raises(DatasetError, match=r"instances_train2017\.json does not exist"):
        load_detection_dataset(f"coco:{tmp_path}", split="train")


def _sim10k(root: Path) -> None:
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for k in range(4):
        Image.new("RGB", (40, 30), (k * 40, 0, 0)).save(root / "JPEGImages" / f"{k}.jpg")
        (root / "Annotations" / f"{k}.xml").write_text(
            f"<annotation><filename>{k}.jpg</filename><size><width>40</width><height>30</height></size>"
            f"<object><name>car</name><bndbox><xmin>{k}</xmin><ymin>2</ymin><xmax>{k + 10}</xmax>"
            "<ymax>12</ymax></bndbox></object><object><name>person</name><bndbox><xmin>1</xmin>"
            "<ymin>1</ymin><xmax>5</xmax><ymax>9</ymax></bndbox></object>"
            "</annotation>"
        )


def test_sim10k_car_only_seeded_disjoint_splits(tmp_path: Path) -> None:
    _sim10k(tmp_path)
    spec = f"sim10k:{tmp_path}?val_fraction=0.25&test_fraction=0.25&seed=3"
    splits = {s: load_detection_dataset(spec, split=s) for s in ("train", "val", "test")}
    names = {s: [ds.coco_gt["images"][i - 1]["file_name"] for i in ds.image_ids] for s, ds in splits.items()}
    assert [len(names[s]) for s in ("train", "val", "test")] == [2, 1, 1]
    assert sorted(n for split in names.values() for n in split) == [f"JPEGImages/{k}.jpg" for k in range(4)]
    ds = splits["train"]
    assert ds.classes == ["car"] and ds.label_to_category == {1: 1} and not ds.has_masks
    image, t = ds[0]
    k = int(names["train"][0][len("JPEGImages/")])
    assert image.shape == (3, 30, 40) and "masks" not in t
    assert t["boxes"].tolist() == [[k, 2, k + 10, 12]] and t["labels"].tolist() == [1]  # person dropped
    assert load_detection_dataset(spec, split="val").manifest_hash == splits["val"].manifest_hash
    (tmp_path / "Annotations" / "0.xml").write_text("<annotation><object>")
    with pytest.raises(DatasetError, match=r"Annotations/0\.xml cannot be parsed"):
        load_detection_dataset(spec)


def test_cityscapes_cars_occlusion_and_crowd(tmp_path: Path) -> None:
    stem = "aachen_000000_000019"
    (tmp_path / "gtFine" / "val" / "aachen").mkdir(parents=True)
    (tmp_path / "leftImg8bit" / "val" / "aachen").mkdir(parents=True)
    Image.new("RGB", (32, 16)).save(tmp_path / "leftImg8bit" / "val" / "aachen" / f"{stem}_leftImg8bit.png")
    objects = [
        {"label": "car", "polygon": [[2, 2], [12, 2], [12, 10], [2, 10]]},  # 11 x 9 px with its edges
        {"label": "person", "polygon": [[8, 0], [14, 0], [14, 6], [8, 6]]},  # hides x 8..12, y 2..6
        {"label": "license plate", "polygon": [[3, 8], [6, 8], [6, 9], [3, 9]]},  # never hides anything
        {"label": "cargroup", "polygon": [[20, 4], [35, 4], [35, 12], [20, 12]]},  # clipped at x = 31
        {"label": "car", "polygon": [[24, 1], [26, 1], [26, 2], [24, 2]]},
        {"label": "building", "polygon": [[23, 0], [27, 0], [27, 3], [23, 3]]},  # hides that car entirely
    ]
    gt = {"imgHeight": 16, "imgWidth": 32, "objects": objects}
    (tmp_path / "gtFine" / "val" / "aachen" / f"{stem}_gtFine_polygons.json").write_text(json.dumps(gt))
    ds = load_detection_dataset(f"cityscapes:{tmp_path}", split="test")  # test -> val
    assert ds.classes == ["car"] and ds.label_to_category == {1: 1} and len(ds) == 1
    _, t = ds[0]
    assert t["labels"].tolist() == [1, 1] and t["iscrowd"].tolist() == [0, 1]
    assert t["area"].tolist() == [99 - 25, 12 * 9]  # the cargroup: x 20..31, y 4..12, nothing over it
    expected = np.zeros((16, 32), dtype=np.uint8)
    expected[2:11, 2:13] = 1
    expected[2:7, 8:13] = 0
    assert np.array_equal(t["masks"][0].numpy(), expected)
    crowd = np.zeros((16, 32), dtype=np.uint8)
    crowd[4:13, 20:32] = 1
    assert np.array_equal(t["masks"][1].numpy(), crowd)
    assert t["boxes"].tolist() == [[2, 2, 13, 11], [20, 4, 32, 13]]
    with pytest.raises(DatasetError, match=r"Cityscapes annotations folder .*gtFine/train does not exist"):
        load_detection_dataset(f"cityscapes:{tmp_path}", split="train")


def test_cityscapes_conversion_is_cached_and_an_edited_file_misses(tmp_path: Path) -> None:
    from bobench.data.dense_readers import cityscapes_coco

    folder = tmp_path / "gtFine" / "val" / "bonn"
    folder.mkdir(parents=True)
    (tmp_path / "leftImg8bit" / "val" / "bonn").mkdir(parents=True)
    polygons = folder / "bonn_000000_000019_gtFine_polygons.json"
    car = {"label": "car", "polygon": [[2, 2], [12, 2], [12, 10], [2, 10]]}
    polygons.write_text(json.dumps({"imgHeight": 16, "imgWidth": 32, "objects": [car]}))
    first = cityscapes_coco(str(tmp_path), "val")
    entries = list((Path(os.environ["BOBENCH_CACHE"]) / "datasets" / "cityscapes-coco").glob("val-*.json"))
    assert len(entries) == 1 and json.loads(entries[0].read_text()) == first
    assert (
        cityscapes_coco(str(tmp_path), "val") == first == cityscapes_coco(str(tmp_path), "val", cache=False)
    )
    # the same path rewritten (size and mtime change): converted again, never served stale
    car["polygon"] = [[2, 2], [6, 2], [6, 4], [2, 4]]
    polygons.write_text(json.dumps({"imgHeight": 16, "imgWidth": 32, "objects": [car]}))
    again = cityscapes_coco(str(tmp_path), "val")
    assert again["annotations"][0]["area"] == 15 != first["annotations"][0]["area"]
    # a damaged entry is rebuilt, not trusted
    for entry in (Path(os.environ["BOBENCH_CACHE"]) / "datasets" / "cityscapes-coco").glob("val-*.json"):
        entry.write_text("{not json")
    assert cityscapes_coco(str(tmp_path), "val") == again


def _item_arrays(ds: DetectionDataset, i: int) -> tuple[np.ndarray, list[int], np.ndarray, list]:
    image, t = ds[i]
    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return pixels, t["labels"].tolist(), t["masks"].numpy(), t["boxes"].tolist()


@pytest.mark.parametrize(("name", "builder"), [("nuclei", build_nuclei), ("mnist-det", build_mnist_det)])
def test_embedded_dense_sets(name: str, builder, tmp_path: Path) -> None:
    info = DENSE_CATALOG[name]
    built = builder()
    seen: dict[bytes, str] = {}
    for split in ("train", "val", "test"):
        ds = load_detection_dataset(name, split=split)
        assert len(ds) == info.split_sizes[split] == len(built[split]) and ds.classes == list(info.classes)
        for i in range(len(ds)):
            pixels, labels, masks, boxes = _item_arrays(ds, i)
            image, instances = built[split][i]  # the json + PNG read back == what was built
            assert np.array_equal(pixels, image) and labels == [label for label, _ in instances]
            assert np.array_equal(masks, np.stack([m for _, m in instances]).reshape(masks.shape))
            assert len(labels) >= 1
            for box, mask in zip(boxes, masks, strict=True):
                ys, xs = np.nonzero(mask)
                assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert seen.setdefault(pixels.tobytes(), split) == split  # no image shared across splits
    # deterministic: a second build elsewhere writes the same json and pixels
    again = write_embedded(name, tmp_path / "again")
    first = Path(os.environ["BOBENCH_CACHE"]) / "datasets" / f"{name}-v{info.version}"
    for split in ("train", "val", "test"):
        assert (again / "annotations" / f"{split}.json").read_bytes() == (
            first / "annotations" / f"{split}.json"
        ).read_bytes()
    for png in sorted((first / "images").rglob("*.png"))[::7]:
        assert np.array_equal(
            np.asarray(Image.open(png)), np.asarray(Image.open(again / png.relative_to(first)))
        )


def test_nuclei_masks_are_the_annotated_label_image() -> None:
    import importlib.util

    import tifffile

    folder = Path(importlib.util.find_spec("stardist").submodule_search_locations[0]) / "data" / "images"
    labels = tifffile.imread(folder / "mask2d.tif")
    assert len(np.unique(labels)) - 1 == 125
    ds = load_detection_dataset("nuclei", split="val")  # the val band starts at row 256; tile 1 at x = 64
    _, t = ds[1]
    tile = labels[256:384, 64:192]
    ids = [v for v in np.unique(tile) if v and (tile == v).sum() >= 16]
    assert t["masks"].shape[0] == len(ids) > 5
    assert np.array_equal(t["masks"].numpy(), np.stack([(tile == v) for v in ids]).astype(np.uint8))
