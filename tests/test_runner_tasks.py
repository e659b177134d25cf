"""Retrieval, OOD and path-placeholder tasks through the runner (real backbones, embedded data)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from bobench.cli.main import main
from bobench.frozen import protocol_params
from bobench.options import RunOptions
from bobench.runner import plan, run_battle
from bobench.store import ResultStore
from bobench.task import TaskError, load_paths, load_suite, load_task, resolve_paths

OPTS = RunOptions(num_workers=0, batch_size=128, progress=False)


def _task(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def _rows(db: Path) -> pd.DataFrame:
    with ResultStore(db, readonly=True) as s:
        return s.results(status=None)


def test_ood_retrieval_and_leave_one_out_tasks_run_end_to_end(tmp_path: Path) -> None:
    ood = _task(
        tmp_path,
        "p13-ood",
        """
        version: 1
        dataset: patches13
        protocol: ood
        params: {num_C: 6}
        ood: {blur: patches13-blur, noise: patches13-noise}
        metrics: [top1, ece_ts, top1@ood=mean, top1@ood=blur, top1@ood=noise, balanced_acc@ood=blur]
        primary: top1@ood=mean
        image_size: 64
        """,
    )
    ret = _task(
        tmp_path,
        "p13-ret",
        """
        version: 1
        dataset: patches13
        protocol: retrieval
        splits: [train, test]
        metrics: [map, mrr, recall@1]
        primary: mrr
        image_size: 64
        """,
    )
    loo = _task(
        tmp_path,
        "digits-loo",
        """
        version: 1
        dataset: digits
        protocol: retrieval
        splits: [test]
        params: {mode: leave_one_out}
        metrics: [mrr]
        primary: mrr
        image_size: 32
        """,
    )
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        s = run_battle(
            ["mobilenetv2_100.tv_in1k"], [ood, ret, loo], store=store, cache_dir=tmp_path / "c", options=OPTS
        )
    assert (s.done, s.failed) == (3, 0), [f.error for f in s.failures]
    rows = _rows(db)
    v = rows.set_index(["task", "metric"])["value"]
    assert set(rows.query("task == 'p13-ood'").metric) == {
        "top1", "ece_ts", "top1@ood=mean", "top1@ood=blur", "top1@ood=noise", "balanced_acc@ood=blur"
    }  # fmt: skip
    # the mean is over the two sets, and a probe on clean crops loses accuracy under corruption
    assert v["p13-ood", "top1@ood=mean"] == pytest.approx(
        (v["p13-ood", "top1@ood=blur"] + v["p13-ood", "top1@ood=noise"]) / 2
    )
    assert v["p13-ood", "top1"] > v["p13-ood", "top1@ood=mean"]
    assert 0 < v["p13-ret", "map"] <= 1 and v["p13-ret", "mrr"] >= v["p13-ret", "map"] - 1e-9
    assert 0 < v["digits-loo", "mrr"] <= 1
    # the OOD sets were extracted once each, into the same content-addressed cache
    manifests = list((tmp_path / "c").rglob("manifest.json"))
    assert len(manifests) == 3 + 2 + 1  # patches13 train/val/test, two corrupted test sets, digits test


def test_task_metrics_reach_the_protocol() -> None:
    task = load_task("patches13-linear")
    params = protocol_params(task)
    assert params["metrics"] == list(task.metrics) and "ece_ts" in params["metrics"]
    assert "device" not in params  # how a cell runs travels in RunOptions, never in the task's params
    ood = load_task("patches13-ood")
    assert "top1@ood=blur" not in protocol_params(ood)["metrics"]  # derived names stay filters


def test_paths_placeholders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = load_task("bob-roxford5k-retrieval")
    assert task.placeholders() == ["roxford5k"]
    with pytest.raises(TaskError, match=r"needs the path\(s\) roxford5k.*--paths"):
        plan(["a"], [task])
    paths_file = tmp_path / "paths.yaml"
    paths_file.write_text("roxford5k: ~/data/roxford5k\n")
    paths = load_paths(paths_file)
    resolved = resolve_paths(task, paths)
    assert (
        resolved.dataset == f"revisitop:{Path('~/data/roxford5k').expanduser()}"
        and not resolved.placeholders()
    )
    monkeypatch.setenv("BOBENCH_PATHS", str(paths_file))
    assert load_paths() == paths
    bob = load_suite("bob")
    assert len(bob.backbones) >= 45 and "bob-imagenet-ood" in bob.tasks


def test_cli_battle_with_a_missing_path_stops_before_work(tmp_path: Path, capsys) -> None:
    paths_file = tmp_path / "paths.yaml"
    paths_file.write_text("cub200: /nowhere/cub\n")
    db = tmp_path / "r.db"
    rc = main(["battle", "--backbones", "random/mobilenetv2_100", "--tasks", "bob-rparis6k-retrieval",
               "--paths", str(paths_file), "--db", str(db)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "rparis6k" in err and "--paths" in err and not db.exists()
    # a path that is given but does not exist: the preflight names the key, the cell is recorded as
    # failed without running, the battle goes on with the rest and exits 1
    knn = _task(tmp_path, "digits-knn", "version: 1\ndataset: digits\nprotocol: knn\nimage_size: 32\n")
    rc = main(["battle", "--backbones", "random/mobilenetv2_100", "--tasks", f"bob-cub200-retrieval,{knn}",
               "--workers", "0", "--paths", str(paths_file), "--db", str(db), "--cache-dir", str(tmp_path / "c")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and "cub200 (/nowhere/cub)" in err and str(paths_file) in err
    rows = _rows(db)
    assert set(rows.loc[rows["status"] == "ok", "task"]) == {"digits-knn"}
    failed = rows[rows["status"] == "failed"]
    assert len(failed) == 1 and failed["error"].str.contains("preflight: dataset .*/nowhere/cub").all()
    assert json.loads(failed["config_json"].iloc[0])["task"]["dataset"] == "imagefolder:/nowhere/cub"
    # every battle ends by writing the HTML report beside its database, failed-only ones too
    page = (tmp_path / "report" / "index.html").read_text()
    assert "bob-cub200-retrieval" in page and "/nowhere/cub" in page


def test_cli_robustness_matches_a_logit_fit_by_numpy(tmp_path: Path, capsys) -> None:
    import numpy as np

    from bobench.metrics import Metric
    from bobench.store import Cell

    ident = np.array([0.6, 0.7, 0.8, 0.9])
    ood = 1 / (1 + np.exp(-(0.8 * np.log(ident / (1 - ident)) - 0.5)))
    ood[2] += 0.05  # one backbone above the line
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        for i, (a, o) in enumerate(zip(ident, ood, strict=True)):
            cell = Cell(f"bb{i}", "t-ood", "patches13", "ood", 0, f"h{i}")
            store.record(
                cell, [Metric("top1", a, True), Metric("top1@ood=mean", o, True)], config={}, provenance={}
            )
    assert main(["results", "robustness", "--task", "t-ood", "--db", str(db), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    a, b = np.polyfit(logit(ident), logit(ood), 1)
    assert out["fit"]["a"] == pytest.approx(a) and out["fit"]["b"] == pytest.approx(b)
    top = out["backbones"][0]
    assert top["backbone"] == "bb2" and top["effective_robustness"] > 0
