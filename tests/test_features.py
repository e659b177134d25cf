"""Feature store: correctness, cache hits, keys that change with every input, resume, concurrency."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
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


def test_features_match_direct_forward_and_hit_cache(tmp_path: Path, tiny, monkeypatch) -> None:
    store = FeatureStore(tmp_path)
    ds = load_dataset("digits", split="val")
    fs = store.get_or_extract(tiny, ds, SMALL)
    X, y = fs.load()
    assert X.shape == (len(ds), tiny.card.embed_dim) and X.dtype == np.float32
    np.testing.assert_array_equal(y, ds.targets)
    assert fs.classes == ds.classes and not fs.cache_hit
    t = tiny.transform(image_size=32)
    idx = [0, 7, len(ds) - 1]
    with torch.inference_mode():
        direct = tiny.embed(torch.stack([t(ds.load_image(i)) for i in idx])).numpy()
    np.testing.assert_allclose(X[idx], direct, rtol=1e-5, atol=1e-5)
    files = {p.name: p.stat().st_mtime_ns for p in fs.path.iterdir()}

    def no_forward(x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a cache hit ran the backbone")

    monkeypatch.setattr(tiny, "embed", no_forward)  # a hit costs no forward pass (not: "is fast")
    again = store.get_or_extract(tiny, ds, SMALL)
    assert again.cache_hit and again.key == fs.key
    assert {p.name: p.stat().st_mtime_ns for p in fs.path.iterdir()} == files  # and writes nothing
    np.testing.assert_array_equal(again.load()[0], X)
    stats = fs.stats
    assert stats["device"] == "cpu" and stats["precision"] == "fp32" and stats["img_per_s"] > 0


def test_cpu_extraction_loads_in_process_by_default_and_workers_change_no_bit(tmp_path: Path, tiny) -> None:
    from torch.utils.data import DataLoader

    from bobench.distributed import default_workers, loader_workers

    assert loader_workers(None, "cpu") == 0  # the CPU's cores run the forward: no worker beside them
    assert loader_workers(None, "cuda") == loader_workers(None, "mps") == default_workers()
    assert loader_workers(3, "cpu") == 3 and loader_workers(0, "cuda") == 0  # asked for: as asked

    made: list[int] = []

    class Counting(DataLoader):  # the loader the extraction really builds, not what its stats claim
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self.num_workers)

    ds = load_dataset("digits", split="val")
    default = ExtractOptions(image_size=32, batch_size=16, progress=False, device="cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("torch.utils.data.DataLoader", Counting)
        fs = FeatureStore(tmp_path / "default").get_or_extract(tiny, ds, default)
    assert made == [0] and fs.stats["loader_workers"] == 0
    two = FeatureStore(tmp_path / "two").get_or_extract(
        tiny, ds, ExtractOptions(**{**vars(default), "num_workers": 2})
    )
    assert two.stats["loader_workers"] == 2
    np.testing.assert_array_equal(two.load()[0], fs.load()[0])


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


@pytest.mark.parametrize("native", [True, False, None])
def test_cpu_bf16_warns_only_where_the_cpu_emulates_it(monkeypatch: pytest.MonkeyPatch, native) -> None:
    """bf16 on an x86 CPU without AVX512-BF16 or AMX is emulated (5-9x slower than fp32): the user is told
    once, by name, with the fix; where bf16 is native, or the probe cannot tell, nothing is said."""
    import warnings

    from bobench import device

    monkeypatch.setattr(device, "cpu_bf16_native", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own: once per place a warning is raised
        placement = device.resolve_placement("cpu", "bf16")
        device.resolve_placement(
            "cpu", "bf16"
        )  # a second caller (a second split, a trainer) is not told again
        device.resolve_placement("cpu", "fp32")
    assert placement.precision == "bf16" and placement.autocast == torch.bfloat16  # a warning, not a refusal
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if native is False:
        assert len(said) == 1 and "without AVX512-BF16 or AMX" in said[0] and "--precision fp32" in said[0]
    else:
        assert said == []


def test_cpu_bf16_probe_agrees_with_proc_cpuinfo() -> None:
    """The probe is torch's; on Linux x86 /proc/cpuinfo's flags are a second reading of the same CPU."""
    import platform

    from bobench.device import cpu_bf16_native

    info = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not info.is_file():
        pytest.skip("needs Linux on x86_64")
    flags = set(next(line for line in info.read_text().splitlines() if line.startswith("flags")).split())
    if "avx512_bf16" in flags:
        assert cpu_bf16_native() is True
    elif "amx_bf16" not in flags:  # AMX also needs the kernel's permission: that case is torch's to judge
        assert cpu_bf16_native() is False


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


# Extracts digits/train with mobilenetv2 at 64 px: `python - CACHE SHARD_SIZE [HOOK]`; prints
# "key cache_hit resumed_shards". The hooks stop it at a chosen point and say so on stdout, so that the tests
# decide where a kill or a second writer lands instead of racing a running extraction:
#   tear:    writes half of shard 2's features file, says "torn NAME", then waits to be killed;
#   pause:   before writing shard 1 (lock held, shard 0 done) says "paused", then waits for a line on stdin;
#   announce: says "waiting LOCKFILE" when it asks for a key's lock.
_EXTRACT = textwrap.dedent(
    """
    import os, sys
    import filelock
    import numpy as np
    from bobench import create_backbone, load_dataset
    from bobench.features import ExtractOptions, FeatureStore

    cache, shard_size, *hooks = sys.argv[1:]
    save = np.save

    def hooked_save(file, arr, *args, **kwargs):
        name = os.path.basename(os.fspath(file))
        if "tear" in hooks and "shard-00002.npy" in name:
            save(file, arr, *args, **kwargs)
            with open(file, "r+b") as f:
                f.truncate(os.path.getsize(file) // 2)
            print("torn", name, flush=True)
            sys.stdin.readline()  # killed here, half-way through writing shard 2
        if "pause" in hooks and "shard-00001.npy" in name:
            print("paused", flush=True)
            sys.stdin.readline()
        return save(file, arr, *args, **kwargs)

    np.save = hooked_save
    if "announce" in hooks:
        acquire = filelock.FileLock.acquire

        def announced(self, *args, **kwargs):
            print("waiting", os.path.basename(self.lock_file), flush=True)
            return acquire(self, *args, **kwargs)

        filelock.FileLock.acquire = announced
    bb = create_backbone("random/mobilenetv2_100")
    ds = load_dataset("digits", split="train")
    opts = ExtractOptions(image_size=64, batch_size=16, num_workers=0, shard_size=int(shard_size), progress=False)
    fs = FeatureStore(cache).get_or_extract(bb, ds, opts)
    print(fs.key, fs.cache_hit, fs.stats["resumed_shards"], flush=True)
    """
)
HANG_S = 300  # only a hung extraction takes this long to reach its next line (the whole run takes seconds)


class _Extraction:
    """The _EXTRACT script in a subprocess whose stdout lines are read with a timeout."""

    def __init__(self, script: Path, cache: Path, *hooks: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(cache), *hooks],
            env=_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def next_line(self) -> str:
        try:
            line = self.lines.get(timeout=HANG_S)
        except queue.Empty:
            raise AssertionError(f"extraction printed nothing in {HANG_S} s") from None
        assert line is not None, f"extraction exited with {self.proc.wait()} before its next line"
        return line

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> list[str]:
        """The final "key hit resumed" line, after a clean exit."""
        words = self.next_line().split()
        assert self.proc.wait(timeout=HANG_S) == 0
        return words

    def kill(self) -> None:
        self.proc.kill()  # a no-op once it has exited
        self.proc.wait()
        self.pump.join(timeout=HANG_S)  # it reaches EOF now: closing stdout under it would race
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }


def _whole_files(folder: Path) -> set[str]:
    """Names of the non-temporary files in ``folder``, after checking that each one reads whole."""
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    manifest = json.loads((folder / "manifest.json").read_text())
    referenced = {f for s in manifest["shards"] for f in (s["file"], s["labels"])}
    assert names == {"manifest.json"} | referenced, "a file under a final name that no manifest lists"
    for s in manifest["shards"]:
        feats, labels = np.load(folder / s["file"]), np.load(folder / s["labels"])
        assert feats.shape == (s["n"], manifest["dim"]) and labels.shape == (s["n"],), s
    return names


def test_killed_extraction_resumes_at_first_missing_shard(tmp_path: Path) -> None:
    script = tmp_path / "extract.py"
    script.write_text(_EXTRACT)
    cache = tmp_path / "cache"
    killed = _Extraction(script, cache, "128", "tear")
    try:
        torn = killed.next_line()
    finally:
        killed.kill()
    [key_dir] = [p.parent for p in cache.glob("*/manifest.json")]
    assert torn == f"torn .shard-00002.npy.tmp-{killed.proc.pid}.npy"  # atomic writes: the tear hit a temp
    partial = json.loads((key_dir / "manifest.json").read_text())
    assert not partial["complete"] and [s["index"] for s in partial["shards"]] == [0, 1]
    # What a killed extraction leaves: whole shards that the manifest lists, and its temp file.
    before = _whole_files(key_dir)
    assert {p.name for p in key_dir.iterdir()} - before == {torn.split()[1]}

    out = subprocess.run(
        [sys.executable, str(script), str(cache), "128"],
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    key, hit, resumed = out.stdout.split()
    assert key == key_dir.name and hit == "False" and int(resumed) == 2  # resumed at shard 2, the torn one
    resumed_fs = FeatureStore(cache).get(key)
    assert resumed_fs is not None
    n_shards = -(-len(load_dataset("digits", "train")) // 128)
    assert [s["index"] for s in resumed_fs.manifest["shards"]] == list(range(n_shards))
    # The dead writer's temp file is ignored: no listed file is a temp file, every file under a final name
    # is whole, and nothing but that temp file (if it is not cleaned up) is left over.
    after = _whole_files(key_dir)
    assert {p.name for p in key_dir.iterdir()} - after <= {torn.split()[1]}
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


def test_concurrent_writers_do_not_corrupt(tmp_path: Path) -> None:
    script = tmp_path / "extract.py"
    script.write_text(_EXTRACT)
    cache = tmp_path / "cache"
    first = _Extraction(script, cache, "256", "pause")
    second = None
    try:
        assert first.next_line() == "paused"  # it holds the key's lock, shard 0 written, shard 1 not
        second = _Extraction(script, cache, "256", "announce")
        waiting = second.next_line()  # no complete features yet, so it asks for the lock the first holds
        first.send("go")
        outs = [first.finish(), second.finish()]
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
    key = outs[0][0]
    assert outs[1][0] == key and waiting == f"waiting {key}.lock"
    assert [o[1] for o in outs] == ["False", "True"]  # the first extracted; the second waited, then hit
    fs = FeatureStore(cache).get(key)
    X, y = fs.load()
    assert X.shape[0] == len(y) == len(load_dataset("digits", "train")) and np.isfinite(X).all()
    assert len(list(cache.glob("*/shard-*.labels.npy"))) == -(-len(y) // 256)
