"""The one exception type of :mod:`bobench.data`."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset spec, file or folder that cannot be used as asked.

    The message always names the offending spec key, file or folder (with a line number for CSV
    manifests) and says what to do about it, so the CLI can print it as is, without a traceback.
    """
