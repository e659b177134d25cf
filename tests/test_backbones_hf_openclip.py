"""The hf: and open_clip: adapters, offline: tiny models built here, saved to disk and read back.

Known answers come from the libraries themselves: the saved transformers model's own CLS / pooled output,
the OpenCLIP model's own ``encode_image``. Hub names are checked in a subprocess with an empty cache,
because huggingface_hub reads its cache location from the environment at import.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from bobench.backbones import create_backbone
from bobench.backbones.base import count_params, tokens_to_map
from bobench.backbones.weights import WeightsUnavailableError
from bobench.registry import UnknownNameError

SIZE = 112
VIT_MEAN, VIT_STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)  # distinct from any library default
_TEXT = {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
TINY_CLIP = {
    "BobTinyViT": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "BobTinyRN": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
}


def _contract(bb, size: int, sides: list[int]) -> None:
    """embed shape, one map per feature_info entry with its channels and exactly ``sides`` spatially."""
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        emb = bb.embed(x)
        maps = bb.features(x)
    assert emb.shape == (2, bb.card.embed_dim)
    assert len(maps) == len(bb.feature_info) == len(sides)
    assert [i.stride for i in bb.feature_info] == [4, 8, 16, 32]
    for m, info, side in zip(maps, bb.feature_info, sides, strict=True):
        assert tuple(m.shape) == (2, info.channels, side, side), info
    assert bb.card.params > 0 and len(bb.card.weights_digest) == 64


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj))


# -- Hugging Face transformers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny random transformers models saved as save_pretrained directories, with the source models."""
    from transformers import (
        ConvNextConfig,
        ConvNextModel,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        ResNetConfig,
        ResNetModel,
        ViTConfig,
        ViTForImageClassification,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("hf")
    vit_cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    models = {
        "vit": ViTModel(ViTConfig(**vit_cfg, image_size=64, patch_size=16)),
        "dinov2reg": Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(**vit_cfg, image_size=64, patch_size=16, num_register_tokens=4)
        ),
        # stem width 8 differs from stage 1's 16: features must pick the stage, not the stem
        "resnet": ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1] * 4)),
        "vit_cls": ViTForImageClassification(
            ViTConfig(**vit_cfg, image_size=64, patch_size=16, num_labels=3)
        ),
    }
    for name, model in models.items():
        model.eval().save_pretrained(root / name)
    ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1] * 4).save_pretrained(root / "convnext")
    torch.save(models["vit_cls"].state_dict(), root / "vit_cls.pth")
    _write_json(
        root / "vit" / "preprocessor_config.json",
        {"image_mean": VIT_MEAN, "image_std": VIT_STD, "size": {"height": 64, "width": 64}, "resample": 2},
    )
    _write_json(  # DINOv2's processor layout: resize the short side, then centre-crop
        root / "dinov2reg" / "preprocessor_config.json",
        {"size": {"shortest_edge": 73}, "crop_size": {"height": 64, "width": 64}, "do_center_crop": True},
    )
    _write_json(  # the ConvNeXt-style processor microsoft/resnet-50 ships: short side / crop_pct, crop
        root / "resnet" / "preprocessor_config.json",
        {"crop_pct": 0.875, "size": {"shortest_edge": 64}, "resample": 3, "image_mean": [0.5] * 3},
    )
    return {"root": root, "models": models, "convnext": ConvNextModel}


def test_hf_vit_loads_saved_weights_and_its_preprocessor_config(hf: dict) -> None:
    src = hf["models"]["vit"]
    bb = create_backbone(f"hf:{hf['root'] / 'vit'}")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        # the CLS token of last_hidden_state, not ViT's tanh pooler_output
        assert torch.equal(bb.embed(x), src(x, interpolate_pos_encoding=True).last_hidden_state[:, 0])
    _contract(bb, SIZE, [math.ceil(SIZE / s) for s in (4, 8, 16, 32)])
    c = bb.card
    assert (c.mean, c.std, c.input_size) == (VIT_MEAN, VIT_STD, (3, 64, 64))
    assert (c.interpolation, c.crop_pct) == ("bilinear", 1.0)
    assert c.extra["preprocess_source"] == "preprocessor_config.json"
    assert (c.family, c.pool, c.embed_dim, c.pretrained, bb.pyramid) == ("vit", "cls", 32, True, True)
    assert c.params == sum(p.numel() for n, p in src.named_parameters() if not n.startswith("pooler."))


def test_hf_dinov2_registers_drops_prefix_tokens(hf: dict) -> None:
    src = hf["models"]["dinov2reg"]
    bb = create_backbone(f"hf:{hf['root'] / 'dinov2reg'}")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        out = src(x)
        assert torch.equal(bb.embed(x), out.pooler_output)  # DINOv2's pooler_output is the normed CLS
        maps = bb.features(x)
    # at stride 16 the pyramid level is the 7x7 patch grid itself: CLS and the 4 registers are gone
    assert torch.equal(maps[2], tokens_to_map(out.last_hidden_state[:, 5:], (7, 7)))
    _contract(bb, SIZE, [28, 14, 7, 4])
    c = bb.card
    assert c.extra["prefix_tokens"] == 5 and c.extra["preprocess_source"] == "preprocessor_config.json"
    assert (c.input_size, c.crop_pct, c.mean) == ((3, 64, 64), round(64 / 73, 4), (0.485, 0.456, 0.406))


def test_hf_resnet_stages_and_pooled_embedding(hf: dict) -> None:
    src = hf["models"]["resnet"]
    bb = create_backbone(f"hf:{hf['root'] / 'resnet'}")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        assert torch.equal(bb.embed(x), src(x).pooler_output.flatten(1))
    _contract(bb, SIZE, [28, 14, 7, 4])  # padded stride-2 convs: 7 → 4, i.e. ceil here
    assert [i.channels for i in bb.feature_info] == [16, 32, 64, 128]
    c = bb.card
    assert (c.family, c.pool, c.embed_dim, bb.pyramid) == ("cnn", "avg", 128, False)
    assert (c.input_size, c.crop_pct, c.interpolation, c.mean) == ((3, 64, 64), 0.875, "bicubic", (0.5,) * 3)
    assert c.params == count_params(src)


def test_hf_random_init_from_config_alone(hf: dict) -> None:
    spec = f"hf:{hf['root'] / 'convnext'}"  # config.json only: enough for the random-init control
    bb = create_backbone(spec, pretrained=False)
    _contract(bb, SIZE, [28, 14, 7, 3])  # ConvNeXt's unpadded 2x2 downsampling floors 7 → 3
    assert not bb.card.pretrained and bb.card.pretraining == "none"
    # no preprocessor_config.json: the config's image size with ImageNet statistics
    assert (bb.card.extra["preprocess_source"], bb.card.input_size) == ("config.image_size", (3, 224, 224))
    assert bb.card.params == count_params(hf["convnext"](bb.model.config))
    assert create_backbone(spec, pretrained=False).card.weights_digest == bb.card.weights_digest
    with pytest.raises(WeightsUnavailableError, match=r"model\.safetensors"):
        create_backbone(spec)


@pytest.mark.parametrize("file", ["vit_cls/model.safetensors", "vit_cls.pth"])
def test_hf_classification_checkpoint_via_weights(hf: dict, file: str) -> None:
    """A ViTForImageClassification file (``vit.`` prefix, a head; legacy key names in the safetensors that
    save_pretrained writes, module names in torch.save) loads strictly into the bare model."""
    src = hf["models"]["vit_cls"]
    bb = create_backbone(f"hf:{hf['root'] / 'vit'}", weights=hf["root"] / file)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        assert torch.equal(bb.embed(x), src.vit(x, interpolate_pos_encoding=True).last_hidden_state[:, 0])
    assert bb.card.pretrained and bb.card.weights == str(hf["root"] / file)


def test_hf_missing_directory_suggests(hf: dict) -> None:
    with pytest.raises(UnknownNameError, match="Did you mean: dinov2reg"):
        create_backbone(f"hf:{hf['root'] / 'dinov2_reg'}")


# -- OpenCLIP --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Register tiny OpenCLIP configs (a ViT and a ModifiedResNet image tower) the public way."""
    import open_clip

    root = tmp_path_factory.mktemp("open_clip_configs")
    for name, vision in TINY_CLIP.items():
        _write_json(root / f"{name}.json", {"embed_dim": 24, "vision_cfg": vision, "text_cfg": _TEXT})
    open_clip.add_model_config(root)
    return root


@pytest.mark.parametrize(
    ("arch", "family", "sides"), [("BobTinyViT", "vit", [16, 8, 4, 2]), ("BobTinyRN", "cnn", [16, 8, 4, 2])]
)
def test_open_clip_random_init_contract(tiny_clip: Path, arch: str, family: str, sides: list[int]) -> None:
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    bb = create_backbone(f"open_clip:{arch}", pretrained=False)
    _contract(bb, 64, sides)
    c = bb.card
    assert (c.mean, c.std) == (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    assert (c.input_size, c.interpolation, c.crop_pct) == ((3, 64, 64), "bicubic", 1.0)
    assert (c.family, c.pool, c.embed_dim, c.pretrained) == (family, "model", 24, False)
    assert bb.pyramid == (family == "vit")
    assert c.params == count_params(open_clip.create_model(arch).visual)  # image tower only


@pytest.mark.parametrize("arch", list(TINY_CLIP))
def test_open_clip_full_and_visual_checkpoints_match_encode_image(
    tiny_clip: Path, tmp_path: Path, arch: str
) -> None:
    import open_clip

    torch.manual_seed(7)
    src = open_clip.create_model(arch).eval()
    torch.save(src.state_dict(), tmp_path / "full.pth")
    torch.save(src.visual.state_dict(), tmp_path / "visual.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        want = src.encode_image(x)  # not normalised, like embed
        for file in ("full.pth", "visual.pth"):
            bb = create_backbone(f"open_clip:{arch}", weights=tmp_path / file)
            assert torch.equal(bb.embed(x), want), file


def test_open_clip_resnet_features_any_size_embed_native_only(tiny_clip: Path) -> None:
    bb = create_backbone("open_clip:BobTinyRN", pretrained=False)
    with torch.inference_mode():
        maps = bb.features(torch.randn(1, 3, SIZE, SIZE))
        assert [m.shape[-1] for m in maps] == [28, 14, 7, 3]  # CLIP's avg-pool downsampling floors 7 → 3
        with pytest.raises(ValueError, match=r"fixed-size position embeddings for \(64, 64\)"):
            bb.embed(torch.randn(1, 3, SIZE, SIZE))
    # a task's image_size override cannot break a fixed-size tower: the card's size is used and recorded
    assert bb.fixed_input_size and bb.preprocess(image_size=SIZE)["input_size"] == [3, 64, 64]
    assert bb.transform(image_size=SIZE)(Image.new("RGB", (90, 70))).shape == (3, 64, 64)


def test_open_clip_vit_hook_fallback_matches_forward_intermediates(tiny_clip: Path) -> None:
    from bobench.backbones.open_clip_source import vit_tokens_by_hook

    bb = create_backbone("open_clip:BobTinyViT", pretrained=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        grid = bb.features(x)[2]  # stride 16 = the 4x4 patch grid itself
        assert torch.equal(grid, tokens_to_map(vit_tokens_by_hook(bb.model, x)[:, 1:], (4, 4)))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("open_clip:ViT-B-23/openai", "Did you mean: ViT-B-32"),
        ("open_clip:ViT-B-32/opneai", "Did you mean: openai"),
        ("open_clip:ViT-B-32", "names no pretrained tag"),
    ],
)
def test_open_clip_unknown_names_suggest(spec: str, match: str) -> None:
    with pytest.raises(UnknownNameError, match=match):
        create_backbone(spec)


# -- hub names on an offline machine with an empty cache (one subprocess for all cases) -------------

_OFFLINE_SCRIPT = """
import json, sys
from user_models import count_network
import open_clip, torch
from open_clip.pretrained import _PRETRAINED, _pcfg
from bobench.backbones import create_backbone

calls = count_network()  # every DNS lookup or connection fails at once, as on a machine with no network
results = {}
for key, spec in [("hf", "hf:facebook/dinov2-small"), ("open_clip", "open_clip:ViT-B-32/openai")]:
    before = dict(calls)
    try:
        create_backbone(spec)
        results[key] = {"error": None}
    except Exception as exc:
        results[key] = {"error": type(exc).__name__, "message": str(exc)}
    results[key]["calls"] = {k: calls[k] - before[k] for k in calls}

# a release whose file *is* in the hub cache loads offline (registered like open_clip's own tags)
before = dict(calls)
open_clip.add_model_config(sys.argv[1])
_PRETRAINED["BobTinyViT"] = {"bobtest": _pcfg(hf_hub=sys.argv[3] + "/", quick_gelu=True)}
bb = create_backbone("open_clip:BobTinyViT/bobtest")
src = open_clip.create_model("BobTinyViT", pretrained=sys.argv[2], force_quick_gelu=True).eval()
x = torch.randn(2, 3, 64, 64)
with torch.inference_mode():
    equal = torch.equal(bb.embed(x), src.encode_image(x))
results["cached"] = {"equal": equal, "weights": bb.card.weights, "extra": bb.card.extra}
results["cached"]["calls"] = {k: calls[k] - before[k] for k in calls}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path) -> dict:
    import open_clip
    from safetensors.torch import save_file

    home = tmp_path_factory.mktemp("hf-home")
    repo, commit = "bobench/tiny-clip", "0" * 40
    snapshot = home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    torch.manual_seed(11)
    src = open_clip.create_model("BobTinyViT", force_quick_gelu=True)
    save_file(src.state_dict(), str(snapshot / "open_clip_model.safetensors"))
    env = {k: v for k, v in os.environ.items() if k not in {"HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"}}
    tests_dir = str(Path(__file__).parent)  # the script imports user_models.count_network
    pythonpath = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(home), PYTHONPATH=pythonpath)
    args = [str(tiny_clip), str(snapshot / "open_clip_model.safetensors"), repo]
    proc = subprocess.run(  # the timeout only guards against a hang; the checks count network calls
        [sys.executable, "-c", _OFFLINE_SCRIPT, *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "home": home}


# "Fails fast" means: no DNS lookup, no connection attempt, no retry back-off. Wall time is not checked:
# a busy machine stretches it at will, while a retry loop or a network probe shows up in these counts.
NO_NETWORK = {"getaddrinfo": 0, "create_connection": 0, "connect": 0, "sleep": 0}


def test_hf_hub_id_offline_fails_fast(offline: dict) -> None:
    r = offline["hf"]
    assert r["error"] == "WeightsUnavailableError" and r["calls"] == NO_NETWORK
    for part in ("hf:facebook/dinov2-small", str(offline["home"] / "hub"), "hf:/path/to/dir", "weights=PATH"):
        assert part in r["message"]


def test_open_clip_tag_offline_fails_fast_naming_the_file(offline: dict) -> None:
    r = offline["open_clip"]
    assert r["error"] == "WeightsUnavailableError" and r["calls"] == NO_NETWORK
    assert (
        "huggingface.co/timm/vit_base_patch32_clip_224.openai/resolve/main/open_clip_model.safetensors"
        in r["message"]
    )
    assert "weights=PATH" in r["message"]


def test_open_clip_cached_release_loads_offline_with_quick_gelu(offline: dict) -> None:
    r = offline["cached"]
    assert r["equal"], "embedding differs from the release loaded by open_clip itself (QuickGELU?)"
    assert r["weights"] == "hf-hub:bobench/tiny-clip/open_clip_model.safetensors" and r["extra"]["quick_gelu"]
    assert r["calls"] == NO_NETWORK  # read from the cache alone
