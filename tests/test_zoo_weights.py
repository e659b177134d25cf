"""Zoo entries whose weights are release files at a URL: cache → converter → strict load, and fetch.

No network: the release file is written in the release's own key layout to the exact cache path a
download would fill, as a user placing the file by hand would.
"""

from __future__ import annotations

import json

import pytest
import torch

from bobench.backbones import create_backbone
from bobench.backbones.download import cached_path
from bobench.backbones.fetch import fetch, names_for, zoo_entry
from bobench.cli.main import main
from user_models import count_network


def _place_mocov3_vit_s(seed: int = 5) -> torch.nn.Module:
    """A random ViT-S (12 heads) saved as MoCo v3 saves it, at bob/mocov3-vit-s16's cache path."""
    import timm

    torch.manual_seed(seed)
    net = timm.create_model(
        "vit_small_patch16_224", num_classes=0, num_heads=12, dynamic_img_size=True
    ).eval()
    release = {f"module.base_encoder.{k}": v for k, v in net.state_dict().items()}
    release |= {f"module.momentum_encoder.{k}": v.clone() + 1 for k, v in net.state_dict().items()}
    release["module.base_encoder.head.0.weight"] = torch.zeros(4096, 384)  # projection MLP: dropped
    release["module.predictor.0.weight"] = torch.zeros(4096, 256)
    path = cached_path(zoo_entry("bob/mocov3-vit-s16").weights["url"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": release}, path)
    return net


def test_url_release_loads_through_cache_and_converter() -> None:
    net = _place_mocov3_vit_s()
    bb = create_backbone("bob/mocov3-vit-s16")
    card = bb.card
    assert card.pretrained and card.pretraining == "mocov3" and card.pretraining_kind == "ssl"
    assert card.weights.startswith("https://dl.fbaipublicfiles.com/moco-v3/")
    assert card.weights_sha256 == "unknown" and card.extra["bob_id"] == "moco-vit_small_patch16_224"
    assert card.mean == pytest.approx((0.485, 0.456, 0.406)) and card.interpolation == "bilinear"
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expect = net.forward_head(net.forward_features(x), pre_logits=True)
        assert torch.allclose(bb.embed(x), expect, atol=1e-5)
    # 12 heads, as the release: a 6-head ViT-S with the same tensors computes something else
    assert bb.model.blocks[0].attn.num_heads == 12


def test_fetch_check_reports_cache_state(capsys) -> None:
    _place_mocov3_vit_s()
    assert fetch("bob/mocov3-vit-s16", download=False).ok
    missing = fetch("bob/mae-vit-b16", download=False)
    assert not missing.ok and "mae_pretrain_vit_base.pth" in missing.where
    assert str(cached_path(zoo_entry("bob/mae-vit-b16").weights["url"])) in missing.where
    rc = main(["backbones", "fetch", "--check", "--json", "bob/mocov3-vit-s16", "bob/mae-vit-b16"])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 1 and [r["ok"] for r in rows] == [True, False]


def test_fetch_offline_fails_at_once_with_url_and_path(monkeypatch, capsys) -> None:
    monkeypatch.setenv("BOBENCH_OFFLINE", "1")
    calls = count_network(monkeypatch.setattr)  # "at once" = no lookup, no connection, no back-off
    rc = main(["backbones", "fetch", "bob/sam-vit-b", "bob/dino-resnet50"])
    assert calls == {"getaddrinfo": 0, "create_connection": 0, "connect": 0, "sleep": 0}
    err = capsys.readouterr().err
    assert rc == 1
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in err
    assert str(cached_path("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth")) in err


def test_published_digest_is_checked() -> None:
    url = zoo_entry("bob/sam-vit-b").weights["url"]
    path = cached_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not the SAM checkpoint")
    got = fetch("bob/sam-vit-b", download=False)
    assert not got.ok and "01ec64" in got.where and "sha256" in got.where


def test_fetch_groups() -> None:
    assert names_for("demo")[:2] == ["mobilenetv2_100.tv_in1k", "tf_efficientnet_lite0.in1k"]
    bob = names_for("bob")
    assert len(bob) >= 45 and all(n.startswith("bob/") for n in bob)
    with pytest.raises(Exception, match="neither a task suite nor a zoo prefix"):
        names_for("nonesuch")


def test_list_filters(capsys) -> None:
    assert main(["backbones", "list", "--json", "--family", "vit", "--method", "ssl"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["name"] for r in rows}
    assert {"bob/dino-vit-s16", "bob/mae-vit-b16", "modern/dinov2-vit-s14"} <= names
    assert all(r["family"] == "vit" and r["pretraining_kind"] == "ssl" for r in rows)
    assert main(["backbones", "list", "--json", "--method", "clip"]) == 0
    clip = {r["name"] for r in json.loads(capsys.readouterr().out)}
    assert "bob/clip-rn50" in clip and "bob/dino-vit-s16" not in clip


def test_show_offline_prints_the_card_with_a_note(capsys) -> None:
    assert main(["backbones", "show", "--json", "bob/mae-vit-b16"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["pretraining"] == "mae" and card["paper"] == "arXiv:2111.06377"
    assert card["params"] > 80e6 and card["embed_dim"] == 768 and "not on disk" in card["note"]
