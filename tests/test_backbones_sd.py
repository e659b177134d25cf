"""The diffusers: adapter (Stable Diffusion v1 encoder), offline, on the tiny config.

The known answer comes from the libraries themselves: a tiny release (diffusers AutoencoderKL and
UNet2DConditionModel, transformers CLIPTextModel) is saved in the diffusers hub layout into a fake Hugging
Face cache, loaded by the adapter, and compared with diffusers' own ``vae.encode`` and ``unet(...)``
forward (hooked at each down block's last layer and the mid block). The full SD v1 config is built once,
random-init, in the slow test.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest
import torch

from bobench.backbones.base import count_params
from bobench.backbones.diffusers_source import CONFIGS, build, tokenize
from bobench.backbones.weights import WeightsError, WeightsUnavailableError, apply_state_dict
from bobench.registry import UnknownNameError
from user_models import count_network

SD14 = "CompVis/stable-diffusion-v1-4"
TINY = CONFIGS["tiny"]
TINY_CHANNELS = TINY["unet"]["block_out_channels"]
PROMPT = "a photo of a cat"
# CLIPTokenizer (openai/clip-vit-large-patch14, as SD v1 ships it) ids, written out by hand
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


def _tiny(prompt: str = "", seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build("bobench/tiny-sd", pretrained=False, prompt=prompt, config="tiny", **kw)


def _run(bb, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.inference_mode():
        return bb.embed(x), bb.features(x)


# -- tokeniser ---------------------------------------------------------------------------------------


def test_tokenize_reproduces_sd_v1_clip_tokenizer_ids() -> None:
    ids = tokenize(PROMPT)
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0].tolist() == CAT_IDS + [49407] * 70  # SD pads with end-of-text, not 0
    assert tokenize("  A photo of a  CAT ")[0].tolist() == ids[0].tolist()  # lower-cased, spaces cleaned
    assert tokenize("")[0].tolist() == [49406] + [49407] * 76
    long = tokenize("cat " * 100)[0].tolist()
    assert long == [49406] + [2368] * 75 + [49407]  # truncated to 75 tokens between start and end


# -- contract ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [64, 128])
def test_tiny_features_and_embed_shapes_strides(side: int) -> None:
    bb = _tiny()
    emb, maps = _run(bb, torch.randn(2, 3, side, side))
    assert [i.stride for i in bb.feature_info] == [8, 16, 32, 64]
    assert [i.channels for i in bb.feature_info] == TINY_CHANNELS
    assert emb.shape == (2, TINY_CHANNELS[-1]) == (2, bb.card.embed_dim)
    for m, info in zip(maps, bb.feature_info, strict=True):
        assert tuple(m.shape) == (2, info.channels, side // info.stride, side // info.stride)


def test_card_declares_the_sd_contract() -> None:
    bb = _tiny(PROMPT, image_size=128)
    c = bb.card
    assert (c.source, c.family, c.pool, c.pretraining) == ("diffusers", "other", "avg", "latent-diffusion")
    assert c.mean == c.std == (0.5, 0.5, 0.5)  # pixels in [-1, 1]
    assert (c.input_size, c.interpolation, c.crop_pct) == ((3, 128, 128), "bicubic", 1.0)
    assert c.extra["prompt"] == PROMPT and c.extra["config"] == "tiny"
    assert not bb.fixed_input_size and not c.pretrained and c.weights == "random-init"
    assert c.params == count_params(bb.model)
    # the never-run parts are not kept: VAE decoder, UNet up blocks, the text encoder
    names = {n.split(".")[1] for n, _ in bb.model.named_parameters()}
    assert names == {"encoder", "quant_conv", "conv_in", "time_embedding", "down_blocks", "mid_block"}


def test_size_not_divisible_by_64_raises() -> None:
    bb = _tiny()
    with pytest.raises(ValueError, match="96x96"):
        bb.embed(torch.zeros(1, 3, 96, 96))
    with pytest.raises(ValueError, match="64x100"):
        bb.features(torch.zeros(1, 3, 64, 100))
    with pytest.raises(ValueError, match="image_size 100"):
        _tiny(image_size=100)


def test_text_embedding_is_a_buffer_computed_once_and_the_prompt_matters(monkeypatch) -> None:
    from transformers import CLIPTextModel

    calls = []
    forward = CLIPTextModel.forward
    monkeypatch.setattr(
        CLIPTextModel, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k)
    )
    empty, cat = _tiny(""), _tiny(PROMPT)  # same seed: only the prompt differs
    assert len(calls) == 2  # once per build
    x = torch.randn(2, 3, 64, 64)
    e1, e2, e_cat = empty.embed(x).detach(), empty.embed(x).detach(), cat.embed(x).detach()
    assert len(calls) == 2  # never again at embed time
    buf = dict(empty.model.named_buffers())["text_embedding"]
    assert buf.shape == (1, 77, TINY["text"]["hidden_size"]) and not buf.requires_grad
    assert "text_embedding" in empty.model.state_dict()  # persistent: the weights digest sees the prompt
    assert not torch.equal(buf, cat.model.text_embedding)
    assert torch.equal(e1, e2) and not torch.allclose(e1, e_cat)
    sd_empty, sd_cat = empty.model.state_dict(), cat.model.state_dict()
    assert all(torch.equal(v, sd_cat[k]) for k, v in sd_empty.items() if k != "text_embedding")


def test_random_init_follows_the_callers_seed() -> None:
    a, b, c = (
        _tiny(seed=0).model.state_dict(),
        _tiny(seed=0).model.state_dict(),
        _tiny(seed=1).model.state_dict(),
    )
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert not torch.equal(a["unet.conv_in.weight"], c["unet.conv_in.weight"])
    # every kept tensor was initialised (no uninitialised memory from the meta-device build)
    assert all(torch.isfinite(v).all() for v in a.values())


def test_prepare_state_dict_roundtrip_ignores_dropped_parts() -> None:
    src, dst = _tiny(PROMPT, seed=0), _tiny(PROMPT, seed=5)
    sd = {
        **src.model.state_dict(),
        "vae.decoder.conv_in.weight": torch.zeros(1),
        "unet.up_blocks.0.x": torch.zeros(1),
    }
    apply_state_dict(dst.model, dst.prepare_state_dict(sd))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(src.embed(x), dst.embed(x))


def test_unknown_repo_needs_a_config() -> None:
    with pytest.raises(UnknownNameError, match="stable-diffusion-v1-4"):
        build("CompVis/stable-diffusion-v1-3", pretrained=False)
    with pytest.raises(UnknownNameError, match="tiny"):
        build(SD14, pretrained=False, config="tinyy")


# -- weights: a tiny release in the diffusers hub layout, in a fake local cache ----------------------


def _snapshot(cache: Path, repo: str) -> Path:
    commit = "0" * 40
    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    for sub in ("vae", "unet", "text_encoder"):
        (snap / sub).mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny diffusers / transformers models saved as two releases: ``bobench/tiny-sd`` (complete,
    with legacy VAE attention names and a text encoder ``.bin`` holding ``position_ids``, as older
    releases do) and ``bobench/broken-sd`` (one UNet tensor missing)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(3)
    vae, unet = AutoencoderKL(**TINY["vae"]).eval(), UNet2DConditionModel(**TINY["unet"]).eval()
    text = CLIPTextModel(CLIPTextConfig(**TINY["text"])).eval()
    legacy = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    vae_sd = {}
    for k, v in vae.state_dict().items():
        for new, old in legacy.items():
            k = k.replace(new, old) if "mid_block.attentions" in k else k
        vae_sd[k] = v
    text_sd = {**text.state_dict(), "text_model.embeddings.position_ids": torch.arange(77)[None]}
    cache = tmp_path_factory.mktemp("hf-cache")
    for repo in ("bobench/tiny-sd", "bobench/broken-sd"):
        snap = _snapshot(cache, repo)
        unet_sd = unet.state_dict()
        if repo == "bobench/broken-sd":
            unet_sd = {k: v for k, v in unet_sd.items() if k != "mid_block.resnets.0.conv1.weight"}
        save_file(vae_sd, str(snap / "vae" / "diffusion_pytorch_model.safetensors"))
        save_file(unet_sd, str(snap / "unet" / "diffusion_pytorch_model.safetensors"))
        torch.save(text_sd, snap / "text_encoder" / "pytorch_model.bin")
    return {"cache": cache, "vae": vae, "unet": unet, "text": text}


def _reference(release: dict, x: torch.Tensor, prompt: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Embed and features computed by diffusers' own forward passes."""
    vae, unet = release["vae"], release["unet"]
    got: dict[str, torch.Tensor] = {}

    def keep(name: str):
        return lambda _m, _i, o: got.__setitem__(name, o[0] if isinstance(o, tuple) else o)

    hooks = [unet.mid_block.register_forward_hook(keep("mid"))]
    for i, block in enumerate(unet.down_blocks):  # the block's last layer, before its downsampler
        last = block.attentions[-1] if getattr(block, "has_cross_attention", False) else block.resnets[-1]
        hooks.append(last.register_forward_hook(keep(f"down{i}")))
    try:
        with torch.inference_mode():
            context = release["text"](input_ids=tokenize(prompt)).last_hidden_state
            latent = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
            unet(
                latent.expand(x.shape[0], -1, -1, -1),
                0,
                encoder_hidden_states=context.expand(x.shape[0], -1, -1),
            )
    finally:
        for h in hooks:
            h.remove()
    return got["mid"].mean(dim=(-2, -1)), [got[f"down{i}"] for i in range(len(unet.down_blocks))]


def test_release_loads_strictly_and_matches_diffusers_forward(release: dict, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(release["cache"]))
    bb = build("bobench/tiny-sd", pretrained=True, prompt=PROMPT, config="tiny")
    assert bb.card.pretrained and bb.card.weights.startswith("hf-hub:bobench/tiny-sd (vae/")
    assert "text_encoder/pytorch_model.bin" in bb.card.weights  # the .bin fallback was used
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    emb, maps = _run(bb, x)
    ref_emb, ref_maps = _reference(release, x, PROMPT)
    assert torch.equal(emb, ref_emb)  # same ops in the same order: bit-identical
    for m, r in zip(maps, ref_maps, strict=True):
        assert torch.equal(m, r)
    with pytest.raises(WeightsError, match=r"missing keys \(1\): mid_block.resnets.0.conv1.weight"):
        build("bobench/broken-sd", pretrained=True, config="tiny")


def test_offline_pretrained_fails_fast_naming_the_repo(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # empty cache
    calls = count_network(monkeypatch.setattr)  # "fast" = no network attempt and no retry back-off
    with pytest.raises(WeightsUnavailableError) as err:
        build(SD14, pretrained=True)
    assert calls == {"getaddrinfo": 0, "create_connection": 0, "connect": 0, "sleep": 0}
    msg = str(err.value)
    assert SD14 in msg and "vae/diffusion_pytorch_model.safetensors" in msg and "pretrained=False" in msg


# -- the full SD v1 architecture ---------------------------------------------------------------------


@pytest.mark.heavy
def test_full_sd_v1_random_init_builds_and_runs() -> None:
    torch.manual_seed(0)
    t = time.perf_counter()
    bb = build(SD14, pretrained=False)
    seconds = time.perf_counter() - t
    vae = count_params(bb.model.vae)
    unet = count_params(bb.model.unet)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(
        f"\nSD v1 encoder: build {seconds:.1f}s, VAE encoder {vae:,}, UNet down+mid {unet:,}, peak RSS {peak_gb:.2f} GiB"
    )
    assert 33e6 < vae < 36e6  # 34,163,664
    assert 340e6 < unet < 360e6  # 348,712,960: down blocks 249.6M + mid block 97.0M + conv_in/time 2.1M
    assert bb.card.params == vae + unet and bb.card.embed_dim == 1280
    assert bb.card.input_size == (3, 256, 256) and bb.card.license == "CreativeML-OpenRAIL-M"
    assert bb.model.text_embedding.shape == (1, 77, 768)
    emb, maps = _run(bb, torch.randn(1, 3, 64, 64))
    assert emb.shape == (1, 1280) and torch.isfinite(emb).all()
    assert [tuple(m.shape[1:]) for m in maps] == [(320, 8, 8), (640, 4, 4), (1280, 2, 2), (1280, 1, 1)]
