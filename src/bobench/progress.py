"""Progress bars: rich on a terminal, silent in logs and CI."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Advance(Protocol):
    def advance(self, n: int) -> None: ...


class _Null:
    def advance(self, n: int) -> None:
        pass


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True, unit: str = "img") -> Iterator[Advance]:
    """A bar with count, rate (``img/s``) and ETA; a no-op when disabled or stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield _Null()
        return
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
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total, rate="")

        class _Bar:
            def advance(self, n: int) -> None:
                progress.advance(task, n)
                speed = progress.tasks[task].speed
                if speed:
                    progress.update(task, rate=f"{speed:.1f} {unit}/s")

        yield _Bar()
