"""Release-layout converters: each is checked by writing a random model in its release's original layout.

Every round trip builds a random-init timm model, rewrites its state dict by hand into the layout of the
original release (the inverse of the converter, with the heads, decoders, momentum encoders and buffers
that the converter must drop), wraps it as the release wraps it, saves it with ``torch.save``, reads it
back with ``load_state_dict``, converts it into a fresh model, loads it strictly and compares every
tensor and one forward pass.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from bobench.backbones.converters import CONVERTERS, convert
from bobench.backbones.torchscript import is_torchscript_archive, read_torchscript_state_dict
from bobench.backbones.weights import WeightsError, apply_state_dict, load_state_dict
from bobench.registry import UnknownNameError

NAMES = [
    "fb_convnext",
    "mae_vit",
    "midas_swinv2",
    "mocov3_resnet",
    "mocov3_vit",
    "sam_vit",
    "sscd_resnet",
    "torchvision_resnet_trunk",
]


# -- helpers ----------------------------------------------------------------------------------------


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and layer scales, so that a wrong or missing tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith("running_mean") or name.endswith(".gamma"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1 + (1.0 if "gamma" in name else 0.0))
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return model.eval()


def _create(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _roundtrip(tmp_path: Path, release: object, converter: str, target: nn.Module) -> None:
    path = tmp_path / "release.pth"
    torch.save(release, path)
    sd = load_state_dict(path)
    apply_state_dict(target, convert(converter, sd, target), source=str(path))


def _assert_same(src: nn.Module, dst: nn.Module, x: torch.Tensor) -> None:
    s, d = src.state_dict(), dst.state_dict()
    assert s.keys() == d.keys()
    for k in s:
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(s[k], d[k]), k
    with torch.no_grad():
        assert torch.allclose(src.eval()(x), dst.eval()(x), atol=1e-5)


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    return _randomized(_create("resnet50", num_classes=0))


@pytest.fixture(scope="module")
def vit_s() -> nn.Module:
    return _randomized(_create("vit_small_patch16_224", num_classes=0, num_heads=12))


IMG64 = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
IMG224 = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))


# -- registry and malformed input -------------------------------------------------------------------


def test_registered_names():
    assert sorted(CONVERTERS) == NAMES


def test_unknown_converter_suggests():
    with pytest.raises(UnknownNameError, match="mocov3_vit"):
        convert("mocov3_vti", {}, nn.Identity())


@pytest.mark.parametrize("name", NAMES)
def test_wrong_release_is_refused(name: str):
    sd = {"encoder.foo.weight": torch.zeros(2), "head.weight": torch.zeros(2)}
    with pytest.raises(WeightsError, match=f"converter '{name}' expected .+encoder.foo.weight"):
        convert(name, sd, nn.Identity())


def test_mocov3_on_plain_resnet_explains(resnet50: nn.Module):
    with pytest.raises(WeightsError, match=r"'mocov3_resnet' expected a MoCo v3 checkpoint.+base_encoder"):
        convert("mocov3_resnet", resnet50.state_dict(), resnet50)


# -- ViT releases -----------------------------------------------------------------------------------


def test_mocov3_vit(tmp_path: Path, vit_s: nn.Module):
    enc = {**vit_s.state_dict(), "head.0.weight": torch.randn(8, 384), "head.1.running_mean": torch.zeros(8)}
    sd = {f"module.base_encoder.{k}": v for k, v in enc.items()}
    sd |= {f"module.momentum_encoder.{k}": v + 1 for k, v in enc.items()}
    sd |= {"module.predictor.0.weight": torch.randn(8, 8)}
    release = {"epoch": 300, "arch": "vit_small", "state_dict": sd, "optimizer": {"state": {}}}
    target = _create("vit_small_patch16_224", num_classes=0, num_heads=12)
    _roundtrip(tmp_path, release, "mocov3_vit", target)
    _assert_same(vit_s, target, IMG224)
    # keys that kept their DDP prefix (not every key had it) are accepted too
    mixed = {**sd, "queue": torch.zeros(1)}
    assert convert("mocov3_vit", mixed, target).keys() == target.state_dict().keys()


def test_mae_vit(tmp_path: Path):
    src = _randomized(_create("vit_small_patch16_224", num_classes=0, global_pool="token"))
    model = {**src.state_dict(), "mask_token": torch.randn(1, 1, 384)}
    model |= {
        "decoder_embed.weight": torch.randn(16, 384),
        "decoder_pos_embed": torch.randn(1, 197, 16),
        "decoder_blocks.0.norm1.weight": torch.ones(16),
        "decoder_norm.weight": torch.ones(16),
        "decoder_pred.weight": torch.randn(768, 16),
    }
    target = _create("vit_small_patch16_224", num_classes=0, global_pool="token")
    _roundtrip(tmp_path, {"model": model}, "mae_vit", target)
    _assert_same(src, target, IMG224)


def _to_sam(sd: dict) -> dict:
    return {f"image_encoder.{k.replace('mlp.fc', 'mlp.lin')}": v for k, v in sd.items()}


@pytest.mark.slow
def test_sam_vit(tmp_path: Path):
    from timm.models.vision_transformer_sam import get_rel_pos

    src = _randomized(_create("samvit_base_patch16", img_size=256, num_classes=0))
    sd = _to_sam(src.state_dict())
    sd |= {
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": torch.randn(2, 128),
        "mask_decoder.transformer.layers.0.self_attn.q_proj.weight": torch.randn(4, 4),
        "mask_decoder.iou_token.weight": torch.randn(1, 256),
    }
    target = _create("samvit_base_patch16", img_size=256, num_classes=0)
    _roundtrip(tmp_path, sd, "sam_vit", target)
    _assert_same(src, target, torch.randn(1, 3, 256, 256))

    # a model built at another size gets resized position tables; the global-attention tables give
    # exactly what SAM's get_rel_pos interpolates at run time from the originals
    small = _create("samvit_base_patch16", img_size=128, num_classes=0)
    converted = convert("sam_vit", sd, small)
    apply_state_dict(small, converted)
    assert small.pos_embed.shape == (1, 8, 8, 768)
    glob = "blocks.2.attn.rel_pos_h"  # samvit_base: global attention in blocks 2, 5, 8, 11
    assert src.state_dict()[glob].shape[0] == 31 and converted[glob].shape[0] == 15
    assert torch.equal(get_rel_pos(8, 8, converted[glob]), get_rel_pos(8, 8, src.state_dict()[glob]))
    assert torch.equal(converted["blocks.0.attn.rel_pos_h"], src.state_dict()["blocks.0.attn.rel_pos_h"])


# -- hierarchical releases --------------------------------------------------------------------------


def _to_fb_convnext(sd: dict) -> dict:
    """timm ConvNeXt → facebookresearch/ConvNeXt names (Linear pointwise convs, final ``norm``)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv").replace("head.norm.", "norm.")
        out[k] = v.flatten(1) if "pwconv" in k and k.endswith("weight") else v  # 1x1 conv → Linear
    return out


def test_fb_convnext_imagenet_layout(tmp_path: Path):
    # convnext_atto has conv_mlp=True: also checks timm's Linear → 1x1 conv reshape
    src = _randomized(_create("convnext_atto", num_classes=0))
    sd = _to_fb_convnext(src.state_dict())
    assert "stages.0.0.gamma" in sd and sd["stages.0.0.pwconv1.weight"].ndim == 2
    sd |= {"head.weight": torch.randn(1000, 320), "head.bias": torch.randn(1000)}
    target = _create("convnext_atto", num_classes=0)
    _roundtrip(tmp_path, {"model": sd}, "fb_convnext", target)
    _assert_same(src, target, IMG64)


def test_fb_convnext_vicregl_layout(tmp_path: Path):
    # VICRegL: no layer scale (gamma absent) and a ``backbone.`` prefix; gamma = 1 is the same function
    src = _randomized(_create("convnext_tiny", num_classes=0))
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(1.0)
    sd = {f"backbone.{k}": v for k, v in _to_fb_convnext(src.state_dict()).items() if "gamma" not in k}
    target = _create("convnext_tiny", num_classes=0)
    _roundtrip(tmp_path, sd, "fb_convnext", target)
    _assert_same(src, target, IMG64)


def test_midas_swinv2(tmp_path: Path):
    src = _randomized(_create("swinv2_tiny_window8_256", num_classes=0))
    # timm 0.6 (MiDaS v3.1) ran patch merging at the end of stage i; timm 1.x at the start of stage i+1
    old = {}
    for k, v in src.state_dict().items():
        m = re.match(r"^layers\.(\d+)\.downsample\.(.*)", k)
        old[f"layers.{int(m[1]) - 1}.downsample.{m[2]}" if m else k] = v
    assert "layers.0.downsample.reduction.weight" in old and "layers.3.downsample.norm.weight" not in old
    buffers = dict(src.named_buffers())
    for k in (
        "layers.0.blocks.0.attn.relative_position_index",
        "layers.0.blocks.0.attn.relative_coords_table",
        "layers.0.blocks.0.attn.k_bias",
        "layers.0.blocks.1.attn_mask",
    ):
        old[k] = buffers[k]
    old |= {"head.weight": torch.randn(1000, 768), "head.bias": torch.randn(1000)}
    sd = {f"pretrained.model.{k}": v for k, v in old.items()}
    sd |= {
        "pretrained.act_postprocess1.3.weight": torch.randn(96, 96, 1, 1),
        "scratch.layer1_rn.weight": torch.randn(4, 96, 3, 3),
        "scratch.refinenet1.out_conv.weight": torch.randn(4, 4, 1, 1),
        "scratch.output_conv.0.weight": torch.randn(4, 4, 3, 3),
    }
    target = _create("swinv2_tiny_window8_256", num_classes=0)
    _roundtrip(tmp_path, sd, "midas_swinv2", target)
    _assert_same(src, target, torch.randn(1, 3, 256, 256))


# -- ResNet-50 releases -----------------------------------------------------------------------------


def test_mocov3_resnet(tmp_path: Path, resnet50: nn.Module):
    enc = {**resnet50.state_dict(), "fc.0.weight": torch.randn(8, 2048), "fc.1.running_var": torch.ones(8)}
    sd = {f"module.base_encoder.{k}": v for k, v in enc.items()}
    sd |= {f"module.momentum_encoder.{k}": v for k, v in enc.items()}
    sd |= {"module.predictor.0.weight": torch.randn(8, 8)}
    target = _create("resnet50", num_classes=0)
    _roundtrip(tmp_path, {"epoch": 1000, "arch": "resnet50", "state_dict": sd}, "mocov3_resnet", target)
    _assert_same(resnet50, target, IMG64)


@pytest.mark.parametrize("layout", ["dino", "vicreg_backbone_prefix", "with_fc"])
def test_torchvision_resnet_trunk(tmp_path: Path, resnet50: nn.Module, layout: str):
    sd = dict(resnet50.state_dict())
    if layout == "vicreg_backbone_prefix":
        sd = {f"backbone.{k}": v for k, v in sd.items()}
    elif layout == "with_fc":
        sd |= {"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)}
    target = _create("resnet50", num_classes=0)
    _roundtrip(tmp_path, sd, "torchvision_resnet_trunk", target)
    _assert_same(resnet50, target, IMG64)


class _GeM(nn.Module):
    def __init__(self, p: float = 3.0) -> None:
        super().__init__()
        self.p = p
        self.cache = torch.zeros(0)  # a plain tensor attribute: in the archive, not in the state_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=1e-6).pow(self.p).mean((2, 3)).pow(1.0 / self.p)


class _L2Norm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=1)


class _SSCD(nn.Module):
    """The SSCD TorchScript structure: a torchvision ResNet-50 trunk and a GeM + Linear + L2 head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torchvision.models.resnet50()
        self.backbone.avgpool = nn.Identity()
        self.backbone.fc = nn.Identity()
        self.embeddings = nn.Sequential(_GeM(), nn.Linear(2048, 512), _L2Norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return self.embeddings(b.layer4(b.layer3(b.layer2(b.layer1(x)))))


def test_sscd_torchscript(tmp_path: Path):
    model = _SSCD()
    _randomized(model, seed=3)
    scripted = torch.jit.script(model)
    path = tmp_path / "sscd_disc_mixup.torchscript.pt"
    torch.jit.save(scripted, str(path))
    assert is_torchscript_archive(path)

    sd = read_torchscript_state_dict(path)
    expected = scripted.state_dict()
    assert list(sd) == list(expected)
    for k, v in expected.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k

    target = _create("resnet50", num_classes=0)
    apply_state_dict(target, convert("sscd_resnet", sd, target))
    with torch.no_grad():
        trunk = scripted.backbone(IMG64)  # avgpool and fc are Identity: flattened trunk features
        assert torch.allclose(target.forward_features(IMG64).flatten(1), trunk, atol=1e-5)


def test_sscd_classy_vision_layout(resnet50: nn.Module):
    """Classy Vision trunk names (how SSCD trained) map to torchvision's."""
    sd = {}
    for k, v in resnet50.state_dict().items():
        k = re.sub(r"^conv1\.", "initial_block._module.0.", k)
        k = re.sub(r"^bn1\.", "initial_block._module.1.", k)
        if m := re.match(r"^layer(\d)\.(\d+)\.(\w+)\.(.*)", k):
            part = {"conv1": "convolutional_block.0", "bn1": "convolutional_block.1"}
            part |= {"conv2": "convolutional_block.3", "bn2": "convolutional_block.4"}
            part |= {"conv3": "convolutional_block.6", "bn3": "bn", "downsample": "downsample"}
            k = f"blocks.{int(m[1]) - 1}.{m[2]}._module.{part[m[3]]}.{m[4]}"
        sd[f"backbone.{k}"] = v
    sd |= {"backbone.blocks.0.0.output": torch.zeros(0), "embeddings.1.weight": torch.randn(512, 2048)}
    target = _create("resnet50", num_classes=0)
    apply_state_dict(target, convert("sscd_resnet", sd, target))
    _assert_same(resnet50, target, IMG64)


# -- reading untrusted files ------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ts") / "linear.pt"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))), str(path))
    return path


def test_tiny_archive_matches_state_dict(tiny_archive: Path):
    expected = torch.jit.load(str(tiny_archive)).state_dict()
    sd = read_torchscript_state_dict(tiny_archive)
    assert list(sd) == list(expected) and all(torch.equal(sd[k], v) for k, v in expected.items())


@pytest.mark.parametrize("protocol", [2, 4])
def test_code_in_torchscript_archive_never_runs(tmp_path: Path, tiny_archive: Path, protocol: int):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(tiny_archive) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps(_Evil(marker), protocol=protocol)
            dst.writestr(item, data)
    assert is_torchscript_archive(evil)
    with pytest.raises(WeightsError, match="no module parameters"):
        read_torchscript_state_dict(evil)
    with pytest.raises(WeightsError):
        load_state_dict(evil)
    assert not marker.exists()


def test_code_in_pickle_never_runs(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": _Evil(marker)}))
    with pytest.raises(WeightsError, match="weights_only"):
        load_state_dict(path)
    with pytest.raises(WeightsError, match="not a TorchScript archive"):
        read_torchscript_state_dict(path)
    assert not marker.exists()


def test_torch_save_file_is_not_torchscript(tmp_path: Path):
    path = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(2)}, path)
    assert not is_torchscript_archive(path)
    assert not is_torchscript_archive(tmp_path / "missing.pt")
    with pytest.raises(WeightsError, match="not a TorchScript archive"):
        read_torchscript_state_dict(path)
