"""BackboneCard: the typed description of a backbone that travels with every result.

The card is the *only* source of a backbone's input contract (size, mean, std, interpolation, crop)
and provenance. Transforms are resolved from it; nothing hard-codes normalisation per dataset or name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Family = Literal["cnn", "vit", "hybrid", "other"]
Pool = Literal["cls", "mean", "avg", "model"]

#: pretraining method → its kind, the grouping ``bobench backbones list --method`` filters on
PRETRAINING_KINDS = {
    "supervised": "supervised",
    **dict.fromkeys(
        ("dino", "dinov2", "dinov3", "mocov3", "mae", "vicreg", "vicregl", "sscd", "fcmae", "eva02-mim"),
        "ssl",
    ),
    **dict.fromkeys(("clip", "siglip", "siglip2", "clip+supervised"), "vision-language"),
    "midas": "depth",
    "sam": "segmentation",
    "latent-diffusion": "generative",
    "none": "none",
}

_TUPLE_FIELDS = ("input_size", "mean", "std")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UNKNOWN = "unknown"


@dataclass(frozen=True)
class BackboneCard:
    """What a backbone is, where it came from and what input it expects.

    Attributes:
        name: the name the user asked for (zoo name or spec), e.g. ``"timm:resnet18"``.
        source: adapter that built it: timm / torchvision / hf / open_clip / callable.
        spec: the fully resolved source spec, e.g. ``"timm:mobilenetv2_100"``.
        family: cnn / vit / hybrid / other.
        params: parameter count of the image model, counted on the built module.
        embed_dim: size of ``embed()`` output.
        pool: how ``embed()`` pools: ``cls`` token, ``mean`` of tokens, ``avg`` global average pool of
            a map, or ``model`` (the model's own pooling/projection, e.g. CLIP's attention pool).
        pretrained: False for a random-init control.
        pretraining: method (``supervised``, ``dino``, ``clip``, ``none`` for random init, ...).
        pretraining_data: e.g. ``IN-1k``; ``unknown`` when not declared.
        pretraining_images: size of the pretraining data in images (for scaling analyses), or
            ``unknown``.
        pretraining_kind: supervised / ssl / vision-language / depth / segmentation / generative /
            none, derived from ``pretraining`` (see :data:`PRETRAINING_KINDS`) unless set.
        input_size: (C, H, W) the model was trained at.
        mean, std, interpolation, crop_pct: the eval preprocessing contract.
        license: weights license or ``unknown``.
        paper: the paper that introduced the weights (arXiv id or URL), or ``unknown``.
        weights: where the weights came from (file, package, hub id) or ``random-init``.
        weights_sha256: the sha256 its release publishes for the weights file, or ``unknown``.
        weights_digest: content hash of the loaded parameters (see
            :func:`~bobench.backbones.weights.state_digest`). Part of the feature-cache key, so new
            weights never hit a stale cache.
    """

    name: str
    source: str
    spec: str
    family: Family
    params: int
    embed_dim: int
    pool: Pool
    pretrained: bool
    pretraining: str = UNKNOWN
    pretraining_data: str = UNKNOWN
    pretraining_images: int | str = UNKNOWN
    pretraining_kind: str = UNKNOWN
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    license: str = UNKNOWN
    paper: str = UNKNOWN
    weights: str = UNKNOWN
    weights_sha256: str = UNKNOWN
    weights_digest: str = UNKNOWN
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        # YAML, JSON and user code give lists; the card keeps tuples so it stays hashable and frozen
        for k in _TUPLE_FIELDS:
            object.__setattr__(self, k, tuple(getattr(self, k)))
        if self.pretraining_kind == UNKNOWN and self.pretraining in PRETRAINING_KINDS:
            object.__setattr__(self, "pretraining_kind", PRETRAINING_KINDS[self.pretraining])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneCard:
        """Inverse of :meth:`to_dict`; unknown keys are rejected."""
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ValueError(f"unknown BackboneCard field(s) {bad}; allowed: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes: Any) -> BackboneCard:
        """Return a copy with ``changes`` applied (a new ``pretraining`` re-derives its kind)."""
        if "pretraining" in changes and "pretraining_kind" not in changes:
            changes["pretraining_kind"] = PRETRAINING_KINDS.get(changes["pretraining"], UNKNOWN)
        return dataclasses.replace(self, **changes)
