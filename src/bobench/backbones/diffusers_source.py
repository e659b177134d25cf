"""Adapter for the Stable Diffusion v1 encoder: ``diffusers:CompVis/stable-diffusion-v1-4``.

Battle of the Backbones' "Stable Diffusion v1.4 encoder": an image in [-1, 1] goes through the VAE encoder
(latent = posterior *mean*, deterministic, x ``scaling_factor`` 0.18215), then the UNet's ``conv_in``,
down blocks and mid block at timestep 0, cross-attending to the CLIP ViT-L/14 text encoder's last hidden
state (77 tokens) for one fixed prompt (``prompt=""`` by default).

What is kept (and counted in ``card.params``): VAE ``encoder`` + ``quant_conv`` and UNet ``conv_in``,
``time_proj``, ``time_embedding``, ``down_blocks``, ``mid_block``. The VAE decoder, ``post_quant_conv``
and the UNet up blocks / output head are never run, so they are never materialised: the diffusers models
are built on the meta device, the unused parts dropped, and only the kept parts allocated (then randomly
initialised with each layer's own ``reset_parameters`` - PyTorch's default init, as plain construction
gives - or filled strictly from the release). The text encoder runs once at build time; its output for the
prompt is stored as the persistent buffer ``model.text_embedding`` ``[1, 77, 768]`` (so the prompt is part
of the weights digest) and the encoder is freed.

``features`` runs the UNet blocks itself (mirroring ``UNet2DConditionModel.forward``, no hooks) and returns
each down block's output *before* its downsampler - its last resnet/attention output, which diffusers
also returns as a residual - at image strides 8/16/32/64 (320/640/1280/1280 channels). ``embed`` is the
global average pool of the mid-block output, ``[B, 1280]``. The model is convolutional: any input side
divisible by 64 works (``fixed_input_size`` is False); others raise ``ValueError``.

Architectures are embedded here as configs (``CONFIGS``), so random init needs no download. ``config``
(``"sd-v1"``, ``"tiny"`` for tests, or a dict of the same shape) defaults to the release's own.
``weights=PATH`` in :func:`~bobench.backbones.create_backbone` takes a state dict of ``bb.model``
(``vae.*``, ``unet.*``, ``text_embedding``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bobench.backbones.base import Backbone, FeatureInfo, count_params
from bobench.backbones.card import BackboneCard
from bobench.backbones.diffusers_configs import CONFIGS, RELEASES
from bobench.backbones.local_files import Missing, hub_missing
from bobench.backbones.weights import apply_state_dict, hub_file, load_state_dict
from bobench.registry import UnknownNameError, suggest

_FILES = {
    "vae": ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin"),
    "unet": ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"),
    "text": ("text_encoder/model.safetensors", "text_encoder/pytorch_model.bin"),
}
# release keys of the parts that are never run (see the module docstring)
_DROPPED = {
    "vae": ("decoder.", "post_quant_conv."),
    "unet": ("up_blocks.", "conv_norm_out.", "conv_out."),
    "text": ("text_model.embeddings.position_ids",),  # a non-persistent buffer in recent transformers
}
_BOS, _EOS, _CONTEXT = 49406, 49407, 77
_STRIDES = (8, 16, 32, 64)


@functools.lru_cache(maxsize=1)
def _bpe() -> Any:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()  # reads the bundled vocabulary: load it once per process


def tokenize(prompt: str, context_length: int = _CONTEXT) -> torch.Tensor:
    """SD v1's CLIPTokenizer ids, offline: ``[49406, bpe..., 49407]`` padded with 49407 (SD's pad token).

    Uses open_clip's copy of the same BPE vocabulary (lower-cased, whitespace-cleaned) and truncates to
    ``context_length - 2`` tokens as ``truncation=True, max_length=77`` does.

    Example:
        >>> tokenize("a photo of a cat")[0, :8].tolist()
        [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    """
    ids = [_BOS, *_bpe().encode(prompt)[: context_length - 2], _EOS]
    return torch.tensor([ids + [_EOS] * (context_length - len(ids))], dtype=torch.long)


def _drop(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def _legacy_attention_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old diffusers VAE files name the mid-block attention query/key/value/proj_attn (diffusers renames
    them on load too); 1x1-conv shaped projections are flattened to linear ones."""
    names = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for k, v in sd.items():
        for old, new in names.items():
            if ".attentions." in k and old in k:
                k = k.replace(old, new)
                v = v.flatten(1) if v.dim() == 4 else v
        out[k] = v
    return out


def _materialise(module: nn.Module, *, init: bool) -> nn.Module:
    """Allocate a meta-device module on the CPU; with ``init``, run every layer's ``reset_parameters``.

    Raises:
        RuntimeError: a layer holds parameters but has no ``reset_parameters`` (it would stay garbage).
    """
    module.to_empty(device="cpu")
    if init:
        for name, m in module.named_modules():
            if next(m.parameters(recurse=False), None) is None and not list(m.buffers(recurse=False)):
                continue
            if not hasattr(m, "reset_parameters"):
                raise RuntimeError(f"cannot initialise {name} ({type(m).__name__}): no reset_parameters")
            m.reset_parameters()
    return module


def _build_modules(config: dict[str, dict[str, Any]], *, init: bool) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """The kept VAE and UNet parts (state-dict keys as in the diffusers release), on the CPU.

    ``init=False`` leaves the memory uninitialised, for a strict load that fills every tensor.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):  # nothing is allocated for the parts dropped below
        vae = AutoencoderKL(**config["vae"])
        unet = UNet2DConditionModel(**config["unet"])
    kept_vae = nn.ModuleDict({"encoder": vae.encoder, "quant_conv": vae.quant_conv})
    kept_unet = nn.ModuleDict(
        {
            "conv_in": unet.conv_in,
            "time_proj": unet.time_proj,
            "time_embedding": unet.time_embedding,
            "down_blocks": unet.down_blocks,
            "mid_block": unet.mid_block,
        }
    )
    return _materialise(kept_vae, init=init), _materialise(kept_unet, init=init)


def _text_embedding(
    config: dict[str, Any], prompt: str, sd: dict[str, torch.Tensor] | None, source: str
) -> torch.Tensor:
    """CLIP text encoder's last hidden state ``[1, 77, D]`` for ``prompt`` (random init when ``sd`` is None)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    encoder = CLIPTextModel(CLIPTextConfig(**config)).eval()
    if sd is not None:
        apply_state_dict(encoder, _drop(sd, _DROPPED["text"]), source=source)
    with torch.no_grad():  # not inference_mode: the buffer must stay usable where autograd is on
        return encoder(input_ids=tokenize(prompt)).last_hidden_state.detach().clone()


class StableDiffusionEncoder(nn.Module):
    """VAE encoder + UNet down/mid blocks with a fixed text conditioning (see the module docstring)."""

    def __init__(
        self, vae: nn.ModuleDict, unet: nn.ModuleDict, text_embedding: torch.Tensor, scaling_factor: float
    ) -> None:
        super().__init__()
        self.vae = vae
        self.unet = unet
        self.register_buffer("text_embedding", text_embedding)  # persistent: part of the weights digest
        self.scaling_factor = float(scaling_factor)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] → scaled posterior mean ``[B, 4, H/8, W/8]``."""
        moments = self.vae["quant_conv"](self.vae["encoder"](x))
        return moments.chunk(2, dim=1)[0] * self.scaling_factor  # chunk 0 is the mean, 1 the log-variance

    def forward(self, x: torch.Tensor, mid: bool = True) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Down-block maps (before each downsampler) and, with ``mid``, the mid-block output."""
        u = self.unet
        sample = self.latent(x)
        b = sample.shape[0]
        t = torch.zeros(b, dtype=torch.long, device=sample.device)  # timestep 0, one per image
        emb = u["time_embedding"](u["time_proj"](t).to(sample.dtype))
        context = self.text_embedding.to(sample.dtype).expand(b, -1, -1)
        sample = u["conv_in"](sample)
        maps = []
        for block in u["down_blocks"]:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=context)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            maps.append(res[len(block.resnets) - 1])  # last resnet/attention output, pre-downsampler
        if not mid:
            return maps, None
        return maps, u["mid_block"](sample, emb, encoder_hidden_states=context)


class DiffusersBackbone(Backbone):
    """The Stable Diffusion v1 encoder behind the bobench contract (see :mod:`bobench.backbones.base`).

    Input: images normalised with mean = std = 0.5 (pixels in [-1, 1]), sides divisible by 64.

    Example:
        >>> bb = build("CompVis/stable-diffusion-v1-4", pretrained=False)
        >>> x = torch.zeros(2, 3, 256, 256)
        >>> bb.embed(x).shape, [tuple(m.shape[1:]) for m in bb.features(x)]
        (torch.Size([2, 1280]), [(320, 32, 32), (640, 16, 16), (1280, 8, 8), (1280, 4, 4)])
    """

    input_multiple = 64  # a task's image_size (e.g. 112) is rounded up to 128 in preprocess()

    def _check_size(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2:]
        if h % 64 or w % 64:
            raise ValueError(
                f"{self.card.name}: input size {h}x{w} is not divisible by 64 (VAE /8, then three UNet "
                "downsamplers); resize or crop to a multiple of 64, e.g. 256."
            )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_size(x)
        _, mid = self.model(x)
        return mid.mean(dim=(-2, -1))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._check_size(x)
        maps, _ = self.model(x, mid=False)
        return maps

    def prepare_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept ``bb.model``'s own layout, also with the dropped decoder / up-block keys present."""
        return _drop(
            sd, tuple(f"vae.{p}" for p in _DROPPED["vae"]) + tuple(f"unet.{p}" for p in _DROPPED["unet"])
        )


def release_files(repo: str) -> dict[str, Path]:
    """The VAE, UNet and text-encoder files of a diffusers-layout hub release (cache first).

    Raises:
        WeightsUnavailableError: a file is neither cached nor downloadable (at once when offline).
    """
    return {part: hub_file(repo, names) for part, names in _FILES.items()}


def build(
    name: str,
    *,
    pretrained: bool,
    prompt: str = "",
    image_size: int = 256,
    config: str | dict[str, dict[str, Any]] | None = None,
) -> DiffusersBackbone:
    """Build ``diffusers:<repo>``, the Stable Diffusion v1 encoder of that release.

    Args:
        name: the hub repo, e.g. ``CompVis/stable-diffusion-v1-4``.
        pretrained: load the release's ``vae/``, ``unet/`` and ``text_encoder/`` files strictly;
            ``False`` gives a random-init control (offline, seeded by the caller's ``torch.manual_seed``).
        prompt: the fixed text conditioning, embedded once here.
        image_size: the card's input side, a multiple of 64 (BoB used 256).
        config: architecture: a name from ``CONFIGS`` or a dict like them; required for repos not in
            ``RELEASES`` (tests use ``"tiny"``).

    Raises:
        UnknownNameError: a repo not in ``RELEASES`` and no ``config``, or an unknown config name.
        ValueError: ``image_size`` not a multiple of 64.
        WeightsUnavailableError: ``pretrained`` and the files are not cached here (offline: at once).
        WeightsError: a file does not fit the architecture.
    """
    if image_size % 64:
        raise ValueError(f"image_size {image_size} is not divisible by 64")
    release = RELEASES.get(name)
    if config is None:
        if release is None:
            raise UnknownNameError(
                f"diffusers:{name} is not a known Stable Diffusion v1 release.{suggest(name, list(RELEASES))}"
                f" Known: {', '.join(RELEASES)}; other repos in the same layout need config='sd-v1'."
            )
        config = release[0]
    if isinstance(config, str):
        if config not in CONFIGS:
            raise UnknownNameError(f"no diffusers config {config!r}.{suggest(config, list(CONFIGS))}")
        config_name, config = config, CONFIGS[config]
    else:
        config_name = "custom"
    files = release_files(name) if pretrained else {}  # fail before building anything
    text_sd = load_state_dict(files["text"]) if pretrained else None
    text_embedding = _text_embedding(config["text"], prompt, text_sd, str(files.get("text")))
    del text_sd
    vae, unet = _build_modules(config, init=not pretrained)
    for part, module in (("vae", vae), ("unet", unet)):
        if pretrained:  # one file in memory at a time
            sd = _drop(load_state_dict(files[part]), _DROPPED[part])
            sd = _legacy_attention_names(sd) if part == "vae" else sd
            apply_state_dict(module, sd, source=str(files[part]))
            del sd
    scaling = float(config["vae"].get("scaling_factor", 0.18215))
    model = StableDiffusionEncoder(vae, unet, text_embedding, scaling).eval()
    channels = list(config["unet"]["block_out_channels"])
    feature_info = [
        FeatureInfo(c, s, f"down_blocks.{i}") for i, (c, s) in enumerate(zip(channels, _STRIDES, strict=True))
    ]
    card = BackboneCard(
        name=f"diffusers:{name}",
        source="diffusers",
        spec=f"diffusers:{name}",
        family="other",
        params=count_params(model),
        embed_dim=channels[-1],
        pool="avg",
        pretrained=pretrained,
        pretraining="latent-diffusion",
        pretraining_data=release[1] if release else "unknown",
        input_size=(3, image_size, image_size),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bicubic",
        crop_pct=1.0,
        license="CreativeML-OpenRAIL-M" if release else "unknown",
        weights=f"hf-hub:{name} ({', '.join(f'{p.parent.name}/{p.name}' for p in files.values())})"
        if pretrained
        else "random-init",
        extra={
            "prompt": prompt,
            "config": config_name,
            "text_encoder": "CLIPTextModel (openai/clip-vit-large-patch14), last hidden state, 77 tokens",
            "latent": f"VAE posterior mean x {scaling}",
            "timestep": 0,
            "features": "down-block outputs before each downsampler",
            "embed": "global average pool of the mid-block output",
            "dropped": "VAE decoder + post_quant_conv, UNet up blocks + output head, text encoder",
        },
    )
    return DiffusersBackbone(model, card, feature_info)


def missing_weights(name: str) -> Missing | None:
    """None when every file ``diffusers:<repo>`` loads (VAE, UNet, text encoder) is cached here, else
    the first that is missing. Never downloads and never builds the model."""
    for names in _FILES.values():
        missing = hub_missing(name, names)
        if missing is not None:
            return missing
    return None
