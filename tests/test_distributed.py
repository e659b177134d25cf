"""DDP on the CPU (gloo, world size 2): the same optimisation as one process, resume, lockstep, torchrun.

Two ranks are started once per module with ``torch.multiprocessing`` on a FileStore (no TCP port to
race for); each phase writes what it found, and the tests compare it with a single-process run here.
The launch test runs ``bobench run --nproc 2`` as a user would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from bobench import distributed
from bobench.checkpoints import Checkpoints
from bobench.options import RunOptions
from bobench.training import Trainer, cpu_state, evaluate_model
from ranks import spawn_ranks
from test_finetune import FAST, OPTS  # the fine-tuning tests' options and augmentation-free recipe

EPOCHS, BATCH = 2, 16  # Blobs: 64 images, 4 updates per epoch


class Killed(Exception):
    pass


def _model() -> nn.Module:
    """No BatchNorm, no dropout: nothing that depends on how a batch is split, so DDP must be exact."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)
    )


def _fit(model: nn.Module, options: RunOptions, ckpt: Path | None = None, kill_at: int | None = None):
    from timm.scheduler import create_scheduler_v2

    from test_training import Blobs

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched, _ = create_scheduler_v2(
        opt, "cosine", num_epochs=EPOCHS, warmup_epochs=1, step_on_epochs=False, updates_per_epoch=4
    )
    val = Blobs(32)

    def evaluate(m: nn.Module) -> float:
        out, y = evaluate_model(m, val, options)
        return float((out.argmax(1) == y).float().mean())

    def on_update(n: int) -> None:
        if n == kill_at:
            raise Killed

    return Trainer(
        model, opt, sched, nn.CrossEntropyLoss(), epochs=EPOCHS, batch_size=BATCH, options=options, seed=7,
        evaluate=evaluate, checkpoints=Checkpoints(ckpt) if ckpt else None, checkpoint_every=1,
        on_update=on_update,
    ).fit(Blobs())  # fmt: skip


def _task(folder: Path, name: str, **params) -> Path:
    body = {"version": 1, "dataset": "digits", "protocol": "finetune", "image_size": 32,
            "params": {**FAST, "epochs": 1, "batch_size": 32, "drop_path": 0.0, **params}}  # fmt: skip
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def _battle(rank: int, db: Path, tasks: list[Path], cache: Path) -> dict:
    """One battle on every rank (rank 0 with the store); what it ended with."""
    from bobench.runner import run_battle
    from bobench.store import ResultStore

    with ResultStore(db) if rank == 0 else contextlib.nullcontext() as store:
        try:
            s = run_battle(
                ["random/timm:test_vit"], [str(t) for t in tasks], store=store, cache_dir=cache, options=OPTS
            )
            return {"done": s.done, "failed": s.failed}
        except distributed.RankFailure as exc:
            return {"rank_failure": str(exc)}


def _worker(rank: int, tmp: Path) -> None:
    """Every phase, on each of 2 ranks; findings go to ``tmp/<phase>-<rank>.pt``."""
    import bobench.trained
    from test_training import _model as bn_model

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)

    # 1. the same optimisation as one process: micro-batches of 4, so 2 accumulation steps per update
    model = _model()
    result = _fit(model, OPTS.replace(batch_size=4))
    bn = bn_model()  # BatchNorm stays per rank on the CPU; the epoch ends with rank 0's statistics
    _fit(bn, OPTS)
    torch.save({"history": result.history, "state": cpu_state(model), "best": result.best_epoch,
                "bn": cpu_state(bn)}, tmp / f"plain-{rank}.pt")  # fmt: skip

    # 2. killed in the first update of epoch 2 on both ranks, then resumed from rank 0's checkpoint
    ck = tmp / "ck"
    try:
        _fit(_model(), OPTS.replace(batch_size=4), ck, kill_at=5)
    except Killed:
        assert distributed.out_of_step() is not None  # an error inside training leaves lockstep
        distributed.reset_out_of_step()  # (both ranks stopped at the same update: they still are)
    if rank == 0:
        shutil.copytree(ck, tmp / "ck-killed")  # for the resume under another world size (test side)
    distributed.barrier()  # copied before the resumed run writes again
    resumed_model = _model()
    resumed = _fit(resumed_model, OPTS.replace(batch_size=4), ck)
    distributed.barrier()  # rank 0 may still be writing its last checkpoint when rank 1 returns
    torch.save({"state": cpu_state(resumed_model), "from": resumed.resumed_from,
                "writer": Checkpoints(ck).writer, "files": sorted(p.name for p in ck.iterdir())},
               tmp / f"resume-{rank}.pt")  # fmt: skip

    # 3. a battle: a frozen cell on every rank, a trained cell that fails before training on every rank
    real_data = bobench.trained._data

    def no_data(*args, **kwargs):
        raise ValueError("no data on this rank")

    bobench.trained._data = no_data
    knn = tmp / "knn.yaml"
    knn.write_text(json.dumps({"version": 1, "dataset": "digits", "protocol": "knn", "image_size": 32}))
    found = _battle(rank, tmp / "same.db", [knn, _task(tmp, "ft")], tmp / "cache")
    torch.save(found, tmp / f"same-{rank}.pt")

    # 4. a protocol that fails on rank 1 only, after its training (no collective pending): recorded
    import bobench.protocols
    from bobench.metrics import Metric
    from bobench.protocols.base import ProtocolResult

    real_protocol = bobench.protocols.get_protocol

    def scored(*args):
        if rank == 1:
            raise RuntimeError("scoring failed on rank 1")
        return ProtocolResult([Metric("top1", 0.5, higher_is_better=True)])

    bobench.trained._data = real_data
    bobench.protocols.get_protocol = lambda name: scored
    torch.save(_battle(rank, tmp / "late.db", [_task(tmp, "ft")], tmp / "cache"), tmp / f"late-{rank}.pt")
    bobench.protocols.get_protocol = real_protocol

    # 5. the trained cell fails on rank 1 only, before training: rank 0 meets it at its training check
    bobench.trained._data = no_data if rank == 1 else real_data
    torch.save(
        _battle(rank, tmp / "diverged.db", [_task(tmp, "ft")], tmp / "cache"), tmp / f"diverged-{rank}.pt"
    )
    distributed.shutdown()  # frees the DDP wrappers first: a clean exit


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run :func:`_worker` on 2 ranks once; the folder with their findings."""
    tmp = tmp_path_factory.mktemp("ddp")
    spawn_ranks(_worker, (tmp,))
    return tmp


def _load(path: Path):
    return torch.load(path, weights_only=False)


def _rows(db: Path) -> pd.DataFrame:
    """The results table of a store (one row per metric; a failed cell is one row, metric empty)."""
    from bobench.store import ResultStore

    with ResultStore(db, readonly=True) as s:
        return s.results(status=None)


def test_two_ranks_train_as_one_process_on_the_same_batch(ranks: Path) -> None:
    single = _model()
    ref = _fit(single, OPTS.replace(batch_size=BATCH))  # one process, one micro-batch per update
    ranks_found = [_load(ranks / f"plain-{r}.pt") for r in (0, 1)]
    for found in ranks_found:
        for a, b in zip(ref.history, found["history"], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)  # the loss over both ranks
            assert a["val"] == b["val"] and a["lr"] == b["lr"]
        assert found["best"] == ref.best_epoch
        for k, v in single.state_dict().items():
            torch.testing.assert_close(found["state"][k], v, rtol=1e-5, atol=1e-6)
    for key in ("state", "bn"):  # the two ranks hold one model, bit for bit (BatchNorm statistics too)
        for k, v in ranks_found[0][key].items():
            assert torch.equal(v, ranks_found[1][key][k]), k


def test_ddp_resumes_from_rank_0s_checkpoint(ranks: Path) -> None:
    plain = _load(ranks / "plain-0.pt")["state"]
    for r in (0, 1):
        found = _load(ranks / f"resume-{r}.pt")
        assert found["from"] == (1, 2)  # epoch 2, after its first update (2 micro-batches per rank)
        assert found["writer"] == (r == 0) and found["files"] == ["last.pt"]
        for k, v in plain.items():
            assert torch.equal(found["state"][k], v), k  # the uninterrupted DDP run, bit for bit
    # rank 0's checkpoint resumes in one process too (another world size, another micro-batch)
    clean, resumed = _model(), _model()
    _fit(clean, OPTS)
    result = _fit(resumed, OPTS, ranks / "ck-killed")
    assert result.resumed_from == (1, 1)  # the same update: one micro-batch per update here
    for k, v in clean.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_a_cell_failing_on_every_rank_is_recorded_once_and_the_battle_goes_on(ranks: Path) -> None:
    assert _load(ranks / "same-0.pt") == {"done": 1, "failed": 1}
    rows = _rows(ranks / "same.db")
    assert rows.groupby("protocol")["status"].unique().map(list).to_dict() == {
        "knn": ["ok"],
        "finetune": ["failed"],
    }
    assert rows.groupby("protocol")["created_at"].nunique().to_dict() == {"knn": 1, "finetune": 1}
    assert "no data on this rank" in rows.set_index("protocol").loc["finetune", "error"]


def test_a_cell_failing_on_one_rank_after_training_is_recorded_with_its_error(ranks: Path) -> None:
    assert _load(ranks / "late-0.pt") == {"done": 0, "failed": 1}  # rank 0 itself scored it
    rows = _rows(ranks / "late.db")
    assert rows["status"].tolist() == ["failed"]
    assert rows["error"].iloc[0].startswith("failed on rank 1: RuntimeError: scoring failed on rank 1")


def test_a_cell_failing_on_one_rank_before_training_stops_every_rank_without_hanging(ranks: Path) -> None:
    for r in (0, 1):
        assert "out of step" in _load(ranks / f"diverged-{r}.pt")["rank_failure"]
    rows = _rows(ranks / "diverged.db")
    assert rows["status"].tolist() == ["failed"] and "out of step" in rows["error"].iloc[0]


def test_launch_refuses_what_the_gpus_cannot_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked before anything starts, with the fix in the message (two GPUs faked, none used)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for device in ("cuda", "auto"):
        with pytest.raises(
            distributed.DistributedError, match=r"--nproc 4 needs 4 GPUs .* sees 2: use --nproc 2"
        ):
            distributed.launch(4, ["run"], device=device)
    with pytest.raises(distributed.DistributedError, match="pins one GPU"):
        distributed.launch(2, ["run"], device="cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(distributed.DistributedError, match="no CUDA GPU: use --device cpu"):
        distributed.launch(2, ["run"], device="cuda")


def test_sync_batchnorm_keeps_timm_norm_act_layers_and_converts_once() -> None:
    """What DDP does on CUDA to BatchNorm, checked on the CPU: the same layers, parameters and outputs."""
    import timm
    from timm.layers.norm_act import SyncBatchNormAct

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet").eval()
    x = torch.randn(2, 3, 32, 32)
    before, keys, params = model(x), list(model.state_dict()), [id(p) for p in model.parameters()]
    n_norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for _ in range(2):  # a second fit of the same model (an lr sweep) converts nothing more
        distributed.sync_batchnorm(model)
        synced = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
        assert len(synced) == n_norms and all(isinstance(m, SyncBatchNormAct) for m in synced)
        assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
        torch.testing.assert_close(model(x), before)  # eval: no sync; the activations are still there


def test_bobench_run_nproc_2_equals_nproc_1(tmp_path: Path) -> None:
    """`bobench run --nproc 2` under torchrun: one ok cell, recorded once, with the metrics of one process."""
    from bobench.runner import run_battle
    from bobench.store import ResultStore

    task = _task(tmp_path, "digits-ft")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    args = ["-b", "random/timm:test_vit", "-t", str(task), "--device", "cpu", "--workers", "0"]
    db, cache = ["--db", str(tmp_path / "ddp.db")], ["--cache-dir", str(tmp_path / "c")]
    cmd = [sys.executable, "-m", "bobench", "run", "--nproc", "2", *args, *db, *cache]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("1 cells run (1 ok, 0 failed)") == 1  # rank 0 alone reports
    with ResultStore(tmp_path / "one.db") as store:  # --nproc 1, in this process
        run_battle(["random/timm:test_vit"], [task], store=store, cache_dir=tmp_path / "c1",
                   options=RunOptions(device="cpu", num_workers=0, progress=False))  # fmt: skip
    ddp, one = _rows(tmp_path / "ddp.db"), _rows(tmp_path / "one.db")
    assert set(ddp["status"]) == {"ok"} and ddp["config_hash"].nunique() == 1
    assert ddp["created_at"].nunique() == 1  # one record() of the cell
    a, b = ddp.set_index("metric")["value"], one.set_index("metric")["value"]
    info = [json.loads(r["config_json"].iloc[0])["info"] for r in (ddp, one)]
    assert info[0]["batch_size"] == info[1]["batch_size"] == 32  # the same global batch
    assert info[0]["history"][0]["loss"] == pytest.approx(info[1]["history"][0]["loss"], rel=1e-5)
    pd.testing.assert_series_equal(a.sort_index(), b.sort_index(), rtol=1e-5)  # measured: 2e-8
