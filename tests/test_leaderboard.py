"""The CLI's end-of-battle leaderboard ranks as the HTML report does: by mean z-score, not raw mean."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bobench.analysis import format_leaderboard, leaderboard
from bobench.metrics import Metric
from bobench.report import report_context
from bobench.store import Cell, ResultStore
from bobench.task import TaskConfig

RETRIEVAL = TaskConfig(name="toy-retrieval", version=1, dataset="digits", protocol="retrieval", primary="mrr")
LINEAR = TaskConfig(name="toy-linear", version=1, dataset="digits", protocol="linear")
# Retrieval spreads the backbones widely, linear narrowly. Raw means: a 0.750 > c 0.600 > b 0.360. Mean z
# (hand-computed, population std): c (0 + 1.389) / 2 = 0.694 > a (1.225 - 0.926) / 2 = 0.149 >
# b (-1.225 - 0.463) / 2 = -0.844. "a" wins on the raw mean only because retrieval's spread outvotes.
SCORES = {"a": (0.90, 0.60), "b": (0.10, 0.62), "c": (0.50, 0.70)}
Z_ORDER, RAW_ORDER = ["c", "a", "b"], ["a", "c", "b"]


def _cell(backbone: str, task: TaskConfig, seed: int = 0) -> Cell:
    return Cell(backbone, task.name, task.dataset, task.protocol, seed, task.config_hash()[:16])


def _record(store: ResultStore, backbone: str, task: TaskConfig, value: float, seed: int = 0) -> None:
    """One ok cell as the runner records it (config_json carries the task, so the report reads it alike)."""
    config = {"backbone": backbone, "seed": seed, "task": task.model_dump(mode="json")}
    store.record(
        _cell(backbone, task, seed), [Metric(task.primary, value, True)], config=config, provenance={}
    )


@pytest.fixture
def store(tmp_path: Path):
    with ResultStore(tmp_path / "r.db") as store:
        for backbone, (mrr, top1) in SCORES.items():
            _record(store, backbone, RETRIEVAL, mrr)
            _record(store, backbone, LINEAR, top1)
        config = {"task": LINEAR.model_dump(mode="json")}
        store.record_failure(_cell("broken", LINEAR), "RuntimeError: no weights", config=config)
        yield store


def test_leaderboard_follows_the_zscore_ranking_of_the_report(store: ResultStore) -> None:
    table = leaderboard(store, ["a", "broken", "b", "c"], [RETRIEVAL, LINEAR])
    raw_mean = table[["toy-retrieval", "toy-linear"]].mean(axis=1).dropna()
    assert list(raw_mean.sort_values(ascending=False).index) == RAW_ORDER  # the order it must NOT follow
    assert list(table.index) == [*Z_ORDER, "broken"]  # no results at all: last
    assert table["rank"].tolist()[:3] == [1, 2, 3] and pd.isna(table.loc["broken", "rank"])
    assert table["score"].tolist()[:3] == pytest.approx([0.6945, 0.1494, -0.8439], abs=1e-3)
    assert table.loc["a", "toy-retrieval"] == 0.90 and table.loc["c", "toy-linear"] == 0.70  # raw, as stored
    assert table["tasks"].tolist() == ["2/2", "2/2", "2/2", "0/2"]

    # the report ranks the same store the same way, rank numbers included
    report = report_context(store.results(status=None), n_boot=10)["leaderboard"]["rows"]
    assert [(r["backbone"], r["rank"]) for r in report] == [(b, str(i)) for i, b in enumerate(Z_ORDER, 1)]

    text = format_leaderboard(table, "toy")
    lines = [ln for ln in text.splitlines() if any(f" {b} " in ln for b in ["a", "b", "c", "broken"])]
    assert [ln.split("│")[2].strip() for ln in lines] == [*Z_ORDER, "broken"]
    assert [ln.split("│")[1].strip() for ln in lines] == ["1", "2", "3", ""]
    first = [cell.strip() for cell in lines[0].split("│")]
    assert first[3:7] == ["50.0", "70.0", "+0.69", "2/2"]  # scores x100, then mean z and tasks


def test_leaderboard_ranks_only_its_own_backbones_and_tasks(store: ResultStore) -> None:
    """z-scores are over the battle's backbones; other backbones and tasks in the store do not count."""
    _record(store, "outsider", RETRIEVAL, 0.0)  # would move every retrieval z-score if it counted
    other = TaskConfig(name="toy-knn", version=1, dataset="digits", protocol="knn")
    _record(store, "b", other, 0.99)
    _record(store, "a", LINEAR, 0.64, seed=1)  # seeds are averaged: a's linear score becomes 0.62
    table = leaderboard(store, ["a", "b"], [RETRIEVAL, LINEAR])
    assert list(table.columns) == ["toy-retrieval", "toy-linear", "score", "rank", "tasks"]
    assert table.loc["a", "toy-linear"] == pytest.approx(0.62)
    # two backbones: z = ±1 on retrieval (0.90 vs 0.10, the outsider's 0.0 not counted); on linear they
    # tie at 0.62 (seeds averaged), a setting without spread has no z-score, so retrieval alone decides
    assert list(table.index) == ["a", "b"] and table["score"].tolist() == pytest.approx([1.0, -1.0])


def test_a_single_backbone_is_listed_with_its_scores_but_no_rank(tmp_path: Path) -> None:
    with ResultStore(tmp_path / "r.db") as store:
        _record(store, "solo", LINEAR, 0.8)
        table = leaderboard(store, ["ghost", "solo"], [RETRIEVAL, LINEAR])
    assert list(table.index) == ["solo", "ghost"]  # scores, unranked, before no results at all
    assert table["rank"].isna().all() and table["score"].isna().all()
    assert table["tasks"].tolist() == ["1/2", "0/2"]
    assert "80.0" in format_leaderboard(table)


def test_a_cell_whose_newest_config_failed_shows_no_score(store: ResultStore) -> None:
    """After a version bump, c's linear cell failed under the new config: the table shows no number for
    it rather than the old config's 0.70, as the report does."""
    bumped = LINEAR.model_copy(update={"version": 2})
    store.record_failure(_cell("c", bumped), "RuntimeError: out of memory", config={})
    table = leaderboard(store, ["a", "b", "c"], [RETRIEVAL, bumped])
    assert pd.isna(table.loc["c", "toy-linear"]) and table.loc["c", "tasks"] == "1/2"
    assert table.loc["a", "toy-linear"] == 0.60  # cells not rerun keep their only config's score
