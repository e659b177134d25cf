"""Fine-tuning as a trained protocol: recipe parts from timm, val selection, n-shot, frozen, resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bobench.backbones import create_backbone
from bobench.options import RunOptions
from bobench.protocols import finetune
from bobench.protocols.base import TrainData
from bobench.runner import run_battle
from bobench.store import ResultStore

OPTS = RunOptions(device="cpu", num_workers=0, progress=False, checkpoint_minutes=None)
# no augmentation, small batches: a few seconds per run on digits at 32 px
FAST = {
    "auto_augment": None,
    "mixup": 0.0,
    "cutmix": 0.0,
    "reprob": 0.0,
    "color_jitter": 0.0,
    "warmup_epochs": 0,
}


def _task(tmp_path: Path, name: str, params: dict, dataset: str = "digits", **extra) -> Path:
    body = {
        "version": 1,
        "dataset": dataset,
        "protocol": "finetune",
        "params": params,
        "image_size": 32,
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def _rows(db: Path) -> pd.DataFrame:
    with ResultStore(db, readonly=True) as s:
        return s.results(status=None)


def test_lr_sweep_is_selected_on_val_and_test_scored_once(tmp_path: Path) -> None:
    task = _task(tmp_path, "digits-ft", {**FAST, "epochs": 2, "batch_size": 64, "lr": [1e-6, 3e-3]})
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        s = run_battle(["random/timm:test_vit"], [task], store=store, cache_dir=tmp_path / "c", options=OPTS)
    assert (s.done, s.failed) == (1, 0), s.failures and s.failures[0].error
    rows = _rows(db)
    info = json.loads(rows["config_json"].iloc[0])["info"]
    val = info["val_by_lr"]
    assert set(val) == {"1e-06", "0.003"} and info["lr"] == 3e-3 and val["0.003"] > val["1e-06"]
    assert info["val_score"] == max(h["val"] for h in info["history"])  # the best epoch of the best lr
    top1 = rows.set_index("metric")["value"]
    assert top1["top1"] > 0.2  # 10 classes, 2 short epochs from random init: well above chance (0.1)
    preds = pd.read_parquet(json.loads(rows["config_json"].iloc[0])["predictions"])
    assert len(preds) == 359 and np.isclose((preds["pred"] == preds["label"]).mean(), top1["top1"])
    assert not (tmp_path / "c" / "checkpoints").exists() or not any(
        (tmp_path / "c" / "checkpoints").iterdir()
    )
    # the report's bootstrap resamples the kept predictions (it checks they reproduce the stored score)
    from bobench.analysis import bootstrap

    ok = rows[rows["status"] == "ok"].copy()
    twin = ok.assign(backbone="twin")  # a second backbone, so that a ranking exists
    boot = bootstrap(pd.concat([ok, twin]), n_boot=20)
    assert boot.attrs["resampling"]["digits-ft:top1"]["predictions"] == ["random/timm:test_vit", "twin"]


def test_a_corrupt_image_met_while_training_fails_the_cell_naming_the_file_and_fix(tmp_path: Path) -> None:
    from bobench import load_dataset

    digits = load_dataset("digits", split="train")
    root = tmp_path / "folder"
    for i in range(40):
        folder = root / digits.classes[int(digits.targets[i])]
        folder.mkdir(parents=True, exist_ok=True)
        digits.load_image(i).save(folder / f"{i}.png")
    (root / digits.classes[0] / "broken.png").write_bytes(b"not a png")  # found when training reads it
    spec = f"imagefolder:{root}"
    task = _task(
        tmp_path, "folder-ft", {**FAST, "epochs": 1, "batch_size": 8}, dataset=spec, splits=["train", "test"]
    )
    with ResultStore(tmp_path / "r.db") as store:
        s = run_battle(["random/timm:test_vit"], [task], store=store, cache_dir=tmp_path / "c", options=OPTS)
    assert (s.done, s.failed) == (0, 1)
    out = s.failures[0]
    assert out.cause == f"dataset {spec}"  # grouped with the dataset's other failures, not the task's
    assert "broken.png" in out.error and "skip_bad_images=true" in out.error
    assert _rows(tmp_path / "r.db")["status"].tolist() == ["failed"]


def test_layer_decay_scales_the_lr_per_layer_group() -> None:
    from timm.optim import create_optimizer_v2

    bb = create_backbone("random/timm:test_vit")
    model = finetune.Classifier(bb, 10)
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scales = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            scales[names[id(p)]] = g["lr_scale"]
    assert scales["head.weight"] == 1.0
    stem = scales["backbone.model.patch_embed.proj.weight"]
    n_layers = round(np.log(stem) / np.log(0.75)) + 1
    assert n_layers == len(bb.model.blocks) + 3  # embeddings, each block, the final norm/head, the new head
    blocks = [scales[f"backbone.model.blocks.{i}.attn.qkv.weight"] for i in range(len(bb.model.blocks))]
    assert blocks == sorted(blocks) and len(set(blocks)) == len(blocks) and stem < blocks[0] < 1.0
    assert len(scales) == sum(1 for p in model.parameters() if p.requires_grad)


def test_mixup_targets_sum_to_one() -> None:
    p = finetune.resolve_params({})
    loss, mix = finetune.loss_and_mixup(p, n_classes=13, multilabel=False)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 13
    _, ym = mix(x, y)
    assert ym.shape == (8, 13) and torch.allclose(ym.sum(1), torch.ones(8))
    assert float(loss(torch.randn(8, 13), ym)) > 0
    _, none = finetune.loss_and_mixup({**p, "mixup": 0.0, "cutmix": 0.0}, 13, False)
    assert none is None


def test_n_shot_and_held_out_val_are_stratified_and_seeded() -> None:
    from bobench.data import load_dataset

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    data = TrainData(train, None, test, list(train.classes))
    p = finetune.resolve_params({"n_shot": 5})
    sub, val, info = finetune._splits(data, p, seed=0)
    labels = train.targets[sub.indices]
    assert np.bincount(labels).tolist() == [5] * 10 and info["n_train"] == 50
    assert not set(sub.indices) & set(val.indices)  # val held out of train, disjoint
    assert abs(len(val) - 0.1 * len(train)) <= 10
    again, _, _ = finetune._splits(data, p, seed=0)
    other, _, _ = finetune._splits(data, p, seed=1)
    assert again.indices == sub.indices != other.indices
    frac, _, _ = finetune._splits(data, finetune.resolve_params({"n_shot": 0.25}), seed=0)
    counts = np.bincount(train.targets[frac.indices])
    held = np.bincount(train.targets[val.indices], minlength=10)
    expected = [round(0.25 * (n - h)) for n, h in zip(np.bincount(train.targets), held, strict=True)]
    assert counts.tolist() == expected
    with pytest.raises(ValueError, match="n_shot"):
        finetune.resolve_params({"n_shot": 1.5})


def test_frozen_backbone_trains_only_the_head(tmp_path: Path) -> None:
    from bobench.data import load_dataset

    bb = create_backbone("random/mobilenetv2_100")
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    splits = [load_dataset("digits", s) for s in ("train", "val", "test")]
    data = TrainData(*splits, classes=list(splits[0].classes), image_size=32)
    params = {**FAST, "epochs": 1, "batch_size": 64, "frozen_backbone": True}
    result = finetune.run(bb, data, params, 0, OPTS, tmp_path / "ck")
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BatchNorm statistics untouched
    assert result.info["frozen_backbone"] and result.info["layer_decay"] is None
    assert result.info["drop_path_slots"] == 0


def test_a_device_task_param_is_refused() -> None:
    with pytest.raises(ValueError, match="run option"):
        finetune.resolve_params({"device": "cuda"})
    with pytest.raises(ValueError, match=r"Did you mean: layer_decay"):
        finetune.resolve_params({"layer_decy": 0.7})


def test_multilabel_finetune_on_chexpert_layout(tmp_path: Path) -> None:
    from test_chexpert import write_chexpert

    root = write_chexpert(tmp_path / "data")
    task = _task(
        tmp_path, "cx-ft", {**FAST, "epochs": 1, "batch_size": 8, "smoothing": 0.0},
        dataset=f"chexpert:{root}?val_fraction=0.3", primary="mean_auroc",
    )  # fmt: skip
    with ResultStore(tmp_path / "r.db") as store:
        s = run_battle(
            ["random/mobilenetv2_100"], [task], store=store, cache_dir=tmp_path / "c", options=OPTS
        )
    assert s.done == 1, s.failures and s.failures[0].error
    metrics = _rows(tmp_path / "r.db").set_index("metric")["value"]
    assert 0 <= metrics["mean_auroc"] <= 1 and "mean_ap" in metrics


def test_killed_finetune_resumes_to_the_same_result(tmp_path: Path) -> None:
    """Killed after its first epoch (held there by a gate, not by timing), a fine-tuning cell resumes
    from its checkpoint and ends with exactly the scores of an uninterrupted run (CPU: bit-equal)."""
    task = _task(tmp_path, "digits-ft", {**FAST, "epochs": 2, "batch_size": 32, "drop_path": 0.0})
    bb = "user_models:make_train_gated"
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parent),
        "BOBENCH_TEST_GATE": str(tmp_path / "gate"),
    }
    env["BOBENCH_TEST_TRAIN_GATE_AFTER"] = str(1079 // 32)  # one epoch of micro-batches of 32 (digits train)
    base = [
        sys.executable,
        "-m",
        "bobench",
        "run",
        "-b",
        bb,
        "-t",
        str(task),
        "--workers",
        "0",
        "--batch-size",
        "32",
    ]
    clean = subprocess.run([*base, "--db", str(tmp_path / "clean.db"), "--cache-dir", str(tmp_path / "c1")],
                           env={**env, "BOBENCH_TEST_TRAIN_GATE_AFTER": "0"}, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    cmd = [*base, "--db", str(tmp_path / "r.db"), "--cache-dir", str(tmp_path / "c2")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_root = tmp_path / "c2" / "checkpoints"
    try:
        deadline = time.monotonic() + 600  # only a real hang reaches this
        epoch = 0
        while epoch < 1 and time.monotonic() < deadline and proc.poll() is None:
            for f in ckpt_root.glob("*/lr0/last.pt"):
                with contextlib.suppress(Exception):  # replaced while we read it: read the next one
                    epoch = torch.load(f, weights_only=True)["epoch"]
            time.sleep(0.1)
        assert epoch == 1 and proc.poll() is None, "the run ended or hung before its first epoch's checkpoint"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (tmp_path / "gate").touch()
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a = _rows(tmp_path / "clean.db").set_index("metric")["value"]
    b = _rows(tmp_path / "r.db").set_index("metric")["value"]
    assert a.to_dict() == b.to_dict()  # exactly equal, not close
    info = json.loads(_rows(tmp_path / "r.db")["config_json"].iloc[0])["info"]
    assert len(info["history"]) == 2
    assert not any(ckpt_root.iterdir())  # recorded: the checkpoints are gone


def test_demo_task_is_in_the_demo_suite() -> None:
    from bobench.task import load_suite, load_task

    assert "patches13-finetune" in load_suite("demo").tasks
    t = load_task("patches13-finetune")
    assert t.protocol == "finetune" and finetune.resolve_params(t.params)["epochs"] <= 5
