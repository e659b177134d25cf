"""Download release weights published at plain URLs into a local cache, verified and resumable.

Many zoo backbones (MoCo v3, MAE, DINO ResNet-50, VICReg, MiDaS, SAM, SSCD) publish weights at plain
URLs (``dl.fbaipublicfiles.com``, GitHub releases) rather than on the Hugging Face Hub.
:func:`url_file` returns such a file from the cache, or downloads it with the standard library only:

* the cache lives in :func:`weights_dir`, one sub-folder per host (see :func:`cached_path`);
* a download streams in chunks to ``<path>.part`` and resumes a partial ``.part`` with an HTTP Range
  request (restarting from zero when the server ignores Range);
* the sha256 is computed while streaming, checked when given, and the file is renamed into place
  atomically, so the final path only ever holds a complete, verified file;
* a file lock next to the file makes two processes fetching the same file take turns;
* an offline machine (``BOBENCH_OFFLINE=1``, or a TCP probe of the URL's host failing within 3 s)
  fails at once with a message that says where to put the file by hand.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlsplit

from filelock import FileLock

from bobench.backbones.errors import WeightsError, WeightsUnavailableError
from bobench.backbones.files import reachable, verify_sha256

PROBE_TIMEOUT_S = 3.0  # TCP probe of the host: an offline machine fails in seconds, not minutes
READ_TIMEOUT_S = 60.0  # per socket operation, so a stalled transfer fails instead of hanging
CHUNK = 1 << 20  # stream 1 MiB at a time; a multi-GB checkpoint is never held in RAM
_TRUE = {"1", "true", "yes", "on"}

# (path, size, mtime_ns, expected sha256) of files verified in this process: hashing a multi-GB
# checkpoint on every call would cost seconds, and a changed file has another size or mtime.
_verified: set[tuple[str, int, int, str | None]] = set()


def weights_dir() -> Path:
    """The weights cache root: ``$BOBENCH_WEIGHTS``, else ``$BOBENCH_CACHE/weights``, else
    ``~/.cache/bobench/weights`` (read on every call, so tests and users can redirect it)."""
    if explicit := os.environ.get("BOBENCH_WEIGHTS"):
        return Path(explicit).expanduser()
    base = os.environ.get("BOBENCH_CACHE") or Path.home() / ".cache" / "bobench"
    return Path(base).expanduser() / "weights"


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"weights URL must be http(s)://host/..., got {url!r}")
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def cached_path(url: str, filename: str | None = None) -> Path:
    """Where the file for ``url`` lives in the cache (it need not exist).

    Args:
        url: an ``http`` or ``https`` URL.
        filename: the cached file's name; defaults to the URL path's basename (query string ignored).

    Returns:
        ``weights_dir()/<host>/<filename>``, e.g.
        ``weights_dir()/dl.fbaipublicfiles.com/mae_pretrain_vit_base.pth``; an explicit non-default
        port is part of the folder name (``127.0.0.1_8000``) so two servers never clash.

    Raises:
        ValueError: not an http(s) URL, no file name in it, or a file name with a path separator.
    """
    host, port = _host_port(url)
    default_port = urlsplit(url).port is None
    name = filename if filename is not None else unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    if not name or name in {".", ".."} or "/" in name or "\\" in name:
        raise ValueError(f"cannot derive a file name from {url!r}; pass filename=")
    folder = host if default_port else f"{host}_{port}"
    return weights_dir() / re.sub(r"[^A-Za-z0-9._-]", "_", folder) / name


def _offline_reason(url: str, download: bool) -> str | None:
    """Why ``url`` cannot be downloaded from here, or None when it can be tried."""
    if not download:
        return "download=False"
    if os.environ.get("BOBENCH_OFFLINE", "").lower() in _TRUE:
        return "BOBENCH_OFFLINE is set"
    # HF_HUB_OFFLINE is deliberately not consulted: it is the Hub's switch, not one for plain URLs.
    host, port = _host_port(url)
    if not reachable(host, port, PROBE_TIMEOUT_S):
        return f"{host}:{port} cannot be reached (offline)"
    return None


def _unavailable(url: str, path: Path, sha256: str | None, reason: str) -> WeightsUnavailableError:
    digest = f" (sha256 {sha256})" if sha256 else ""
    return WeightsUnavailableError(
        f"weights {url} are not in the local cache and cannot be downloaded: {reason}. Either download "
        f"{url}{digest} on a machine with network and place it at {path}, or pass the file with "
        f"weights=PATH (CLI: --weights PATH), or run once where the network exists to fill the cache."
    )


def _check_cached(path: Path, sha256: str | None) -> Path:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, sha256)
    if key not in _verified:
        verify_sha256(path, sha256)
        _verified.add(key)
    return path


def _user_agent() -> str:
    try:
        version = metadata.version("bobench")
    except metadata.PackageNotFoundError:
        version = "0"
    return f"bobench/{version} (+https://pypi.org/project/bobench) Python-urllib"


@contextmanager
def _byte_bar(description: str, total: int | None, done: int, enabled: bool) -> Iterator:
    """A rich bar with bytes, rate and ETA; a no-op callable when disabled or stderr is not a terminal
    (the convention of :mod:`bobench.progress`, whose bar counts items, not bytes)."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total, completed=done)
        yield lambda n: bar.advance(task, n)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range: bytes a-b/N`` header; None for what is absent."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    first, total = m.groups()
    return (int(first) if first else None), (int(total) if total and total != "*" else None)


def _fetch(url: str, part: Path, progress: bool) -> str:
    """Download ``url`` into ``part``, resuming what is there; return the whole file's sha256.

    Raises:
        WeightsError: an HTTP error status or a truncated transfer (``part`` is kept for a resume).
        WeightsUnavailableError: the connection failed.
    """
    for attempt in range(2):  # the second attempt restarts from zero after an unusable Range answer
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": _user_agent()}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            resp = urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=READ_TIMEOUT_S
            )
        except urllib.error.HTTPError as exc:
            _, total = _content_range(exc.headers.get("Content-Range"))
            exc.close()
            if exc.code == 416 and offset and attempt == 0:
                if total == offset:  # the .part is already complete (stopped before the rename)
                    return _hash_prefix(part, offset).hexdigest()
                part.unlink()
                continue
            raise WeightsError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}") from exc
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, DNS, bad status line
            raise WeightsUnavailableError(f"downloading {url} failed: {exc}") from exc
        with resp:
            first, total = _content_range(resp.headers.get("Content-Range"))
            if resp.status == 206 and offset and first != offset:
                part.unlink()  # an answer for other bytes than we asked: start over
                continue
            if resp.status != 206:  # 200: the server ignored Range and sends the whole file
                offset = 0
            length = resp.headers.get("Content-Length")
            if total is None and length is not None:
                total = offset + int(length)
            hasher = _hash_prefix(part, offset)
            received = offset
            with (
                open(part, "ab" if offset else "wb") as f,
                _byte_bar(part.name[: -len(".part")], total, offset, progress) as advance,
            ):
                try:
                    while block := resp.read(CHUNK):
                        f.write(block)
                        hasher.update(block)
                        received += len(block)
                        advance(len(block))
                except (OSError, http.client.HTTPException) as exc:  # reset, timeout: keep bytes to resume
                    raise WeightsError(
                        f"downloading {url} broke off after {received} bytes ({exc}); call again to resume"
                    ) from exc
        if total is not None and received != total:
            raise WeightsError(
                f"downloading {url} stopped at {received} of {total} bytes; call again to resume"
            )
        return hasher.hexdigest()
    raise WeightsError(f"downloading {url} failed: the server's answers to a Range request do not fit")


def _hash_prefix(part: Path, size: int) -> hashlib._Hash:
    """sha256 state after the first ``size`` bytes of ``part`` (the bytes a resume keeps)."""
    h = hashlib.sha256()
    if size:
        with open(part, "rb") as f:
            while (remaining := size - f.tell()) > 0 and (block := f.read(min(CHUNK, remaining))):
                h.update(block)
    return h


def url_file(
    url: str,
    *,
    sha256: str | None = None,
    filename: str | None = None,
    download: bool = True,
    progress: bool = True,
) -> Path:
    """The verified local file for ``url``, downloaded into the cache if needed.

    A cached file is sha256-verified once per process per file version (size and mtime) and returned
    at once, without touching the network. Otherwise, when ``download`` and the URL's host accepts a
    TCP connection within 3 s (and ``BOBENCH_OFFLINE`` is not set), the file is streamed to
    ``<path>.part`` under a file lock, resuming a partial ``.part`` with a Range request, verified,
    and renamed into place atomically.

    Args:
        url: an ``http`` or ``https`` URL of the published weights.
        sha256: the expected hex digest (full or a prefix); None skips the check.
        filename: the cached file's name; defaults to the URL's basename (see :func:`cached_path`).
        download: False never touches the network.
        progress: show a bar (bytes, rate, ETA) on a terminal.

    Returns:
        The path of the complete, verified file.

    Raises:
        WeightsUnavailableError: not cached and ``download=False``, offline, or the connection failed;
            the message names the URL, the exact cache path to place the file at, and ``weights=PATH``.
        WeightsError: an HTTP error status (named with the URL), a truncated transfer (the ``.part`` is
            kept, so calling again resumes), or a sha256 mismatch (a downloaded file is deleted; a
            cached one is left for the user to inspect). The message gives expected and actual digests.
    """
    path = cached_path(url, filename)
    if path.is_file():
        return _check_cached(path, sha256)
    if reason := _offline_reason(url, download):
        raise _unavailable(url, path, sha256, reason)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One writer per file across threads and processes: a second caller waits, then finds the file.
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            return _check_cached(path, sha256)
        part = path.with_name(path.name + ".part")
        try:
            digest = _fetch(url, part, progress)
        except WeightsUnavailableError as exc:
            raise _unavailable(url, path, sha256, str(exc)) from exc
        if sha256 and not digest.startswith(sha256.lower()):
            part.unlink()
            raise WeightsError(
                f"sha256 of {url} is {digest}, expected {sha256}: the download is corrupt or the URL "
                "now serves a different release. The file was deleted; check the URL and the digest."
            )
        os.replace(part, path)  # atomic: the final path only ever holds a complete, verified file
        st = path.stat()
        _verified.add((str(path), st.st_size, st.st_mtime_ns, sha256))
    return path
