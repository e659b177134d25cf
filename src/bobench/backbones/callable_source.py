"""Adapter for user models: ``<module>:<callable>`` returning an ``nn.Module`` (or a ready Backbone).

The callable is called with no arguments, or with ``pretrained=`` if it accepts that keyword. A random-init
control of a callable without that keyword is re-initialised by bobench (every layer's
``reset_parameters()``, a timm-style ``init_weights()``) or refused when that cannot cover every parameter
(:mod:`bobench.backbones.reinit`). The
preprocessing contract is taken from the model where it declares one (a timm-style ``pretrained_cfg``
or ``default_cfg`` dict, or ``input_size`` / ``mean`` / ``std`` attributes); otherwise ImageNet mean
and std at 224 px are assumed *with a warning*, because a wrong normalisation silently costs accuracy.

Embedding: ``forward_head(forward_features(x), pre_logits=True)`` for timm-like models, else the
model's output pooled by its shape ([B, D] as is; [B, C, H, W] global average pool; [B, N, D] token
mean). Dense features: the last map at each stride 4/8/16/32, found by probing one forward.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bobench.backbones.base import Backbone, FeatureInfo, count_params
from bobench.backbones.card import IMAGENET_MEAN, IMAGENET_STD, BackboneCard
from bobench.backbones.hooks import capture, probe_stages
from bobench.backbones.reinit import reinitialize
from bobench.registry import import_target


class DefaultPreprocessingWarning(UserWarning):
    """A user backbone declared no input contract; ImageNet defaults were assumed."""


def _pool_output(out: Any) -> tuple[torch.Tensor, str]:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model output is a {type(out).__name__}; expected a tensor")
    if out.dim() == 2:
        return out, "model"
    if out.dim() == 3:
        return out.mean(1), "mean"
    if out.dim() == 4:
        return out.mean((2, 3)), "avg"
    raise TypeError(f"cannot pool a model output of shape {tuple(out.shape)} into [B, D]")


def _declared_cfg(model: nn.Module) -> dict[str, Any]:
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and "mean" in cfg:
            return dict(cfg)
    if all(hasattr(model, a) for a in ("mean", "std")):
        return {
            k: getattr(model, k)
            for k in ("mean", "std", "input_size", "interpolation", "crop_pct")
            if hasattr(model, k)
        }
    return {}


class CallableBackbone(Backbone):
    """Any user ``nn.Module`` behind the bobench backbone contract."""

    def __init__(self, model, card, feature_info, stages: list[str], timm_like: bool):
        super().__init__(model, card, feature_info)
        self._stages = stages
        self._timm_like = timm_like

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self._timm_like:
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return _pool_output(self.model(x))[0]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self._stages:
            raise NotImplementedError(
                f"{self.card.name} produces no spatial maps at strides 4-32; dense tasks need a CNN or ViT"
            )
        got, _ = capture(self.model, x, self._stages)
        return [got[n] for n in self._stages]


def build(
    target: str | Callable[..., Any],
    *,
    pretrained: bool,
    name: str | None = None,
    randomize: bool | None = None,
) -> Backbone:
    """Import ``module:callable`` (or take the callable), call it and wrap the result.

    Args:
        target: ``"module:callable"`` or the callable.
        pretrained: passed on as ``pretrained=`` when the callable accepts it.
        name: the name on the card (default: ``target``).
        randomize: the caller wants random weights (default: ``not pretrained``; False when a weights file
            will be loaded over the model anyway). A callable without a ``pretrained`` keyword is then
            re-initialised here.

    Raises:
        ImportError: the module or attribute does not exist (message names it).
        TypeError: the callable did not return an ``nn.Module``.
        RandomInitError: random weights were asked for and the model cannot be re-initialised.
    """
    factory = import_target(target) if isinstance(target, str) else target
    name = name or (target if isinstance(target, str) else f"{factory.__module__}:{factory.__qualname__}")
    kwargs = {}
    try:
        if "pretrained" in inspect.signature(factory).parameters:
            kwargs["pretrained"] = pretrained
    except (TypeError, ValueError):  # builtins / C callables have no signature
        pass
    model = factory(**kwargs)
    # a callable that cannot be told not to load its weights is re-initialised here (or refused), so a
    # random/ control is never the pretrained network under a random card
    reinit = (not pretrained if randomize is None else randomize) and "pretrained" not in kwargs
    if isinstance(model, Backbone):
        if reinit:
            reinitialize(model.model, name)
            model.card = model.card.replace(extra={**model.card.extra, "reinitialized_by": "bobench"})
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} returned a {type(model).__name__}; a backbone factory must return nn.Module")
    if reinit:
        reinitialize(model, name)
    cfg = _declared_cfg(model)
    if not cfg:
        warnings.warn(
            f"{name} declares no preprocessing (pretrained_cfg, or mean/std attributes); assuming "
            "ImageNet mean/std at 224 px. Set model.pretrained_cfg = {'mean':..., 'std':..., "
            "'input_size': (3, H, W)} to silence this.",
            DefaultPreprocessingWarning,
            stacklevel=2,
        )
    input_size = tuple(cfg.get("input_size", (3, 224, 224)))
    timm_like = hasattr(model, "forward_features") and hasattr(model, "forward_head")
    model.eval()
    with torch.inference_mode():
        probe = torch.zeros(1, *input_size)
        if timm_like:
            emb, pool = model.forward_head(model.forward_features(probe), pre_logits=True), "model"
        else:
            emb, pool = _pool_output(model(probe))
    stages = probe_stages(model, side=max(64, input_size[-1] // 32 * 32))
    card = BackboneCard(
        name=name,
        source="callable",
        spec=name,
        family="other",
        params=count_params(model),
        embed_dim=int(emb.shape[-1]),
        pool=pool,  # type: ignore[arg-type]
        pretrained=pretrained,
        input_size=input_size,  # type: ignore[arg-type]
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        interpolation=cfg.get("interpolation", "bicubic"),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        extra={"reinitialized_by": "bobench"} if reinit else {},
    )
    feature_info = [FeatureInfo(c, s, n) for n, c, s in stages]
    return CallableBackbone(model, card, feature_info, [n for n, _, _ in stages], timm_like)
