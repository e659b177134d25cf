"""Architectures and releases of the ``diffusers`` source (:mod:`bobench.backbones.diffusers_source`).

Embedded as data so that a random-init Stable Diffusion encoder builds with no download. Each config has
three parts: ``vae`` (``AutoencoderKL`` kwargs), ``unet`` (``UNet2DConditionModel`` kwargs) and ``text``
(``CLIPTextConfig`` kwargs), copied from the release's ``config.json`` files.
"""

from __future__ import annotations

import copy
from typing import Any

_SD_V1: dict[str, dict[str, Any]] = {
    # vae/config.json of CompVis/stable-diffusion-v1-4 (diffusers defaults for the rest)
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": 512,
        "scaling_factor": 0.18215,
    },
    # unet/config.json
    "unet": {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,  # diffusers' legacy name: 8 heads
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "act_fn": "silu",
    },
    # text_encoder/config.json: openai/clip-vit-large-patch14's text tower
    "text": {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
        "layer_norm_eps": 1e-5,
    },
}


def _tiny() -> dict[str, dict[str, Any]]:
    """Same block types, tiny widths (distinct per level so tests see each); full vocabulary and 77
    positions, since the real tokeniser feeds it."""
    cfg = copy.deepcopy(_SD_V1)
    cfg["vae"].update(
        block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4, sample_size=64
    )
    cfg["unet"].update(
        sample_size=8,
        block_out_channels=[16, 24, 32, 40],
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=2,
    )
    cfg["text"].update(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32
    )
    return cfg


#: architectures by name; ``build(..., config=NAME)``
CONFIGS: dict[str, dict[str, dict[str, Any]]] = {"sd-v1": _SD_V1, "tiny": _tiny()}

#: releases in the diffusers layout: (config, pretraining data as the model card states it)
RELEASES: dict[str, tuple[str, str]] = {
    "CompVis/stable-diffusion-v1-4": (
        "sd-v1",
        "LAION-2B(en) and subsets: laion-high-resolution, laion-improved-aesthetics, laion-aesthetics v2 5+",
    ),
}
