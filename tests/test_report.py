"""The HTML report: built from a real results database, opened in a real headless Chromium.

The browser test is the contract a user sees: the page loads from file:// with the network cut, raises
no console error or exception, every plot decodes, and hostile names stored in the database (a backbone
called ``<script>alert(1)</script>``, an error text with an ``onerror`` handler) show up as literal text
and never run. Chromium is required, not optional: ``make test`` installs it.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from bobench.cli.report import report_cmd
from bobench.metrics import Metric
from bobench.options import RunOptions
from bobench.report import build_report
from bobench.runner import run_battle
from bobench.store import Cell, ResultStore
from bobench.task import TaskConfig, load_task
from browser import BrowserMissingError, Chromium, find_chromium

SCRIPT_NAME = "<script>alert(1)</script>"
LONG_NAME = "timm:" + "a_really_long_backbone_name_with_many_parts_" * 6 + "in22k_ft_in1k"
BROKEN_NAME = "<b>broken</b>"
BROKEN_ERROR = "RuntimeError: <img src=x onerror=alert(2)> exploded\n  while extracting features"
ROOT = Path(__file__).resolve().parent.parent

TASKS = {
    # linear probe kept tiny (2 values of C, 50 iterations): the test is about the report, not the probe
    "digits-linear": """
        version: 1
        dataset: digits
        protocol: linear
        params: {num_C: 2, max_iter: 50}
        metrics: [top1, ece]
        image_size: 32
    """,
    "digits-knn": """
        version: 1
        dataset: digits
        protocol: knn
        image_size: 32
    """,
    "digits-retrieval": """
        version: 1
        dataset: digits
        protocol: retrieval
        splits: [test]
        params: {mode: leave_one_out, ks: [1, 5]}
        metrics: [map, mrr]
        primary: mrr
        image_size: 32
    """,
}


def _tasks(folder: Path) -> list[TaskConfig]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in TASKS.items():
        (folder / f"{name}.yaml").write_text(textwrap.dedent(body))
    return [load_task(folder / f"{name}.yaml") for name in TASKS]


def _record(store: ResultStore, backbone: str, task: TaskConfig, scores: dict[str, float], **kw) -> None:
    """Store one ok cell the way the runner does (same config layout, so the analysis reads it alike)."""
    cell = Cell(backbone, task.name, task.dataset, task.protocol, 0, task.config_hash()[:16])
    config = {"backbone": backbone, "seed": 0, "task": task.model_dump(mode="json")}
    lower = {"ece"}  # calibration error: lower is better
    metrics = [Metric(k, v, higher_is_better=k not in lower) for k, v in scores.items()]
    store.record(cell, metrics, config=config, device="cpu", dtype="fp32", **kw)


@pytest.fixture(scope="module")
def battle_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny battle (2 backbones × 3 digits tasks) plus hand-recorded hostile and partial cells."""
    root = tmp_path_factory.mktemp("report-db")
    tasks = _tasks(root / "tasks")
    db = root / "results.db"
    opts = RunOptions(num_workers=0, batch_size=128, progress=False)
    with ResultStore(db) as store:
        summary = run_battle(
            ["random/mobilenetv2_100", "user_models:make_declared"], tasks, store=store,
            cache_dir=root / "cache", options=opts,
        )  # fmt: skip
        assert summary.failed == 0, [o.error for o in summary.failures]
        real = store.results()
        card = real.loc[real["backbone"] == "user_models:make_declared", "card_json"].iloc[0]
        # The hostile backbone: real scores of a real backbone, shifted, under a name and card fields
        # that would run script if the page ever put them in unescaped.
        for task in tasks:
            rows = real[(real["backbone"] == "random/mobilenetv2_100") & (real["task"] == task.name)]
            scores = {m: min(1.0, v * 1.05) for m, v in zip(rows["metric"], rows["value"], strict=True)}
            hostile_card = {
                **json.loads(card),
                "name": SCRIPT_NAME,
                "license": "<i onmouseover=alert(4)>x</i>",
            }
            _record(store, SCRIPT_NAME, task, scores, card=hostile_card, img_per_s=900.0)
        # A very long name with one setting missing (knn) and a setting no one else has (all-NaN z).
        _record(store, LONG_NAME, tasks[0], {"top1": 0.5, "ece": 0.2}, img_per_s=50.0)
        _record(store, LONG_NAME, tasks[2], {"map": 0.3, "mrr": 0.6}, img_per_s=50.0)
        solo = tasks[1].model_copy(update={"name": "digits-knn-solo"})
        _record(store, LONG_NAME, solo, {"top1": 0.7})
        broken = Cell(BROKEN_NAME, tasks[1].name, tasks[1].dataset, tasks[1].protocol, 0, "deadbeef")
        store.record_failure(broken, BROKEN_ERROR, config={"task": tasks[1].model_dump(mode="json")})
    return db


def test_chromium_is_installed() -> None:
    """Fails (never skips) without Chromium: CI must run the browser test, and `make test` installs it."""
    try:
        find_chromium()
    except BrowserMissingError as exc:
        pytest.fail(str(exc))


@pytest.mark.slow  # a real battle and a browser: ~10 s
def test_report_renders_and_is_inert_in_a_real_browser(battle_db: Path, tmp_path: Path) -> None:
    out = build_report(battle_db, tmp_path / "report", n_boot=50)
    html = out.read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and SCRIPT_NAME not in html
    assert not re.findall(r'(?:src|href)="(?!data:image/png;base64,|#)', html)  # nothing to fetch
    try:
        browser = Chromium()
    except BrowserMissingError as exc:
        pytest.fail(str(exc))
    with browser:
        page = browser.open(out.resolve().as_uri(), offline=True)
        assert page.errors() == [], page.errors()
        assert page.dialogs == []  # no alert/confirm/prompt ever opened
        assert all(u.startswith(("file:", "data:")) for u in page.requests), page.requests
        images = page.images()
        # leaderboard, z-score heat map, correlations, task-vs-task scatter, accuracy vs cost
        assert len(images) == 5, images
        assert all(i["width"] > 0 and i["height"] > 0 for i in images), images
        text = page.evaluate("document.body.innerText")
        for literal in (SCRIPT_NAME, "<img src=x onerror=alert(2)> exploded", BROKEN_NAME, LONG_NAME):
            assert literal in text, literal
        assert page.evaluate("document.scripts.length") == 0
        handlers = "[...document.querySelectorAll('*')].filter(e => [...e.attributes].some(a => a.name.startsWith('on'))).length"
        assert page.evaluate(handlers) == 0  # no element with an inline event handler
        shot = page.screenshot(tmp_path / "report.png")
    _assert_is_a_rendered_page(shot)


def _assert_is_a_rendered_page(png: Path, size: tuple[int, int] | None = None) -> None:
    """``png`` decodes as an image of a real page: viewport-sized, and not blank or one flat colour."""
    with Image.open(png) as image:
        image.verify()  # a truncated or corrupt file raises here, not later in someone's docs
    with Image.open(png) as image:
        width, height = image.size
        real = (width, height) == size if size else width >= 800 and height >= 600
        assert real, f"{png}: {width}×{height}, not the size of a page"
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=width * height)  # [(count, colour)], every colour present
    assert len(colours) >= 100, f"{png}: {len(colours)} colours; a page of text and plots has thousands"
    background = max(count for count, _ in colours) / (width * height)
    assert background < 0.97, f"{png}: {background:.1%} of the pixels are one colour: a blank page"


def test_docs_screenshot_of_the_demo_report(tmp_path: Path) -> None:
    """With BOBENCH_UPDATE_SCREENSHOT=1, renders the demo battle's report to docs/report.png.

    The demo database is ``$BOBENCH_DEMO_DB`` or bobench-results/results.db (what ``make demo`` writes).
    Either way, docs/report.png (when present; it is written here) must decode as a rendered page: a
    real viewport size, text and plots on it, not a blank or an error page.
    """
    target = ROOT / "docs" / "report.png"
    if os.environ.get("BOBENCH_UPDATE_SCREENSHOT") != "1":
        if target.exists():
            _assert_is_a_rendered_page(target)
        return
    db = Path(os.environ.get("BOBENCH_DEMO_DB", ROOT / "bobench-results" / "results.db"))
    assert db.exists(), f"no demo results at {db}: run `make demo` (or set BOBENCH_DEMO_DB) first"
    out = build_report(db, tmp_path / "report", title="bobench demo")
    with Chromium(height=1800) as browser:
        page = browser.open(out.resolve().as_uri(), offline=True)
        assert page.errors() == [], page.errors()
        assert len(page.images()) >= 2  # the leaderboard and heat map are in the shot, not only text
        shot = page.screenshot(tmp_path / "report.png", full_page=False)
    _assert_is_a_rendered_page(shot, size=(browser.width, browser.height))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(shot.read_bytes())  # replaced only once the new shot has passed


def _store(tmp_path: Path, cells: list[tuple[str, str, float | None]]) -> Path:
    """A database of hand-made cells: (backbone, task, score), a None score recording a failure."""
    tasks = {t.name: t for t in _tasks(tmp_path / "tasks")}
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        for backbone, task, score in cells:
            t = tasks[task]
            if score is None:
                cell = Cell(backbone, t.name, t.dataset, t.protocol, 0, "c0ffee")
                store.record_failure(
                    cell, "Traceback (most recent call last):\n  File x\nValueError: bad", config={}
                )
            else:
                _record(store, backbone, t, {t.primary: score})
    return db


def test_single_backbone_says_there_are_no_zscores(tmp_path: Path) -> None:
    db = _store(tmp_path, [("only", "digits-knn", 0.9), ("only", "digits-retrieval", 0.8)])
    html = build_report(db, tmp_path / "out", n_boot=10).read_text()
    assert "at least two backbones" in html and "<img" not in html.split('id="cost"')[0]
    assert "0.9000" in html  # its raw scores are still shown


def test_failed_only_database_still_renders(tmp_path: Path) -> None:
    db = _store(tmp_path, [("x", "digits-knn", None), ("y", "digits-linear", None)])
    html = build_report(db, tmp_path / "out", n_boot=10).read_text()
    assert "nothing to rank" in html and "ValueError: bad" in html  # a traceback's last line, not its header
    assert "<img" not in html


def test_empty_and_non_overlapping_databases_render(tmp_path: Path) -> None:
    with ResultStore(tmp_path / "empty.db"):
        pass
    html = build_report(tmp_path / "empty.db", tmp_path / "empty", n_boot=10).read_text()
    assert "nothing to rank" in html
    # two backbones, no setting in common: every z-score is undefined, nothing is ranked or plotted as if
    db = _store(tmp_path / "apart", [("a", "digits-knn", 0.9), ("b", "digits-retrieval", 0.5)])
    html = build_report(db, tmp_path / "apart-out", n_boot=10).read_text()
    assert "Every z-score is undefined" in html and "0.9000" in html


def test_title_names_the_database_never_a_backbone(tmp_path: Path) -> None:
    """`bobench run -b TYPO` once titled the page after the typo; the default names the database."""
    typo = "timm:resnet5O-TYPO"
    db = _store(tmp_path, [(typo, "digits-knn", None), ("a", "digits-knn", 0.9)])
    html = build_report(db, tmp_path / "out", n_boot=10).read_text()
    assert "<title>bobench report: r.db</title>" in html and "<h1>bobench report: r.db</h1>" in html
    assert typo in html  # listed among the failures, but nowhere in the title
    heads = re.findall(r"<title>.*?</title>|<h1>.*?</h1>", html, flags=re.S)
    assert len(heads) == 2 and not any(typo in h for h in heads), heads
    html = build_report(db, tmp_path / "own", n_boot=10, title="my <battle>").read_text()
    assert "<title>my &lt;battle&gt;</title>" in html  # a caller's title is kept, escaped


def test_missing_database_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no results database at .*run a battle first"):
        build_report(tmp_path / "absent.db", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_writes_the_report_and_prints_its_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = _store(tmp_path, [("a", "digits-knn", 0.9), ("b", "digits-knn", 0.7), ("c", "digits-knn", 0.8)])
    app = typer.Typer()
    app.command()(report_cmd)
    monkeypatch.setenv("BOBENCH_DB", str(db))  # the default --db, read when the command runs
    result = CliRunner().invoke(app, ["--out", str(tmp_path / "rep"), "--n-boot", "10"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(tmp_path / "rep" / "index.html")
    assert (tmp_path / "rep" / "index.html").read_text().count("<img") >= 2


def test_runs_of_an_older_task_config_are_neither_cells_nor_failures_to_retry(tmp_path: Path) -> None:
    """After a task's version bump the database keeps the old runs: the summary counts them apart, and a
    failure that a newer config has since replaced is not listed (rerunning would not retry it)."""
    from bobench.report.render import report_context

    tasks = {t.name: t for t in _tasks(tmp_path / "tasks")}
    knn, lin = tasks["digits-knn"], tasks["digits-linear"]
    old_knn = knn.model_copy(update={"version": knn.version + 1})  # another config, recorded first
    assert old_knn.config_hash() != knn.config_hash()
    with ResultStore(tmp_path / "r.db") as store:
        _record(store, "a", old_knn, {"top1": 0.5})
        _record(store, "a", knn, {"top1": 0.9})
        store.record_failure(Cell("a", lin.name, lin.dataset, lin.protocol, 0, "c0ffee"), "E: old", config={})
        _record(store, "a", lin, {"top1": 0.8})
        _record(store, "b", old_knn, {"top1": 0.4})
        store.record_failure(
            Cell("b", knn.name, knn.dataset, knn.protocol, 0, "f00d"), "E: current", config={}
        )
        results = store.results(status=None)
    ctx = report_context(results, n_boot=5)
    assert ctx["summary"]["cells_ok"] == 2  # a's newest knn and linear runs
    assert ctx["summary"]["cells_failed"] == 1 and ctx["summary"]["cells_superseded"] == 3
    assert [(f["backbone"], f["task"]) for f in ctx["failures"]] == [("b", "digits-knn")]
    assert (
        "older runs of changed tasks"
        in build_report(tmp_path / "r.db", tmp_path / "out", n_boot=5).read_text()
    )
