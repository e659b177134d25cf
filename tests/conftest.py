"""Shared test set-up: offline, small, deterministic, CPU only."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread per test process (inherited by the subprocesses tests start): tests check
# correctness, and on 2 cores a second process (DataLoader worker, concurrent writer) makes OpenMP's
# spinning threads wait on each other, turning milliseconds into seconds.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/user_models.py for `user_models:make_net`


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's ~/.cache/bobench or results database from a test."""
    root = tmp_path_factory.mktemp("bobench-home")
    monkeypatch.setenv("BOBENCH_CACHE", str(root / "cache"))
    monkeypatch.setenv("BOBENCH_DB", str(root / "results.db"))


@pytest.fixture(scope="session")
def chelsea():
    """A real photo of a cat (skimage ships it)."""
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.chelsea())
