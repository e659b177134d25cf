"""The backbone contract every adapter satisfies.

A :class:`Backbone` is an ``nn.Module`` that wraps one image model (``.model``) and exposes:

* ``card`` - a :class:`~bobench.backbones.card.BackboneCard`;
* ``transform(train)`` - the preprocessing, resolved from the card only;
* ``embed(x) -> [B, D]`` - one pooled vector per image (pool declared on the card);
* ``features(x) -> list[Tensor]`` - multi-scale maps ``[B, C_i, H/s_i, W/s_i]`` described by
  ``feature_info`` (channels and stride per map). Plain ViTs return a simple feature pyramid at strides
  4/8/16/32 built from their last map, as in ViTDet.

Adapters (one module per source) subclass :class:`Backbone` and implement ``embed`` and ``features``;
they never inherit from each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bobench.backbones.card import BackboneCard

PYRAMID_STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class FeatureInfo:
    """One map returned by :meth:`Backbone.features`."""

    channels: int
    stride: int
    name: str = ""


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def simple_feature_pyramid(
    fmap: torch.Tensor, image_hw: tuple[int, int], strides: Sequence[int] = PYRAMID_STRIDES
) -> list[torch.Tensor]:
    """Parameter-free simple feature pyramid from one map (ViTDet's layout, without its learned convs).

    Each output has spatial size ``ceil(H / s) x ceil(W / s)`` so the strides are exact whatever the
    patch size (14 or 16): finer levels are bilinearly upsampled, coarser ones max-pooled. A dense head
    that wants ViTDet's learned deconvolutions adds them on top.

    Example:
        >>> maps = simple_feature_pyramid(torch.zeros(2, 192, 14, 14), (224, 224))
        >>> [tuple(m.shape[-2:]) for m in maps]
        [(56, 56), (28, 28), (14, 14), (7, 7)]
    """
    h, w = image_hw
    out = []
    for s in strides:
        size = (math.ceil(h / s), math.ceil(w / s))
        if size == tuple(fmap.shape[-2:]):
            out.append(fmap)
        elif size[0] >= fmap.shape[-2]:
            out.append(F.interpolate(fmap, size=size, mode="bilinear", align_corners=False))
        else:
            out.append(F.adaptive_max_pool2d(fmap, size))
    return out


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, N, C]`` patch tokens (prefix tokens already removed) → ``[B, C, gh, gw]``."""
    b, n, c = tokens.shape
    gh, gw = grid
    if n != gh * gw:
        raise ValueError(f"{n} tokens do not form a {gh}x{gw} grid")
    return tokens.transpose(1, 2).reshape(b, c, gh, gw)


def build_transform(preprocess: dict[str, Any]) -> Callable:
    """torchvision transform from a resolved preprocessing dict (see :meth:`Backbone.preprocess`)."""
    from timm.data import create_transform

    return create_transform(
        input_size=tuple(preprocess["input_size"]),
        is_training=preprocess["train"],
        interpolation=preprocess["interpolation"],
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
        crop_pct=preprocess["crop_pct"],
        # keep training augmentation to the torchvision basics: crop, flip; no colour jitter or RandAug
        color_jitter=None,
        auto_augment=None,
    )


class Backbone(nn.Module):
    """Base class of all adapters. See the module docstring for the contract.

    Args:
        model: the wrapped image model; kept whole (classifier included) so logits stay available.
        card: its card.
        feature_info: one :class:`FeatureInfo` per map that :meth:`features` returns.
    """

    #: whether the maps from ``features`` are a synthetic pyramid built from one ViT map
    pyramid: bool = False
    #: the model only runs at ``card.input_size`` (e.g. CLIP's fixed position embeddings); an
    #: ``image_size`` override in :meth:`preprocess` is then ignored, and the size actually used is
    #: what the resolved preprocessing (and so the feature-cache key) records
    fixed_input_size: bool = False
    #: input sides must be a multiple of this (e.g. 64 for Stable Diffusion's VAE + UNet); an
    #: ``image_size`` override in :meth:`preprocess` is rounded up to it
    input_multiple: int = 1

    def __init__(self, model: nn.Module, card: BackboneCard, feature_info: Sequence[FeatureInfo]) -> None:
        super().__init__()
        self.model = model
        self.card = card
        self.feature_info = list(feature_info)

    # -- contract --------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``[B, card.embed_dim]`` for a normalised image batch ``[B, 3, H, W]``."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale maps, one per entry of ``feature_info``, finest first."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Classifier output of the wrapped model, where it has one.

        Raises:
            NotImplementedError: the model has no classification head.
        """
        raise NotImplementedError(f"{self.card.name} has no classification head")

    def prepare_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adapt a checkpoint to ``self.model``'s key layout before strict loading (default: as is).

        Adapters whose ``model`` is part of a larger release (e.g. CLIP's image tower) override this.
        """
        return sd

    def layer_ids(self) -> dict[str, int] | None:
        """Layer id (0 = stem, growing toward the output) of each ``self.model`` parameter, for layer-wise
        lr decay, where this adapter knows better than :func:`bobench.backbones.layers.layer_ids`' rules
        (timm's ``group_matcher``, else the generic block map). Default: None, use those rules."""
        return None

    # -- preprocessing ---------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self.card.embed_dim

    @property
    def prefers_channels_last(self) -> bool:
        """CNNs run faster channels_last on CPU and GPU; token models gain nothing."""
        return self.card.family == "cnn"

    def preprocess(self, train: bool = False, image_size: int | None = None) -> dict[str, Any]:
        """The resolved preprocessing as plain data (hashed into feature-cache keys).

        Args:
            train: training augmentation (random resized crop + flip) instead of resize + centre crop.
            image_size: override the card's input size (e.g. small images in tests); mean, std,
                interpolation and crop stay the card's. Ignored for ``fixed_input_size`` models,
                rounded up to a multiple of ``input_multiple``.
        """
        c, h, w = self.card.input_size
        if image_size is not None and not self.fixed_input_size:
            m = max(1, int(self.input_multiple))
            h = w = -(-int(image_size) // m) * m
        return {
            "train": bool(train),
            "input_size": [c, h, w],
            "interpolation": self.card.interpolation,
            "crop_pct": float(self.card.crop_pct),
            "mean": [float(v) for v in self.card.mean],
            "std": [float(v) for v in self.card.std],
        }

    def transform(self, train: bool = False, image_size: int | None = None) -> Callable:
        """PIL image → normalised tensor, built from the card (see :meth:`preprocess`)."""
        return build_transform(self.preprocess(train, image_size))

    def extra_repr(self) -> str:
        c = self.card
        return f"name={c.name!r}, family={c.family}, embed_dim={c.embed_dim}, params={c.params:,}"
