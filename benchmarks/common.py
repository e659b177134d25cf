"""Shared helpers for benchmarks: machine description and result files."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    from bobench.provenance import device_info

    return {
        "device": device_info("cuda" if torch.cuda.is_available() else "cpu"),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def save(name: str, payload: dict[str, Any], quick: bool = False) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the machine attached; return its path. A ``quick``
    (smoke) run writes ``benchmarks/results/quick/<name>.json`` instead (not tracked by git), so it never
    replaces the numbers BENCHMARKS.md quotes."""
    folder = RESULTS / "quick" if quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=float))
    return path


def measure_quiet(
    measure: Callable[[], dict[str, Any]], label: str, retries: int, max_foreign: float
) -> dict[str, Any]:
    """``measure()`` (a dict with ``foreign_cores``), repeated up to ``retries`` times while other
    processes used more than ``max_foreign`` cores meanwhile (on 2 cores one busy neighbour slows
    torch's threads several fold); the least disturbed attempt counts, and every attempt is kept in
    ``attempts``."""
    attempts = [measure()]
    while attempts[-1]["foreign_cores"] > max_foreign and len(attempts) <= retries:
        print(
            f"  ({label}: {attempts[-1]['foreign_cores']:.2f} cores used by others; measuring again)",
            flush=True,
        )
        attempts.append(measure())
    best = min(attempts, key=lambda a: a["foreign_cores"])
    return {**best, "attempts": attempts}


def best_of(fn, repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls of ``fn`` (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def extract_patches13(backbone: str, image_size: int | None, prefix: str):
    """One backbone's extraction pass over patches13 (train/val/test) into an empty cache, timed.

    The shared first step of the amortisation benchmarks (P3, P6): what the protocols after it reuse.

    Returns:
        ``(backbone, store, options, {split: FeatureSet}, seconds)``.
    """
    import tempfile

    from bobench import create_backbone, load_dataset
    from bobench.features import ExtractOptions, FeatureStore

    bb = create_backbone(backbone)
    store = FeatureStore(tempfile.mkdtemp(prefix=prefix))
    opts = ExtractOptions(image_size=image_size, progress=False, device="cpu")  # bobench's default workers
    t0 = time.perf_counter()
    feats = {
        s: store.get_or_extract(bb, load_dataset("patches13", split=s), opts)
        for s in ("train", "val", "test")
    }
    return bb, store, opts, feats, time.perf_counter() - t0


def fresh_features(folder: Path, inputs: Path | None = None, empty_inputs: bool = False) -> Path:
    """``folder`` emptied for a new feature cache. With ``inputs``, its input cache (``folder/inputs``) is
    that shared folder, emptied first when ``empty_inputs``: every run of the input-cache benchmarks
    extracts into fresh feature folders while one input cache is filled once and reused."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    if inputs is not None:
        if empty_inputs:
            shutil.rmtree(inputs, ignore_errors=True)
        inputs.mkdir(parents=True, exist_ok=True)
        folder.mkdir(parents=True)
        (folder / "inputs").symlink_to(inputs, target_is_directory=True)
    return folder


def patches13_jpegs(root: Path, copies: int, size: tuple[int, int] | None = None) -> Path:
    """patches13 (all splits) as JPEG class folders (quality 90), each crop written ``copies`` times,
    resized (bicubic) to ``size`` ``(W, H)`` first when given (e.g. a photo's 500 x 375)."""
    from PIL import Image

    from bobench import load_dataset

    for split in ("train", "val", "test"):
        ds = load_dataset("patches13", split=split)
        for i in range(len(ds)):
            img, label = ds[i]
            folder = root / ds.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            if size is not None:
                img = img.resize(size, Image.Resampling.BICUBIC)
            for c in range(copies):
                img.save(folder / f"{split}{i:04d}_{c}.jpg", quality=90)
    return root
