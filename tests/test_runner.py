"""Battles end to end: planning, skipping finished cells, failure isolation, resume after a kill."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from bobench.options import RunOptions
from bobench.runner import plan, run_battle
from bobench.store import ResultStore
from bobench.task import TaskError, load_suite, load_task

OPTS = RunOptions(num_workers=0, batch_size=64, progress=False)


def _task(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture
def digits_tasks(tmp_path: Path) -> list[Path]:
    return [
        _task(
            tmp_path,
            "digits-linear",
            """
            version: 1
            dataset: digits
            protocol: linear
            params: {num_C: 8}
            metrics: [top1, ece]
            image_size: 32
        """,
        ),
        _task(
            tmp_path,
            "digits-knn",
            """
            version: 1
            dataset: digits
            protocol: knn
            image_size: 32
        """,
        ),
    ]


def _rows(db: Path) -> pd.DataFrame:
    with ResultStore(db, readonly=True) as s:
        return s.results(status=None)


def test_battle_records_skips_and_forces(tmp_path: Path, digits_tasks: list[Path]) -> None:
    db = tmp_path / "r.db"
    bbs = ["random/mobilenetv2_100", "user_models:make_declared"]
    with ResultStore(db) as store:
        s1 = run_battle(bbs, digits_tasks, store=store, cache_dir=tmp_path / "c", options=OPTS)
    assert (s1.done, s1.failed, s1.skipped) == (4, 0, 0)
    rows = _rows(db)
    assert set(rows["status"]) == {"ok"}
    linear = rows[rows["task"] == "digits-linear"]
    assert set(linear["metric"]) == {"top1", "ece"}  # the task keeps only the metrics it lists
    assert (linear.loc[linear.metric == "top1", "value"] > 0.5).all()
    assert rows["card_json"].str.contains("weights_digest").all() and rows["device"].eq("cpu").all()
    n = len(rows)
    with ResultStore(db) as store:
        s2 = run_battle(bbs, digits_tasks, store=store, cache_dir=tmp_path / "c", options=OPTS)
        assert (s2.done, s2.skipped) == (0, 4)
        s3 = run_battle(
            bbs[:1], digits_tasks[:1], store=store, cache_dir=tmp_path / "c", options=OPTS, force=True
        )
        assert s3.done == 1
    assert len(_rows(db)) == n  # --force replaced, never duplicated
    preds = Path(linear["config_json"].iloc[0].split('"predictions": "')[1].split('"')[0])
    p = pd.read_parquet(preds)
    assert len(p) == linear["n_test"].iloc[0] and {"index", "label", "pred", "confidence"} <= set(p.columns)


def test_failing_backbone_is_isolated(tmp_path: Path, digits_tasks: list[Path]) -> None:
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        s = run_battle(
            ["user_models:make_broken", "random/mobilenetv2_100"],
            digits_tasks,
            store=store,
            cache_dir=tmp_path / "c",
            options=OPTS,
        )
        assert (s.done, s.failed) == (2, 2)
        failures = store.failures()
    assert {f["backbone"] for f in failures} == {"user_models:make_broken"}
    assert all("broken on purpose" in f["error"] for f in failures)
    with ResultStore(db) as store:  # a rerun retries only the failed cells
        s = run_battle(
            ["user_models:make_broken", "random/mobilenetv2_100"],
            digits_tasks,
            store=store,
            cache_dir=tmp_path / "c",
            options=OPTS,
        )
    assert (s.skipped, s.failed) == (2, 2)


def test_killed_battle_resumes_without_duplicates(tmp_path: Path, digits_tasks: list[Path]) -> None:
    """Killed at a known point (held by a gate, not by timing), a battle resumes where it stopped."""
    db, cache, gate = tmp_path / "r.db", tmp_path / "c", tmp_path / "gate"
    tasks = ",".join(str(p) for p in digits_tasks)
    bbs = "random/mobilenetv2_100,user_models:make_gated,random/tf_efficientnet_lite0"
    cmd = [sys.executable, "-m", "bobench", "battle", "--backbones", bbs, "--tasks", tasks]
    cmd += ["--db", str(db), "--cache-dir", str(cache), "--workers", "0"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "BOBENCH_TEST_GATE": str(gate)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the first backbone's two cells get recorded, then the battle waits at the gated build
        deadline = time.monotonic() + 600  # only a real hang reaches this
        n_done = 0
        while n_done < 2 and time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    with sqlite3.connect(db) as con:
                        n_done = con.execute("select count(distinct task) from results").fetchone()[0]
                except sqlite3.OperationalError:  # the file exists but the schema is not there yet
                    n_done = 0
            time.sleep(0.1)
        assert n_done == 2 and proc.poll() is None, f"battle ended or hung before the gate ({n_done} cells)"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rows = _rows(db)
    assert set(rows["backbone"]) == {"random/mobilenetv2_100"}
    gate.touch()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "2 skipped" in out.stdout and "4 cells run (4 ok, 0 failed)" in out.stdout
    rows = _rows(db)
    assert len(rows.groupby(["backbone", "task"])) == 6
    assert not rows.duplicated(["backbone", "task", "seed", "metric", "config_hash"]).any()
    assert (rows["status"] == "ok").all()


def test_demo_suite_reduced_end_to_end(tmp_path: Path) -> None:
    """The demo's shape on a reduced suite: real shipped weights beat their random-init control."""
    _task(
        tmp_path,
        "p13-linear",
        """
        version: 1
        dataset: patches13
        protocol: linear
        params: {num_C: 8}
        image_size: 64
    """,
    )
    suite = tmp_path / "mini.yaml"
    suite.write_text(
        textwrap.dedent("""
        backbones: [mobilenetv2_100.tv_in1k, random/mobilenetv2_100]
        tasks: [p13-linear.yaml]
    """)
    )
    db = tmp_path / "r.db"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bobench",
            "battle",
            "--suite",
            str(suite),
            "--db",
            str(db),
            "--cache-dir",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "leaderboard" in out.stdout.lower() or "primary metric" in out.stdout
    top1 = _rows(db).query("metric == 'top1'").set_index("backbone")["value"]
    assert top1["mobilenetv2_100.tv_in1k"] - top1["random/mobilenetv2_100"] >= 0.2, top1
    lines = [ln for ln in out.stdout.splitlines() if "mobilenetv2_100" in ln]
    assert "tv_in1k" in lines[0]  # ranked first
    exp = tmp_path / "r.csv"
    subprocess.run(
        [sys.executable, "-m", "bobench", "results", "export", str(exp), "--db", str(db)], check=True
    )
    assert len(pd.read_csv(exp)) == len(_rows(db))


def test_plan_and_config_hash(digits_tasks: list[Path]) -> None:
    cells = plan(["a", "b"], digits_tasks, seeds=[0, 1])
    assert len(cells) == 8 and len({c.cell for c in cells}) == 8
    again = plan(["a", "b"], digits_tasks, seeds=[0, 1])
    assert [c.cell.config_hash for c in cells] == [c.cell.config_hash for c in again]


def test_task_errors_name_file_key_and_fix(tmp_path: Path) -> None:
    bad = _task(tmp_path, "bad", "version: 1\ndataset: digits\nprotocl: linear\n")
    with pytest.raises(TaskError, match=r"(?s)bad\.yaml.*'protocl' is not allowed.*Did you mean: protocol"):
        load_task(bad)
    bad2 = _task(tmp_path, "bad2", "version: 0\ndataset: digits\nprotocol: lineer\n")
    with pytest.raises(TaskError) as err:
        load_task(bad2)
    assert "version" in str(err.value) and "lineer" in str(err.value) and "linear" in str(err.value)
    with pytest.raises(TaskError, match=r"(?s)unknown task 'patches13-linaer'.*patches13-linear"):
        load_task("patches13-linaer")
    suite = tmp_path / "s.yaml"
    suite.write_text("backbones: [a]\ntasks: [no-such-task]\n")
    with pytest.raises(TaskError, match=r"(?s)s\.yaml.*unknown task 'no-such-task'"):
        load_suite(suite)
    demo = load_suite("demo")
    assert len(demo.backbones) == 4 and "patches13-linear" in demo.tasks


def test_wall_time_includes_extraction_and_peak_memory_is_recorded(
    tmp_path: Path, digits_tasks: list[Path]
) -> None:
    import json

    with ResultStore(tmp_path / "r.db") as store:
        s = run_battle(
            ["random/mobilenetv2_100"], digits_tasks, store=store, cache_dir=tmp_path / "c", options=OPTS
        )
        rows = store.results().drop_duplicates(["task"]).set_index("task")
    info = {t: json.loads(c)["info"] for t, c in rows["config_json"].items()}
    first, second = (rows.loc[t] for t in ("digits-linear", "digits-knn"))
    # the first cell pays for the build and the extraction both tasks share; the second only its probe
    lin, kn = info["digits-linear"], info["digits-knn"]
    assert lin["extract_s"] == kn["extract_s"] > 0  # one extraction, shared
    assert first["wall_time_s"] == pytest.approx(lin["build_s"] + lin["extract_s"] + lin["protocol_s"])
    assert second["wall_time_s"] == pytest.approx(kn["protocol_s"])
    assert first["wall_time_s"] + second["wall_time_s"] <= s.wall_time_s  # cells sum to at most the battle
    assert (rows["peak_mem_mb"] > 10).all()  # the process peak (CPU): a real number, not NULL


def test_unknown_backbone_is_a_usage_error_before_any_work(tmp_path: Path, digits_tasks: list[Path]) -> None:
    from bobench.registry import UnknownNameError

    with ResultStore(tmp_path / "r.db") as store:
        with pytest.raises(UnknownNameError, match=r"Did you mean: mobilenetv2_100\.tv_in1k"):
            run_battle(
                ["random/mobilenetv2_100", "mobilenetv2_100.tv_in"],
                digits_tasks,
                store=store,
                cache_dir=tmp_path / "c",
                options=OPTS,
            )
        assert store.results(status=None).empty  # the good backbone did not run either
