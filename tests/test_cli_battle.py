"""`bobench run` / `battle` as a script sees them: exit codes, usage errors, the preflight, the hints.

Every test runs the installed entry point in a subprocess, as a user or a script would.
"""

from __future__ import annotations

import os
import re
import shlex
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "bobench"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bobench", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=600,
        cwd=cwd,
    )


def _task(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def _rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute("select backbone, task, status, error from results").fetchall()


@pytest.fixture
def knn(tmp_path: Path) -> Path:
    return _task(tmp_path, "digits-knn", "version: 1\ndataset: digits\nprotocol: knn\nimage_size: 32\n")


def test_exit_0_when_all_ok_and_1_when_a_cell_fails(tmp_path: Path, knn: Path) -> None:
    db = tmp_path / "r.db"
    common = ("--db", str(db), "--cache-dir", str(tmp_path / "c"), "--workers", "0")
    ok = run("run", "-b", "random/mobilenetv2_100", "-t", str(knn), *common)
    assert ok.returncode == 0, ok.stderr
    assert "1 cells run (1 ok, 0 failed)" in ok.stdout
    bad = run(
        "battle",
        "--backbones",
        "user_models:make_broken,random/tf_efficientnet_lite0",
        "--tasks",
        str(knn),
        *common,
    )
    assert bad.returncode == 1, bad.stderr
    assert "1 cells run (1 ok, 0 failed)" not in bad.stdout  # both ran, one failed
    assert "2 cells run (1 ok, 1 failed)" in bad.stdout
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("exit 1: 1 cell(s) failed") and "bobench results list --failed" in last
    # the failure is reported once, by cause, with its first line
    assert re.search(r"backbone user_models:make_broken: .*broken on purpose \(1 cell\)", bad.stderr)
    # the report is titled by the database, not by a backbone
    page = (tmp_path / "report" / "index.html").read_text()
    title = re.search(r"<title>(.*?)</title>", page, re.S).group(1)
    assert "r.db" in title and "make_broken" not in title
    # rerunning retries only the failed cell, and still exits 1 while it fails
    again = run(
        "battle",
        "--backbones",
        "user_models:make_broken,random/tf_efficientnet_lite0",
        "--tasks",
        str(knn),
        *common,
    )
    assert (
        again.returncode == 1
        and "1 cells run (0 ok, 1 failed)" in again.stdout
        and "1 skipped" in again.stdout
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("run", "-b", "mobilenetv2_100.tv_in", "-t", "patches13-knn"),
            "Did you mean: mobilenetv2_100.tv_in1k",
        ),
        (
            ("battle", "--backbones", "timm:resnet51", "--tasks", "patches13-knn"),
            "timm has no model 'resnet51'",
        ),
        (
            ("battle", "--backbones", "random/mobilenetv2_100", "--tasks", "patches13-knnn"),
            "unknown task 'patches13-knnn'",
        ),
        (("battle", "--suite", "demoo"), "unknown suite 'demoo'"),
        (("run", "-b", "random/mobilenetv2_100", "-t", "patches13-knn", "--batch-size", "0"), "batch-size"),
        (("run", "-b", "random/mobilenetv2_100", "-t", "TASKDIR/typo.yaml"), "Did you mean: num_C"),
    ],
)
def test_usage_errors_exit_2_before_any_work(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    db = tmp_path / "r.db"
    (tmp_path / "typo.yaml").write_text("version: 1\ndataset: digits\nprotocol: linear\nparams: {numC: 3}\n")
    args = tuple(a.replace("TASKDIR", str(tmp_path)) for a in args)
    proc = run(*args, "--db", str(db))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not db.exists()  # nothing was started, nothing recorded


def test_corrupt_image_names_the_file_and_the_fix(tmp_path: Path, chelsea) -> None:
    root = tmp_path / "pets"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            chelsea.resize((40, 40)).save(root / c / f"{i}.png")
    bad = root / "cat" / "3.png"
    bad.write_bytes(bad.read_bytes()[:120])  # truncated: the header reads, the pixels do not
    task = _task(
        tmp_path, "pets-knn", f"version: 1\ndataset: 'imagefolder:{root}?test_fraction=0.5&val_fraction=0.0'\n"
        "protocol: knn\nimage_size: 32\nsplits: [train, test]\n"
    )  # fmt: skip
    db = tmp_path / "r.db"
    # workers > 0: the error happens in a DataLoader worker process, the case that used to hide it
    proc = run("run", "-b", "random/mobilenetv2_100", "-t", str(task), "--db", str(db), "--workers", "1",
               "--cache-dir", str(tmp_path / "c"))  # fmt: skip
    assert proc.returncode == 1
    assert str(bad) in proc.stderr and "?skip_bad_images=true" in proc.stderr
    assert "DataLoader worker" not in proc.stderr.split("Failed, by cause:")[1]
    ((_, _, status, error),) = _rows(db)
    assert (
        status == "failed" and error.splitlines()[0].count(str(bad)) == 1 and "skip_bad_images=true" in error
    )
    # the fix the message names works
    task.write_text(task.read_text().replace("val_fraction=0.0", "val_fraction=0.0&skip_bad_images=true"))
    fixed = run("run", "-b", "random/mobilenetv2_100", "-t", str(task), "--db", str(db), "--workers", "1",
                "--cache-dir", str(tmp_path / "c"))  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr


def test_the_bob_suite_without_weights_or_data_says_so_in_a_few_lines(tmp_path: Path) -> None:
    args = (
        "battle",
        "--suite",
        "bob",
        "--paths",
        str(EXAMPLES / "bob-paths.yaml"),
        "--db",
        str(tmp_path / "r.db"),
    )
    env = {"BOBENCH_WEIGHTS": str(tmp_path / "weights"), "HF_HUB_OFFLINE": "1", "BOBENCH_OFFLINE": "1"}
    dry = run(*args, "--dry-run", cwd=tmp_path, env=env)
    assert dry.returncode == 1
    assert "1612 cell(s)" in dry.stdout  # 52 backbones x 31 tasks and "nothing was run" in dry.stdout
    assert "52 backbone(s) lack weights" in dry.stderr and "bobench backbones fetch --suite bob" in dry.stderr
    assert "dataset path(s) do not exist: ade20k (/data/ADEChallengeData2016), aircraft (" in dry.stderr
    assert not (tmp_path / "r.db").exists() or not _rows(tmp_path / "r.db")
    strict = run(*args, "--strict", cwd=tmp_path, env=env)
    assert strict.returncode == 1 and "--strict: stopping before any work" in strict.stderr
    full = run(*args, cwd=tmp_path, env=env)
    assert full.returncode == 1
    lines = (full.stdout + full.stderr).strip().splitlines()
    assert len(lines) <= 12, lines  # a few lines, not one per cell
    assert "1612 blocked by the preflight" in full.stdout
    rows = _rows(tmp_path / "r.db")
    assert len(rows) == 1612 and {r[2] for r in rows} == {"failed"}
    assert all(r[3].startswith("preflight: ") and "Fix: " in r[3] for r in rows)
    page = (tmp_path / "report" / "index.html").read_text()  # the full list is in the report too
    assert "bob/sd-v1-encoder" in page and "preflight" in page


def _hinted_commands() -> set[str]:
    """Every `bobench ...` command a message tells the user to run (single backticks: message text)."""
    found = set()
    for path in SRC.rglob("*"):
        if path.suffix in {".py", ".yaml"}:
            found |= set(re.findall(r"(?<!`)`(bobench [a-z][^`{}]*)`(?!`)", path.read_text()))
    from bobench.backbones.factory import BACKBONES

    found.add(BACKBONES.list_command)
    return found


def test_every_hinted_command_exists(tmp_path: Path) -> None:
    hints = _hinted_commands()
    # the unknown-name errors a user meets name these
    for args in (
        ("run", "-b", "nope", "-t", "x"),
        ("battle", "--suite", "nope"),
        ("run", "-b", "random/mobilenetv2_100", "-t", "nope"),
    ):
        err = run(*args, "--db", str(tmp_path / "r.db")).stderr
        hints |= set(re.findall(r"`(bobench [a-z][^`]*)`", err))
    assert {
        "bobench backbones list",
        "bobench tasks list",
        "bobench tasks suites",
        "bobench results list --failed",
    } <= hints
    for hint in sorted(hints):
        argv = shlex.split(hint)[1:]
        proc = run(*argv, "--help")  # parses the command and every option it names
        assert proc.returncode == 0 and "Usage:" in proc.stdout, (hint, proc.stderr)
    for listing in ("backbones list", "tasks list", "tasks suites", "datasets list"):
        assert run(*listing.split()).returncode == 0, listing


def test_every_built_in_task_has_valid_parameters() -> None:
    from bobench.runner import validate_tasks
    from bobench.task import list_tasks, load_task

    validate_tasks([load_task(t["name"]) for t in list_tasks()])  # raises naming the task and the key
