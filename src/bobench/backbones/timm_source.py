"""Adapter for timm models: ``timm:<architecture>[.<pretrained tag>]``.

Embeddings use the model's own head pooling (``forward_head(pre_logits=True)``): the CLS token for
ViTs whose ``global_pool`` is ``token``, global average pooling for CNNs. Dense features come from
``forward_intermediates``; plain ViTs (one stride throughout) get a simple feature pyramid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bobench.backbones.base import (
    PYRAMID_STRIDES,
    Backbone,
    FeatureInfo,
    count_params,
    simple_feature_pyramid,
)
from bobench.backbones.card import BackboneCard
from bobench.backbones.local_files import Missing, file_missing, hub_missing
from bobench.backbones.weights import WeightsUnavailableError, hub_file, network_available
from bobench.registry import UnknownNameError, suggest

_POOL = {"token": "cls", "avg": "avg", "avgmax": "avg", "max": "avg", "map": "model", "": "model"}


def _global_pool(model: nn.Module) -> str:
    gp: Any = getattr(model, "global_pool", None)
    if gp is None and hasattr(model, "head"):
        gp = getattr(model.head, "global_pool", None)
    if gp is not None and not isinstance(gp, str):
        gp = getattr(gp, "pool_type", "avg")
    return gp or "avg"


def _family(model: nn.Module) -> str:
    has_attn = any(name.endswith("attn") for name, _ in model.named_modules())
    if has_attn and hasattr(model, "patch_embed"):
        return "vit"
    return "hybrid" if has_attn else "cnn"


def _create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    base = name.split(".")[0]
    if not timm.is_model(base):
        hint = suggest(base, timm.list_models())
        raise UnknownNameError(f"timm has no model {base!r}.{hint}")
    kwargs = dict(kwargs)
    if pretrained:
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None:
            tags = timm.list_pretrained(f"{base}.*")
            raise UnknownNameError(
                f"timm has no pretrained weights {name!r}. Tags with weights: {', '.join(tags[:8]) or 'none'}"
            )
        if cfg.hf_hub_id:
            # resolve the file ourselves: cache hit, download, or an immediate clear error offline
            kwargs["pretrained_cfg_overlay"] = {"file": str(hub_file(cfg.hf_hub_id))}
        elif not network_available(host="github.com"):
            raise WeightsUnavailableError(
                f"weights for timm:{name} come from {cfg.url} and this machine is offline; download the "
                "file elsewhere and pass it with weights=PATH (CLI: --weights PATH)"
            )
    try:  # let ViTs accept any input size (tests run at 112 px); CNNs do natively and reject the kwarg
        return timm.create_model(name, pretrained=pretrained, dynamic_img_size=True, **kwargs)
    except TypeError as exc:
        if "dynamic_img_size" not in str(exc):
            raise
        return timm.create_model(name, pretrained=pretrained, **kwargs)


class TimmBackbone(Backbone):
    """A timm model behind the bobench backbone contract (see :mod:`bobench.backbones.base`)."""

    def __init__(self, model: nn.Module, card: BackboneCard, feature_info, indices: list[int], plain: bool):
        super().__init__(model, card, feature_info)
        self._indices = indices
        self.pyramid = plain

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.model.forward_intermediates(
            x, indices=self._indices, intermediates_only=True, output_fmt="NCHW"
        )
        if self.pyramid:
            return simple_feature_pyramid(maps[-1], tuple(x.shape[-2:]))
        return list(maps)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.model.num_classes == 0:
            raise NotImplementedError(f"{self.card.name} has no classification head")
        return self.model(x)


def build(name: str, *, pretrained: bool, **kwargs: Any) -> TimmBackbone:
    """Build ``timm:<name>``; ``pretrained`` loads the tag's hub weights (cache first).

    ``kwargs`` go to ``timm.create_model`` (e.g. ``num_classes=0`` for a release without a classifier,
    ``num_heads=12`` for MoCo v3's ViT-S).
    """
    model = _create(name, pretrained, kwargs)
    info = list(model.feature_info)
    reductions = [int(f["reduction"]) for f in info]
    plain = len(set(reductions)) == 1
    if plain:
        indices = [len(info) - 1]
        chans = int(info[-1]["num_chs"])
        feature_info = [FeatureInfo(chans, s, f"pyramid{s}") for s in PYRAMID_STRIDES]
    else:
        # the last block at each standard stride (stride-2 stems are not useful dense features)
        last = {r: i for i, r in enumerate(reductions) if r >= 4}
        indices = [last[r] for r in sorted(last)]
        feature_info = [
            FeatureInfo(int(info[i]["num_chs"]), reductions[i], info[i]["module"]) for i in indices
        ]
    cfg = model.pretrained_cfg
    head = model.get_classifier() if model.num_classes else None
    params = count_params(model) - (count_params(head) if isinstance(head, nn.Module) else 0)
    pool = _POOL.get(_global_pool(model), "model")
    family = _family(model)
    if pool == "avg" and family != "cnn":
        pool = "mean"
    card = BackboneCard(
        name=f"timm:{name}",
        source="timm",
        spec=f"timm:{name}",
        family=family,  # type: ignore[arg-type]
        params=params,
        embed_dim=int(getattr(model, "head_hidden_size", None) or model.num_features),
        pool=pool,  # type: ignore[arg-type]
        pretrained=pretrained,
        input_size=tuple(cfg.get("input_size", (3, 224, 224))),
        mean=tuple(cfg.get("mean")),
        std=tuple(cfg.get("std")),
        interpolation=cfg.get("interpolation", "bicubic"),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        license=cfg.get("license") or "unknown",
        paper=cfg.get("paper_ids") or "unknown",
        weights=f"hf-hub:{cfg.get('hf_hub_id')}" if pretrained and cfg.get("hf_hub_id") else "unknown",
    )
    return TimmBackbone(model, card, feature_info, indices, plain)


def missing_weights(name: str) -> Missing | None:
    """None when the pretrained weights of ``timm:<name>`` are cached here, else what is missing.

    Never downloads and never builds the model (the battle preflight calls it for every backbone).
    """
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return Missing(f"timm publishes no pretrained weights {name!r}", "")
    if cfg.hf_hub_id:
        return hub_missing(cfg.hf_hub_id, ("model.safetensors", "pytorch_model.bin"))
    return file_missing(Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name, cfg.url)
