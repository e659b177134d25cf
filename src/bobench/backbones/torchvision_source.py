"""Adapter for torchvision classification models: ``torchvision:<name>[.<WEIGHTS_TAG>]``.

``torchvision:resnet50`` with ``pretrained=True`` takes the DEFAULT weights enum, ``torchvision:
resnet50.IMAGENET1K_V1`` a named one. The card's preprocessing comes from the weights' own
``transforms()`` preset. The embedding is the input of the final ``nn.Linear`` (the classifier),
captured with a hook, so every family pools the way its authors did. Dense features of CNNs are the
last module output at each stride 4/8/16/32, found once by probing a dummy forward; ViT tokens become
a simple feature pyramid; Swin's NHWC stages are permuted to NCHW.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bobench.backbones.base import (
    PYRAMID_STRIDES,
    Backbone,
    FeatureInfo,
    count_params,
    simple_feature_pyramid,
    tokens_to_map,
)
from bobench.backbones.card import IMAGENET_MEAN, IMAGENET_STD, BackboneCard
from bobench.backbones.hooks import capture, probe_stages
from bobench.backbones.local_files import Missing, file_missing
from bobench.backbones.weights import WeightsUnavailableError, network_available
from bobench.registry import UnknownNameError, suggest


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to take embeddings from")
    return found[-1]


class TorchvisionBackbone(Backbone):
    """A torchvision classifier behind the bobench backbone contract."""

    def __init__(self, model, card, feature_info, head: str, stages: list[str], kind: str):
        super().__init__(model, card, feature_info)
        self._head = dict(model.named_modules())[head]
        self._stages = stages
        self._kind = kind  # "cnn", "vit" or "swin"
        self.pyramid = kind == "vit"

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        got, _ = capture(self.model, x, [], head=self._head)
        return got["_head"]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        got, _ = capture(self.model, x, self._stages)
        maps = [got[n] for n in self._stages]
        if self._kind == "swin":
            return [m.permute(0, 3, 1, 2) for m in maps]
        if self._kind == "vit":
            p = self.model.patch_size
            grid = (x.shape[-2] // p, x.shape[-1] // p)
            return simple_feature_pyramid(tokens_to_map(maps[0][:, 1:], grid), tuple(x.shape[-2:]))
        return maps

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _weights_enum(name: str, tag: str | None):
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(name)
    except (ValueError, KeyError):
        return None
    if tag is None:
        return enum.DEFAULT
    try:
        return enum[tag]
    except KeyError:
        raise UnknownNameError(
            f"torchvision {name} has no weights {tag!r}; available: {', '.join(w.name for w in enum)}"
        ) from None


def _check_cached(url: str, spec: str) -> None:
    """Fail at once offline when the weights file is not in torch's hub cache."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not path.is_file() and not network_available(host="download.pytorch.org"):
        raise WeightsUnavailableError(
            f"weights for {spec} are not cached at {path} and download.pytorch.org cannot be reached. "
            f"Download {url} elsewhere and place it at {path}, or pass it with weights=PATH."
        )


def build(name: str, *, pretrained: bool) -> TorchvisionBackbone:
    """Build ``torchvision:<name>[.<TAG>]``."""
    import torchvision
    from torchvision.models import list_models

    arch, _, tag = name.partition(".")
    available = list_models(module=torchvision.models)
    if arch not in available:
        raise UnknownNameError(f"torchvision has no classification model {arch!r}.{suggest(arch, available)}")
    weights = _weights_enum(arch, tag or None)
    if pretrained:
        if weights is None:
            raise WeightsUnavailableError(f"torchvision publishes no weights for {arch}")
        _check_cached(weights.url, f"torchvision:{name}")
    model = torchvision.models.get_model(arch, weights=weights if pretrained else None)
    head_name, head = _last_linear(model)
    if isinstance(model, torchvision.models.VisionTransformer):
        kind, family, pool = "vit", "vit", "cls"
        stages = ["encoder"]
        feature_info = [FeatureInfo(model.hidden_dim, s, f"pyramid{s}") for s in PYRAMID_STRIDES]
    elif isinstance(model, torchvision.models.SwinTransformer):
        kind, family, pool = "swin", "vit", "avg"
        stages = [f"features.{i}" for i in (1, 3, 5, 7)]
        feature_info = [
            FeatureInfo(int(model.features[i][-1].norm1.normalized_shape[0]), s, f"features.{i}")
            for i, s in zip((1, 3, 5, 7), PYRAMID_STRIDES, strict=True)
        ]
    else:
        kind, family, pool = "cnn", "cnn", "avg"
        probed = probe_stages(model)
        stages = [n for n, _, _ in probed]
        feature_info = [FeatureInfo(c, s, n) for n, c, s in probed]
    mean, std, size, crop_pct, interp = IMAGENET_MEAN, IMAGENET_STD, 224, 0.875, "bilinear"
    if weights is not None:  # the preprocessing contract of these weights (also right for random init)
        t = weights.transforms()
        size = int(t.crop_size[0])
        crop_pct = size / float(t.resize_size[0])
        mean, std, interp = tuple(t.mean), tuple(t.std), t.interpolation.value
    card = BackboneCard(
        name=f"torchvision:{name}",
        source="torchvision",
        spec=f"torchvision:{name}",
        family=family,  # type: ignore[arg-type]
        params=count_params(model) - count_params(head),
        embed_dim=int(head.in_features),
        pool=pool,  # type: ignore[arg-type]
        pretrained=pretrained,
        input_size=(3, size, size),
        mean=mean,
        std=std,
        interpolation=interp,
        crop_pct=round(crop_pct, 4),
        license="BSD-3-Clause (torchvision)" if pretrained else "unknown",
        weights=weights.url if pretrained and weights is not None else "unknown",
    )
    return TorchvisionBackbone(model, card, feature_info, head_name, stages, kind)


def missing_weights(name: str) -> Missing | None:
    """None when the weights of ``torchvision:<name>[.<TAG>]`` are in torch's hub cache, else what is
    missing. Never downloads and never builds the model."""
    arch, _, tag = name.partition(".")
    weights = _weights_enum(arch, tag or None)
    if weights is None:
        return Missing(f"torchvision publishes no weights for {arch}", "")
    return file_missing(Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name, weights.url)
