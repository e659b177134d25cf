"""What a battle shows while it runs: a live rich panel on a terminal, one plain line per cell elsewhere.

Usage (the runner's ``on_outcome`` contract is all it needs)::

    with BattleDisplay(len(plan(backbones, tasks, seeds))) as display:
        summary = run_battle(backbones, tasks, store=store, on_outcome=display.on_outcome)
    print(display.summary_line())

On an interactive terminal (:func:`bobench.progress.interactive`) the panel shows a bar of finished
cells (ok, failed and skipped), the current backbone, the last cell and its primary metric, the
throughput of the last fresh extraction, elapsed time and an ETA, and the last few failures.
Extraction bars opened meanwhile (:func:`bobench.progress.progress_bar`) are routed into the panel as
extra rows, so there is exactly one ``Live`` on the terminal and nothing redraws over it.

Anywhere else (pipes, files, CI) it prints exactly one plain line per finished cell, the format of
:func:`outcome_line`, and nothing else: no colours, cursor moves or carriage returns.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING

from bobench.progress import interactive, make_progress, route_bars

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live

    from bobench.cells import CellOutcome
    from bobench.runner import BattleSummary


def first_error_line(out: CellOutcome, limit: int = 200) -> str:
    """The first line of a failed cell's error, at most ``limit`` characters."""
    return (out.error.splitlines() or ["unknown error"])[0][:limit]


def metric_text(out: CellOutcome) -> str:
    """``name=value`` of the cell's primary metric (its first metric if the primary is missing)."""
    if not out.metrics:
        return "no metrics"
    primary = next((m for m in out.metrics if m.name == out.planned.task.primary), out.metrics[0])
    return f"{primary.name}={primary.value:.4f}"


def outcome_line(out: CellOutcome, summary: BattleSummary) -> str:
    """The plain log line of one finished cell.

    ``[i/n] backbone | task | seed s: metric=value (x.xs)`` or ``...: FAILED: first error line``,
    where ``i`` counts the cells finished so far in this run and ``n`` those it had to run (planned
    minus skipped).
    """
    pc = out.planned
    n = len(summary.planned) - summary.skipped - summary.blocked
    i = summary.done + summary.failed
    msg = metric_text(out) if out.status == "ok" else "FAILED: " + first_error_line(out)
    secs = f" ({out.wall_time_s:.1f}s)" if out.wall_time_s is not None else ""
    return f"[{i}/{n}] {pc.backbone} | {pc.task.name} | seed {pc.seed}: {msg}{secs}"


def eta_seconds(elapsed_s: float, finished: int, remaining: int) -> float | None:
    """Time left: the mean wall time per finished cell times the cells remaining.

    The mean is taken over the battle's elapsed wall clock (cells that only read the cache are fast,
    the first cell of each backbone pays for its build and extraction).

    Returns:
        None before any cell has finished (no estimate yet), 0.0 when nothing remains.
    """
    if remaining <= 0:
        return 0.0
    if finished <= 0:
        return None
    return elapsed_s / finished * remaining


def _clock_text(seconds: float | None) -> str:
    return "?" if seconds is None else str(timedelta(seconds=round(seconds)))


class BattleDisplay:
    """Progress of a battle, fed by the runner's ``on_outcome(out, summary)`` callback.

    A context manager: the live panel exists only between ``__enter__`` and ``__exit__`` (and extraction
    bars are routed into it only then); outcomes arriving outside it are printed as plain lines.
    Counts always come from the latest ``BattleSummary``, so the skipped cells known when the battle
    starts appear with its first outcome; pass ``skipped`` to show them before that.

    Args:
        total_cells: cells planned (ok + failed + skipped + not yet run); None until the first outcome
            says (``len(summary.planned)``).
        skipped: cells already known to be skipped before the first outcome.
        console: where to draw or print (default: a rich console on stderr).
        live: True forces the live panel, False forces plain lines, None decides by
            :func:`bobench.progress.interactive` on ``console``.
        max_failures: how many of the latest failures the panel lists.
        refresh_per_second: redraw rate of the panel; outcomes arriving faster only update its state.
        clock: seconds since an arbitrary origin (injectable for tests).
    """

    def __init__(
        self,
        total_cells: int | None = None,
        *,
        skipped: int = 0,
        console: Console | None = None,
        live: bool | None = None,
        max_failures: int = 3,
        refresh_per_second: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from rich.console import Console

        self.console = console if console is not None else Console(stderr=True)
        self.live = interactive(self.console) if live is None else live
        self.total = total_cells
        self.skipped = skipped
        self.done = 0
        self.failed = 0
        self.backbone: str | None = None
        self.last_cell: str | None = None
        self.last_ok = True
        self.img_per_s: float | None = None
        self.failures: deque[str] = deque(maxlen=max_failures)
        self._clock = clock
        self._t0 = clock()
        self._t_end: float | None = None
        self._refresh = refresh_per_second
        # the Live's refresh thread renders while the battle's thread updates the counts
        self._lock = threading.RLock()
        self._stack: ExitStack | None = None
        self._live: Live | None = None
        self._bars = make_progress(self.console) if self.live else None

    # -- the context ------------------------------------------------------------------------------
    def __enter__(self) -> BattleDisplay:
        """Start the clock and, when live, the panel and the routing of extraction bars into it."""
        self._t0, self._t_end = self._clock(), None
        if self.live:
            from rich.live import Live

            assert self._bars is not None
            stack = ExitStack()
            live = Live(
                console=self.console,
                get_renderable=self.__rich__,
                refresh_per_second=self._refresh,
                transient=False,  # the final panel stays on screen as the battle's record
                redirect_stdout=True,  # stray prints and warnings scroll above the panel
                redirect_stderr=True,
            )
            stack.enter_context(live)
            stack.enter_context(route_bars(self._bars))
            self._stack, self._live = stack, live  # only once started: until then, plain lines
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the clock and the panel, leaving its last frame on the terminal."""
        self._t_end = self._clock()
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()  # un-routes the bars, then the Live's final refresh draws the end state
            self._live = None

    # -- the callback -----------------------------------------------------------------------------
    def on_outcome(self, out: CellOutcome, summary: BattleSummary) -> None:
        """Record one finished cell: redraw the panel (at its refresh rate) or print its plain line.

        The runner's ``on_outcome`` callback; never raises for odd outcomes
        (a failure without an error text, an ok cell without metrics).
        """
        pc = out.planned
        with self._lock:
            self.total = len(summary.planned)
            # cells the preflight blocked are failures too (recorded, never run, never shown one by one)
            self.skipped, self.done = summary.skipped, summary.done
            self.failed = summary.failed + summary.blocked
            self.backbone = pc.backbone
            self.last_ok = out.status == "ok"
            msg = metric_text(out) if self.last_ok else "FAILED"
            secs = f" ({out.wall_time_s:.1f}s)" if out.wall_time_s is not None else ""
            self.last_cell = f"{pc.task.name} | seed {pc.seed}: {msg}{secs}"
            if out.img_per_s is not None:  # None means the features came from the cache
                self.img_per_s = out.img_per_s
            if not self.last_ok:
                self.failures.append(
                    f"{pc.backbone} | {pc.task.name} | seed {pc.seed}: {first_error_line(out)}"
                )
        if self._live is None:
            # plain text only: no markup, highlighting or wrapping, so a CI log gets the line verbatim
            self.console.print(
                outcome_line(out, summary), markup=False, highlight=False, emoji=False, soft_wrap=True
            )

    # -- derived numbers --------------------------------------------------------------------------
    @property
    def elapsed_s(self) -> float:
        """Seconds since ``__enter__`` (or construction), frozen at ``__exit__``."""
        return (self._t_end if self._t_end is not None else self._clock()) - self._t0

    @property
    def remaining(self) -> int | None:
        """Cells neither finished nor skipped; None while the total is unknown."""
        if self.total is None:
            return None
        return max(0, self.total - self.skipped - self.done - self.failed)

    def eta_s(self) -> float | None:
        """Estimated seconds left (see :func:`eta_seconds`); None while unknown."""
        remaining = self.remaining
        if remaining is None:
            return None
        return eta_seconds(self.elapsed_s, self.done + self.failed, remaining)

    def summary_line(self) -> str:
        """One plain line for the end, e.g. ``5 cells: 3 ok, 1 failed, 1 skipped in 0:00:12``."""
        with self._lock:
            total = self.total if self.total is not None else self.done + self.failed + self.skipped
            text = f"{total} cells: {self.done} ok, {self.failed} failed, {self.skipped} skipped"
            if self.remaining:
                text += f", {self.remaining} not run"
            return f"{text} in {_clock_text(self.elapsed_s)}"

    # -- the panel --------------------------------------------------------------------------------
    def __rich__(self) -> RenderableType:
        """The panel's current frame: what the Live redraws, and what ``console.print(display)`` shows."""
        from rich.console import Group
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            finished = self.done + self.failed + self.skipped
            total = self.total
            bar_row = Table.grid(padding=(0, 1))
            bar_row.add_row(
                ProgressBar(total=max(total or 0, 1), completed=finished if total else 0, width=40),
                Text(f"{finished}/{total if total is not None else '?'} cells", style="bold"),
                Text.assemble(
                    (f"{self.done} ok", "green"),
                    " · ",
                    (f"{self.failed} failed", "red" if self.failed else ""),
                    " · ",
                    (f"{self.skipped} skipped", "dim"),
                ),
            )
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold cyan", no_wrap=True)
            grid.add_column(overflow="ellipsis")
            grid.add_row("cells", bar_row)
            grid.add_row("backbone", Text(self.backbone or "starting…", no_wrap=True, overflow="ellipsis"))
            if self.last_cell is not None:
                style = "" if self.last_ok else "red"
                grid.add_row(
                    "last cell", Text(self.last_cell, style=style, no_wrap=True, overflow="ellipsis")
                )
            speed = f"{self.img_per_s:.1f} img/s" if self.img_per_s is not None else "–"
            grid.add_row("extraction", Text(speed))
            grid.add_row(
                "time", Text(f"elapsed {_clock_text(self.elapsed_s)} · ETA {_clock_text(self.eta_s())}")
            )
            for i, line in enumerate(self.failures):  # one row each, cut at the panel's edge
                label = f"failures ({self.failed})" if i == 0 else ""
                grid.add_row(label, Text(line, style="red", no_wrap=True, overflow="ellipsis"))
        parts: list[RenderableType] = [grid]
        if self._bars is not None and self._bars.tasks:  # an extraction running right now
            parts.append(self._bars)
        return Panel(Group(*parts), title="battle", title_align="left", border_style="blue")
