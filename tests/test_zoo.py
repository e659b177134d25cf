"""The zoo: every named backbone builds (random init, offline) and keeps the adapter contract.

Parametrized over the registry like timm's own model tests. Backbones over ~150M parameters are
marked ``heavy``: they run in CI's second pytest step (``make test`` runs both).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import yaml

from bobench.backbones import create_backbone, list_backbones
from bobench.backbones.card import PRETRAINING_KINDS, UNKNOWN
from bobench.backbones.zoo import read_zoo_file, zoo_files

ROWS = {r["name"]: r for r in list_backbones()}
# names that give away a big model; test_heavy_marker_matches_size keeps this honest
_HEAVY = re.compile(r"xlarge|large|-xl|-l\d|-l-|vit-l|rn50x64|stable-diffusion|sd-v1", re.IGNORECASE)
HEAVY_PARAMS = 150e6
CONTRACT_SIZE = 112
# card fields every pretrained zoo entry states (a value, or explicitly "unknown")
REQUIRED_CARD = ("family", "pretraining", "pretraining_data", "pretraining_images", "paper", "license")


def _param(name: str):
    marks = [pytest.mark.heavy] if _HEAVY.search(name) else []
    return pytest.param(name, marks=marks, id=name)


ALL = [_param(n) for n in sorted(ROWS)]


def test_zoo_size_and_unique_names():
    entries = [e for f in zoo_files() for e in read_zoo_file(f)]
    names = [e.name for e in entries]
    assert len(names) == len(set(names)), "duplicate zoo names"
    assert len(ROWS) >= 45
    assert sum(n.startswith("bob/") for n in ROWS) >= 45
    assert sum(n.startswith("modern/") for n in ROWS) >= 10
    assert sum(n.startswith("random/") for n in ROWS) >= 20


def test_bob_reference_backbones_covered():
    """Every backbone in BoB's retrieval table maps to exactly one zoo entry via bob_id."""
    import csv

    from bobench.analysis import REFERENCE_DIR

    with (REFERENCE_DIR / "bob_retrieval_mrr.csv").open() as f:
        bob_ids = {row["backbone"] for row in csv.DictReader(f)}
    ours = [r["bob_id"] for r in ROWS.values() if r.get("bob_id")]
    assert len(ours) == len(set(ours))
    assert bob_ids <= set(ours), sorted(bob_ids - set(ours))


@pytest.mark.parametrize("path", zoo_files(), ids=lambda p: p.name)
def test_every_pretrained_entry_states_its_card(path):
    for raw in yaml.safe_load(path.read_text()):
        if raw.get("pretrained", True) is False:
            continue
        card = raw.get("card") or {}
        missing = [k for k in REQUIRED_CARD if k not in card or card[k] in (None, "")]
        assert not missing, f"{raw['name']}: card lacks {missing} (state a value or 'unknown')"
        assert card["family"] in {"cnn", "vit", "hybrid", "other"}
        assert card["pretraining"] in PRETRAINING_KINDS, (
            f"{raw['name']}: unknown method {card['pretraining']}"
        )
        imgs = card["pretraining_images"]
        assert imgs == UNKNOWN or (isinstance(imgs, int) and imgs > 0)
        if "weights" in raw:  # a release file: where it is and its digest (or explicitly unknown)
            assert "sha256" in raw["weights"], f"{raw['name']}: state the published sha256 or 'unknown'"
            assert raw["weights"]["sha256"] == UNKNOWN or re.fullmatch(
                r"[0-9a-f]{6,64}", raw["weights"]["sha256"]
            )


def test_every_named_converter_exists():
    from bobench.backbones.converters import CONVERTERS

    named = {
        e.weights["converter"]
        for f in zoo_files()
        for e in read_zoo_file(f)
        if e.weights and "converter" in e.weights
    }
    assert named and named <= set(CONVERTERS), named - set(CONVERTERS)


def test_release_preprocessing_is_the_releases_own():
    """Mean/std come from each release, never a blanket ImageNet default (BoB's CLIP bug)."""
    clip_mean = (0.48145466, 0.4578275, 0.40821073)
    half = (0.5, 0.5, 0.5)
    for name, mean in [
        ("bob/clip-rn50", clip_mean),
        ("bob/clip-vit-b16-laion2b", clip_mean),
        ("bob/midas-swinv2-t-256", half),
        ("bob/sd-v1-encoder", half),
        ("bob/vit-b16-in1k", half),
        ("modern/siglip2-vit-b16", half),
        ("bob/dino-vit-s16", (0.485, 0.456, 0.406)),
    ]:
        bb = create_backbone(name, pretrained=False)
        assert bb.card.mean == pytest.approx(mean), name
        del bb


@pytest.mark.parametrize("name", ALL)
def test_contract(name, chelsea):
    bb = create_backbone(name, pretrained=False)
    card = bb.card
    assert (card.params >= HEAVY_PARAMS) == bool(_HEAVY.search(name)), (
        f"{name}: heavy marker wrong ({card.params:,})"
    )
    assert not bb.training
    assert card.name == name and not card.pretrained and card.pretraining == "none"
    for field, value in card.to_dict().items():
        assert value not in (None, ""), f"{name}: card.{field} is empty"
    assert card.family == ROWS[name]["family"]
    # preprocessing from the card: a real photo becomes a normalised tensor of the card's size
    x = bb.transform()(chelsea)
    assert tuple(x.shape) == tuple(card.input_size)
    m = bb.input_multiple  # e.g. 64 for SD: 112 px becomes 64, not 128
    size = bb.preprocess(image_size=max(m, CONTRACT_SIZE // m * m))["input_size"][1]  # native if fixed
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        emb = bb.embed(x)
        maps = bb.features(x)
    assert emb.shape == (2, card.embed_dim) and torch.isfinite(emb).all()
    strides = [f.stride for f in bb.feature_info]
    assert strides == sorted(strides) and len(set(strides)) == len(strides), strides
    assert len(maps) == len(bb.feature_info)
    for m, info in zip(maps, bb.feature_info, strict=True):
        assert m.shape[:2] == (2, info.channels), (name, info)
        side = size / info.stride  # exact up to the rounding of strided convolutions
        assert m.shape[-2] in {math.floor(side), math.ceil(side)}, (name, info, tuple(m.shape))
