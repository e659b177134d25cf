"""Is a weights file already on this machine? Answered from the caches alone, never downloading.

The preflight of a battle (:mod:`bobench.preflight`) asks every backbone this before any work, so it
must cost a few ``stat()`` calls, not a model build. Each source adapter answers for its own files
with a ``missing_weights(name)`` function built on these helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse


@dataclass(frozen=True)
class Missing:
    """Weights that are not on disk: what is missing, and the host a download would come from."""

    what: str
    host: str


def hub_cached(repo_id: str, filenames: tuple[str, ...]) -> Path | None:
    """The first of ``filenames`` of Hub repo ``repo_id`` in the local Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str):  # a path; the other answers are None and _CACHED_NO_EXIST
            return Path(found)
    return None


def hub_missing(repo_id: str, filenames: tuple[str, ...]) -> Missing | None:
    """None when one of ``filenames`` of ``repo_id`` is cached, else a :class:`Missing`."""
    if hub_cached(repo_id, filenames) is not None:
        return None
    return Missing(
        f"{' or '.join(filenames)} of hub repo {repo_id} not in the Hugging Face cache", "huggingface.co"
    )


def file_missing(path: Path, url: str) -> Missing | None:
    """None when ``path`` (where ``url`` is cached) is a file, else a :class:`Missing`."""
    if path.is_file():
        return None
    return Missing(f"{url} is not cached at {path}", urlparse(url).hostname or url)
