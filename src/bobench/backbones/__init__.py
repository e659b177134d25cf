"""Backbones: one contract (:class:`Backbone`), one front door (:func:`create_backbone`).

Importing this package is cheap; torch is imported when a backbone is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bobench.backbones.base import Backbone, FeatureInfo
    from bobench.backbones.card import BackboneCard
    from bobench.backbones.factory import BACKBONES, create_backbone

__all__ = ["BACKBONES", "Backbone", "BackboneCard", "FeatureInfo", "create_backbone", "list_backbones"]

_LAZY = {
    "Backbone": "bobench.backbones.base",
    "FeatureInfo": "bobench.backbones.base",
    "BackboneCard": "bobench.backbones.card",
    "BACKBONES": "bobench.backbones.factory",
    "create_backbone": "bobench.backbones.factory",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bobench.backbones' has no attribute {name!r}")


def list_backbones() -> list[dict[str, Any]]:
    """Every named backbone with its listing metadata (name, spec, family, pretraining, ...).

    Reads the zoo and plugins only: never imports torch.
    """
    from bobench.registry import Registry

    reg = Registry("backbone", group="bobench.backbones", list_command="bobench backbones list")
    return [{"name": name, **reg[name].meta} for name in reg]
