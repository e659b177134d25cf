"""The one exception type of :mod:`bobench.data`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class DatasetError(ValueError):
    """A dataset spec, file or folder that cannot be used as asked.

    The message always names the offending spec key, file or folder (with a line number for CSV
    manifests) and says what to do about it, so the CLI can print it as is, without a traceback.
    """


_WORKER_PREFIX = "Caught "
_ORIGINAL = "\nOriginal Traceback (most recent call last):"


def unwrap_worker_error(exc: BaseException) -> BaseException:
    """The error a DataLoader worker raised, as it was raised there, instead of torch's wrapper.

    A worker's exception reaches the main process re-created with the message ``Caught DatasetError in
    DataLoader worker process 0. Original Traceback ...``: the file name and the fix are buried in a
    traceback and the first line, the one a battle prints, says neither. This returns a new exception
    of the same type with the original message (the worker's traceback text kept as a note), or
    ``exc`` itself when it is not such a wrapper.
    """
    text = str(exc)
    if not (text.startswith(_WORKER_PREFIX) and _ORIGINAL in text):
        return exc
    kind = type(exc)
    marker = f"{kind.__module__}.{kind.__qualname__}: "
    at = text.rfind(marker)
    if at < 0:
        marker = f"{kind.__qualname__}: "
        at = text.rfind(marker)
    if at < 0:
        return exc
    try:
        original = kind(text[at + len(marker) :].strip())
    except Exception:  # an exception type whose constructor wants more than a message
        return exc
    original.add_note(text[:at].rstrip())  # where it happened, for BOBENCH_DEBUG and the stored traceback
    return original


@contextmanager
def worker_errors_unwrapped() -> Iterator[None]:
    """Inside the block, a DataLoader worker's error is re-raised as itself (see
    :func:`unwrap_worker_error`), so the message names the file and the fix instead of the worker."""
    try:
        yield
    except Exception as exc:
        original = unwrap_worker_error(exc)
        if original is exc:
            raise
        raise original from None
