"""Small file helpers shared by the caches: content keys and writes that are never seen half done."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_save_npy", "atomic_write_bytes", "config_sha", "read_manifest", "write_manifest"]


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


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """``folder/manifest.json`` as a dict, or None when it is missing or not (yet) valid JSON."""
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` to ``folder/manifest.json`` atomically (indented JSON): the pair of
    :func:`read_manifest`."""
    atomic_write_bytes(folder / "manifest.json", json.dumps(manifest, indent=1).encode())


def atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    """``np.save`` to ``path`` through a temporary sibling, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
