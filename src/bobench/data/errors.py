"""The one exception type of :mod:`bobench.data`."""

from __future__ import annotations

import difflib


class DatasetError(ValueError):
    """A dataset spec, file or folder that cannot be used as asked.

    The message always names the offending spec key, file or folder (with a line number for CSV
    manifests) and says what to do about it, so the CLI can print it as is, without a traceback.
    """


def did_you_mean(name: str, choices: list[str]) -> str:
    """Return ``" Did you mean 'a' or 'b'?"`` for close matches of ``name`` in ``choices``, else ``""``."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
