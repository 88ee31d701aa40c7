"""Progress of long work on stderr: a rich bar on a terminal, one plain line per step elsewhere.

A CI log or a ``nohup`` file shows nothing of a rich bar, so off a terminal every finished layer
prints ``layer i/N, elapsed, ETA`` as a line of its own. The first layer also gives the estimate for
the whole run (the first layers cost what the others do: each is one forward pass and one layer's math).
"""

from __future__ import annotations

import time
from typing import Callable, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def duration(seconds: float) -> str:
    """``4.2 s``, ``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class LineProgress:
    """``update(done, total)`` after each finished layer prints one line to ``stream``."""

    def __init__(self, stream: TextIO, label: str = "layer", clock: Callable[[], float] = time.monotonic):
        self.stream, self.label, self.clock = stream, label, clock
        self.start = clock()
        self.first: int | None = None  # layers already done when this run started (--resume)

    def update(self, done: int, total: int) -> None:
        if self.first is None:
            self.first = done
            if done:  # resumed: the reports of finished layers, no new work yet
                print(f"{done}/{total} {self.label}s already done", file=self.stream, flush=True)
                return
        elapsed = self.clock() - self.start
        new = done - self.first
        if new <= 0:
            return
        left = elapsed / new * (total - done)
        line = f"{self.label} {done}/{total}, elapsed {duration(elapsed)}, ETA {duration(left)}"
        if new == 1 and done < total:
            line += f" (estimate from the first {self.label}: about {duration(elapsed + left)} in all)"
        print(line, file=self.stream, flush=True)


def progress_reporter(console: Console, enabled: bool, tty: bool, stream: TextIO, total: int, description: str):
    """A context manager yielding ``update(done, total)``: rich on a TTY, lines otherwise, or nothing."""
    if not enabled:
        return _Nothing()
    if tty:
        return _Rich(console, total, description)
    return _Lines(LineProgress(stream))


class _Nothing:
    def __enter__(self):
        return lambda done, total: None

    def __exit__(self, *exc):
        return False


class _Lines:
    def __init__(self, lines: LineProgress):
        self.lines = lines

    def __enter__(self):
        return self.lines.update

    def __exit__(self, *exc):
        return False


class _Rich:
    def __init__(self, console: Console, total: int, description: str):
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), console=console, transient=False)
        self.task = self.bar.add_task(description, total=total)

    def __enter__(self):
        self.bar.__enter__()
        return lambda done, total: self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)
