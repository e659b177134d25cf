"""Map cache: maps equal a direct forward, hits run no backbone, keys change with every input, float16
error bound, incomplete entries are redone, one extraction for concurrent asks, worker errors, disk space.

CPU only, tiny random timm backbones at 64 px on the embedded ``mnist-seg`` (100 test images, 96 px) or a
three-image segfolder of mixed sizes written in ``tmp_path``.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bobench import create_backbone
from bobench.data.errors import DatasetError
from bobench.data.segmentation import load_segmentation_dataset
from bobench.dense.segmentation import SegmentationModel, build_segmenter
from bobench.map_cache import MapSet, MapStore
from bobench.options import RunOptions

RESNET, VIT = "random/timm:test_resnet", "random/timm:test_vit"
S = 64
OPTS = RunOptions(device="cpu", batch_size=16, num_workers=0, progress=False)
F16_RTOL = 2.0**-11  # float16 keeps 11 significant bits: round to nearest is within half an ulp
F16_ATOL = 2.0**-25  # below float16's normal range (6.1e-5) the spacing is fixed at 2**-24


@pytest.fixture(scope="module")
def mnist():
    return load_segmentation_dataset("mnist-seg", split="test")


def segmenter(
    spec: str = RESNET, maps: str = "last", n_classes: int = 11, seed: int = 0, **kw
) -> SegmentationModel:
    torch.manual_seed(0)  # the head's init; the backbone's is init_seed
    return build_segmenter(create_backbone(spec, init_seed=seed), n_classes, head="linear", maps=maps, **kw)


def count_backbone_calls(model: SegmentationModel, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes of every ``backbone.features`` call (what ``backbone_maps`` runs)."""
    calls: list[int] = []
    inner = model.backbone.features

    def counted(x: torch.Tensor) -> list[torch.Tensor]:
        calls.append(len(x))
        return inner(x)

    monkeypatch.setattr(model.backbone, "features", counted)
    return calls


def resized_images(ds, idx) -> torch.Tensor:
    """The square input, computed here independently of the module."""
    x = torch.stack([ds.load(i)[0] for i in idx])
    return F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False, antialias=True)


def nearest_exact(mask: np.ndarray, size: int) -> np.ndarray:
    """Pixel-centre nearest neighbour in numpy: output pixel i reads input floor((i + 0.5) * H / S)."""
    h, w = mask.shape
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(int), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(int), w - 1)
    return mask[np.ix_(rows, cols)]


def write_segfolder(root: Path, sizes=((40, 56), (48, 48), (30, 70)), bad_value: int | None = None) -> str:
    rng = np.random.default_rng(0)
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("bg\nfg\n")
    for split in ("train", "test"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / "images" / split / f"im{i}.png"
            )
            mask = (rng.random((h, w)) > 0.5).astype(np.uint8)
            mask[0, :3] = 255
            if bad_value is not None and i == 1:
                mask[2, 3] = bad_value
            Image.fromarray(mask).save(root / "masks" / split / f"im{i}.png")
    return f"segfolder:{root}"


def edit_png(path: Path) -> None:
    arr = np.asarray(Image.open(path)).copy()
    arr[1, 1] = 1 - arr[1, 1] if arr.ndim == 2 else 255 - arr[1, 1]
    Image.fromarray(arr).save(path)
    now = time.time_ns()
    os.utime(path, ns=(now, now + 10**9))  # a later mtime even on a coarse-grained file system


# -- correctness and hits ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "maps"), [(RESNET, "all"), (VIT, "last")])
def test_maps_match_direct_forward_and_hit_cache(tmp_path: Path, mnist, spec, maps, monkeypatch) -> None:
    store = MapStore(tmp_path)
    model = segmenter(spec, maps)

    def flip(image, mask):  # an augmentation the cache must not see
        return image.flip(-1), mask.flip(-1)

    augmented = load_segmentation_dataset("mnist-seg", split="test", transforms=flip)
    ms = store.get_or_extract(model, augmented, S, OPTS)
    assert augmented.transforms is flip  # the caller's dataset is untouched
    assert not ms.cache_hit and ms.n == len(mnist) == 100 and ms.dtype == "float16"
    info = model.backbone.feature_info
    assert ms.in_index == model.in_index
    assert ms.shapes == [(info[i].channels, S // info[i].stride, S // info[i].stride) for i in model.in_index]
    assert all(
        isinstance(ms.maps(j), np.memmap) and ms.maps(j).dtype == np.float16 for j in range(len(ms.shapes))
    )
    assert isinstance(ms.masks, np.memmap) and ms.masks.shape == (100, S, S) and ms.masks.dtype == np.uint8

    idx = np.array([5, 0, 99, 42, 5])  # unsorted, with a repeat
    x = resized_images(mnist, idx)
    model.eval()
    with torch.inference_mode():
        direct = model.backbone_maps(x)
        ref_logits = model(x)
    got = ms.batch(idx)
    assert [g.dtype for g in got] == [torch.float16] * len(got)
    for g, d in zip(got, direct, strict=True):
        np.testing.assert_allclose(g.float().numpy(), d.numpy(), rtol=F16_RTOL + 1e-5, atol=F16_ATOL + 1e-6)
    with torch.inference_mode():
        logits = model.forward_maps(got, (S, S))
    scale = float(ref_logits.abs().max())
    np.testing.assert_allclose(logits.numpy(), ref_logits.numpy(), rtol=0, atol=2e-3 * scale)
    # scoring is on the original size: upsample the S x S logits to sizes[i]
    assert tuple(ms.sizes.shape) == (100, 2) and ms.sizes.dtype == np.int64
    assert (ms.sizes == [96, 96]).all()

    expected = np.stack([nearest_exact(mnist.load(i)[1].numpy(), S) for i in idx])
    np.testing.assert_array_equal(ms.masks[idx], expected)
    np.testing.assert_array_equal(ms.mask_batch(torch.as_tensor(idx)).numpy(), expected.astype(np.int64))
    stats = ms.stats
    assert stats["device"] == "cpu" and stats["precision"] == "fp32" and stats["img_per_s"] > 0
    assert (stats["forward_chunk"], stats["chunk_from"]) == (16, "pixels")  # 16 of 64 px fit in 2**18 px

    files = {p.name: p.stat().st_mtime_ns for p in ms.path.iterdir()}
    calls = count_backbone_calls(model, monkeypatch)
    again = store.get_or_extract(model, mnist, S, OPTS)  # the un-augmented view: the same entry
    assert again.cache_hit and again.key == ms.key and calls == []  # no forward pass
    assert {p.name: p.stat().st_mtime_ns for p in ms.path.iterdir()} == files  # and nothing written
    for a, b in zip(again.batch(idx), got, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float16_error_bound_against_float32(tmp_path: Path, mnist) -> None:
    store = MapStore(tmp_path)
    model = segmenter(RESNET, "all")
    half = store.get_or_extract(model, mnist, S, OPTS)
    # in chunks of 3 (3+3+3+3+3+1 a batch): the chunks' maps are put back together in order
    full = store.get_or_extract(model, mnist, S, OPTS.replace(forward_chunk=3), dtype="float32")
    assert half.key != full.key and full.dtype == "float32" and full.maps(0).dtype == np.float32
    assert (full.stats["forward_chunk"], full.stats["chunk_from"]) == (3, "fixed")
    idx = np.arange(0, 100, 9)
    with torch.inference_mode():
        direct = model.eval().backbone_maps(resized_images(mnist, idx))
    for j in range(len(full.shapes)):
        f32, f16 = np.asarray(full.maps(j)), np.asarray(half.maps(j)).astype(np.float32)
        np.testing.assert_allclose(f32[idx], direct[j].numpy(), rtol=1e-5, atol=1e-6)
        err = np.abs(f16 - f32)
        assert (err <= F16_RTOL * np.abs(f32) + F16_ATOL).all(), float(err.max())
        assert float(err.max()) <= 1e-3 * float(np.abs(f32).max())  # the documented relative bound
    assert full.stats["bytes"] > 1.9 * half.stats["bytes"] - 100 * S * S * 1.1


# -- keys -------------------------------------------------------------------------------------------------
def test_key_changes_with_every_component(tmp_path: Path) -> None:
    spec = write_segfolder(tmp_path / "data")
    store = MapStore(tmp_path / "cache")
    model = segmenter(RESNET, "last", n_classes=2)

    def key(m=model, split="train", size=S, options=OPTS, dtype="float16") -> str:
        return store.key(m, load_segmentation_dataset(spec, split), size, options, dtype)

    base = key()
    assert key() == base  # stable
    # the head is not in the key: UPerNet reading the same map shares the entry
    torch.manual_seed(0)
    upernet = build_segmenter(create_backbone(RESNET), 2, head="upernet", maps="last", channels=8)
    assert key(m=upernet) == base
    keys = {"base": base}
    keys["in_index"] = key(m=segmenter(RESNET, "all", n_classes=2))
    keys["explicit_index"] = key(m=segmenter(RESNET, n_classes=2, maps=[1]))
    keys["image_size"] = key(size=32)
    keys["dtype"] = key(dtype="float32")
    keys["precision"] = key(options=OPTS.replace(precision="bf16"))
    keys["split"] = key(split="test")
    keys["weights"] = key(m=segmenter(RESNET, "last", n_classes=2, seed=1))
    keys["backbone"] = key(m=segmenter(VIT, "last", n_classes=2))
    edit_png(tmp_path / "data" / "masks" / "train" / "im1.png")
    keys["mask"] = key()
    edit_png(tmp_path / "data" / "images" / "train" / "im2.png")
    keys["image"] = key()
    assert len(set(keys.values())) == len(keys), " ".join(f"{k}={v[:8]}" for k, v in keys.items())
    # run options that do not change the numbers do not change the key
    assert key(options=OPTS.replace(batch_size=3, num_workers=2)) == keys["image"]


def test_mixed_sizes_and_a_changed_dataset_is_extracted_anew(tmp_path: Path) -> None:
    spec = write_segfolder(tmp_path / "data")
    store = MapStore(tmp_path / "cache")
    model = segmenter(RESNET, "last", n_classes=2)
    ds = load_segmentation_dataset(spec, "train")
    ms = store.get_or_extract(model, ds, S, OPTS.replace(batch_size=2))
    assert ms.sizes.tolist() == [[40, 56], [48, 48], [30, 70]]  # the originals, (H, W)
    np.testing.assert_array_equal(ms.masks[2], nearest_exact(ds.load(2)[1].numpy(), S))
    assert (ms.masks[:, 0, 0] == 255).all()  # ignore survives the resize
    edit_png(tmp_path / "data" / "masks" / "train" / "im0.png")
    edited = load_segmentation_dataset(spec, "train")
    fresh = store.get_or_extract(model, edited, S, OPTS)
    assert not fresh.cache_hit and fresh.key != ms.key
    np.testing.assert_array_equal(fresh.masks[0], nearest_exact(edited.load(0)[1].numpy(), S))
    assert store.get(ms.key) is not None  # the old entry is still valid for the old files' hash


# -- robustness ---------------------------------------------------------------------------------------------
def test_incomplete_entries_are_extracted_again(tmp_path: Path, monkeypatch) -> None:
    spec = write_segfolder(tmp_path / "data")
    store = MapStore(tmp_path / "cache")
    model = segmenter(RESNET, "all", n_classes=2)
    ds = load_segmentation_dataset(spec, "train")
    first = store.get_or_extract(model, ds, S, OPTS)
    reference = [m.clone() for m in first.batch([0, 1, 2])]
    calls = count_backbone_calls(model, monkeypatch)
    manifest = first.path / "manifest.json"

    def breakers():
        data = json.loads(manifest.read_text())
        yield "not complete", lambda: manifest.write_text(json.dumps({**data, "complete": False}))
        yield "no manifest", manifest.unlink
        yield "map missing", (first.path / "map2.npy").unlink
        yield "masks missing", (first.path / "masks.npy").unlink
        yield "torn manifest", lambda: manifest.write_text(manifest.read_text()[:50])

    for what, brk in breakers():
        brk()
        leftover = first.path / ".map0.tmp-99999.npy"  # what a killed writer leaves
        leftover.write_bytes(b"partial")
        assert store.get(first.key) is None, what
        n_calls = len(calls)
        again = store.get_or_extract(model, ds, S, OPTS)
        assert not again.cache_hit and len(calls) > n_calls, what
        assert not leftover.exists() and not [p for p in again.path.iterdir() if p.name.startswith(".")]
        for a, b in zip(again.batch([0, 1, 2]), reference, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert store.get_or_extract(model, ds, S, OPTS).cache_hit, what


def test_concurrent_requests_extract_once(tmp_path: Path, monkeypatch) -> None:
    spec = write_segfolder(tmp_path / "data")
    model = segmenter(RESNET, "last", n_classes=2)
    ds = load_segmentation_dataset(spec, "train")
    calls = count_backbone_calls(model, monkeypatch)
    opts = OPTS.replace(batch_size=1)
    with ThreadPoolExecutor(2) as pool:  # separate stores on one root: separate lock objects
        futures = [
            pool.submit(MapStore(tmp_path / "cache").get_or_extract, model, ds, S, opts) for _ in range(2)
        ]
        results = [f.result() for f in futures]
    assert calls == [1, 1, 1]  # three images, one extraction
    assert sorted(r.cache_hit for r in results) == [False, True]
    assert results[0].key == results[1].key


def test_worker_error_surfaces_with_the_file_named(tmp_path: Path) -> None:
    spec = write_segfolder(tmp_path / "data", bad_value=7)  # two classes: 7 is no class
    store = MapStore(tmp_path / "cache")
    model = segmenter(RESNET, "last", n_classes=2)
    ds = load_segmentation_dataset(spec, "train")
    with pytest.raises(DatasetError) as info:
        store.get_or_extract(model, ds, S, OPTS.replace(num_workers=1, batch_size=1))
    message = str(info.value)
    assert "im1.png" in message and "value 7" in message and not message.startswith("Caught")
    key = store.key(model, ds, S, OPTS)
    assert store.get(key) is None
    assert not [p for p in (store.root / key).iterdir()]  # no temporary files left behind


def test_too_little_disk_space_fails_before_writing(tmp_path: Path, monkeypatch) -> None:
    import bobench.map_cache as map_cache

    spec = write_segfolder(tmp_path / "data")
    store = MapStore(tmp_path / "cache")
    model = segmenter(RESNET, "last", n_classes=2)
    ds = load_segmentation_dataset(spec, "train")
    usage = map_cache.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(map_cache.shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    with pytest.raises(OSError) as info:
        store.get_or_extract(model, ds, S, OPTS)
    assert info.value.errno == errno.ENOSPC and "BOBENCH_CACHE" in str(info.value)
    key = store.key(model, ds, S, OPTS)
    assert store.get(key) is None and not list((store.root / key).iterdir())


def test_float16_overflow_asks_for_float32(tmp_path: Path, monkeypatch) -> None:
    spec = write_segfolder(tmp_path / "data")
    model = segmenter(RESNET, "last", n_classes=2)
    ds = load_segmentation_dataset(spec, "train")
    inner = model.backbone.features
    monkeypatch.setattr(model.backbone, "features", lambda x: [m * 1e6 + 1e5 for m in inner(x)])
    store = MapStore(tmp_path / "cache")
    for opts in (OPTS, OPTS.replace(forward_chunk=3)):  # the flag of any chunk, whole batch or not
        with pytest.raises(ValueError, match="float32"):
            store.get_or_extract(model, ds, S, opts)
    assert store.get_or_extract(model, ds, S, OPTS, dtype="float32").maps(0).max() > 65504


def test_refusals(tmp_path: Path) -> None:
    spec = write_segfolder(tmp_path / "data")
    store = MapStore(tmp_path / "cache")
    ds = load_segmentation_dataset(spec, "train")
    with pytest.raises(ValueError, match="frozen"):
        store.get_or_extract(segmenter(RESNET, "last", n_classes=2, frozen=False), ds, S, OPTS)
    model = segmenter(RESNET, "last", n_classes=2)
    with pytest.raises(ValueError, match="float16"):
        store.get_or_extract(model, ds, S, OPTS, dtype="bfloat16")
    with pytest.raises(ValueError, match="image_size"):
        store.key(model, ds, 0, OPTS)
    with pytest.raises(TypeError, match="manifest_hash"):
        store.key(model, [(torch.rand(3, 8, 8), torch.zeros(8, 8, dtype=torch.long))], S, OPTS)


def test_mapset_pickles_without_its_arrays(tmp_path: Path) -> None:
    spec = write_segfolder(tmp_path / "data")
    model = segmenter(RESNET, "all", n_classes=2)
    ms = MapStore(tmp_path / "cache").get_or_extract(
        model, load_segmentation_dataset(spec, "train"), S, OPTS, dtype="float32"
    )
    opened = [ms.maps(j) for j in range(len(ms.shapes))], ms.masks, ms.sizes
    assert opened
    blob = pickle.dumps(ms)
    assert len(blob) < 20_000  # the manifest, not the maps (float32 maps alone are ~90 kB here)
    back: MapSet = pickle.loads(blob)
    for a, b in zip(back.batch([2, 0]), ms.batch([2, 0]), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # one image as a dataset item: a DataLoader's collate gives batch()'s layout
    loader = torch.utils.data.DataLoader([back.item(2), back.item(0)], batch_size=2)
    for a, b in zip(next(iter(loader)), ms.batch([2, 0]), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_default_root_follows_bobench_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BOBENCH_CACHE", str(tmp_path / "c"))
    assert MapStore().root == tmp_path / "c" / "maps" and (tmp_path / "c" / "maps").is_dir()
