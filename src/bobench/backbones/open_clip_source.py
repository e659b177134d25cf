"""Adapter for OpenCLIP image towers: ``open_clip:<arch>/<pretrained tag>`` (``open_clip:<arch>`` for random init).

Only the image tower (``model.visual``) is kept; the text tower is dropped after building. ``embed`` is
``visual(x)``: the projected image embedding CLIP matches against text (pool ``model``: the class token
through ``ln_post`` and ``proj`` for ViTs, the attention pool for ModifiedResNet), *not* L2-normalised
(protocols normalise). The input contract is the release's own: mean/std/interpolation from the tag's
pretrained config (CLIP's constants, never ImageNet's), size from ``visual.image_size``, crop_pct 1.0
because CLIP resizes the short side to the input size and centre-crops.

Dense features: ViT towers give the last block's patch tokens (class token dropped) as a grid, then the
simple feature pyramid at strides 4/8/16/32; ModifiedResNet gives layer1..layer4 (strides 4/8/16/32).
CLIP towers have fixed-size position embeddings (ViT tokens, the ResNet attention pool), so ``embed``
runs at ``card.input_size`` only; ModifiedResNet ``features`` run at any size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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
from bobench.backbones.card import BackboneCard
from bobench.backbones.hooks import capture
from bobench.backbones.local_files import Missing, file_missing, hub_missing
from bobench.backbones.weights import WeightsUnavailableError, hub_file, network_available
from bobench.registry import UnknownNameError, suggest

_RN_STAGES = ("layer1", "layer2", "layer3", "layer4")
# keys of a tag's pretrained config that describe preprocessing (the rest is download information)
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def _tower_kind(visual: nn.Module) -> str:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return "vit"
    return "rn" if isinstance(visual, ModifiedResNet) else "other"


def vit_tokens_by_hook(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Last-block tokens ``[B, N, D]`` of an OpenCLIP ViT via a forward hook (versions without
    ``forward_intermediates``, i.e. open_clip < 2.31). Older towers run the transformer sequence-first
    (LND), newer ones batch-first (NLD): the transformer's ``batch_first`` flag says which."""
    last = f"transformer.resblocks.{len(visual.transformer.resblocks) - 1}"
    got, _ = capture(visual, x, [last])
    tokens = got[last]
    return tokens if getattr(visual.transformer, "batch_first", False) else tokens.transpose(0, 1)


class OpenClipBackbone(Backbone):
    """An OpenCLIP image tower behind the bobench backbone contract (see :mod:`bobench.backbones.base`).

    Example:
        >>> bb = create_backbone("open_clip:ViT-B-32/openai")
        >>> x = torch.zeros(2, 3, 224, 224)
        >>> bb.embed(x).shape, [m.shape[-1] for m in bb.features(x)]
        (torch.Size([2, 512]), [56, 28, 14, 7])
    """

    def __init__(
        self, model: nn.Module, card: BackboneCard, feature_info: Sequence[FeatureInfo], kind: str
    ) -> None:
        super().__init__(model, card, feature_info)
        self._kind = kind  # "vit", "rn" or "other"
        self.pyramid = kind == "vit"
        self.fixed_input_size = True  # embed needs the position-embedding / attention-pool size

    def _check_size(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != tuple(self.card.input_size[1:]):
            raise ValueError(
                f"{self.card.name} has fixed-size position embeddings for {self.card.input_size[1:]} input; "
                f"got {tuple(x.shape[-2:])}. Use bb.transform() without image_size, or resize to that size."
            )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_size(x)
        return self.model(x)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        v = self.model
        if self._kind == "vit":
            self._check_size(x)
            if hasattr(v, "forward_intermediates"):
                out = v.forward_intermediates(x, indices=1, intermediates_only=True, output_fmt="NCHW")
                fmap = out["image_intermediates"][-1]
            else:
                grid = (x.shape[-2] // v.patch_size[0], x.shape[-1] // v.patch_size[1])
                fmap = tokens_to_map(vit_tokens_by_hook(v, x)[:, 1:], grid)
            return simple_feature_pyramid(fmap, tuple(x.shape[-2:]))
        if self._kind == "rn":
            if hasattr(v, "forward_intermediates"):  # stops before the fixed-size attention pool
                out = v.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
                return out["image_intermediates"]
            self._check_size(x)
            got, _ = capture(v, x, _RN_STAGES)
            return [got[n] for n in _RN_STAGES]
        raise NotImplementedError(
            f"{self.card.name}: dense features are implemented for OpenCLIP ViT and ModifiedResNet towers, "
            f"not {type(v).__name__}; embed() works."
        )

    def prepare_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept a full CLIP checkpoint (its ``visual.*`` keys, stripped) or an image-tower-only one."""
        if any(k.startswith("visual.") for k in sd):
            return {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
        return sd


def _parse(name: str) -> tuple[str, str | None]:
    import open_clip

    arch, _, tag = name.partition("/")
    models = open_clip.list_models()
    if arch not in models:
        raise UnknownNameError(f"open_clip has no model config {arch!r}.{suggest(arch, models)}")
    return arch, tag or None


def _pretrained_cfg(arch: str, tag: str) -> dict[str, Any]:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise UnknownNameError(
            f"open_clip {arch} has no pretrained tag {tag!r}.{suggest(tag, tags)} "
            f"Tags: {', '.join(tags) or 'none (random init only)'}"
        )
    return dict(cfg)


def _weights_file(arch: str, tag: str, cfg: dict[str, Any]) -> tuple[Path, str]:
    """The tag's checkpoint and its origin: hub cache or download, or open_clip's URL cache; offline
    misses fail at once (open_clip itself would retry the download and then raise a RuntimeError)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if cfg.get("hf_hub"):
        # open_clip's convention: "org/repo/" means the default file, "org/repo/file.bin" a named one
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        stem, ext = os.path.splitext(filename)
        safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else f"{stem}.safetensors"
        names = (safe, filename) if ext in (".bin", ".pth", ".pt") else (filename,)
        path = hub_file(repo, names)  # prefers safetensors, as open_clip does
        return path, f"hf-hub:{repo}/{path.name}"
    url = cfg.get("url", "")
    if not url:
        raise WeightsUnavailableError(f"open_clip {arch}/{tag} names neither a hub repo nor a URL")
    from open_clip.pretrained import download_pretrained_from_url

    cached = Path("~/.cache/clip").expanduser() / os.path.basename(url)
    if not cached.is_file() and not network_available(host=urlparse(url).hostname or "github.com"):
        raise WeightsUnavailableError(
            f"weights for open_clip:{arch}/{tag} are not cached at {cached} and {url} cannot be reached "
            "(offline). Download the file elsewhere and place it there, or pass it with weights=PATH."
        )
    return Path(download_pretrained_from_url(url)), url  # verifies the sha256 the URL carries


def _embed_dim(visual: nn.Module, hw: tuple[int, int]) -> int:
    dim = getattr(visual, "output_dim", None)
    if dim is None:  # towers that do not declare it (some timm-based ones): one dummy forward
        with torch.inference_mode():
            dim = visual.eval()(torch.zeros(1, 3, *hw)).shape[-1]
    return int(dim)


def build(name: str, *, pretrained: bool) -> OpenClipBackbone:
    """Build ``open_clip:<arch>[/<tag>]``; ``pretrained`` loads the tag's checkpoint (cache first).

    A tag with ``pretrained=False`` builds the release's architecture (QuickGELU where the tag used it)
    and input contract with random weights.

    Raises:
        UnknownNameError: unknown architecture or tag (with suggestions), or ``pretrained`` without a tag.
        WeightsUnavailableError: the checkpoint is not cached and cannot be downloaded here.
    """
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    arch, tag = _parse(name)
    if pretrained and tag is None:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise UnknownNameError(
            f"open_clip:{arch} names no pretrained tag; use open_clip:{arch}/<tag> with a tag from "
            f"{', '.join(tags) or 'none'}, or pretrained=False for random init."
        )
    cfg = _pretrained_cfg(arch, tag) if tag else {}
    path, origin = _weights_file(arch, tag, cfg) if pretrained and tag else (None, "unknown")  # fail first
    quick_gelu = bool(cfg.get("quick_gelu", False))
    model = open_clip.create_model(
        arch,
        # the file resolved above (never a tag: open_clip would retry downloads itself), loaded strictly
        # by open_clip's own loader, which also converts third-party layouts
        pretrained=str(path) if path is not None else None,
        # OpenAI's and some LAION releases were trained with QuickGELU: the wrong activation loads
        # without error and silently degrades the features
        force_quick_gelu=quick_gelu,
        force_preprocess_cfg={k: cfg[k] for k in _PREPROCESS_KEYS if k in cfg},
        # never fetch Hugging Face text-tower weights: the text tower is dropped below (the name is
        # understood by open_clip 2.x and 3.x alike)
        pretrained_hf=False,
    )
    visual = model.visual
    del model  # the text tower is never used: free it
    pp = dict(getattr(visual, "preprocess_cfg", {}))
    size = visual.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    kind = _tower_kind(visual)
    if kind == "vit":
        width = int(visual.conv1.out_channels)
        feature_info = [FeatureInfo(width, s, f"pyramid{s}") for s in PYRAMID_STRIDES]
    elif kind == "rn":
        feature_info = [
            FeatureInfo(int(getattr(visual, n)[-1].bn3.num_features), s, n)
            for n, s in zip(_RN_STAGES, PYRAMID_STRIDES, strict=True)
        ]
    else:
        feature_info = []
    card = BackboneCard(
        name=f"open_clip:{name}",
        source="open_clip",
        spec=f"open_clip:{name}",
        family={"vit": "vit", "rn": "cnn"}.get(kind, "other"),  # type: ignore[arg-type]
        params=count_params(visual),
        embed_dim=_embed_dim(visual, (h, w)),
        pool="model",
        pretrained=pretrained,
        pretraining="clip",
        pretraining_data=tag or "unknown",
        input_size=(3, int(h), int(w)),
        mean=tuple(
            float(v) for v in pp.get("mean") or getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN
        ),
        std=tuple(
            float(v) for v in pp.get("std") or getattr(visual, "image_std", None) or OPENAI_DATASET_STD
        ),
        interpolation=str(pp.get("interpolation", "bicubic")),
        crop_pct=1.0,
        weights=origin,
        extra={
            "tower": type(visual).__name__,
            "resize_mode": pp.get("resize_mode", "shortest"),
            "quick_gelu": quick_gelu or bool((open_clip.get_model_config(arch) or {}).get("quick_gelu")),
        },
    )
    return OpenClipBackbone(visual, card, feature_info, kind)


def missing_weights(name: str) -> Missing | None:
    """None when the checkpoint of ``open_clip:<arch>/<tag>`` is cached here, else what is missing.

    Never downloads and never builds the model.
    """
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    arch, tag = _parse(name)
    if tag is None:
        return Missing(f"open_clip:{arch} names no pretrained tag", "")
    cfg = _pretrained_cfg(arch, tag)
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        stem, _ = os.path.splitext(filename)
        safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else f"{stem}.safetensors"
        return hub_missing(repo, (safe, filename))
    url = cfg.get("url", "")
    return file_missing(Path("~/.cache/clip").expanduser() / os.path.basename(url), url)
