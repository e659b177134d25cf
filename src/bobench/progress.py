"""Progress bars: rich on a terminal, silent in logs and CI.

One rule decides whether anything animated is drawn, :func:`interactive`; extraction bars
(:func:`progress_bar`) and the battle display (:mod:`bobench.battle_display`) both follow it.

While a battle display is live it *routes* bars into itself (:func:`route_bars`): a bar opened then
becomes one more row of the display's own rich ``Live`` instead of starting a second ``Live`` on
another console, which would redraw over the first and garble both.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress


class Advance(Protocol):
    #: whether anything is drawn (a caller can skip computing a note nobody sees)
    shown: bool

    def advance(self, n: int, note: str = "") -> None: ...


class _Null:
    shown = False

    def advance(self, n: int, note: str = "") -> None:
        pass


def interactive(console: Console | None = None) -> bool:
    """Whether ``console`` (default: a console on stderr) should get animated output.

    True for a real, non-dumb terminal (rich's ``Console.is_interactive``: honours ``TERM=dumb``,
    ``FORCE_COLOR``, ``TTY_COMPATIBLE`` and ``TTY_INTERACTIVE``), except under ``CI`` where
    ``FORCE_COLOR`` often fakes a terminal for colours while the log viewer cannot redraw lines.
    ``TTY_INTERACTIVE=1`` overrides the CI rule. ``NO_COLOR`` only removes colours (rich does that).
    """
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    if os.environ.get("TTY_INTERACTIVE") == "1":
        return True
    return bool(console.is_interactive) and not os.environ.get("CI")


def make_progress(console: Console | None = None) -> Progress:
    """A rich ``Progress`` with the bar's columns: count, percent, rate field, elapsed and ETA.

    Tasks must carry a ``rate`` field (``add_task(..., rate="")``).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("[cyan]{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console or Console(stderr=True), transient=False)


class _TaskBar:
    """One task of a rich ``Progress``, advanced by count, showing the rate in ``unit``/s."""

    shown = True

    def __init__(self, progress: Progress, task: int, unit: str) -> None:
        self._progress, self._task, self._unit = progress, task, unit
        self._note = ""

    def advance(self, n: int, note: str = "") -> None:
        """Advance by ``n``; ``note`` (e.g. ``loss 0.53 lr 1e-3``) is shown after the rate until the
        next non-empty note replaces it."""
        self._progress.advance(self._task, n)
        self._note = note or self._note
        # look the task up by id: a routed Progress removes finished tasks, so ids are not list indices
        speed = next((t.speed for t in self._progress.tasks if t.id == self._task), None)
        if speed or self._note:
            rate = f"{speed:.1f} {self._unit}/s" if speed else ""
            self._progress.update(self._task, rate=f"{rate} {self._note}".strip())


# The Progress that bars are routed into while a display is live (None: each bar draws itself).
# Module-global rather than a ContextVar so that bars opened in executor threads route too;
# rich's Progress is thread-safe.
_route: Progress | None = None
_route_lock = threading.Lock()


@contextmanager
def route_bars(progress: Progress) -> Iterator[None]:
    """While active, :func:`progress_bar` adds a task to ``progress`` instead of drawing its own bar.

    ``progress`` must be rendered by the caller's own ``Live`` (it is never started here); each
    routed task is removed when its bar closes. Nested routes restore the previous one on exit.
    """
    global _route
    with _route_lock:
        previous, _route = _route, progress
    try:
        yield
    finally:
        with _route_lock:
            _route = previous


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True, unit: str = "img") -> Iterator[Advance]:
    """A bar with count, rate (``img/s``) and ETA; a no-op when disabled or stderr is not interactive.

    Inside :func:`route_bars` the bar is a row of the routing display instead (drawn only if that
    display is live, as routing is only set up by a live display).
    """
    if not enabled:
        yield _Null()
        return
    routed = _route
    if routed is not None:
        task = routed.add_task(description, total=total, rate="")
        try:
            yield _TaskBar(routed, task, unit)
        finally:
            routed.remove_task(task)
        return
    if not interactive():
        yield _Null()
        return
    with make_progress() as progress:
        yield _TaskBar(progress, progress.add_task(description, total=total, rate=""), unit)
