"""Small file helpers shared by the caches: content keys and writes that are never seen half done."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_save_npy", "atomic_write_bytes", "config_sha"]


def config_sha(obj: Any) -> str:
    """sha256 of ``obj``'s canonical JSON (sorted keys, no spaces): a cache key of plain data."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling, synced, then renamed (never half written)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    """``np.save`` to ``path`` through a temporary sibling, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
