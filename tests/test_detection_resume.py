"""Detection cells under the shared Trainer: killed and resumed, bf16 autocast on the CPU, 2-rank DDP.

The killed run is held by a gate (a patched ``Checkpoints.save`` that waits for a file after writing a
chosen checkpoint), never by timing: the test waits for the file that says the run is held there, kills
it, and reruns the same command. The patches live in a driver script that then runs ``bobench run``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from bobench.options import RunOptions
from bobench.store import ResultStore
from ranks import spawn_ranks
from test_detection import CATS, SLIM, _coco, _task

OPTS = RunOptions(device="cpu", num_workers=0, progress=False, checkpoint_minutes=None, batch_size=4)
# 2 epochs (the lr decays at the second: the scheduler's state must resume too) and a sweep of 2 lrs
PARAMS = {**SLIM, "epochs": 2, "lr": [1e-3, 2e-3], "val_fraction": 0.25}
LRS = [f"detection lr={lr:g}" for lr in PARAMS["lr"]]  # the Trainer's description of each lr's run

# `python driver.py run ...` = `bobench run ...`, logging every checkpoint save and fit to $DET_LOG, and
# held (until $DET_GATE exists) right after writing the second lr's checkpoint of its first epoch
DRIVER = """
import json, os, sys, time
from pathlib import Path

from bobench.checkpoints import Checkpoints
from bobench.training import Trainer

LOG, GATE = Path(os.environ["DET_LOG"]), Path(os.environ["DET_GATE"])
real_save, real_fit = Checkpoints.save, Trainer.fit


def note(**what):
    with LOG.open("a") as f:
        f.write(json.dumps({"pid": os.getpid(), **what}) + "\\n")


def save(self, state, name="last"):
    real_save(self, state, name)
    note(event="save", folder=self.folder.name, name=name, epoch=state.get("epoch"))
    if (self.folder.name, name, state.get("epoch")) == ("lr1", "last", 1):
        note(event="held")  # the checkpoint is whole on disk: the test kills this process now
        while not GATE.exists():
            time.sleep(0.05)


def fit(self, dataset):
    note(event="fit", run=self.description)
    result = real_fit(self, dataset)
    note(event="fitted", run=self.description, resumed_from=result.resumed_from)
    return result


Checkpoints.save, Trainer.fit = save, fit
from bobench.cli.main import main

sys.exit(main())
"""


def _rows(db: Path) -> pd.DataFrame:
    with ResultStore(db, readonly=True) as store:
        return store.results(status=None)


def _events(log: Path) -> list[dict]:
    """The driver's log; a line still being written (no newline yet) is not read."""
    text = log.read_text() if log.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]


def _cocojson(tmp_path: Path, n: int = 24) -> str:
    ann = _coco(tmp_path / "data", n, CATS)
    return f"cocojson:{ann}?images={ann.parent / 'img'}"


def test_a_killed_detection_sweep_resumes_to_the_same_result(tmp_path: Path) -> None:
    """Killed in its second lr after that lr's first epoch checkpoint (an epoch's end always checkpoints,
    whatever ``checkpoint_minutes``), a detection cell resumes there: the first lr is not retrained (its
    ``done`` outcome is read back), the second continues at epoch 2, and the stored metrics, val curve
    and every test detection equal an uninterrupted run's exactly (CPU, one thread: bit for bit)."""
    task = _task(tmp_path, _cocojson(tmp_path), params=PARAMS)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "DET_GATE": str(tmp_path / "gate")}
    base = [sys.executable, str(driver), "run", "-b", "random/timm:test_resnet", "-t", str(task),
            "--device", "cpu", "--workers", "0", "--batch-size", "4"]  # fmt: skip

    clean_env = {**env, "DET_LOG": str(tmp_path / "clean.log"), "DET_GATE": str(driver)}  # an open gate
    clean_cmd = [*base, "--db", str(tmp_path / "clean.db"), "--cache-dir", str(tmp_path / "c1")]
    clean = subprocess.run(clean_cmd, env=clean_env, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    fitted = [
        (e["run"], e["resumed_from"]) for e in _events(tmp_path / "clean.log") if e["event"] == "fitted"
    ]
    assert fitted == [(LRS[0], None), (LRS[1], None)]  # the driver's hooks see both lrs' runs

    log = tmp_path / "r.log"
    env["DET_LOG"] = str(log)
    cmd = [*base, "--db", str(tmp_path / "r.db"), "--cache-dir", str(tmp_path / "c2")]
    err = (tmp_path / "killed.err").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 600  # only a real hang waits this long
        while proc.poll() is None and time.monotonic() < deadline:
            if any(e["event"] == "held" for e in _events(log)):
                break
            time.sleep(0.1)
        ended = "the run ended before its second lr's first epoch:\n"
        assert proc.poll() is None, ended + (tmp_path / "killed.err").read_text()[-3000:]
        assert any(e["event"] == "held" for e in _events(log)), "the run hung before the gate"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        err.close()
    [cell] = (tmp_path / "c2" / "checkpoints").iterdir()
    assert sorted(p.name for p in (cell / "lr0").iterdir()) == ["done.pt"]  # lr0 finished, state dropped
    assert torch.load(cell / "lr1" / "last.pt", weights_only=True)["epoch"] == 1
    killed = _events(log)

    (tmp_path / "gate").touch()
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = _events(log)[len(killed) :]
    assert len({e["pid"] for e in after}) == 1 and after[0]["pid"] not in {e["pid"] for e in killed}
    # the first lr is not retrained; the second resumes at its second epoch and finishes it
    assert [(e["run"], e.get("resumed_from")) for e in after if e["event"] in ("fit", "fitted")] == [
        (LRS[1], None),
        (LRS[1], [1, 0]),
    ]
    saves = [(e["folder"], e["name"], e["epoch"] if e["name"] == "last" else None) for e in after
             if e["event"] == "save"]  # fmt: skip
    assert saves == [("lr1", "last", 2), ("lr1", "done", None)]

    a, b = _rows(tmp_path / "clean.db"), _rows(tmp_path / "r.db")
    assert set(a["status"]) == set(b["status"]) == {"ok"}
    assert a.set_index("metric")["value"].to_dict() == b.set_index("metric")["value"].to_dict()
    ca, cb = (json.loads(r["config_json"].iloc[0]) for r in (a, b))
    for key in ("lr", "epoch", "val_score", "val_by_lr", "history", "n_detections"):
        assert ca["info"][key] == cb["info"][key], key  # losses of every epoch: floats, exactly equal
    assert len(cb["info"]["history"]) == 2 and all(math.isfinite(h["loss"]) for h in cb["info"]["history"])
    assert cb["info"]["n_detections"] > 0  # the compared detections are not an empty set
    pd.testing.assert_frame_equal(pd.read_parquet(ca["predictions"]), pd.read_parquet(cb["predictions"]))
    assert not any(cell.parent.iterdir())  # recorded: the checkpoints are gone


def test_a_detection_cell_trains_and_scores_under_bf16_autocast_on_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``precision="bf16"`` on the CPU: the backbone and neck run in bfloat16 in training and evaluation,
    while anchors, proposals, detections and scores stay float32 (bf16 would round box corners to 4-8 px
    at COCO sizes and tie scores); the AP is finite and the row says bf16."""
    import bobench.dense.heads as heads
    from bobench.runner import run_battle

    seen: dict[str, set] = {"train": set(), "eval": set(), "anchors": set(), "proposals": set(), "out": set()}
    real_build = heads.build_detector

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)

        def features(m, args, out):
            seen["train" if m.training else "eval"].update(v.dtype for v in out.values())

        def detections(m, args, out):
            if not m.training:
                seen["out"].update(v.dtype for d in out for k, v in d.items() if k != "labels")

        model.backbone.register_forward_hook(features)
        model.rpn.anchor_generator.register_forward_hook(lambda m, a, out: seen["anchors"].add(out[0].dtype))
        model.rpn.register_forward_hook(lambda m, a, out: seen["proposals"].add(out[0][0].dtype))
        model.register_forward_hook(detections)
        return model

    monkeypatch.setattr(heads, "build_detector", build)
    task = _task(tmp_path, _cocojson(tmp_path, 16))
    with ResultStore(tmp_path / "r.db") as store:
        s = run_battle(["random/timm:test_resnet"], [task], store=store, cache_dir=tmp_path / "c",
                       options=OPTS.replace(precision="bf16"))  # fmt: skip
    assert (s.done, s.failed) == (1, 0), s.failures and s.failures[0].error
    rows = _rows(tmp_path / "r.db")
    assert set(rows["dtype"]) == {"bf16"} and set(rows["device"]) == {"cpu"}
    values = rows.set_index("metric")["value"]
    for key in ("box_AP", "box_AP50", "mask_AP"):
        assert 0.0 <= values[key] <= 1.0, key  # finite: NaN fails both comparisons
    info = json.loads(rows["config_json"].iloc[0])["info"]
    assert all(math.isfinite(h["loss"]) for h in info["history"]) and info["n_detections"] > 0
    assert seen["train"] == seen["eval"] == {torch.bfloat16}  # autocast was on, in training and eval
    assert seen["anchors"] == seen["proposals"] == seen["out"] == {torch.float32}


def _ddp_worker(rank: int, tmp: Path, task: str) -> None:
    """One rank of a 2-rank gloo battle over the detection task; what its training ended with."""
    from bobench import distributed
    from bobench.runner import run_battle
    from bobench.training import Trainer

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    real_fit, fits = Trainer.fit, []

    def fit(self, dataset):
        result = real_fit(self, dataset)
        fits.append({"world": distributed.rank_world()[1], "history": result.history,
                     "state": result.best_state, "batch": result.batch_size})  # fmt: skip
        return result

    Trainer.fit = fit
    with ResultStore(tmp / "ddp.db") if rank == 0 else contextlib.nullcontext() as store:
        s = run_battle(["random/timm:test_resnet"], [task], store=store, cache_dir=tmp / "c", options=OPTS)
    torch.save({"done": s.done, "failed": s.failed, "fits": fits}, tmp / f"rank{rank}.pt")
    distributed.shutdown()


@pytest.mark.slow
def test_two_gloo_ranks_train_one_detection_cell_together(tmp_path: Path) -> None:
    """2 CPU ranks (gloo) train one detection cell with DDP: neither hangs, both end with the same
    weights bit for bit (averaged gradients, rank 0's buffers) and the same curve, and rank 0 records
    the cell once with a finite AP."""
    task = _task(tmp_path, _cocojson(tmp_path, 20))
    spawn_ranks(_ddp_worker, (tmp_path, str(task)))
    found = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert (found[0]["done"], found[0]["failed"]) == (1, 0)  # rank 0 records; rank 1 counts nothing
    (a,), (b,) = found[0]["fits"], found[1]["fits"]
    assert a["world"] == b["world"] == 2 and a["batch"] == b["batch"] == 4
    assert a["history"] == b["history"]  # losses averaged over ranks; rank 0's val score on both
    assert a["state"].keys() == b["state"].keys()
    for k, v in a["state"].items():
        assert torch.equal(v, b["state"][k]), k
    rows = _rows(tmp_path / "ddp.db")
    assert set(rows["status"]) == {"ok"} and rows["created_at"].nunique() == 1  # recorded once
    assert 0.0 <= rows.set_index("metric")["value"]["box_AP"] <= 1.0
