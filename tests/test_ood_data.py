"""OOD datasets: readers for published layouts (tiny fake releases) and corrupted patches13."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bobench.data import DatasetError, DatasetSpec, load_dataset
from bobench.data.corruptions import BLUR_SIGMA, KINDS, NOISE_STD, apply
from bobench.data.embedded import CATALOG, build_embedded
from bobench.data.objectnet import read_objectnet
from bobench.data.ood_readers import (
    VISDA_CLASSES,
    imagenet_a_wnids,
    imagenet_r_wnids,
    imagenet_wnids,
    read_visda,
)

# load_dataset("patches13", split="test").manifest_hash, computed before the corrupted variants were
# added: adding datasets to the catalog must not change an existing dataset's content or hash.
PATCHES13_TEST_HASH = "797af258161b8238c473e6898ce51c5361d43be927b3c4c1e68c42f3d3009d82"


def image(path: Path, size: tuple[int, int] = (8, 6), color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def files(root: Path, folders: dict[str, int], ext: str = ".jpg") -> None:
    """``root/<folder>/<i><ext>`` for each folder: count pair (one real image, copied)."""
    template = image(root.parent / f"_template{ext}")
    for folder, count in folders.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shutil.copyfile(template, root / folder / f"{i}{ext}")


# ------------------------------------------------------------------------------------- ImageNet family


def test_class_lists_come_from_timm() -> None:
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids) and wnids[0] == "n01440764"
    for subset in (imagenet_a_wnids(), imagenet_r_wnids()):
        assert len(subset) == len(set(subset)) == 200 and set(subset) <= set(wnids)


def test_imagenet_v2_maps_index_folders_to_wnids(tmp_path: Path) -> None:
    release = tmp_path / "imagenetv2-matched-frequency-format-val"
    files(release, {"0": 2, "1": 3, "999": 1}, ext=".jpeg")
    ds = load_dataset(f"imagenet-v2:{tmp_path}", "test")  # the parent of the one release folder
    wnids = imagenet_wnids()
    assert ds.classes == list(wnids) and len(ds) == 6
    assert [ds.classes[t] for t in ds.targets] == [wnids[0]] * 2 + [wnids[1]] * 3 + [wnids[999]]
    assert load_dataset(f"imagenet-v2:{release}", "test").manifest_hash == ds.manifest_hash
    with pytest.raises(DatasetError, match=r"test-only OOD set.*'train'"):
        load_dataset(f"imagenet-v2:{release}", "train")
    (release / "1000").mkdir()
    image(release / "1000" / "x.jpeg")
    with pytest.raises(DatasetError, match="1000 is not a class"):
        load_dataset(f"imagenet-v2:{release}", "test")
    shutil.rmtree(release / "1000")
    files(tmp_path / "imagenetv2-top-images-format-val", {"5": 1})
    with pytest.raises(DatasetError, match=r"several.*pick one"):
        load_dataset(f"imagenet-v2:{tmp_path}", "test")


def test_imagenet_sketch(tmp_path: Path) -> None:
    wnids = imagenet_wnids()
    files(tmp_path / "sketch", {wnids[3]: 2, wnids[10]: 1}, ext=".JPEG")
    ds = load_dataset(f"imagenet-sketch:{tmp_path}", "test")
    assert ds.classes == list(wnids) and ds.targets.tolist() == [3, 3, 10]
    assert load_dataset(f"imagenet-sketch:{tmp_path / 'sketch'}", "test").manifest_hash == ds.manifest_hash
    (tmp_path / "sketch" / "n99999999").mkdir()
    with pytest.raises(DatasetError, match="n99999999 is not a class"):
        load_dataset(f"imagenet-sketch:{tmp_path}", "test")
    with pytest.raises(DatasetError, match="test-only"):
        load_dataset(f"imagenet-sketch:{tmp_path}", "val")


@pytest.mark.parametrize(
    ("kind", "wnids"), [("imagenet-a", imagenet_a_wnids), ("imagenet-r", imagenet_r_wnids)]
)
def test_imagenet_a_r(tmp_path: Path, kind: str, wnids) -> None:
    classes = wnids()
    files(tmp_path / "release", {classes[0]: 2, classes[199]: 1})
    (tmp_path / "release" / "README.txt").write_text("ignored")
    ds = load_dataset(f"{kind}:{tmp_path / 'release'}", "test")
    assert ds.classes == list(classes) and len(ds.classes) == 200
    assert [ds.classes[t] for t in ds.targets] == [classes[0]] * 2 + [classes[199]]
    outside = next(w for w in imagenet_wnids() if w not in classes)  # an ImageNet class not in the 200
    files(tmp_path / "release", {outside: 1})
    with pytest.raises(DatasetError, match=f"{outside} is not a class"):
        load_dataset(f"{kind}:{tmp_path / 'release'}", "test")
    shutil.rmtree(tmp_path / "release" / outside)
    (tmp_path / "release" / classes[5]).mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        load_dataset(f"{kind}:{tmp_path / 'release'}", "test")


# ------------------------------------------------------------------------------------------ ObjectNet


def objectnet_release(root: Path, with_pytorch_map: bool) -> None:
    """Three ObjectNet classes: two overlap ImageNet (one maps to two classes), one does not."""
    wnids = imagenet_wnids()
    for folder, n in (("alarm_clock", 2), ("banana", 1), ("bathtub_x", 1)):
        for i in range(n):
            image(root / "images" / folder / f"{i}.png", size=(10, 7))
    names = [f"imagenet class {i}" for i in range(1000)]
    names[409], names[530], names[954] = "analog clock", "digital clock", "banana"
    line_of = {i: 999 - i for i in range(1000)} if with_pytorch_map else {i: i for i in range(1000)}
    lines = [""] * 1000
    for index, line in line_of.items():
        lines[line] = names[index]
    mappings = root / "mappings"
    mappings.mkdir(parents=True)
    (mappings / "imagenet_to_label_2012_v2").write_text("\n".join(lines) + "\n")
    if with_pytorch_map:
        (mappings / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps(line_of))
    labels = {"alarm_clock": "Alarm clock", "banana": "Banana", "bathtub_x": "Bathtub"}
    (mappings / "folder_to_objectnet_label.json").write_text(json.dumps(labels))
    overlap = {"Alarm clock": "analog clock; digital clock", "Banana": "banana", "Tie": "imagenet class 3"}
    (mappings / "objectnet_to_imagenet_1k.json").write_text(json.dumps(overlap))
    assert wnids[409] != wnids[530]


@pytest.mark.parametrize("with_pytorch_map", [False, True])
def test_objectnet_overlap_and_mapping(tmp_path: Path, with_pytorch_map: bool) -> None:
    objectnet_release(tmp_path / "objectnet-1.0", with_pytorch_map)
    wnids = imagenet_wnids()
    clock, clock2, banana = wnids[409], wnids[530], wnids[954]
    ds = load_dataset(f"objectnet:{tmp_path}", "test")  # the parent of objectnet-1.0/
    assert ds.classes == [clock, clock2, banana]  # mapped wnids, standard order; bathtub dropped
    assert [ds.classes[t] for t in ds.targets] == [clock, clock, banana]  # first mapped wnid
    assert ds.extras["objectnet_to_imagenet"] == {"alarm_clock": [clock, clock2], "banana": [banana]}
    assert ds.extras["label_sets"] == {clock: [clock, clock2], banana: [banana]}
    assert ds.load_image(0).size == (8, 5)  # the 1 px border is cropped
    items = read_objectnet(DatasetSpec.parse(f"objectnet:{tmp_path / 'objectnet-1.0'}"), "test")
    assert items.boxes.tolist() == [[1, 1, 9, 6]] * 3
    with pytest.raises(DatasetError, match="test-only"):
        load_dataset(f"objectnet:{tmp_path}", "train")


def test_objectnet_errors(tmp_path: Path) -> None:
    root = tmp_path / "objectnet-1.0"
    objectnet_release(root, with_pytorch_map=False)
    mappings = root / "mappings"
    overlap = json.loads((mappings / "objectnet_to_imagenet_1k.json").read_text())
    (mappings / "objectnet_to_imagenet_1k.json").write_text(json.dumps({**overlap, "Banana": "bananas"}))
    with pytest.raises(DatasetError, match="'bananas' is not a line"):
        load_dataset(f"objectnet:{root}", "test")
    image(root / "images" / "mystery" / "0.png")
    (mappings / "objectnet_to_imagenet_1k.json").unlink()
    with pytest.raises(DatasetError, match=r"lacks objectnet_to_imagenet_1k.json.*imagenet_to_label_2012_v2"):
        load_dataset(f"objectnet:{root}", "test")
    (mappings / "objectnet_to_imagenet_1k.json").write_text(json.dumps(overlap))
    with pytest.raises(DatasetError, match=r"mystery is not in folder_to_objectnet_label.json"):
        load_dataset(f"objectnet:{root}", "test")


# -------------------------------------------------------------------------------------------- VisDA


def visda_release(root: Path, per_class: int = 5) -> None:
    template = image(root / "_template.png")
    for sub, tag in (("train", "src"), ("validation", "real")):
        lines = []
        for label, name in enumerate(VISDA_CLASSES):
            (root / sub / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class if sub == "train" else 2):
                rel = f"{name}/{tag}_{i}.png"
                shutil.copyfile(template, root / sub / rel)
                lines.append(f"{rel} {label}")
        (root / sub / "image_list.txt").write_text("\n".join(lines) + "\n")


def test_visda_domains_and_seeded_split(tmp_path: Path) -> None:
    visda_release(tmp_path)
    spec = DatasetSpec.parse(f"visda:{tmp_path}?val_fraction=0.2&test_fraction=0.2&seed=3")
    parts = {s: read_visda(spec, s) for s in ("train", "val", "test")}
    assert [len(p.paths) for p in parts.values()] == [36, 12, 12]
    assert len({path for p in parts.values() for path in p.paths}) == 60  # disjoint, complete
    assert parts["test"].classes == list(VISDA_CLASSES)
    assert all(p.paths[0].startswith("train/") for p in parts.values())
    for p in parts.values():  # every label matches its class folder
        assert all(path.split("/")[1] == VISDA_CLASSES[t] for path, t in zip(p.paths, p.targets, strict=True))
    assert read_visda(spec, "test").paths == parts["test"].paths  # reproducible
    other = read_visda(
        DatasetSpec.parse(f"visda:{tmp_path}?val_fraction=0.2&test_fraction=0.2&seed=4"), "test"
    )
    assert other.paths != parts["test"].paths and parts["test"].split_params["seed"] == 3

    real = load_dataset(f"visda:{tmp_path}?domain=real", "test")
    assert len(real) == 24 and real.classes == list(VISDA_CLASSES)
    assert real.load_image(0).size == (8, 6)
    with pytest.raises(DatasetError, match=r"domain=real.*test-only.*'train'"):
        load_dataset(f"visda:{tmp_path}?domain=real", "train")
    with pytest.raises(DatasetError, match="domain='sim' is unknown"):
        load_dataset(f"visda:{tmp_path}?domain=sim", "test")
    assert len(load_dataset(f"visda:{tmp_path}", "train")) == 36  # default: synthetic, 0.1/0.2


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("car/x.png", "line 3: expected '<relative path> <label>'"),
        ("car/x.png 12", "line 3: label '12' is not an integer"),
        ("../car/x.png 3", "line 3: path '../car/x.png' must be relative"),
        ("car/x.png 4", "line 3: path 'car/x.png' is in folder 'car' but label 4 is 'horse'"),
    ],
)
def test_visda_malformed_line(tmp_path: Path, line: str, match: str) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "image_list.txt").write_text(f"bus/a.png 2\n\n{line}\n")
    with pytest.raises(DatasetError, match=match) as info:
        read_visda(DatasetSpec.parse(f"visda:{tmp_path}"), "train")
    assert str(tmp_path / "train" / "image_list.txt") in str(info.value)


def test_visda_missing_list(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"validation/image_list.txt does not exist"):
        load_dataset(f"visda:{tmp_path}?domain=real", "test")


# ------------------------------------------------------------------------------- corrupted patches13


def _high_frequency_energy(images: np.ndarray) -> float:
    x = images.astype(np.float64)
    return float(np.mean(np.diff(x, axis=1) ** 2) + np.mean(np.diff(x, axis=2) ** 2))


def test_corruptions_are_deterministic_and_of_the_expected_strength() -> None:
    clean = build_embedded("patches13").images[::10]  # 78 crops keep this fast
    for kind in KINDS:
        out = apply(kind, clean, seed=0)
        assert out.dtype == np.uint8 and out.shape == clean.shape
        assert np.array_equal(out, apply(kind, clean, seed=0)) and not np.array_equal(out, clean)
    assert not np.array_equal(apply("noise", clean, seed=0), apply("noise", clean, seed=1))
    # Blur with sigma 1.5 px keeps well under half of the pixel-to-pixel energy.
    assert BLUR_SIGMA == 1.5
    assert _high_frequency_energy(apply("blur", clean)) < 0.3 * _high_frequency_energy(clean)
    # Noise: where clipping is rare (mid-range pixels), the residual std is the target within 10%.
    residual = apply("noise", clean).astype(np.float64) - clean
    mid = (clean > 80) & (clean < 175)
    assert residual[mid].std() == pytest.approx(NOISE_STD * 255, rel=0.1)
    # Colour: hue rotates, luma stays (up to rounding and clipping).
    luma = np.array([0.299, 0.587, 0.114])
    shifted = apply("color", clean).astype(np.float64)
    assert np.abs(shifted @ luma - clean @ luma).mean() < 3.0
    assert np.abs(shifted - clean).mean() > 5.0
    with pytest.raises(ValueError, match="unknown corruption"):
        apply("fog", clean)


@pytest.mark.parametrize("kind", KINDS)
def test_corrupted_patches13_matches_clean_dataset(kind: str) -> None:
    name = f"patches13-{kind}"
    clean, corrupted = build_embedded("patches13"), build_embedded(name)
    assert corrupted.classes == clean.classes
    assert np.array_equal(corrupted.targets, clean.targets) and np.array_equal(corrupted.splits, clean.splits)
    assert CATALOG[name].split_sizes == CATALOG["patches13"].split_sizes
    ds = load_dataset(name, split="test")
    assert len(ds) == 156 and ds.classes == load_dataset("patches13", split="test").classes
    assert ds.manifest_hash != PATCHES13_TEST_HASH


def test_patches13_hash_unchanged() -> None:
    assert load_dataset("patches13", split="test").manifest_hash == PATCHES13_TEST_HASH
