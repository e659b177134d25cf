"""Random-init controls are random, seeded by the cell, and never the pretrained network in disguise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bobench.backbones import create_backbone
from bobench.backbones.reinit import RandomInitError
from bobench.options import RunOptions
from bobench.runner import run_battle
from bobench.store import ResultStore

SHIPPED = "user_models:make_shipped_mobilenet"  # loads real ImageNet weights itself, no `pretrained=`


def test_random_control_of_a_callable_that_loads_real_weights_is_random(chelsea) -> None:
    pre = create_backbone(SHIPPED)
    rnd = create_backbone(f"random/{SHIPPED}")
    assert rnd.card.pretrained is False and rnd.card.weights == "random-init(seed=0)"
    assert rnd.card.extra["reinitialized_by"] == "bobench"
    assert rnd.card.weights_digest != pre.card.weights_digest
    pre_sd, rnd_sd = pre.model.state_dict(), rnd.model.state_dict()
    for name, p in pre.model.named_parameters():
        assert not torch.equal(p, rnd_sd[name]), f"{name} kept its pretrained value"
    # BatchNorm statistics are back to their initial values, not ImageNet's
    bn = [k for k in rnd_sd if k.endswith("running_mean")]
    assert bn and all(torch.equal(rnd_sd[k], torch.zeros_like(rnd_sd[k])) for k in bn)
    assert not torch.equal(pre_sd[bn[0]], rnd_sd[bn[0]])
    # and the features differ: a real photo's embedding is not the pretrained one
    x = pre.transform()(chelsea).unsqueeze(0)
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(pre.embed(x), rnd.embed(x)).item()
    assert cos < 0.9, cos


def test_random_control_of_a_callable_is_seeded_by_init_seed() -> None:
    a0 = create_backbone(f"random/{SHIPPED}", init_seed=0)
    b0 = create_backbone(f"random/{SHIPPED}", init_seed=0)
    a1 = create_backbone(f"random/{SHIPPED}", init_seed=1)
    assert a0.card.weights_digest == b0.card.weights_digest
    assert a0.card.weights_digest != a1.card.weights_digest
    assert a1.card.weights == "random-init(seed=1)"


def test_a_parameter_no_layer_can_reset_is_refused_with_the_fix() -> None:
    with pytest.raises(RandomInitError) as err:
        create_backbone("random/user_models:make_scaled")
    msg = str(err.value)
    assert "user_models:make_scaled" in msg and "scale" in msg and "`pretrained: bool` keyword" in msg
    create_backbone("user_models:make_scaled")  # the pretrained build itself is fine


def test_a_callable_that_takes_pretrained_is_trusted_not_reinitialised() -> None:
    bb = create_backbone("random/user_models:make_declared")
    assert bb.model.was_pretrained is False and "reinitialized_by" not in bb.card.extra


def _cards(db: Path) -> pd.DataFrame:
    import json

    with ResultStore(db, readonly=True) as s:
        rows = s.results(metric="top1")
    rows["digest"] = [json.loads(c)["weights_digest"] for c in rows["card_json"]]
    rows["weights"] = [json.loads(c)["weights"] for c in rows["card_json"]]
    return rows


def test_battle_seeds_of_a_random_control_are_its_init_seeds(tmp_path: Path) -> None:
    task = tmp_path / "digits-knn.yaml"
    task.write_text("version: 1\ndataset: digits\nprotocol: knn\nimage_size: 32\nseeds: [0, 1, 2]\n")
    db = tmp_path / "r.db"
    opts = RunOptions(num_workers=0, progress=False)
    with ResultStore(db) as store:
        s = run_battle(
            ["random/mobilenetv2_100", "mobilenetv2_100.tv_in1k"],
            [task],
            store=store,
            cache_dir=tmp_path / "c",
            options=opts,
        )
    assert (s.done, s.failed) == (6, 0)
    rows = _cards(db)
    rnd = rows[rows["backbone"] == "random/mobilenetv2_100"].set_index("seed")
    assert rnd["digest"].nunique() == 3  # three networks, one per seed
    assert list(rnd.sort_index()["weights"]) == [f"random-init(seed={i})" for i in range(3)]
    assert rnd["value"].nunique() > 1  # kNN is deterministic: differing scores come from the inits
    pre = rows[rows["backbone"] == "mobilenetv2_100.tv_in1k"]
    assert pre["digest"].nunique() == 1  # the seed does not change pretrained weights
    # the same seed gives the same network and the same score as a run of that seed alone
    with ResultStore(tmp_path / "r1.db") as store:
        run_battle(
            ["random/mobilenetv2_100"], [task], store=store, cache_dir=tmp_path / "c", options=opts, seeds=[2]
        )
    again = _cards(tmp_path / "r1.db").iloc[0]
    assert again["digest"] == rnd.loc[2, "digest"]
    assert np.isclose(again["value"], rnd.loc[2, "value"])
