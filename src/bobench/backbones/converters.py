"""Convert checkpoints from their original release's key layout to the layout of a timm model.

A zoo entry names a converter; the loader reads the file with :func:`~bobench.backbones.weights.load_state_dict`
(TorchScript archives through :mod:`bobench.backbones.torchscript`), calls :func:`convert` and loads the
result strictly with :func:`~bobench.backbones.weights.apply_state_dict`. Every converter is a function
``fn(sd, model) -> sd``: it keeps the backbone (trunk) tensors of the release, drops its heads
(projectors, predictors, decoders, momentum encoders, depth heads, ...) and renames the rest so that the
result loads into ``model`` with no missing and no unexpected keys. Where timm ships its own filter for a
layout (``checkpoint_filter_fn``), the converter calls it instead of repeating it. A checkpoint that does
not look like the release a converter is for raises :class:`~bobench.backbones.weights.WeightsError`
naming the converter and what it expected.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bobench.backbones.weights import WeightsError
from bobench.registry import Registry, UnknownNameError, suggest

StateDict = dict[str, torch.Tensor]

Converter = Callable[[StateDict, nn.Module], StateDict]
CONVERTERS = Registry("converter", group="bobench.converters")


def _registered(fn: Converter) -> Converter:
    """Register ``fn`` under its own name (as a lazy ``module:attr`` target, like every registry entry)."""
    CONVERTERS.register(fn.__name__, f"{__name__}:{fn.__name__}")
    return fn


def convert(name: str, sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Apply the converter ``name`` to a checkpoint.

    Args:
        name: a registered converter (see ``CONVERTERS``).
        sd: flat state dict as returned by ``load_state_dict`` (already unwrapped, and with the
            ``module.`` prefix stripped when every key had it) or by :func:`~bobench.backbones.torchscript.read_torchscript_state_dict`.
        model: the target timm model, built with the zoo entry's kwargs (e.g. ``num_classes=0``).

    Returns:
        A state dict that loads strictly into ``model`` (BatchNorm ``num_batches_tracked`` may be absent).

    Raises:
        UnknownNameError: ``name`` is not registered (the message suggests close names).
        WeightsError: the checkpoint does not look like the release the converter is for.
    """
    if name not in CONVERTERS:
        raise UnknownNameError(
            f"unknown checkpoint converter {name!r}.{suggest(name, list(CONVERTERS))} Converters: "
            f"{', '.join(sorted(CONVERTERS))}; or register your own in the `bobench.converters` group."
        )
    fn: Converter = CONVERTERS.load(name)
    return fn(dict(sd), model)


# -- helpers ----------------------------------------------------------------------------------------


def _fail(converter: str, expected: str, sd: StateDict) -> WeightsError:
    keys = list(sd)
    sample = ", ".join(keys[:5]) + (f", ... ({len(keys)} keys)" if len(keys) > 5 else "")
    return WeightsError(
        f"converter {converter!r} expected {expected}, but the checkpoint's keys look like: {sample}. "
        "Check that the file is the release this zoo entry names."
    )


def _take(sd: StateDict, prefix: str, drop: tuple[str, ...] = ()) -> StateDict:
    """Keys under ``prefix`` with the prefix removed, minus those (after removal) starting with ``drop``."""
    out = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return {k: v for k, v in out.items() if not k.startswith(drop)} if drop else out


def _drop_recomputed(sd: StateDict, model: nn.Module) -> StateDict:
    """Drop buffers the model registers as non-persistent (recomputed at build, e.g. ``k_bias``)."""
    persistent = model.state_dict().keys()
    volatile = {k for k, _ in model.named_buffers()} - set(persistent)
    return {k: v for k, v in sd.items() if k not in volatile}


def _resnet_trunk(sd: StateDict, converter: str) -> StateDict:
    """Torchvision ResNet trunk names, found under whatever prefix holds ``conv1`` and ``layer1``-``layer4``.

    Releases wrap the trunk differently (none, ``backbone.``, ``base_encoder.``); the prefix is the one
    in front of ``conv1.weight`` that also has ``layer4.0.conv1.weight``. ``fc.*`` (a classifier or
    projection MLP) is dropped: the target is built with ``num_classes=0``.
    """
    for key in sorted((k for k in sd if k.endswith("conv1.weight")), key=len):
        prefix = key[: -len("conv1.weight")]
        if (prefix == "" or prefix.endswith(".")) and f"{prefix}layer4.0.conv1.weight" in sd:
            return _take(sd, prefix, drop=("fc.",))
    raise _fail(converter, "torchvision ResNet trunk keys (conv1.weight, layer1.* ... layer4.*)", sd)


# -- converters -------------------------------------------------------------------------------------


def _mocov3_encoder(sd: StateDict, converter: str) -> StateDict:
    # momentum_encoder.* and predictor.* are training-only; base_encoder is the released backbone
    for prefix in ("base_encoder.", "module.base_encoder."):
        enc = _take(sd, prefix)
        if enc:
            return enc
    raise _fail(converter, "a MoCo v3 checkpoint with 'base_encoder.*' keys (beside momentum_encoder.*)", sd)


@_registered
def mocov3_vit(sd: StateDict, model: nn.Module) -> StateDict:
    """MoCo v3 ViT (``vit-s-300ep.pth.tar``, ``vit-b-300ep.pth.tar``) → timm ``vit_*_patch16_224``.

    MoCo v3 subclasses timm's VisionTransformer, so names already match; its ``head`` is the projection
    MLP and is dropped.
    """
    enc = _mocov3_encoder(sd, "mocov3_vit")
    if "patch_embed.proj.weight" not in enc:
        raise _fail("mocov3_vit", "a ViT base_encoder (base_encoder.patch_embed.proj.weight)", sd)
    return {k: v for k, v in enc.items() if not k.startswith("head.")}


@_registered
def mocov3_resnet(sd: StateDict, model: nn.Module) -> StateDict:
    """MoCo v3 ResNet-50 (``r-50-1000ep.pth.tar``) → timm ``resnet50``; ``fc.*`` (projection MLP) dropped."""
    return _resnet_trunk(_mocov3_encoder(sd, "mocov3_resnet"), "mocov3_resnet")


@_registered
def torchvision_resnet_trunk(sd: StateDict, model: nn.Module) -> StateDict:
    """DINO / VICReg / VICRegL ResNet-50 trunks (torchvision names, maybe ``backbone.``) → timm ``resnet50``.

    timm's ResNet uses torchvision's names; VICReg's extra ``padding`` layer has no tensors.
    """
    return _resnet_trunk(sd, "torchvision_resnet_trunk")


@_registered
def mae_vit(sd: StateDict, model: nn.Module) -> StateDict:
    """MAE pretraining release (``mae_pretrain_vit_*.pth``) → timm ViT (``num_classes=0, global_pool='token'``).

    Encoder names match timm; the decoder (``decoder_*``) and ``mask_token`` only serve pretraining.
    """
    if "patch_embed.proj.weight" not in sd or "blocks.0.attn.qkv.weight" not in sd:
        raise _fail("mae_vit", "MAE ViT encoder keys (patch_embed.proj.weight, blocks.N.attn.qkv.*)", sd)
    return {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token"))}


_FB_CONVNEXT = ("downsample_layers.", "stages.", "norm.", "head.")


@_registered
def fb_convnext(sd: StateDict, model: nn.Module) -> StateDict:
    """facebookresearch/ConvNeXt layout (ImageNet and VICRegL releases) → timm ``convnext_*``.

    Uses ``timm.models.convnext.checkpoint_filter_fn`` (``downsample_layers.0`` → ``stem``,
    ``downsample_layers.i`` → ``stages.i.downsample``, ``stages.i.j`` → ``stages.i.blocks.j``, dwconv /
    pwconv renames, final ``norm`` → ``head.norm``, Linear → 1x1 conv reshape for ``conv_mlp`` models).
    The classifier (``head.fc``) is dropped. VICRegL trained without layer scale (``gamma`` absent):
    timm's blocks then get ``gamma = 1``, which computes the same function.
    """
    from timm.models.convnext import checkpoint_filter_fn

    if all(k.startswith("backbone.") for k in sd):
        sd = _take(sd, "backbone.")
    if "downsample_layers.0.0.weight" not in sd:
        raise _fail("fb_convnext", "FB ConvNeXt keys (downsample_layers.0.0.weight, stages.i.j.dwconv.*)", sd)
    # only the trunk goes through the filter: it reshapes 2D tensors to the model's shape by name and
    # would fail with a KeyError on anything else (projectors of full training checkpoints)
    out = checkpoint_filter_fn({k: v for k, v in sd.items() if k.startswith(_FB_CONVNEXT)}, model)
    model_sd = model.state_dict()
    out = {k: v for k, v in out.items() if not (k.startswith("head.") and k not in model_sd)}
    if not any(k.endswith(".gamma") for k in out):
        for k, v in model_sd.items():
            if k.endswith(".gamma"):
                out[k] = torch.ones_like(v)
    return out


@_registered
def midas_swinv2(sd: StateDict, model: nn.Module) -> StateDict:
    """MiDaS v3.1 ``dpt_swin2_*.pt`` encoder (timm 0.6 SwinV2 under ``pretrained.model.``) → timm 1.x SwinV2.

    ``scratch.*`` and ``pretrained.act_postprocess*`` form the depth head and are dropped.
    ``timm.models.swin_transformer_v2.checkpoint_filter_fn`` moves the patch merging from the end of
    stage i (timm 0.6, ``layers.0.downsample`` exists) to the start of stage i+1 (timm 1.x), drops the
    recomputed ``relative_position_index`` / ``relative_coords_table`` / ``attn_mask`` buffers and resizes
    the patch embedding if needed; the ImageNet classifier (``head``) is dropped.
    """
    from timm.models.swin_transformer_v2 import checkpoint_filter_fn

    enc = _take(sd, "pretrained.model.")
    if "patch_embed.proj.weight" not in enc or not any(k.startswith("layers.") for k in enc):
        raise _fail("midas_swinv2", "a MiDaS DPT-SwinV2 checkpoint (pretrained.model.layers.*)", sd)
    out = checkpoint_filter_fn(enc, model)
    return _drop_recomputed({k: v for k, v in out.items() if not k.startswith("head.")}, model)


@_registered
def sam_vit(sd: StateDict, model: nn.Module) -> StateDict:
    """Segment Anything (``sam_vit_*.pth``) image encoder → timm ``samvit_*_patch16``.

    ``timm.models.vision_transformer_sam.checkpoint_filter_fn`` keeps ``image_encoder.*`` (stripped),
    drops the prompt encoder and mask decoder, and renames ``mlp.lin1/2`` → ``mlp.fc1/2``. SAM was trained
    at 1024 px; for a model built at another ``img_size`` the absolute position embedding is resized
    (bicubic) and the global-attention relative position tables linearly, as SAM's own ``get_rel_pos``
    interpolates them at run time.
    """
    from timm.layers import resample_abs_pos_embed_nhwc
    from timm.models.vision_transformer_sam import checkpoint_filter_fn

    if "image_encoder.patch_embed.proj.weight" not in sd:
        raise _fail("sam_vit", "a SAM checkpoint (image_encoder.patch_embed.proj.weight)", sd)
    out = checkpoint_filter_fn(sd, model)
    model_sd = model.state_dict()
    for k, v in out.items():
        want = model_sd.get(k)
        if want is None or want.shape == v.shape:
            continue
        if k == "pos_embed":
            out[k] = resample_abs_pos_embed_nhwc(v, list(want.shape[1:3]))
        elif k.endswith(("attn.rel_pos_h", "attn.rel_pos_w")) and v.shape[1:] == want.shape[1:]:
            resized = F.interpolate(v.T[None], size=want.shape[0], mode="linear")
            out[k] = resized[0].T.contiguous()
    return out


# Classy Vision bottleneck: convolutional_block = (conv1, bn1, relu, conv2, bn2, relu, conv3), then bn
_CLASSY_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(?:_module\.)?(convolutional_block\.\d|bn|downsample)\.")
_CLASSY_PARTS = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "bn": "bn3"}


def _classy_to_torchvision(sd: StateDict) -> StateDict:
    """Classy Vision ResNet names (``initial_block``, ``blocks.s.b._module``) → torchvision names."""
    out: StateDict = {}
    for k, v in sd.items():
        k = re.sub(r"^initial_block\.(?:_module\.)?0\.", "conv1.", k)
        k = re.sub(r"^initial_block\.(?:_module\.)?1\.", "bn1.", k)
        if m := _CLASSY_BLOCK.match(k):
            part = m[3].rpartition(".")[2]
            k = f"layer{int(m[1]) + 1}.{m[2]}.{_CLASSY_PARTS.get(part, part)}.{k[m.end() :]}"
        elif k.startswith("blocks."):
            continue  # e.g. ClassyBlock's cached output: not a weight
        out[k] = v
    return out


@_registered
def sscd_resnet(sd: StateDict, model: nn.Module) -> StateDict:
    """SSCD TorchScript ResNet-50 (``sscd_*.torchscript.pt``) → timm ``resnet50`` trunk.

    Keeps ``backbone.*``: torchvision names (``fc``, the 2048→512 projection of the torchvision
    variant, is dropped) or Classy Vision names (mapped to torchvision's). ``embeddings.*`` (GeM pooling,
    projection, L2 norm) is dropped.
    """
    trunk = _take(sd, "backbone.")
    if any(k.startswith("initial_block.") for k in trunk):
        trunk = _classy_to_torchvision(trunk)
    if not trunk:
        raise _fail("sscd_resnet", "an SSCD model with 'backbone.*' and 'embeddings.*' tensors", sd)
    return _resnet_trunk(trunk, "sscd_resnet")
