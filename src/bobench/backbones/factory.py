"""``create_backbone``: the one front door for every backbone.

Specs:
    ``timm:convnext_base.fb_in22k``, ``torchvision:resnet50``, ``hf:facebook/dinov2-small``,
    ``open_clip:ViT-B-16/laion2b_s34b_b88k``, ``mypkg.models:make_net`` (any callable returning an
    ``nn.Module``), a zoo name (``mobilenetv2_100.tv_in1k``), and ``random/<any of these>`` for the
    random-init control of the same architecture.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from bobench.backbones.base import Backbone
from bobench.backbones.weights import (
    WeightsError,
    apply_state_dict,
    load_state_dict,
    package_file,
    state_digest,
    verified_path,
)
from bobench.backbones.zoo import ZooEntry
from bobench.registry import Registry, UnknownNameError, suggest

#: named backbones: the built-in zoo and plugins, via the ``bobench.backbones`` entry-point group
BACKBONES = Registry("backbone", group="bobench.backbones")

#: adapters, one module per source; each exposes ``build(name, *, pretrained) -> Backbone``
SOURCES = Registry("source")
SOURCES.register("timm", "bobench.backbones.timm_source:build")
SOURCES.register("torchvision", "bobench.backbones.torchvision_source:build")
SOURCES.register("hf", "bobench.backbones.hf_source:build")
SOURCES.register("open_clip", "bobench.backbones.open_clip_source:build")


def _resolve_zoo_weights(w: dict[str, Any]) -> tuple[str, str]:
    """(local path, origin shown on the card) of a zoo entry's weights."""
    if "path" in w:
        return str(verified_path(Path(w["path"]), w.get("sha256"))), w.get("url") or w["path"]
    if "package" in w and "file" in w:
        path = str(package_file(w["package"], w["file"], w.get("sha256")))
        return path, w.get("url") or f"{w['package']}:{w['file']}"
    raise WeightsError(f"zoo weights entry {w} names neither 'path' nor 'package' + 'file'")


def _build_source(spec: str, pretrained: bool) -> Backbone:
    source, sep, rest = spec.partition(":")
    if sep and source in SOURCES:
        if not rest:
            raise ValueError(f"backbone spec {spec!r} names no model after '{source}:'")
        return SOURCES.load(source)(rest, pretrained=pretrained)
    if (sep and "." in source) or (sep and source.isidentifier() and source not in SOURCES):
        from bobench.backbones.callable_source import build

        return build(spec, pretrained=pretrained)
    names = list(BACKBONES)
    hint = suggest(spec, names)
    raise UnknownNameError(
        f"unknown backbone {spec!r}.{hint} Use a zoo name (`bobench backbones list`) or a spec "
        f"<source>:<model> with source one of {sorted(SOURCES)} or a python 'module:callable'."
    )


def create_backbone(
    spec: str,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    *,
    init_seed: int = 0,
) -> Backbone:
    """Build a backbone in eval mode, with its card filled in.

    Args:
        spec: zoo name or source spec (see the module docstring); ``random/<spec>`` forces random init.
        pretrained: load the published weights; ``False`` gives the random-init control.
        weights: a local ``.safetensors`` or torch file to load instead (``weights_only=True``).
        init_seed: seed for random initialisation, so random-init controls are reproducible.

    Returns:
        A :class:`~bobench.backbones.base.Backbone` with ``card.weights_digest`` set to a content hash
        of its parameters.

    Raises:
        UnknownNameError: unknown name, with suggestions.
        WeightsUnavailableError: weights not on disk and not downloadable here (message says where
            to put which file).
        WeightsError: the weights file does not fit the architecture (missing / unexpected keys).

    Example:
        >>> bb = create_backbone("random/mobilenetv2_100")
        >>> bb.embed(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 1280])
    """
    name = spec
    if spec.startswith("random/") and spec not in BACKBONES:
        spec, pretrained = spec[len("random/") :], False
    entry: ZooEntry | None = None
    factory: Any = None
    overrides: dict[str, Any] = {}
    if spec in BACKBONES:
        target = BACKBONES.load(spec)
        if isinstance(target, ZooEntry):
            entry = target
            pretrained = pretrained and entry.pretrained
            spec = entry.spec
            overrides = dict(entry.card)
        else:  # a plugin registered a factory: it gets the same treatment as a user callable
            factory = target
            overrides = dict(BACKBONES[spec].meta.get("card", {}))
    weights_path = str(weights) if weights is not None else None
    weights_origin = weights_path
    remap = "none"
    if weights_path is None and pretrained and entry is not None and entry.weights:
        weights_path, weights_origin = _resolve_zoo_weights(entry.weights)
        remap = entry.weights.get("remap", "none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        if factory is not None:
            from bobench.backbones.callable_source import build

            bb = build(factory, pretrained=pretrained and weights_path is None, name=spec)
        else:
            bb = _build_source(spec, pretrained=pretrained and weights_path is None)
    if weights_path is not None:
        sd = load_state_dict(weights_path)
        apply_state_dict(bb.model, bb.prepare_state_dict(sd), remap=remap, source=weights_path)
    card = bb.card
    loaded = weights_path is not None or pretrained
    changes: dict[str, Any] = {
        "name": name,
        "pretrained": loaded,
        "weights_digest": state_digest(bb.model),
    }
    if weights_origin is not None:
        changes["weights"] = weights_origin
    if not loaded:
        changes.update(pretraining="none", pretraining_data="none", weights=f"random-init(seed={init_seed})")
        overrides = {k: v for k, v in overrides.items() if k not in {"pretraining", "pretraining_data"}}
    for k in ("input_size", "mean", "std"):
        if k in overrides:
            overrides[k] = tuple(overrides[k])
    bb.card = card.replace(**{**overrides, **changes})
    return bb.eval()
