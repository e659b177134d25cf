"""Semantic segmentation data: the ADE20K, VOC (+ SBD), Cityscapes and segfolder readers, and the embedded
sets. Every tree is written by hand in ``tmp_path`` (a few images of 8-32 px) and every expected mask is
the hand-set one, mapped by hand.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
import torch
from PIL import Image

from bobench.data import (
    DatasetError,
    SegmentationDataset,
    list_segmentation_datasets,
    load_segmentation_dataset,
)
from bobench.data.dense_embedded import DENSE_CATALOG
from bobench.data.seg_files import SEG_CATALOG, write_segmentation_embedded

SRC = Path(__file__).resolve().parents[1] / "src"


def _image(path: Path, height: int, width: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _mask(path: Path, values: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(values, dtype=np.uint8))
    if palette:  # VOC's PNGs: index k drawn in colour (k, 255 - k, 7): reading RGB would give other values
        img = img.convert("P")
        img.putpalette([c for k in range(256) for c in (k, 255 - k, 7)])
    img.save(path)


def _masks(ds: SegmentationDataset) -> list[list[list[int]]]:
    return [ds[i][1].tolist() for i in range(len(ds))]


# ---------------------------------------------------------------- ADE20K


def _ade(root: Path) -> Path:
    ade = root / "ADEChallengeData2016"
    raw = {
        ("training", "ADE_train_00000002"): [[0, 1, 150], [2, 0, 5]],
        ("training", "ADE_train_00000001"): [[3, 3, 3], [0, 0, 0]],
        ("validation", "ADE_val_00000001"): [[1, 0, 0], [0, 0, 150]],
    }
    for (folder, stem), values in raw.items():
        _image(ade / "images" / folder / f"{stem}.jpg", 2, 3)
        _mask(ade / "annotations" / folder / f"{stem}.png", np.array(values))
    return ade


def test_ade20k_reduce_zero_label_and_splits(tmp_path: Path) -> None:
    ade = _ade(tmp_path)
    ds = load_segmentation_dataset(f"ade20k:{tmp_path}", split="train")  # a folder holding the layout
    assert ds.kind == "ade20k" and ds.n_classes == 150 and ds.ignore_index == 255
    assert ds.classes[:3] == ["wall", "building", "sky"] and ds.classes[-1] == "flag"
    assert ds.names == ["ADE_train_00000001", "ADE_train_00000002"]  # sorted
    image, mask = ds[1]
    assert image.dtype == torch.float32 and image.shape == (3, 2, 3) and 0 <= image.min() <= image.max() <= 1
    assert mask.dtype == torch.int64 and mask.tolist() == [[255, 0, 149], [1, 255, 4]]  # 0 -> 255, k -> k-1
    assert ds[0][1].tolist() == [[2, 2, 2], [255, 255, 255]]
    test = load_segmentation_dataset(f"ade20k:{ade}", split="test")  # the folder itself; test -> validation
    assert test.names == ["ADE_val_00000001"] and _masks(test) == [[[0, 255, 255], [255, 255, 149]]]
    assert test.split == "test" and "validation" in test.source
    with pytest.raises(DatasetError, match=r"ade20k has no val split.*validation.*hold a val split out"):
        load_segmentation_dataset(f"ade20k:{ade}", split="val")
    _mask(ade / "annotations" / "training" / "ADE_train_00000001.png", np.array([[3, 151, 3], [0, 0, 0]]))
    bad = load_segmentation_dataset(f"ade20k:{ade}")
    with pytest.raises(DatasetError) as info:
        bad[0]
    message = str(info.value)
    assert "ADE_train_00000001.png holds value 151 (row 0, column 1)" in message and "1..150" in message


# ---------------------------------------------------------------- VOC and SBD

VOC_MASKS = {
    "2007_000032": [[0, 1, 255], [15, 15, 255]],
    "2007_000039": [[20, 0, 0], [0, 255, 0]],
    "2007_000063": [[7, 7, 0], [0, 0, 0]],
}


def _voc(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000039\n2007_000032\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000063\n")
    for k, (name, values) in enumerate(VOC_MASKS.items()):
        _image(voc / "JPEGImages" / f"{name}.jpg", 2, 3, seed=k)
        _mask(voc / "SegmentationClass" / f"{name}.png", np.array(values), palette=True)
    return voc


def test_voc_palette_masks_are_read_by_index(tmp_path: Path) -> None:
    voc = _voc(tmp_path)
    assert Image.open(voc / "SegmentationClass" / "2007_000032.png").mode == "P"
    ds = load_segmentation_dataset(f"voc:{tmp_path}")  # a folder holding VOCdevkit/VOC2012
    assert ds.n_classes == 21 and ds.classes[0] == "background" and ds.classes[15] == "person"
    assert ds.names == ["2007_000032", "2007_000039"]
    assert _masks(ds) == [VOC_MASKS["2007_000032"], VOC_MASKS["2007_000039"]]  # 255 border kept
    test = load_segmentation_dataset(f"voc:{voc}", split="test")  # test -> val.txt
    assert test.names == ["2007_000063"] and _masks(test) == [VOC_MASKS["2007_000063"]]
    with pytest.raises(DatasetError, match=r"voc has no val split"):
        load_segmentation_dataset(f"voc:{voc}", split="val")
    _mask(voc / "SegmentationClass" / "2007_000063.png", np.array([[7, 21, 0], [0, 0, 0]]), palette=True)
    with pytest.raises(DatasetError, match=r"2007_000063\.png holds value 21 \(row 0, column 1\).*0\.\.20"):
        test[0]


def _sbd_mat(path: Path, values: list[list[int]]) -> None:
    """A ``cls/*.mat`` in SBD's structure: a GTcls struct of Boundaries (a cell of sparse maps per
    class), Segmentation (uint8 class indices, no border) and CategoriesPresent."""
    seg = np.array(values, dtype=np.uint8)
    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        boundaries[k, 0] = scipy.sparse.csc_matrix(seg.shape, dtype=bool)
    present = np.unique(seg[seg > 0]).astype(np.uint8).reshape(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    gt = {"Boundaries": boundaries, "Segmentation": seg, "CategoriesPresent": present}
    scipy.io.savemat(path, {"GTcls": gt})


def test_voc_with_sbd_is_trainaug_minus_val(tmp_path: Path) -> None:
    voc = _voc(tmp_path)
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    _sbd_mat(sbd / "cls" / "2007_000032.mat", [[0, 0, 0], [0, 0, 0]])  # a VOC train id: VOC's mask wins
    _sbd_mat(sbd / "cls" / "2007_000063.mat", [[7, 7, 7], [7, 7, 7]])  # a VOC val id: never in train
    _sbd_mat(sbd / "cls" / "2008_000002.mat", [[0, 12, 12], [3, 0, 0]])  # its jpg is in VOC's JPEGImages
    _sbd_mat(sbd / "cls" / "2011_003276.mat", [[19, 0, 0], [0, 0, 19]])  # its jpg only in SBD's img/
    _image(voc / "JPEGImages" / "2008_000002.jpg", 2, 3)
    _image(sbd / "img" / "2011_003276.jpg", 2, 3)
    ds = load_segmentation_dataset(f"voc:{voc}?sbd={tmp_path / 'benchmark_RELEASE'}")
    assert ds.names == ["2007_000032", "2007_000039", "2008_000002", "2011_003276"]
    assert _masks(ds) == [
        VOC_MASKS["2007_000032"], VOC_MASKS["2007_000039"], [[0, 12, 12], [3, 0, 0]], [[19, 0, 0], [0, 0, 19]]
    ]  # fmt: skip
    paths = [ds.paths(i) for i in range(len(ds))]
    assert paths[0][1].endswith("SegmentationClass/2007_000032.png") and paths[2][1].endswith(
        "2008_000002.mat"
    )
    assert paths[2][0] == str(voc / "JPEGImages" / "2008_000002.jpg")
    assert paths[3][0] == str(sbd / "img" / "2011_003276.jpg")
    assert "SBD" in ds.source and ds.manifest_hash != load_segmentation_dataset(f"voc:{voc}").manifest_hash
    assert len(load_segmentation_dataset(f"voc:{voc}?sbd={sbd}", split="test")) == 1  # SBD only adds to train
    with pytest.raises(DatasetError, match=r"SBD folder .*nope/cls does not exist; give sbd="):
        load_segmentation_dataset(f"voc:{voc}?sbd={tmp_path / 'nope'}")


# ---------------------------------------------------------------- Cityscapes


def test_cityscapes_label_ids_to_train_ids(tmp_path: Path) -> None:
    stems = {("train", "aachen", "aachen_000000_000019"): [[7, 8, 11, 12], [13, 17, 19, 20]],
             ("train", "bonn", "bonn_000001_000019"): [[21, 22, 23, 24], [25, 26, 27, 28]],
             ("val", "lindau", "lindau_000000_000019"): [[31, 32, 33, 0], [4, 6, 9, 34]]}  # fmt: skip
    for (split, city, stem), values in stems.items():
        _image(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", 2, 4)
        _mask(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", np.array(values))
    ds = load_segmentation_dataset(f"cityscapes-seg:{tmp_path}")
    assert ds.classes[:3] == ["road", "sidewalk", "building"] and ds.n_classes == 19
    assert ds.names == ["aachen/aachen_000000_000019", "bonn/bonn_000001_000019"]
    assert _masks(ds) == [[[0, 1, 2, 3], [4, 5, 6, 7]], [[8, 9, 10, 11], [12, 13, 14, 15]]]
    test = load_segmentation_dataset(f"cityscapes-seg:{tmp_path}", split="test")  # test -> val
    assert _masks(test) == [[[16, 17, 18, 255], [255, 255, 255, 255]]]  # unlisted ids 0, 4, 6, 9, 34 -> 255
    with pytest.raises(DatasetError, match=r"cityscapes-seg has no val split"):
        load_segmentation_dataset(f"cityscapes-seg:{tmp_path}", split="val")
    with pytest.raises(
        DatasetError, match=r"Cityscapes annotations folder /nope/gtFine/train does not exist; "
    ):
        load_segmentation_dataset("cityscapes-seg:/nope")


# ---------------------------------------------------------------- segfolder: errors, hash, transforms


def _folder(root: Path) -> Path:
    (root / "classes.txt").write_text("background\nroad\ncar\n")
    _image(root / "images" / "train" / "a.jpg", 8, 12, seed=1)
    _mask(root / "masks" / "train" / "a.png", np.arange(96).reshape(8, 12) % 3)
    _image(root / "images" / "train" / "sub" / "b.png", 8, 12, seed=2)
    values = np.zeros((8, 12), dtype=np.uint8)
    values[:, 9:] = 255
    _mask(root / "masks" / "train" / "sub" / "b.png", values)
    return root


def test_segfolder_layout_classes_and_missing_split(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    ds = load_segmentation_dataset(f"segfolder:{root}")
    assert ds.classes == ["background", "road", "car"] and ds.names == ["a", "sub/b"]
    assert ds[0][1].tolist() == (np.arange(96).reshape(8, 12) % 3).tolist()
    assert ds[1][1][:, 9:].eq(255).all() and ds[1][1][:, :9].eq(0).all()
    named = load_segmentation_dataset(f"segfolder:{root}?classes=bg,road,car")
    assert named.classes == ["bg", "road", "car"] and named.manifest_hash != ds.manifest_hash
    with pytest.raises(
        DatasetError, match=r"segfolder val folder .*images/val does not exist; a segfolder is"
    ):
        load_segmentation_dataset(f"segfolder:{root}", split="val")
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetError, match=r"has no classes\.txt"):
        load_segmentation_dataset(f"segfolder:{root}")
    clone = pickle.loads(pickle.dumps(named))  # DataLoader workers get a pickled copy
    assert clone.manifest_hash == named.manifest_hash and torch.equal(clone[1][1], named[1][1])


def test_manifest_hash_follows_mask_files(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    first = load_segmentation_dataset(f"segfolder:{root}").manifest_hash
    assert load_segmentation_dataset(f"segfolder:{root}").manifest_hash == first and len(first) == 64
    mask = root / "masks" / "train" / "a.png"
    _mask(mask, np.ones((8, 12)))
    os.utime(mask, ns=(1, 1))
    edited = load_segmentation_dataset(f"segfolder:{root}").manifest_hash
    assert edited != first
    os.utime(mask, ns=(2, 2))  # touched only
    assert load_segmentation_dataset(f"segfolder:{root}").manifest_hash not in (first, edited)


def test_bad_masks_name_the_file_and_the_value(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    mask = root / "masks" / "train" / "sub" / "b.png"
    _mask(mask, np.pad(np.full((8, 12), 2), ((0, 0), (0, 1))))  # 13 px wide: not its image's size
    ds = load_segmentation_dataset(f"segfolder:{root}")  # sizes are not checked at load by default
    with pytest.raises(
        DatasetError, match=r"mask .*sub/b\.png is 13x8 px but its image .*sub/b\.png is 12x8"
    ):
        ds[1]
    with pytest.raises(DatasetError, match=r"sub/b\.png is 13x8 px"):
        load_segmentation_dataset(f"segfolder:{root}?check_sizes=true")
    values = np.zeros((8, 12), dtype=np.uint8)
    values[5, 7] = 3  # one class too many; 255 elsewhere would be fine
    _mask(mask, values)
    with pytest.raises(DatasetError) as info:
        ds[1]
    assert f"mask {mask} holds value 3 (row 5, column 7)" in str(info.value)
    assert "neither a class index 0..2 nor the ignore value 255" in str(info.value)
    Image.new("RGB", (12, 8)).save(mask)
    with pytest.raises(DatasetError, match=r"b\.png is a RGB image; a mask is a single-channel PNG"):
        ds[1]
    mask.unlink()
    with pytest.raises(DatasetError, match=r"mask .*sub/b\.png of item 'sub/b' does not exist"):
        load_segmentation_dataset(f"segfolder:{root}")


def test_spec_errors_suggest_and_name_the_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"unknown segmentation dataset 'ade2k:/x'\. Did you mean: ade20k"):
        load_segmentation_dataset("ade2k:/x")
    with pytest.raises(DatasetError, match=r"Did you mean: cityscapes-seg"):
        load_segmentation_dataset("cityscapes:/x")  # the detection scheme
    with pytest.raises(DatasetError, match=r"Did you mean: mnist-seg"):
        load_segmentation_dataset("mnist-sge")
    with pytest.raises(DatasetError, match=r"unknown option 'sdb'\. Did you mean: sbd\?"):
        load_segmentation_dataset("voc:/x?sdb=/y")
    with pytest.raises(DatasetError, match=r"ADE20K root /nope does not exist; ADE20K's layout is"):
        load_segmentation_dataset("ade20k:/nope")
    with pytest.raises(DatasetError, match=r"VOC root /nope does not exist; VOC's layout is VOC2012/"):
        load_segmentation_dataset("voc:/nope", split="test")
    with pytest.raises(DatasetError, match=r"VOC list .*/ImageSets/Segmentation/val\.txt does not exist"):
        load_segmentation_dataset(f"voc:{tmp_path}", split="test")  # a root without the lists
    with pytest.raises(DatasetError, match=r"check_sizes='maybe' is not true or false"):
        load_segmentation_dataset(f"segfolder:{tmp_path}?check_sizes=maybe")
    with pytest.raises(DatasetError, match=r"unknown split 'tset'\. Did you mean: test"):
        load_segmentation_dataset("mnist-seg", split="tset")


def test_transforms_v2_move_the_mask_with_the_image(tmp_path: Path) -> None:
    from torchvision.transforms import v2

    root = _folder(tmp_path)
    plain = load_segmentation_dataset(f"segfolder:{root}")[0]
    image, mask = load_segmentation_dataset(f"segfolder:{root}", transforms=v2.RandomHorizontalFlip(p=1.0))[0]
    assert type(image) is torch.Tensor and type(mask) is torch.Tensor and mask.dtype == torch.int64
    assert torch.equal(mask, plain[1].flip(-1)) and torch.equal(image, plain[0].flip(-1))
    crop = v2.RandomResizedCrop((24, 24), scale=(0.5, 1.0), antialias=True)
    torch.manual_seed(0)
    image, mask = load_segmentation_dataset(f"segfolder:{root}", transforms=crop)[1]
    assert image.shape == (3, 24, 24) and mask.shape == (24, 24)
    assert set(mask.unique().tolist()) <= {0, 255}  # nearest: no blended label values
    image, mask = load_segmentation_dataset(f"segfolder:{root}", transforms=v2.Resize((16, 24)))[1]
    expected = torch.zeros((16, 24), dtype=torch.int64)
    expected[:, 18:] = 255  # columns 9..11 of 12, doubled
    assert image.shape == (3, 16, 24) and torch.equal(mask, expected)


# ---------------------------------------------------------------- embedded sets


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("seg-cache")  # built once for the module's embedded tests


@pytest.mark.parametrize("name", ["mnist-seg", "nuclei-seg"])
def test_embedded_masks_are_the_union_of_the_instance_masks(
    name: str, shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bobench.data import load_detection_dataset

    monkeypatch.setenv("BOBENCH_CACHE", str(shared_cache))
    info = SEG_CATALOG[name]
    dense_name, dense_version = info.derived_from
    assert DENSE_CATALOG[dense_name].version == dense_version  # bump this set's version with its source's
    for split in ("train", "val", "test"):
        ds = load_segmentation_dataset(name, split=split)
        dense = load_detection_dataset(dense_name, split=split)
        assert len(ds) == len(dense) == info.split_sizes[split] and ds.classes == list(info.classes)
        assert ds.kind == f"embedded:{name}" and ds.split == split
        for i in range(len(ds)):
            image, mask = ds[i]
            dense_image, target = dense[i]
            union = torch.zeros(mask.shape, dtype=torch.int64)
            for label, instance in zip(target["labels"], target["masks"], strict=True):
                union[instance.bool()] = label  # COCO category id == class index (0 is background)
            assert torch.equal(mask, union) and torch.equal(image, dense_image)
            assert image.shape[-1] == info.image_size
    rows = {row["name"]: row for row in list_segmentation_datasets()}
    assert rows[name]["n_classes"] == len(info.classes) and rows[name]["split_sizes"] == info.split_sizes
    assert set(rows[name]) >= {
        "name",
        "description",
        "n_classes",
        "split_sizes",
        "image_size",
        "source",
        "license",
    }


def test_embedded_hash_is_the_same_for_a_second_build(
    shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hash comes from the pixels, not the files' times: a set built elsewhere hashes the same."""
    monkeypatch.setenv("BOBENCH_CACHE", str(shared_cache))
    first = load_segmentation_dataset("nuclei-seg", split="val")
    assert first.names[:2] == ["00000", "00001"] and first.classes == ["background", "nucleus"]
    monkeypatch.setenv("BOBENCH_CACHE", str(shared_cache / "elsewhere"))
    again = load_segmentation_dataset("nuclei-seg", split="val")
    assert again.paths(0)[0] != first.paths(0)[0] and again.manifest_hash == first.manifest_hash
    assert (
        Path(write_segmentation_embedded("nuclei-seg")) / "classes.txt"
    ).read_text() == "background\nnucleus\n"


def test_list_segmentation_datasets_imports_no_torch() -> None:
    code = (
        "import sys, bobench.data\n"
        "rows = bobench.data.list_segmentation_datasets()\n"
        "heavy = [m for m in ('torch', 'PIL', 'scipy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(sorted(r['name'] for r in rows))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['mnist-seg', 'nuclei-seg']"
