"""The input cache (:mod:`bobench.input_cache`): features equal to the ordinary path's, one decode shared by
backbones that resize alike, which transforms split, a bad image mid-build and the resume after it, and the
``--input-cache`` flag of the command line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from bobench import create_backbone, input_cache, load_dataset
from bobench.data import DatasetError
from bobench.features import ExtractOptions, FeatureStore
from bobench.input_cache import InputStore, Normalise, split_transform

OPTS = ExtractOptions(image_size=48, batch_size=8, num_workers=0, progress=False)
CACHED = dataclasses.replace(OPTS, input_cache=True)
SIZES = [(40, 60), (64, 50), (30, 30), (77, 41), (52, 52)]  # (H, W): every aspect, up- and down-sized


def _folder(root: Path, per_class: int = 5, split: str | None = "train") -> Path:
    """An imagefolder of noise photos of different sizes, two classes: a train split folder only, or (with
    ``split=None``) class folders at the root, which the reader splits by fractions."""
    rng = np.random.default_rng(1)
    for c, cls in enumerate(("a", "b")):
        folder = root / split / cls if split else root / cls
        folder.mkdir(parents=True)
        for i in range(per_class):
            h, w = SIZES[i % len(SIZES)]
            arr = (rng.random((h, w, 3)) * 200 + c * 40).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("spec", ["random/timm:test_resnet", "random/timm:test_vit"])  # channels_last or not
def test_features_through_the_input_cache_equal_the_ordinary_path(tmp_path: Path, spec: str) -> None:
    ds = load_dataset(f"imagefolder:{_folder(tmp_path / 'data')}", split="train")
    bb = create_backbone(spec)
    plain = FeatureStore(tmp_path / "plain").get_or_extract(bb, ds, OPTS)
    cached = FeatureStore(tmp_path / "cached").get_or_extract(bb, ds, CACHED)
    assert plain.key == cached.key  # the same numbers, so the same cache key
    X, y = plain.load()
    Xc, yc = cached.load()
    np.testing.assert_array_equal(Xc, X)
    np.testing.assert_array_equal(yc, y)
    assert plain.stats["input_cache"] is None
    used = cached.stats["input_cache"]
    assert used["used"] and not used["hit"] and used["shape"] == [48, 48, 3]
    assert [p.name[:16] for p in (tmp_path / "cached" / "inputs").iterdir() if p.is_dir()] == [used["key"]]


def test_backbones_that_resize_alike_share_one_decode(tmp_path: Path) -> None:
    """A second backbone with the same resize and crop reads the stored images: it works with the image
    files gone, gives what its ordinary extraction gives; another image size is another entry."""
    data = _folder(tmp_path / "data")
    ds = load_dataset(f"imagefolder:{data}", split="train")
    first = create_backbone("random/timm:test_resnet")
    second = create_backbone("random/timm:test_resnet", init_seed=1)
    want = FeatureStore(tmp_path / "plain").get_or_extract(second, ds, OPTS).load()[0]
    store = FeatureStore(tmp_path / "cache")
    opts = CACHED
    assert not store.get_or_extract(first, ds, opts).stats["input_cache"]["hit"]
    for png in data.rglob("*.png"):
        png.unlink()  # a decode would fail now
    fs = store.get_or_extract(second, ds, opts)
    assert fs.stats["input_cache"]["hit"]
    np.testing.assert_array_equal(fs.load()[0], want)
    with pytest.raises(DatasetError):  # 56 px: another resize, so another entry, which must decode
        store.get_or_extract(second, ds, dataclasses.replace(opts, image_size=56))


def test_normalise_is_torchvisions_to_tensor_and_normalize_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 13, 17, 3), dtype=np.uint8)
    for mean, std in [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5,) * 3, (0.5,) * 3)]:
        reference = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        want = torch.stack([reference(Image.fromarray(a)) for a in images])
        got = Normalise(mean, std)(torch.from_numpy(images))
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.equal(got, want)
        assert got.is_contiguous(memory_format=torch.channels_last)  # a view of the uint8 layout
    with pytest.raises(ValueError, match="uint8"):
        Normalise((0.5,) * 3, (0.5,) * 3)(torch.zeros(1, 3, 4, 4))


def test_which_transforms_split() -> None:
    bb = create_backbone("random/timm:test_resnet")
    split = split_transform(bb.transform(image_size=48))
    assert not isinstance(split, str)
    assert [type(op).__name__ for op in split.geometric] == ["Resize", "CenterCrop"]
    assert split.mean == pytest.approx(bb.card.mean) and split.std == pytest.approx(bb.card.std)
    norm = T.Normalize((0.5,) * 3, (0.5,) * 3)
    assert "not a torchvision Compose" in split_transform(lambda im: im)
    assert "ToTensor and Normalize" in split_transform(T.Compose([T.Resize(8), T.ToTensor()]))
    lam = T.Compose([T.Resize(8), T.Lambda(lambda im: im), T.ToTensor(), norm])
    assert "does not know: Lambda" in split_transform(lam)
    flip = T.Compose([T.RandomHorizontalFlip(), T.ToTensor(), norm])  # random: must never be stored
    assert "RandomHorizontalFlip" in split_transform(flip)


def test_a_transform_that_does_not_split_extracts_the_ordinary_way_and_says_why(tmp_path: Path) -> None:
    ds = load_dataset(f"imagefolder:{_folder(tmp_path / 'data')}", split="train")
    bb = create_backbone("random/timm:test_resnet")
    ordinary = bb.transform(image_size=48)
    bb.transform = lambda train=False, image_size=None: lambda im: ordinary(im)  # a custom callable
    fs = FeatureStore(tmp_path / "c").get_or_extract(bb, ds, CACHED)
    assert fs.stats["input_cache"] == {
        "used": False,
        "reason": "the transform is a function, not a torchvision Compose",
    }
    want = FeatureStore(tmp_path / "plain").get_or_extract(
        create_backbone("random/timm:test_resnet"), ds, OPTS
    )
    np.testing.assert_array_equal(fs.load()[0], want.load()[0])


def test_a_bad_image_stops_the_build_naming_it_and_the_fixed_build_resumes(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data")
    ds = load_dataset(f"imagefolder:{data}", split="train")
    geometric = split_transform(create_backbone("random/timm:test_resnet").transform(image_size=48)).geometric
    n = len(ds)
    bad = data / ds.item_id(n - 1)  # the last image, in the third shard of 3
    good = bad.read_bytes()
    bad.write_bytes(b"not a png")
    store = InputStore(tmp_path / "inputs")
    with pytest.raises(DatasetError, match=bad.name.replace(".", r"\.")):
        store.get_or_build(ds, geometric, workers=0, shard_size=3)
    (folder,) = [p for p in store.root.iterdir() if p.is_dir()]
    assert json.loads((folder / "manifest.json").read_text())["shards"] == [0, 1]  # kept
    bad.write_bytes(good)
    done = store.get_or_build(ds, geometric, workers=0, shard_size=3)
    assert done.manifest["resumed_shards"] == 2 and done.manifest["complete"]
    fresh = InputStore(tmp_path / "fresh").get_or_build(ds, geometric, workers=0, shard_size=3)
    np.testing.assert_array_equal(done.rows(range(n)), fresh.rows(range(n)))
    for i in (0, 4, n - 1):  # the stored rows are the resized images
        image = ds.load_image(i)
        for op in geometric:
            image = op(image)
        np.testing.assert_array_equal(done.rows([i])[0], np.asarray(image))


def test_images_of_different_sizes_after_the_transform_are_refused_by_name(tmp_path: Path) -> None:
    ds = load_dataset(f"imagefolder:{_folder(tmp_path / 'data')}", split="train")
    with pytest.raises(
        ValueError,
        match=r"input cache: image train/a/2\.png is \(40, 40, 3\) after .* the first was \(40, 60, 3\)",
    ):
        InputStore(tmp_path / "inputs").get_or_build(ds, [T.Resize(40)], workers=0)


def test_the_cli_flag(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data")
    args = [
        "-m",
        "bobench",
        "features",
        "extract",
        "-b",
        "random/timm:test_resnet",
        "-d",
        f"imagefolder:{data}",
    ]
    args += ["--split", "train", "--image-size", "48", "--workers", "0", "--device", "cpu", "--json"]
    env = {**os.environ, "BOBENCH_CACHE": str(tmp_path / "cache")}
    first = subprocess.run([sys.executable, *args, "--input-cache"], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    (row,) = json.loads(first.stdout)
    assert not row["cache_hit"]
    manifest = json.loads((Path(row["path"]) / "manifest.json").read_text())
    assert manifest["stats"]["input_cache"]["used"] is True
    assert any((tmp_path / "cache" / "features" / "inputs").iterdir())
    typo = subprocess.run([sys.executable, *args, "--input-cahce"], capture_output=True, text=True, env=env)
    assert typo.returncode == 2 and "--input-cahce" in typo.stderr


def test_a_battle_records_the_input_cache_and_a_bad_image_fails_only_its_cell(tmp_path: Path) -> None:
    from bobench.options import RunOptions
    from bobench.runner import run_battle
    from bobench.store import ResultStore

    good, bad = _folder(tmp_path / "good", 10, None), _folder(tmp_path / "bad", 10, None)
    victim = sorted(bad.rglob("*.png"))[0]
    victim.write_bytes(b"not a png")
    tasks = []
    for name, root in (("good", good), ("bad", bad)):
        body = {"version": 1, "dataset": f"imagefolder:{root}", "protocol": "knn", "image_size": 48,
                "params": {"ks": [1]}, "primary": "top1"}  # fmt: skip
        tasks.append(tmp_path / f"{name}.yaml")
        tasks[-1].write_text(json.dumps(body))
    opts = RunOptions(device="cpu", num_workers=0, progress=False, input_cache=True)
    with ResultStore(tmp_path / "r.db") as store:
        s = run_battle(
            ["random/timm:test_resnet"], tasks, store=store, cache_dir=tmp_path / "c", options=opts
        )
    assert (s.done, s.failed) == (1, 1), [f.error for f in s.failures]
    assert f"cannot read image {victim}" in s.failures[0].error  # named, with the fix
    with ResultStore(tmp_path / "r.db", readonly=True) as store:
        rows = store.results(status=None)
    ok = rows[rows["status"] == "ok"].iloc[0]
    info = json.loads(ok["config_json"])["info"]
    assert {v["used"] for v in info["input_cache"].values()} == {True}


@pytest.fixture
def streaming(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first extraction fills the input cache from its own batches (bobench does so on accelerators only,
    where the separate pass would leave the device idle), in 4-image shards so batches of 3 straddle them."""
    monkeypatch.setattr(input_cache, "NORMALISE_ON_DEVICE", frozenset({"cpu"}))
    monkeypatch.setattr(input_cache, "SHARD_SIZE", 4)


STREAMED = dataclasses.replace(CACHED, batch_size=3)


def _inputs_manifest(root: Path) -> dict:
    (folder,) = [p for p in (root / "inputs").iterdir() if p.is_dir()]
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.parametrize("batch_size", [3, 10])  # batches straddle shards / one batch fills two shards
def test_a_streamed_first_extraction_stores_what_the_separate_pass_stores(
    tmp_path: Path, streaming: None, batch_size: int
) -> None:
    data = _folder(tmp_path / "data")
    ds = load_dataset(f"imagefolder:{data}", split="train")
    n, bb = len(ds), create_backbone("random/timm:test_resnet")
    plain = FeatureStore(tmp_path / "plain").get_or_extract(bb, ds, OPTS).load()[0]
    store = FeatureStore(tmp_path / "cache")
    fs = store.get_or_extract(bb, ds, dataclasses.replace(STREAMED, batch_size=batch_size))
    info = fs.stats["input_cache"]
    assert info["streamed"] and not info["hit"] and info["shape"] == [48, 48, 3] and info["build_s"] > 0
    np.testing.assert_array_equal(fs.load()[0], plain)
    manifest = _inputs_manifest(store.root)
    assert manifest["complete"] and manifest["shards"] == [0, 1] and manifest["n"] == n == 8  # 3+3+2 images
    geometric = split_transform(bb.transform(image_size=48)).geometric
    separate = InputStore(tmp_path / "separate").get_or_build(ds, geometric, workers=0)
    streamed = InputStore(store.root / "inputs").get_or_build(ds, geometric, workers=0)
    assert streamed.cache_hit and streamed.key == separate.key
    np.testing.assert_array_equal(streamed.rows(range(n)), separate.rows(range(n)))
    second = create_backbone("random/timm:test_resnet", init_seed=1)
    want = FeatureStore(tmp_path / "plain2").get_or_extract(second, ds, OPTS).load()[0]
    for png in data.rglob("*.png"):
        png.unlink()  # the next backbone reads the stored images
    fs = store.get_or_extract(second, ds, dataclasses.replace(STREAMED, batch_size=batch_size))
    assert fs.stats["input_cache"]["hit"] and "streamed" not in fs.stats["input_cache"]
    np.testing.assert_array_equal(fs.load()[0], want)


def test_a_bad_image_mid_stream_is_named_and_the_rerun_resumes_the_input_cache(
    tmp_path: Path, streaming: None
) -> None:
    data = _folder(tmp_path / "data")
    ds = load_dataset(f"imagefolder:{data}", split="train")
    bb = create_backbone("random/timm:test_resnet")
    plain = FeatureStore(tmp_path / "plain").get_or_extract(bb, ds, OPTS).load()[0]
    assert len(ds) == 8  # batches 0-2, 3-5, 6-7; shards 0-3, 4-7
    bad = data / ds.item_id(7)  # in the last batch: shard 0 is full before it, shard 1 is not
    good = bad.read_bytes()
    bad.write_bytes(b"not a png")
    store = FeatureStore(tmp_path / "cache")
    with pytest.raises(DatasetError, match=bad.name.replace(".", r"\.")):
        store.get_or_extract(bb, ds, STREAMED)
    manifest = _inputs_manifest(store.root)
    assert manifest["shards"] == [0] and not manifest["complete"]  # kept, and the lock released
    bad.write_bytes(good)
    fs = store.get_or_extract(bb, ds, STREAMED)  # a started key: the separate pass resumes it
    assert "streamed" not in fs.stats["input_cache"] and not fs.stats["input_cache"]["hit"]
    assert _inputs_manifest(store.root)["resumed_shards"] == 1
    np.testing.assert_array_equal(fs.load()[0], plain)


@pytest.mark.parametrize("batch_size", [1, 3])  # a later batch differs / images within one batch differ
def test_a_stream_of_images_of_different_sizes_is_refused_by_name(
    tmp_path: Path, streaming: None, batch_size: int
) -> None:
    ds = load_dataset(f"imagefolder:{_folder(tmp_path / 'data')}", split="train")
    bb = create_backbone("random/timm:test_resnet")
    norm = T.Normalize(bb.card.mean, bb.card.std)
    bb.transform = lambda train=False, image_size=None: T.Compose([T.Resize(40), T.ToTensor(), norm])
    with pytest.raises(
        ValueError,
        match=r"input cache: image train/a/2\.png is \(40, 40, 3\) after .* the first was \(40, 60, 3\)",
    ):
        FeatureStore(tmp_path / "cache").get_or_extract(
            bb, ds, dataclasses.replace(STREAMED, batch_size=batch_size)
        )


def test_on_an_accelerator_the_workers_decode_and_the_device_normalises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the input cache, an extraction on an accelerator reads uint8 batches and normalises them on
    the device: the same features bit for bit, and the record says where. (Run here on the CPU, treated as
    an accelerator; on the CPU itself the workers normalise.)"""
    ds = load_dataset(f"imagefolder:{_folder(tmp_path / 'data')}", split="train")
    bb = create_backbone("random/timm:test_resnet")
    plain = FeatureStore(tmp_path / "plain").get_or_extract(bb, ds, OPTS)
    assert plain.stats["normalised_on"] == "workers"
    monkeypatch.setattr(input_cache, "NORMALISE_ON_DEVICE", frozenset({"cpu"}))
    fs = FeatureStore(tmp_path / "device").get_or_extract(bb, ds, dataclasses.replace(OPTS, num_workers=2))
    assert fs.stats["normalised_on"] == "device" and fs.stats["input_cache"] is None
    assert fs.key == plain.key
    np.testing.assert_array_equal(fs.load()[0], plain.load()[0])
    np.testing.assert_array_equal(fs.load()[1], plain.load()[1])
    ordinary = bb.transform(image_size=48)
    bb.transform = lambda train=False, image_size=None: lambda im: ordinary(im)  # does not split
    fs = FeatureStore(tmp_path / "custom").get_or_extract(bb, ds, OPTS)
    assert fs.stats["normalised_on"] == "workers"
    np.testing.assert_array_equal(fs.load()[0], plain.load()[0])


def test_an_extraction_does_not_wait_for_another_that_is_filling_the_input_cache(
    tmp_path: Path, streaming: None
) -> None:
    """On an accelerator a second backbone whose input cache another process is filling (as it extracts)
    decodes for itself instead of idling the device until that extraction ends, and says so."""
    from filelock import FileLock

    from bobench.files import config_sha

    ds = load_dataset(f"imagefolder:{_folder(tmp_path / 'data')}", split="train")
    bb = create_backbone("random/timm:test_resnet")
    plain = FeatureStore(tmp_path / "plain").get_or_extract(bb, ds, OPTS).load()[0]
    store = FeatureStore(tmp_path / "cache")
    inputs = InputStore(store.root / "inputs")
    geometric = split_transform(bb.transform(image_size=48)).geometric
    other = FileLock(str(inputs.root / f"{config_sha(inputs.key_fields(ds, geometric))}.lock"))
    with other.acquire(timeout=0):  # "another process" streaming this key
        fs = store.get_or_extract(bb, ds, STREAMED)
    assert fs.stats["input_cache"] == {
        "used": False,
        "reason": "another process is filling the input cache of this resize",
    }
    assert fs.stats["normalised_on"] == "device"
    np.testing.assert_array_equal(fs.load()[0], plain)


def test_the_device_normalised_path_names_an_image_that_does_not_fit_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images of different sizes in one batch fail the ordinary path at the collate too; this path names the
    image and the fix, and does not blame an input cache nobody asked for. One image a batch works."""
    monkeypatch.setattr(input_cache, "NORMALISE_ON_DEVICE", frozenset({"cpu"}))
    ds = load_dataset(f"imagefolder:{_folder(tmp_path / 'data')}", split="train")
    bb = create_backbone("random/timm:test_resnet")
    norm = T.Normalize(bb.card.mean, bb.card.std)
    bb.transform = lambda train=False, image_size=None: T.Compose([T.Resize(40), T.ToTensor(), norm])
    with pytest.raises(ValueError, match=r"^image train/a/2\.png is \(40, 40, 3\) .* or --batch-size 1$"):
        FeatureStore(tmp_path / "c").get_or_extract(bb, ds, dataclasses.replace(OPTS, batch_size=3))
    fs = FeatureStore(tmp_path / "c").get_or_extract(bb, ds, dataclasses.replace(OPTS, batch_size=1))
    assert fs.stats["normalised_on"] == "device" and len(fs.load()[0]) == len(ds)
