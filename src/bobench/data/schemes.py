"""Spec strings of the dense readers (``scheme:/path?key=value&...``) and their missing-path error.

Torch-free; shared by :mod:`bobench.data.dense_readers` (detection) and :mod:`bobench.data.segmentation`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from urllib.parse import parse_qsl

from bobench.data.errors import DatasetError
from bobench.registry import suggest


def parse_scheme_spec(
    spec: str, schemes: Mapping[str, Sequence[str]], what: str
) -> tuple[str, str, dict[str, str]]:
    """``"sim10k:/data?seed=1"`` -> ``("sim10k", "/data", {"seed": "1"})``; a bare name has scheme ``""``.

    Args:
        spec: the spec string (``~`` in the path is expanded).
        schemes: scheme -> the option names it accepts (an unknown scheme accepts none).
        what: the kind of spec, for messages (``"detection"``, ``"segmentation"``).

    Raises:
        DatasetError: an option the scheme does not accept (with a did-you-mean and the accepted ones).
    """
    body, _, query = spec.strip().partition("?")
    scheme, sep, path = body.partition(":")
    if not sep:
        scheme, path = "", body
    options = dict(parse_qsl(query, keep_blank_values=True))
    allowed = list(schemes.get(scheme, ()))
    for key in options:
        if key not in allowed:
            raise DatasetError(
                f"{what} spec {spec!r}: unknown option {key!r}.{suggest(key, allowed)} "
                f"{scheme or 'this dataset'} accepts {', '.join(allowed) or 'no options'}."
            )
    return scheme, os.path.expanduser(path), options


def need_path(path: str, what: str, fix: str) -> str:
    """``path`` if it exists, else a DatasetError naming ``what`` and the ``fix`` (e.g. the layout)."""
    if not os.path.exists(path):
        raise DatasetError(f"{what} {path} does not exist; {fix}.")
    return path
