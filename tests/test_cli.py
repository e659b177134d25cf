"""The command line, run as a user runs it: subprocesses of the installed `bobench` entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

BOBENCH = [sys.executable, "-m", "bobench"]


def run(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), **(env or {})}
    proc = subprocess.run([*BOBENCH, *args], capture_output=True, text=True, env=full_env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"bobench {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def _commands() -> list[tuple[str, ...]]:
    """Every command path of the CLI, read from the click tree itself (a new command cannot be missed)."""
    import typer.main

    from bobench.cli.main import app

    def walk(cmd, path: tuple[str, ...]) -> list[tuple[str, ...]]:
        subs = getattr(cmd, "commands", None)
        if not subs:
            return [path]
        return [p for name, sub in sorted(subs.items()) for p in walk(sub, (*path, name))]

    return walk(typer.main.get_command(app), ())


def test_every_command_has_help() -> None:
    commands = _commands()
    # the ones the README shows, so a renamed command fails here
    for want in [
        ("backbones", "list"),
        ("backbones", "show"),
        ("backbones", "fetch"),
        ("datasets", "list"),
        ("features", "extract"),
        ("tasks", "list"),
        ("tasks", "suites"),
        ("run",),
        ("battle",),
        ("demo",),
        ("results", "list"),
        ("results", "export"),
        ("results", "robustness"),
        ("report",),
    ]:
        assert want in commands
    top = run("--help").stdout
    for path in commands:
        assert path[0] in top
        proc = run(*path, "--help")
        assert "Usage:" in proc.stdout and proc.stderr == "", path
    assert "Exit codes" in run("battle", "--help").stdout


def test_backbones_list_is_torch_free_and_filters() -> None:
    code = (
        "import sys; from bobench.cli.main import main; rc = main(['backbones', 'list', '--json']);"
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert {"mobilenetv2_100.tv_in1k", "tf_efficientnet_lite0.in1k"} <= {r["name"] for r in rows}
    sup = json.loads(run("backbones", "list", "--json", "--method", "supervised").stdout)
    assert sup and all(r["pretraining"] == "supervised" for r in sup)
    assert "mobilenetv2_100.tv_in1k" in run("backbones", "list").stdout  # table is not truncated in pipes


def test_backbones_show_prints_counted_card() -> None:
    card = json.loads(run("backbones", "show", "tf_efficientnet_lite0.in1k", "--json").stdout)
    assert card["params"] == 3371008 and card["embed_dim"] == 1280 and card["mean"] == [0.5, 0.5, 0.5]
    assert [f["stride"] for f in card["feature_info"]] == [4, 8, 16, 32]


def test_datasets_list() -> None:
    rows = json.loads(run("datasets", "list", "--json").stdout)
    kinds = {r["name"]: r["kind"] for r in rows}
    assert {k: kinds.get(k) for k in ("patches13", "mnist5k", "mnist-det", "nuclei", "mnist-seg")} == {
        "patches13": "classification", "mnist5k": "classification", "mnist-det": "detection", "nuclei": "detection",
        "mnist-seg": "segmentation",
    }  # fmt: skip
    assert next(r for r in rows if r["name"] == "mnist-det")["n_classes"] == 10


def test_features_extract_then_cache_hit(tmp_path: Path) -> None:
    args = (
        "features",
        "extract",
        "-b",
        "random/mobilenetv2_100",
        "-d",
        "digits",
        "--split",
        "val",
        "--image-size",
        "32",
        "--cache-dir",
        str(tmp_path),
        "--json",
    )
    first = json.loads(run(*args).stdout)[0]
    second = json.loads(run(*args).stdout)[0]
    assert not first["cache_hit"] and second["cache_hit"] and first["key"] == second["key"]
    assert first["n"] == 359 and first["dim"] == 1280 and first["device"] == "cpu"


def test_cpu_bf16_where_emulated_warns_in_one_line_and_still_runs(tmp_path: Path) -> None:
    """The user asked for bf16 on a CPU that emulates it (forced here: this machine may have AVX512-BF16): one
    ``warning:`` line that names the fix, the features extracted in bf16, exit 0."""
    code = (
        "import sys; from bobench import device; device.cpu_bf16_native = lambda: False;"
        "from bobench.cli.main import main;"
        "sys.exit(main(['features', 'extract', '-b', 'random/mobilenetv2_100', '-d', 'digits', '--split', 'val',"
        f"'--image-size', '32', '--precision', 'bf16', '--cache-dir', {str(tmp_path)!r}, '--json']))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    env.pop("BOBENCH_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "bf16" in line]
    assert len(said) == 1 and said[0].startswith("warning: --precision bf16 on a CPU without AVX512-BF16")
    assert "--precision fp32" in said[0] and "features.py" not in proc.stderr
    assert json.loads(proc.stdout)[0]["precision"] == "bf16"


@pytest.mark.parametrize(
    ("flag", "value"), [("--batch-size", "0"), ("--workers", "-1"), ("--image-size", "0")]
)
def test_features_extract_refuses_bad_run_options_even_when_cached(
    tmp_path: Path, flag: str, value: str
) -> None:
    """These were unchecked: on a cache hit `--batch-size 0` printed the table and exited 0."""
    base = ("features", "extract", "-b", "random/mobilenetv2_100", "-d", "digits", "--split", "val")
    run(*base, "--image-size", "32", "--cache-dir", str(tmp_path))  # now a re-run would hit the cache
    args = [*base, "--cache-dir", str(tmp_path), flag, value]
    if flag != "--image-size":
        args += ["--image-size", "32"]
    proc = run(*args, check=False)
    assert proc.returncode == 2 and f"Invalid value for '{flag}'" in proc.stderr and proc.stdout == ""


def test_results_export(tmp_path: Path) -> None:
    from bobench.metrics import Metric
    from bobench.store import Cell, ResultStore

    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        store.record(Cell("bb", "task", "ds", "linear"), [Metric("top1", 0.5, True)], config={"a": 1})
    out = tmp_path / "out.csv"
    run("results", "export", str(out), "--db", str(db))
    df = pd.read_csv(out)
    assert df.loc[0, "value"] == 0.5 and df.loc[0, "metric"] == "top1"
    run("results", "export", str(tmp_path / "out.parquet"), "--db", str(db))
    assert pd.read_parquet(tmp_path / "out.parquet").loc[0, "backbone"] == "bb"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("backbones", "show", "mobilenetv2_100.tv_in"), "Did you mean: mobilenetv2_100.tv_in1k"),
        (("features", "extract", "-b", "random/mobilenetv2_100", "-d", "/no/such/dir"), "/no/such/dir"),
        (("features", "extract", "-b", "timm:resnet18.a1_in1k", "-d", "digits"), "weights=PATH"),
        (("results", "export", "x.csv", "--db", "/no/such.db"), "no results database at /no/such.db"),
    ],
)
def test_bad_input_gives_one_clear_line(args: tuple[str, ...], message: str) -> None:
    proc = run(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
