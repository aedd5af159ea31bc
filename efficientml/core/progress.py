"""Progress bars (rich), silent when not attached to a terminal or when disabled."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def track(it: Iterable[T], description: str = "", total: int | None = None,
          enabled: bool | None = None) -> Iterator[T]:
    """Iterate with a progress bar on a terminal (stderr); plain iteration otherwise."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield from it
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    if total is None and hasattr(it, "__len__"):
        total = len(it)  # type: ignore[arg-type]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(),
                  console=Console(file=sys.stderr), transient=True) as prog:
        task = prog.add_task(description, total=total)
        for x in it:
            yield x
            prog.advance(task)
