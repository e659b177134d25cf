"""Layer maps for layer-wise lr decay and drop path, for every backbone source, offline and tiny.

Known answers: timm's own ``group_parameters(model, model.group_matcher(coarse=False))`` for timm models,
timm's optimizer factory (``create_optimizer_v2(..., layer_decay=0.75)``) for the lr scales, and the
drop-path rates that ``timm.create_model(name, drop_path_rate=r)`` (or a Hugging Face config with
``drop_path_rate``) builds. Layer maps of the other sources are written out by hand below.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from torch import nn

from bobench.backbones import create_backbone
from bobench.backbones.base import Backbone
from bobench.backbones.layers import (
    drop_path_rates,
    find_blocks,
    generic_layer_ids,
    group_matcher_for,
    layer_ids,
    no_weight_decay_for,
    set_drop_path,
)

DECAY = 0.75
_TEXT = {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
TINY_CLIP = {  # three blocks: a run of blocks needs at least three
    "BobLayersViT": {"image_size": 64, "layers": 3, "width": 64, "patch_size": 16, "head_width": 32},
    "BobLayersRN": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
}


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Backbone]:
    """``kind -> fresh random-init backbone`` for one tiny model of every source."""
    import open_clip
    from transformers import ConvNextConfig, ViTConfig

    root = tmp_path_factory.mktemp("layers")
    vit = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    ViTConfig(**vit, image_size=64, patch_size=16).save_pretrained(root / "hf_vit")
    ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1] * 4).save_pretrained(root / "hf_convnext")
    for name, vision in TINY_CLIP.items():
        cfg = {"embed_dim": 24, "vision_cfg": vision, "text_cfg": _TEXT}
        (root / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root)

    def make(kind: str) -> Backbone:
        if kind == "diffusers":
            from bobench.backbones.diffusers_source import build as build_sd

            torch.manual_seed(0)
            return build_sd("bobench/tiny-sd", pretrained=False, config="tiny")
        spec = {
            "hf_vit": f"hf:{root / 'hf_vit'}",
            "hf_convnext": f"hf:{root / 'hf_convnext'}",
            "open_clip_vit": "open_clip:BobLayersViT",
            "open_clip_rn": "open_clip:BobLayersRN",
        }.get(kind, kind)
        return create_backbone(spec, pretrained=False)

    return make


# -- layer maps --------------------------------------------------------------------------------------

# kind: (number of backbone layers, a parameter of layer 0, a parameter of the last layer)
LAYER_MAPS = {
    "timm:vit_tiny_patch16_224": (14, "cls_token", "head.weight"),  # 0 = embeddings, 13 = classifier
    "timm:resnet18": (10, "conv1.weight", "fc.weight"),  # one id per residual block
    "torchvision:resnet18": (6, "bn1.weight", "fc.weight"),  # 0 = stem, layer1..4 = 1..4, fc
    "hf_vit": (5, "embeddings.cls_token", "layernorm.weight"),  # 3 encoder layers
    "hf_convnext": (6, "embeddings.patch_embeddings.weight", "layernorm.weight"),  # 4 stages
    "open_clip_vit": (5, "class_embedding", "proj"),  # 3 resblocks; proj is an output projection
    "open_clip_rn": (6, "conv3.weight", "attnpool.c_proj.weight"),  # 3-conv stem, 4 stages, attnpool
    "diffusers": (6, "vae.encoder.conv_in.weight", "unet.mid_block.resnets.0.conv1.weight"),
    "user_models:make_declared": (5, "body.0.weight", "body.5.0.weight"),  # stem conv, 4 stages
}


@pytest.mark.parametrize("kind", list(LAYER_MAPS))
def test_layer_map_of_each_source(build, kind: str) -> None:
    bb = build(kind)
    ids = layer_ids(bb)
    n, first, last = LAYER_MAPS[kind]
    assert list(ids) == [name for name, _ in bb.model.named_parameters()]
    assert sorted(set(ids.values())) == list(range(n))  # contiguous
    assert (ids[first], ids[last]) == (0, n - 1)


def test_timm_ids_are_timms_own() -> None:
    from timm.models import group_parameters

    bb = create_backbone("timm:vit_tiny_patch16_224", pretrained=False)
    model = bb.model
    assert layer_ids(bb) == group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    ids = layer_ids(bb)
    assert ids["patch_embed.proj.weight"] == ids["pos_embed"] == 0
    assert [ids[f"blocks.{i}.attn.qkv.weight"] for i in range(12)] == list(range(1, 13))
    assert ids["norm.weight"] == 12  # the final norm joins the last block, as in timm


def test_diffusers_map_is_vae_then_unet_down_blocks_then_mid(build) -> None:
    ids = layer_ids(build("diffusers"))
    by_layer: dict[int, set[str]] = {}
    for name, i in ids.items():
        parts = name.split(".")
        by_layer.setdefault(i, set()).add(".".join(parts[:3] if parts[1] == "down_blocks" else parts[:2]))
    assert by_layer == {
        0: {"vae.encoder", "vae.quant_conv", "unet.conv_in", "unet.time_embedding"},
        **{i + 1: {f"unet.down_blocks.{i}"} for i in range(4)},
        5: {"unet.mid_block"},
    }


def test_generic_rule_on_hand_made_models() -> None:
    class Stage(nn.Sequential):
        pass

    class Net(nn.Module):  # ResNet layout: stages are attributes, a transition sits between two of them
        def __init__(self) -> None:
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.stem = nn.Conv2d(3, 4, 3)
            self.layer1 = Stage(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
            self.layer2 = Stage(nn.Conv2d(4, 4, 1), nn.ReLU())
            self.mix = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())
            self.layer3 = Stage(nn.Conv2d(4, 4, 1))
            self.norm = nn.LayerNorm(4)
            self.proj = nn.Parameter(torch.zeros(4, 2))

    ids = generic_layer_ids(Net())
    assert find_blocks(Net()) == ("", ["layer1", "layer2", "layer3"])
    assert ids == {
        "cls_token": 0,  # an embedding held by the model itself: before the blocks
        "proj": 4,  # any other tensor held by it: after them
        "stem.weight": 0,
        "stem.bias": 0,
        **{f"layer1.{k}": 1 for k in ("0.weight", "0.bias", "1.weight", "1.bias")},
        "layer2.0.weight": 2,
        "layer2.0.bias": 2,
        "mix.0.weight": 2,  # between two blocks: joins the one before it
        "mix.0.bias": 2,
        "layer3.0.weight": 3,
        "layer3.0.bias": 3,
        "norm.weight": 4,
        "norm.bias": 4,
    }
    # no run of three blocks (an attention's q/k/v Linears are leaves, not blocks): one id per child
    attn = nn.Module()
    attn.q, attn.k, attn.v = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    assert find_blocks(attn) is None
    assert set(generic_layer_ids(attn).values()) == {0, 1, 2}


def test_an_adapter_override_wins_and_must_cover_every_parameter() -> None:
    bb = create_backbone("user_models:make_declared", pretrained=False)
    names = [n for n, _ in bb.model.named_parameters()]
    bb.layer_ids = lambda: {n: 7 if n.startswith("body.5") else 3 for n in names}
    assert set(layer_ids(bb).values()) == {0, 1}  # compacted
    bb.layer_ids = lambda: {names[0]: 0}
    with pytest.raises(ValueError, match="no id for"):
        layer_ids(bb)


# -- end to end: timm's optimizer factory on a fine-tuning wrapper -------------------------------------


class Wrapper(nn.Module):
    """What a fine-tuning protocol builds: the backbone and a new head."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, 3)

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        return group_matcher_for(self.backbone)

    def no_weight_decay(self) -> set[str]:
        return no_weight_decay_for(self.backbone)


@pytest.mark.parametrize("kind", list(LAYER_MAPS))
def test_layer_decay_groups_through_timm_create_optimizer(build, kind: str) -> None:
    from timm.optim import create_optimizer_v2

    bb = build(kind)
    wrapper = Wrapper(bb)
    opt = create_optimizer_v2(wrapper, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=DECAY)
    ids = {f"backbone.model.{n}": i for n, i in layer_ids(bb).items()}
    n_layers = max(ids.values()) + 2  # the backbone's layers and the head
    ids.update({n: n_layers - 1 for n, _ in wrapper.head.named_parameters(prefix="head")})
    group_of = {}
    for g, group in enumerate(opt.param_groups):
        for p in group["params"]:
            assert id(p) not in group_of, "a parameter in two groups"
            group_of[id(p)] = g
    no_decay = wrapper.no_weight_decay()
    scales = {}
    for name, p in wrapper.named_parameters():
        group = opt.param_groups[group_of[id(p)]]  # KeyError: a trainable parameter in no group
        assert group["lr_scale"] == pytest.approx(DECAY ** (n_layers - 1 - ids[name])), name
        exempt = p.ndim <= 1 or name in no_decay
        assert group["weight_decay"] == (0.0 if exempt else 0.05), name
        scales[ids[name]] = group["lr_scale"]
    assert len(group_of) == sum(1 for p in wrapper.parameters() if p.requires_grad)
    assert scales[n_layers - 1] == 1.0  # the head
    assert scales[0] == pytest.approx(DECAY ** (n_layers - 1))  # the stem
    assert [scales[i] for i in range(n_layers)] == sorted(scales.values())  # growing with depth
    assert len(set(scales.values())) == n_layers


def test_position_embeddings_get_no_weight_decay(build) -> None:
    assert no_weight_decay_for(build("timm:vit_tiny_patch16_224")) >= {
        "backbone.model.pos_embed",
        "backbone.model.cls_token",
    }  # timm's own list
    assert no_weight_decay_for(build("torchvision:resnet18")) == set()
    hf = no_weight_decay_for(build("hf_vit"), prefix="")
    assert hf == {"embeddings.cls_token", "embeddings.position_embeddings"}


def test_matcher_rejects_parameters_outside_backbone_and_head(build) -> None:
    bb = build("user_models:make_declared")
    match = group_matcher_for(bb, head_prefix=("head.", "neck."))
    assert match("neck.0.weight") == match("head.weight") == 5
    assert match("backbone.model.body.0.weight") == 0
    with pytest.raises(ValueError, match="neither in the backbone"):
        match("decoder.weight")


# -- drop path ---------------------------------------------------------------------------------------


def _rate(module: nn.Module | None) -> float:
    return float(getattr(module, "drop_prob", 0.0)) if module is not None else 0.0


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_atto", "resnet18", "mobilenetv2_100"])
def test_set_drop_path_rates_match_timm_build(name: str) -> None:
    import timm

    bb = create_backbone(f"timm:{name}", pretrained=False)
    with torch.device("meta"):
        ref = timm.create_model(name, drop_path_rate=0.1)
    slots = set_drop_path(bb, 0.1)
    rates = drop_path_rates(bb.model, 0.1)
    assert slots == len(rates) > 0
    built = {n for n, m in ref.named_modules() if type(m).__name__ == "DropPath"}
    assert built <= set(rates)  # every slot timm fills is found, none invented
    for slot, r in rates.items():
        owner, _, attr = slot.rpartition(".")
        assert type(getattr(bb.model.get_submodule(owner), attr)).__name__ == "DropPath"
        ours = _rate(getattr(bb.model.get_submodule(owner), attr))
        assert ours == r == pytest.approx(_rate(getattr(ref.get_submodule(owner), attr)), abs=1e-7), slot
    assert max(rates.values()) == pytest.approx(0.1 if name != "mobilenetv2_100" else 0.1 * 16 / 17)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_atto"])
def test_drop_path_leaves_eval_alone_and_makes_training_stochastic(name: str) -> None:
    bb = create_backbone(f"timm:{name}", pretrained=False)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = bb.embed(x)
        assert set_drop_path(bb, 0.1) > 0
        assert torch.equal(bb.embed(x), before)  # eval mode: every DropPath is the identity
        bb.train()
        runs = []
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            runs.append(bb.embed(x))
    assert torch.equal(runs[0], runs[1])  # seeded: reproducible
    assert not torch.equal(runs[0], runs[2])  # but the dropped paths change with the seed
    assert not torch.equal(runs[0], before)


def test_hugging_face_drop_path_slots_match_its_own_build(build) -> None:
    from transformers import ConvNextConfig, ConvNextModel

    bb = build("hf_convnext")
    assert set_drop_path(bb, 0.2) == 4
    ref = ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1] * 4, drop_path_rate=0.2))
    for i in range(4):
        slot = f"encoder.stages.{i}.layers.0.drop_path"
        assert _rate(bb.model.get_submodule(slot)) == pytest.approx(_rate(ref.get_submodule(slot)))


@pytest.mark.parametrize(
    "kind",
    [
        "torchvision:resnet18",
        "hf_vit",
        "open_clip_vit",
        "open_clip_rn",
        "diffusers",
        "user_models:make_declared",
    ],
)
def test_models_without_slots_are_left_untouched(build, kind: str) -> None:
    bb = build(kind)
    modules = [(n, type(m)) for n, m in bb.model.named_modules()]
    assert set_drop_path(bb, 0.1) == 0
    assert [(n, type(m)) for n, m in bb.model.named_modules()] == modules


def test_drop_path_rate_is_checked() -> None:
    bb = create_backbone("user_models:make_declared", pretrained=False)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"in \[0, 1\)"):
            set_drop_path(bb, bad)


def test_drop_path_zero_resets() -> None:
    bb = create_backbone("timm:convnext_atto", pretrained=False)
    set_drop_path(bb, 0.3)
    assert set_drop_path(bb, 0.0) == 12
    assert all(_rate(m) == 0.0 for n, m in bb.model.named_modules() if n.endswith("drop_path"))
