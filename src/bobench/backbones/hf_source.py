"""Adapter for Hugging Face transformers vision models: ``hf:<repo id>`` or ``hf:<local directory>``.

Two layouts are recognised by one probe forward at build time:

* **token models** (ViT, DINOv2, DINOv2 with registers, and any model whose ``last_hidden_state`` is
  ``[B, N, D]`` tokens with ``config.patch_size``): ``embed`` is the CLS token of ``last_hidden_state``
  (the final-layer-normed CLS; for DINOv2 this *is* ``pooler_output``, while ViT's ``pooler_output`` is
  an extra tanh layer that ViTForImageClassification does not use: not counted in params). A model
  without prefix tokens falls back to its own ``pooler_output`` (pool ``model``) or the token mean.
  ``features`` drops the prefix tokens (CLS, registers, distillation: everything before the patch grid,
  i.e. ``1 + config.num_register_tokens`` for DINOv2-reg), reshapes the grid and builds the simple
  feature pyramid at strides 4/8/16/32. Position embeddings are interpolated, so any input size runs.
* **conv models** (ResNet, ConvNeXt, ...; ``output_hidden_states=True`` yields NCHW maps): ``embed`` is
  the flattened ``pooler_output`` (global average pool), ``features`` the last hidden state at each
  stride 4/8/16/32. Hierarchical transformers (Swin) are not supported: ``SwinModel`` reports each
  stage *after* its downsampling, so its stride-4 map would be the bare patch embedding.

Preprocessing comes from ``preprocessor_config.json`` when it is local or cached, else from
``config.image_size`` with ImageNet mean/std, else ImageNet defaults at 224 px; ``card.extra
["preprocess_source"]`` says which.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

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
from bobench.backbones.local_files import Missing, hub_missing
from bobench.backbones.weights import WeightsUnavailableError, network_available
from bobench.registry import UnknownNameError, suggest

_PROBE_SIDE = 64  # divisible by 32 and cheap: the probe only reads layouts, strides and channels
# PIL resample codes as stored in preprocessor_config.json
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _size_kwargs(model: nn.Module) -> dict[str, bool]:
    # ViT refuses other input sizes unless asked; DINOv2 always interpolates and has no such argument
    params = inspect.signature(model.forward).parameters
    return {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in params else {}


def _patch_hw(config: Any) -> tuple[int, int]:
    p = config.patch_size
    return (int(p[0]), int(p[1])) if isinstance(p, (list, tuple)) else (int(p), int(p))


class HFBackbone(Backbone):
    """A transformers vision model behind the bobench backbone contract (see :mod:`bobench.backbones.base`).

    Example:
        >>> bb = create_backbone("hf:/path/to/dinov2-small")  # a save_pretrained directory
        >>> x = torch.zeros(2, 3, 112, 112)
        >>> bb.embed(x).shape, [m.shape[-1] for m in bb.features(x)]
        (torch.Size([2, 384]), [28, 14, 7, 4])
    """

    def __init__(
        self,
        model: nn.Module,
        card: BackboneCard,
        feature_info: Sequence[FeatureInfo],
        kind: str,
        stages: list[int],
    ) -> None:
        super().__init__(model, card, feature_info)
        self._kind = kind  # "tokens" or "conv"
        self._stages = stages
        self.pyramid = kind == "tokens"
        self._kw = _size_kwargs(model)

    def _patch_tokens(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        ph, pw = _patch_hw(self.model.config)
        grid = (x.shape[-2] // ph, x.shape[-1] // pw)
        n_prefix = hidden.shape[1] - grid[0] * grid[1]
        if n_prefix < 0:
            raise ValueError(f"{hidden.shape[1]} tokens do not hold a {grid[0]}x{grid[1]} patch grid")
        return tokens_to_map(hidden[:, n_prefix:], grid)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x, **self._kw)
        if self._kind == "conv":
            return out.pooler_output.flatten(1)
        if self.card.pool == "cls":
            return out.last_hidden_state[:, 0]
        if self.card.pool == "model":
            return out.pooler_output
        return out.last_hidden_state.mean(1)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self._kind == "tokens":
            hidden = self.model(pixel_values=x, **self._kw).last_hidden_state
            return simple_feature_pyramid(self._patch_tokens(x, hidden), tuple(x.shape[-2:]))
        hs = self.model(pixel_values=x, output_hidden_states=True).hidden_states
        return [hs[i] for i in self._stages]

    def prepare_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept the bare model's checkpoint or a task model's (``vit.*`` / ``dinov2.*`` + a head).

        Keys under ``base_model_prefix`` are kept and stripped (the head is dropped); checkpoint-format
        names that transformers renames on load (e.g. ``encoder.layer.0.attention.attention.query`` in v5)
        are mapped to the module's names; a pooler the checkpoint lacks keeps the module's values where
        ``embed`` never uses it (CLS models). Anything else is left for the strict load to report.
        """
        prefix = f"{self.model.base_model_prefix}."
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        own = self.model.state_dict()
        rename = _file_to_module_names(self.model, own)
        sd = {k if k in own else rename.get(k, k): v for k, v in sd.items()}
        pooler = [k for k in own if k.startswith("pooler.")] if self.card.pool == "cls" else []
        if pooler and not any(k.startswith("pooler.") for k in sd):
            # ViTForImageClassification & co. are built without ViT's tanh pooler, which CLS never uses
            sd = {**sd, **{k: own[k] for k in pooler}}
        return sd


def _file_to_module_names(model: nn.Module, own: dict[str, torch.Tensor]) -> dict[str, str]:
    """Checkpoint-file name → module name, for transformers versions that rename weights on load.

    transformers >= 5 saves (and publishes) the legacy names and renames them when loading; its own
    reverse mapping, applied to the module's state dict, pairs both names through tensor identity.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x: file names are module names
        return {}
    by_id = {id(t): k for k, t in own.items()}
    reverted = revert_weight_conversion(model, dict(own))
    return {fk: by_id[id(t)] for fk, t in reverted.items() if id(t) in by_id}


def _locate(name: str) -> tuple[str, Path | None]:
    """``(repo id or directory, local directory or None)``; a missing path gets a did-you-mean."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), path
    if name.startswith(("/", ".", "~")) or path.exists():
        siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
        raise UnknownNameError(
            f"hf:{name}: no such directory.{suggest(path.name, siblings)} A local model is a directory "
            "holding config.json and model.safetensors (as written by save_pretrained)."
        )
    return name, None


def _offline_error(repo: str, what: str) -> WeightsUnavailableError:
    from huggingface_hub.constants import HF_HUB_CACHE

    cached = [p.name[len("models--") :].replace("--", "/") for p in Path(HF_HUB_CACHE).glob("models--*")]
    return WeightsUnavailableError(
        f"hf:{repo}: {what} not in the local Hugging Face cache ({HF_HUB_CACHE}) and the Hub cannot be reached "
        f"(offline).{suggest(repo, cached)} Run once with network to fill the cache, or download the repo "
        "elsewhere and use the local directory, hf:/path/to/dir, holding config.json + model.safetensors "
        "(+ preprocessor_config.json); a weights file alone goes with weights=PATH (CLI: --weights PATH)."
    )


def _load(repo: str, local: Path | None, pretrained: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    offline = local is not None or not network_available()
    try:
        config = AutoConfig.from_pretrained(repo, local_files_only=offline)
    except (OSError, ValueError) as exc:  # ValueError: a config.json without a known model_type
        if local is not None:
            raise UnknownNameError(f"hf:{repo}: the directory holds no usable config.json ({exc})") from exc
        if offline and isinstance(exc, OSError):
            raise _offline_error(repo, "config.json is") from exc
        raise
    kw = {"dtype": torch.float32}  # transformers 5 loads checkpoints in their stored dtype by default
    if not pretrained:
        return AutoModel.from_config(config, **kw)
    try:
        return AutoModel.from_pretrained(repo, config=config, local_files_only=offline, **kw)
    except OSError as exc:
        if local is None and offline:
            raise _offline_error(repo, "the weights are") from exc
        if local is not None:
            raise WeightsUnavailableError(
                f"hf:{repo}: the directory has a config but no readable weights ({exc}). Put model.safetensors "
                "there (save_pretrained writes it), pass a file with weights=PATH, or use pretrained=False."
            ) from exc
        raise


def _local_file(repo: str, local: Path | None, filename: str) -> Path | None:
    """A small side file (preprocessor config, README) if it is on disk or, online, downloadable."""
    if local is not None:
        return local / filename if (local / filename).is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, local_files_only=not network_available()))
    except Exception:  # missing entry, offline cache miss, gated repo: the fallbacks below apply
        return None


def _edge(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int):
        return v, v
    if isinstance(v, dict) and "height" in v:
        return int(v["height"]), int(v["width"])
    if isinstance(v, dict) and "shortest_edge" in v:
        return int(v["shortest_edge"]), int(v["shortest_edge"])
    return None


def _preprocess(pp_file: Path | None, config: Any) -> dict[str, Any]:
    """The card's input contract: from preprocessor_config.json, else config.image_size, else defaults."""
    if pp_file is not None:
        pp = json.loads(pp_file.read_text())
        size = _edge(pp.get("size")) or (224, 224)
        crop = _edge(pp.get("crop_size")) if pp.get("do_center_crop", "crop_size" in pp) else None
        if crop is not None:  # resize (short side or fixed) then centre-crop, e.g. DINOv2's 256 → 224
            hw, crop_pct = crop, crop[0] / size[0]
        elif "crop_pct" in pp and size[0] < 384:  # ConvNeXt/ResNet processors: resize to s / crop_pct, crop s
            hw, crop_pct = size, float(pp["crop_pct"])
        else:  # a plain resize to the input size: HF squashes, the card can only say crop_pct 1.0
            hw, crop_pct = size, 1.0
        squash = crop is None and "shortest_edge" not in (pp.get("size") or {})
        resample = pp.get("resample", 3)
        return {
            "input_size": (3, *hw),
            "mean": tuple(float(v) for v in pp.get("image_mean", IMAGENET_MEAN)),
            "std": tuple(float(v) for v in pp.get("image_std", IMAGENET_STD)),
            "interpolation": _RESAMPLE.get(resample, str(resample).lower()),
            "crop_pct": round(crop_pct, 4),
            "source": "preprocessor_config.json",
            "resize_mode": "squash" if squash else "shortest",
        }
    side = getattr(config, "image_size", None)
    hw = _edge(side) or (tuple(side) if isinstance(side, (list, tuple)) else None)
    return {
        "input_size": (3, *(hw or (224, 224))),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "source": "config.image_size" if hw else "imagenet-defaults",
        "resize_mode": "shortest",
    }


def _license(readme: Path | None) -> str:
    """``license:`` from a model card's YAML front matter, where the card is on disk."""
    head = re.match(r"---\n(.*?)\n---", readme.read_text(errors="replace"), re.S) if readme else None
    found = re.search(r"^license:\s*['\"]?([^'\"\n]+)", head.group(1), re.M) if head else None
    return found.group(1).strip() if found else "unknown"


def _unused_pooler_params(model: nn.Module, pool: str) -> int:
    pooler = getattr(model, "pooler", None)
    return count_params(pooler) if pool == "cls" and isinstance(pooler, nn.Module) else 0


def _probe(model: nn.Module, name: str) -> Any:
    was_training = model.training
    try:
        with torch.inference_mode():
            x = torch.zeros(1, 3, _PROBE_SIDE, _PROBE_SIDE)
            return model.eval()(pixel_values=x, output_hidden_states=True, **_size_kwargs(model))
    except Exception as exc:  # text-image models wanting input_ids, fixed-size models, ...
        raise NotImplementedError(
            f"hf:{name} builds {type(model).__name__}, which does not run on an image batch alone "
            f"({type(exc).__name__}: {exc}); bobench supports transformers vision models."
        ) from exc
    finally:
        model.train(was_training)


class _Layout(NamedTuple):
    kind: str  # "tokens" or "conv"
    family: str
    pool: str
    dim: int
    stages: list[int]  # indices into hidden_states (conv models)
    feature_info: list[FeatureInfo]
    extra: dict[str, Any]


def _layout(model: nn.Module, out: Any, name: str) -> _Layout:
    """Token model (plain ViT) or NCHW stage maps (CNN), read from the probe's outputs."""
    last, config = getattr(out, "last_hidden_state", None), model.config
    if last is not None and last.dim() == 3 and getattr(config, "patch_size", None):
        ph, pw = _patch_hw(config)
        n_prefix = last.shape[1] - (_PROBE_SIDE // ph) * (_PROBE_SIDE // pw)
        if n_prefix >= 0:  # else a hierarchical model whose last grid is coarser than the patches
            dim = int(last.shape[-1])
            # without a CLS token (SigLIP-like): the model's own pooling, or the token mean
            pool = "model" if getattr(out, "pooler_output", None) is not None else "mean"
            info = [FeatureInfo(dim, s, f"pyramid{s}") for s in PYRAMID_STRIDES]
            return _Layout(
                "tokens", "vit", "cls" if n_prefix else pool, dim, [], info, {"prefix_tokens": n_prefix}
            )
    hs, pooled = getattr(out, "hidden_states", None), getattr(out, "pooler_output", None)
    if last is None or last.dim() != 4 or not hs or pooled is None:
        raise NotImplementedError(
            f"hf:{name} builds {type(model).__name__}, whose output is neither patch tokens "
            "(last_hidden_state [B, N, D] with config.patch_size) nor NCHW stage maps with a pooled output."
        )
    # the last hidden state at each stride (the stage output, not the stem at the same stride)
    stride_of = {math.ceil(_PROBE_SIDE / s): s for s in PYRAMID_STRIDES}
    picked = sorted({stride_of[h.shape[-1]]: i for i, h in enumerate(hs) if h.shape[-1] in stride_of}.items())
    info = [FeatureInfo(int(hs[i].shape[1]), s, f"hidden_states.{i}") for s, i in picked]
    return _Layout("conv", "cnn", "avg", int(pooled.flatten(1).shape[1]), [i for _, i in picked], info, {})


def build(name: str, *, pretrained: bool) -> HFBackbone:
    """Build ``hf:<repo id or directory>``; ``pretrained`` loads its weights (cache or local dir first).

    Raises:
        UnknownNameError: a local path that does not exist (with sibling suggestions).
        WeightsUnavailableError: offline and not cached (config for random init, weights otherwise).
        NotImplementedError: the model's output is neither patch tokens nor NCHW stage maps.
    """
    repo, local = _locate(name)
    model = _load(repo, local, pretrained)
    config = model.config
    lay = _layout(model, _probe(model, name), name)
    pp = _preprocess(_local_file(repo, local, "preprocessor_config.json"), config)
    card = BackboneCard(
        name=f"hf:{name}",
        source="hf",
        spec=f"hf:{name}",
        family=lay.family,  # type: ignore[arg-type]
        params=count_params(model) - _unused_pooler_params(model, lay.pool),
        embed_dim=lay.dim,
        pool=lay.pool,  # type: ignore[arg-type]
        pretrained=pretrained,
        input_size=pp["input_size"],
        mean=pp["mean"],
        std=pp["std"],
        interpolation=pp["interpolation"],
        crop_pct=pp["crop_pct"],
        license=_license(_local_file(repo, local, "README.md")),
        weights=(str(local) if local is not None else f"hf-hub:{repo}") if pretrained else "unknown",
        extra={
            "preprocess_source": pp["source"],
            "resize_mode": pp["resize_mode"],
            "model_type": getattr(config, "model_type", "unknown"),
            "hf_class": type(model).__name__,
            **lay.extra,
        },
    )
    return HFBackbone(model, card, lay.feature_info, lay.kind, lay.stages)


def missing_weights(name: str) -> Missing | None:
    """None when ``hf:<repo or directory>``'s config and weights are on disk, else what is missing.

    Never downloads and never builds the model.
    """
    repo, local = _locate(name)
    names = ("model.safetensors", "pytorch_model.bin")
    if local is not None:
        if (local / "config.json").is_file() and any((local / n).is_file() for n in names):
            return None
        return Missing(f"directory {local} lacks config.json or {' / '.join(names)}", "")
    return hub_missing(repo, ("config.json",)) or hub_missing(repo, names)
