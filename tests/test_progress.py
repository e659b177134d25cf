"""The battle display and progress bars: plain lines in logs, one live panel on a terminal."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from bobench.battle_display import BattleDisplay, eta_seconds, outcome_line
from bobench.cells import CellOutcome
from bobench.metrics import Metric
from bobench.progress import interactive, progress_bar
from bobench.runner import BattleSummary, plan

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LONG_ERROR = "ValueError: " + "the probe diverged " * 8  # longer than the console's 80 columns


class Clock:
    """A hand-driven clock, so elapsed time and ETA are exact."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _cells(n: int, backbones: tuple[str, ...] = ("resnet18",)):
    return plan(list(backbones), ["patches13-linear"], seeds=list(range(n)))


def _ok(pc, top1: float, wall: float | None = 1.25, img_per_s: float | None = 812.5) -> CellOutcome:
    metrics = [Metric("top5", 0.99, True), Metric("top1", top1, True)]  # primary is not first
    return CellOutcome(pc, "ok", metrics=metrics, wall_time_s=wall, img_per_s=img_per_s)


def _failed(pc, error: str = "RuntimeError: boom\n\nTraceback (most recent call last): ...") -> CellOutcome:
    return CellOutcome(pc, "failed", error=error, wall_time_s=0.5)


def _feed(display: BattleDisplay, summary: BattleSummary, outs: list[CellOutcome]) -> None:
    """Count each outcome into the summary and call back, as ``run_battle`` does."""
    for out in outs:
        if out.status == "ok":
            summary.done += 1
        else:
            summary.failed += 1
            summary.failures.append(out)
        display.on_outcome(out, summary)


def test_plain_lines_one_per_cell_exact_and_free_of_escapes() -> None:
    cells = _cells(5)
    summary = BattleSummary(cells, skipped=1)  # cell 0 was in the store already
    outs = [
        _ok(cells[1], 0.8123),
        _failed(cells[2]),
        _ok(cells[3], 0.5, wall=None),
        _failed(cells[4], LONG_ERROR),
    ]
    buf = io.StringIO()
    display = BattleDisplay(5, console=Console(file=buf, force_terminal=False))
    assert display.live is False
    with display:
        _feed(display, summary, outs)
    text = buf.getvalue()
    assert "\x1b" not in text and "\r" not in text
    assert text.splitlines() == [
        "[1/4] resnet18 | patches13-linear | seed 1: top1=0.8123 (1.2s)",
        "[2/4] resnet18 | patches13-linear | seed 2: FAILED: RuntimeError: boom (0.5s)",
        "[3/4] resnet18 | patches13-linear | seed 3: top1=0.5000",
        f"[4/4] resnet18 | patches13-linear | seed 4: FAILED: {LONG_ERROR[:200]} (0.5s)",
    ]
    assert text.endswith("\n") and len(text.splitlines()) == len(outs)  # nothing else, no wrapping
    # outcome_line is what the display printed, line by line
    replay = BattleSummary(cells, skipped=1)
    for i, out in enumerate(outs):
        replay.done, replay.failed = (
            sum(o.status == "ok" for o in outs[: i + 1]),
            sum(o.status == "failed" for o in outs[: i + 1]),
        )
        assert outcome_line(out, replay) == text.splitlines()[i]
    assert display.summary_line() == "5 cells: 2 ok, 2 failed, 1 skipped in 0:00:00"


def test_live_panel_shows_counts_backbone_eta_and_failures() -> None:
    cells = _cells(5)
    summary = BattleSummary(cells)
    buf, clock = io.StringIO(), Clock()
    console = Console(file=buf, force_terminal=True, width=120)
    with BattleDisplay(5, console=console, live=True, clock=clock) as display:
        clock.now += 30.0  # three cells in 30 s: 10 s each, two left → ETA 20 s
        _feed(display, summary, [_ok(cells[0], 0.8123), _failed(cells[1]), _ok(cells[2], 0.75)])
    text = ANSI.sub("", buf.getvalue())  # the last frame is redrawn on exit
    for shown in (
        "3/5 cells",
        "2 ok · 1 failed · 0 skipped",
        "resnet18",
        "patches13-linear | seed 2: top1=0.7500 (1.2s)",
        "812.5 img/s",
        "elapsed 0:00:30 · ETA 0:00:20",
        "resnet18 | patches13-linear | seed 1: RuntimeError: boom",
    ):
        assert shown in text, shown
    assert "[1/5]" not in text  # no plain lines while live
    assert display.summary_line() == "5 cells: 2 ok, 1 failed, 0 skipped, 2 not run in 0:00:30"


def test_outcomes_faster_than_the_refresh_rate() -> None:
    cells = _cells(200, backbones=("resnet18", "vit-s"))
    summary = BattleSummary(cells, skipped=40)
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=80)
    with BattleDisplay(console=console, live=True, refresh_per_second=50) as display:
        outs = [_ok(pc, 0.5) if i % 7 else _failed(pc, LONG_ERROR) for i, pc in enumerate(cells[40:])]
        _feed(display, summary, outs)
    text = ANSI.sub("", buf.getvalue())
    assert "400/400 cells" in text and "vit-s" in text and "ETA 0:00:00" in text
    assert len(display.failures) == 3  # only the latest few are listed
    assert display.remaining == 0 and display.eta_s() == 0.0


def test_extraction_bars_are_routed_into_the_live_panel() -> None:
    cells = _cells(2)
    frame = Console(file=io.StringIO(), force_terminal=False, width=120)
    with BattleDisplay(
        console=Console(file=io.StringIO(), force_terminal=True, width=120), live=True
    ) as display:
        with progress_bar("extract resnet18", total=10) as bar:
            bar.advance(4)
            with frame.capture() as cap:
                frame.print(display)
            assert "extract resnet18" in cap.get() and "4/10" in cap.get()
        with progress_bar("extract vit-s", total=8) as bar:  # a second bar: its task id is not 0
            bar.advance(8)
            with frame.capture() as cap:
                frame.print(display)
            assert "extract vit-s" in cap.get() and "8/8" in cap.get() and "extract resnet18" not in cap.get()
        _feed(display, BattleSummary(cells), [_ok(cells[0], 0.9)])
        with frame.capture() as cap:
            frame.print(display)
        assert "extract resnet18" not in cap.get()  # a finished bar leaves the panel
    with progress_bar("after the battle", total=3) as bar:  # routing ends with the display
        bar.advance(3)  # not interactive under pytest: a silent no-op


def test_eta_by_hand() -> None:
    assert eta_seconds(30.0, finished=3, remaining=2) == 20.0
    assert eta_seconds(0.0, finished=0, remaining=5) is None  # nothing to average yet
    assert eta_seconds(12.0, finished=4, remaining=0) == 0.0
    # skipped cells cost no time and are not remaining: 6 planned, 2 skipped, 2 run in 10 s
    cells, clock = _cells(6), Clock(0.0)
    summary = BattleSummary(cells, skipped=2)
    display = BattleDisplay(console=Console(file=io.StringIO()), live=False, clock=clock)
    assert display.eta_s() is None  # total unknown before the first outcome
    with display:
        clock.now = 10.0
        _feed(display, summary, [_ok(cells[2], 0.5), _ok(cells[3], 0.5)])
        assert display.remaining == 2
        assert display.eta_s() == 10.0  # 5 s per cell × 2 left
        clock.now = 99.0
    assert display.elapsed_s == 99.0  # frozen at exit


def test_interactive_follows_the_terminal_and_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CI", "TTY_INTERACTIVE", "TTY_COMPATIBLE", "FORCE_COLOR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert interactive(Console(file=io.StringIO(), force_terminal=True))
    assert not interactive(Console(file=io.StringIO(), force_terminal=False))
    monkeypatch.setenv("CI", "true")
    assert not interactive(Console(file=io.StringIO(), force_terminal=True))
    assert not BattleDisplay(console=Console(file=io.StringIO(), force_terminal=True)).live
    monkeypatch.delenv("CI")
    monkeypatch.setenv("TERM", "dumb")
    assert not interactive(Console(file=io.StringIO(), force_terminal=True))
