"""The Ray executor on a real local Ray instance: same numbers as local, isolation, retries, resume.

Workers import this module (``test_ray:make_flaky``…) through the PYTHONPATH the executor forwards,
which holds tests/ because conftest puts it on the driver's sys.path.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from bobench.cells import WorkGroup
from bobench.options import RunOptions
from bobench.runner import plan, run_battle
from bobench.store import ResultStore
from user_models import TinyNet

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

OPTS = RunOptions(num_workers=0, batch_size=64, progress=False, device="cpu")
_CFG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def _marker() -> Path:
    return Path(os.environ["BOBENCH_TEST_DIE_MARKER"])  # forwarded to workers (a BOBENCH_* variable)


def _died_gate() -> Path:
    """Created by the driver once the 32 px cell's outcome reached it; FlakyNet dies only after that."""
    return _marker().with_name("flaky-gate")


def _sleeping() -> Path:
    return _marker().with_name("sleeping")


class FlakyNet(TinyNet):
    """Kills its worker process, like an OOM kill, on a 48 px forward while its marker file is armed.

    It dies *mid*-group at a known point: first it waits (a handshake, not a sleep) until the driver has
    the 32 px cell's outcome and opens the gate. A gate that never opens is a failed cell, not a death.
    """

    def forward(self, x):
        if x.shape[-1] == 48 and _marker().read_text() == "armed":
            deadline = time.monotonic() + 300  # only a broken handshake reaches this
            while not _died_gate().exists():
                if time.monotonic() > deadline:
                    raise RuntimeError("the driver never opened the gate: the 32 px outcome did not arrive")
                time.sleep(0.05)
            _marker().write_text("died")  # so the retry lives
            os._exit(1)
        return super().forward(x)


class SleepyNet(TinyNet):
    """Takes far longer than any test (and its deadlines), so only a cancellation frees its worker."""

    def forward(self, x):
        _sleeping().touch()
        time.sleep(3600)
        return super().forward(x)


def make_flaky() -> torch.nn.Module:
    net = FlakyNet()
    net.pretrained_cfg = dict(_CFG)
    return net


def make_sleepy() -> torch.nn.Module:
    net = SleepyNet()
    net.pretrained_cfg = dict(_CFG)
    return net


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """One local Ray instance for the module (its start-up costs seconds); the executor joins it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def _module_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bobench-home-ray")


@pytest.fixture(autouse=True)
def _same_worker_env(_isolated_cache: None, _module_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One isolated BOBENCH_CACHE/BOBENCH_DB for the module, not one per test: the executor forwards
    them to the workers, and a new runtime env means new worker processes, each importing torch again.
    """
    monkeypatch.setenv("BOBENCH_CACHE", str(_module_home / "cache"))
    monkeypatch.setenv("BOBENCH_DB", str(_module_home / "results.db"))
    monkeypatch.setenv("BOBENCH_TEST_DIE_MARKER", str(_module_home / "die-marker"))  # see FlakyNet


def _task(tmp_path: Path, name: str, protocol: str, size: int, extra: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    body = f"version: 1\ndataset: digits\nprotocol: {protocol}\nimage_size: {size}\n{extra}"
    path.write_text(body)
    return path


@pytest.fixture
def digits_tasks(tmp_path: Path) -> list[Path]:
    return [
        _task(tmp_path, "digits-linear", "linear", 32, "params: {num_C: 8}\nmetrics: [top1, ece]\n"),
        _task(tmp_path, "digits-knn", "knn", 32),
    ]


def _rows(db: Path) -> pd.DataFrame:
    with ResultStore(db, readonly=True) as s:
        return s.results(status=None)


def _battle(db: Path, backbones: list[str], tasks: list[Path], cache: Path, on_outcome=None, **options):
    with ResultStore(db) as store:
        return run_battle(
            backbones,
            tasks,
            store=store,
            cache_dir=cache,
            options=OPTS,
            executor="ray",
            executor_options=options,
            on_outcome=on_outcome,
        )


def test_ray_gives_the_local_numbers(tmp_path: Path, digits_tasks: list[Path]) -> None:
    """Frozen and trained cells alike: a Ray worker computes exactly what the driver would."""
    bbs = ["random/mobilenetv2_100", "user_models:make_declared"]
    finetune = _task(
        tmp_path, "digits-finetune", "finetune", 32,
        "params: {epochs: 1, batch_size: 64, auto_augment: null, mixup: 0.0, cutmix: 0.0, reprob: 0.0, "
        "color_jitter: 0.0, warmup_epochs: 0}\n",
    )  # fmt: skip
    tasks = [*digits_tasks, finetune]
    with ResultStore(tmp_path / "local.db") as store:
        run_battle(bbs, tasks, store=store, cache_dir=tmp_path / "c-local", options=OPTS)
    # its own feature cache, so the workers extract the features themselves
    s = _battle(tmp_path / "ray.db", bbs, tasks, tmp_path / "c-ray")
    assert (s.done, s.failed, s.skipped) == (6, 0, 0)
    assert not any((tmp_path / "c-ray" / "checkpoints").iterdir())  # recorded: the driver removed them
    key = ["backbone", "task", "seed", "metric"]
    local = _rows(tmp_path / "local.db").sort_values(key).reset_index(drop=True)
    remote = _rows(tmp_path / "ray.db").sort_values(key).reset_index(drop=True)
    assert len(local) == len(remote) > 0 and set(remote["status"]) == {"ok"}
    pd.testing.assert_frame_equal(remote[key], local[key])
    assert (remote["value"] - local["value"]).abs().max() <= 1e-12
    assert remote["card_json"].str.contains("weights_digest").all() and remote["device"].eq("cpu").all()
    preds = remote["config_json"].str.extract(r'"predictions": "([^"]+)"')[0].dropna()
    assert len(preds) and all(Path(p).is_file() for p in preds)  # the driver wrote the Parquet files


def test_failing_backbone_is_isolated(tmp_path: Path, digits_tasks: list[Path]) -> None:
    db = tmp_path / "r.db"
    s = _battle(db, ["user_models:make_broken", "user_models:make_declared"], digits_tasks, tmp_path / "c")
    assert (s.done, s.failed) == (2, 2)
    with ResultStore(db) as store:
        failures = store.failures()
    assert {f["backbone"] for f in failures} == {"user_models:make_broken"}
    assert all("broken on purpose" in f["error"] for f in failures)


def test_ctrl_c_cancels_outstanding_tasks(
    tmp_path: Path, digits_tasks: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bobench.executors.ray_executor import execute

    cancelled = []  # the real ray.cancel runs; this only sees which tasks the driver stopped

    def spy(gen, **kwargs):
        cancelled.append(gen)
        return real_cancel(gen, **kwargs)

    real_cancel = ray.cancel
    monkeypatch.setattr(ray, "cancel", spy)
    groups = [
        WorkGroup(bb, tuple(plan([bb], digits_tasks[1:])), OPTS, str(tmp_path / "c"))
        for bb in ("user_models:make_declared", "test_ray:make_sleepy")
    ]
    outs = execute(groups)
    first = next(outs)
    assert first.planned.backbone == "user_models:make_declared" and first.status == "ok"
    deadline = time.monotonic() + 120  # deadlines here only catch a hang
    while not _sleeping().exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _sleeping().exists(), "the sleepy task never started"
    with pytest.raises(KeyboardInterrupt):
        outs.throw(KeyboardInterrupt)
    # only the sleepy group still owed a cell; force-cancelling the declared one as it returned aborted
    # the driver once (a Ray 2.60 check failure), so a finished group is left to end on its own
    assert len(cancelled) == 1
    assert ray.is_initialized()  # started by the fixture, so left running
    deadline = time.monotonic() + 120
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2, "the sleepy task still holds its CPU"


@pytest.fixture
def two_sizes(tmp_path: Path) -> list[Path]:
    """Two tasks on different image sizes: two extractions, so a worker can die between the cells."""
    return [_task(tmp_path, "d32", "linear", 32, "params: {num_C: 4}\n"), _task(tmp_path, "d48", "knn", 48)]


def test_dead_worker_is_retried_with_the_remaining_cells(tmp_path: Path, two_sizes: list[Path]) -> None:
    from bobench.executors.ray_executor import execute

    marker, gate = _marker(), _died_gate()

    def open_gate_after_d32(outcome, *_) -> None:
        if outcome.planned.task.name == "d32":
            gate.touch()

    gate.unlink(missing_ok=True)
    marker.write_text("armed")
    cells = plan(["test_ray:make_flaky"], two_sizes)
    group = WorkGroup("test_ray:make_flaky", tuple(cells), OPTS, str(tmp_path / "c1"))
    outs = []
    for outcome in execute([group], max_retries=1):
        outs.append(outcome)
        open_gate_after_d32(outcome)
    assert marker.read_text() == "died"  # it did die once, after d32 came back
    assert [o.planned.task.name for o in outs] == ["d32", "d48"]  # one outcome each, no duplicate
    assert all(o.status == "ok" for o in outs), [o.error for o in outs]

    gate.unlink()
    marker.write_text("armed")
    db = tmp_path / "r.db"
    # on_outcome runs once the cell is recorded: the worker dies with d32 already in the store
    s = _battle(db, ["test_ray:make_flaky"], two_sizes, tmp_path / "c2", open_gate_after_d32, max_retries=0)
    assert (s.done, s.failed) == (1, 1)
    rows = _rows(db)
    assert set(rows.loc[rows.status == "ok", "task"]) == {"d32"}  # came back before the death: kept
    (err,) = rows.loc[rows.status == "failed", "error"]
    assert "worker" in err and "died" in err and "1 attempt" in err, err


def test_gpu_rule() -> None:
    from bobench.executors.ray_executor import gpus_for

    def group(device: str) -> WorkGroup:
        return WorkGroup("b", (), RunOptions(device=device), "c")

    assert gpus_for(group("cuda:1"), 4) == gpus_for(group("auto"), 4) == 1
    assert gpus_for(group("auto"), 0) == gpus_for(group("cpu"), 4) == gpus_for(group("mps"), 0) == 0
    assert gpus_for(group("cuda"), 0, override=0.5) == 0.5
    with pytest.raises(ValueError, match="needs a GPU but the Ray cluster has none"):
        gpus_for(group("cuda"), 0)


def test_missing_ray_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from bobench.executors.ray_executor import execute

    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "bobench\[ray\]"'):
        execute([])


def test_killed_ray_battle_resumes_without_duplicates(
    tmp_path: Path, digits_tasks: list[Path], ray_cluster: str
) -> None:
    """Killed at a known point (one backbone held at its build by a gate, not by timing), a Ray battle
    resumes where it stopped."""
    db, cache, gate = tmp_path / "r.db", tmp_path / "c", tmp_path / "gate"
    tasks = ",".join(str(p) for p in digits_tasks)
    bbs = "user_models:make_declared,user_models:make_gated"
    cmd = [sys.executable, "-m", "bobench", "battle", "--backbones", bbs, "--tasks", tasks, "--db", str(db)]
    cmd += ["--cache-dir", str(cache), "--workers", "0", "--executor", "ray"]
    # BOBENCH_TEST_GATE reaches the workers like every BOBENCH_* variable
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "BOBENCH_TEST_GATE": str(gate)}
    # the killed run joins the module's Ray instance; the rerun starts (and stops) its own
    log = tmp_path / "killed.log"
    with log.open("w") as f:  # a file, not a pipe nobody reads while it runs
        proc = subprocess.Popen([*cmd, "--address", ray_cluster], env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        # make_declared's two cells get recorded while make_gated waits at its build for the gate
        deadline = time.monotonic() + 600  # only a real hang reaches this
        n_done = 0
        while n_done < 2 and time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    with sqlite3.connect(db) as con:
                        n_done = con.execute(
                            "select count(distinct backbone || task) from results"
                        ).fetchone()[0]
                except sqlite3.OperationalError:  # the file exists but the schema is not there yet
                    n_done = 0
            time.sleep(0.1)
        assert n_done == 2 and proc.poll() is None, (
            f"battle ended or hung before the gate ({n_done} cells): {log.read_text()[-2000:]}"
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert set(_rows(db)["backbone"]) == {"user_models:make_declared"}
    gate.touch()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr  # 0: every cell ok (a failed cell would make it 1)
    assert "2 skipped" in out.stdout and "2 cells run (2 ok, 0 failed)" in out.stdout, out.stdout
    rows = _rows(db)
    assert len(rows.groupby(["backbone", "task"])) == 4
    assert not rows.duplicated(["backbone", "task", "seed", "metric", "config_hash"]).any()
    assert (rows["status"] == "ok").all()
