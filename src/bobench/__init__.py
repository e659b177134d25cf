"""bobench: Battle of the Backbones as a tested, resumable, cached benchmark harness.

The top-level names are imported lazily so that ``import bobench`` (and ``bobench backbones list``)
does not import torch.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("bobench")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["FeatureStore", "ResultStore", "__version__", "create_backbone", "load_dataset"]

_LAZY = {
    "create_backbone": "bobench.backbones.factory",
    "load_dataset": "bobench.data",
    "FeatureStore": "bobench.features",
    "ResultStore": "bobench.store",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bobench' has no attribute {name!r}")
