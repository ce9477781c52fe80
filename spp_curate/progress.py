"""Progress for long stages: items done, items/s, ETA, and quarantined count.

In a terminal, a rich bar. Elsewhere (CI, ``nohup``, a pipe, a log file) a bar
squeezed to 80 columns reads ``10000/100…``, so each stage prints plain lines
instead: one when it starts, one every :data:`LOG_EVERY_S` seconds, and one
when it ends, e.g. ``embed: 4,096/10,000 (41%) 512 img/s, 0 quarantined, eta 0:00:11``.
``SPP_CURATE_PROGRESS=plain|bar`` chooses either way.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

# soft wrap: a line stays one line in a log, whatever width rich assumes when it is not a terminal
console = Console(stderr=True, soft_wrap=True)


class RateColumn(ProgressColumn):
    """Items per second, with the unit the stage counts in."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.0f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")


class QuarantineColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        bad = task.fields.get("quarantined")
        if bad is None:
            return Text("")
        return Text(f"{bad} quarantined", style="yellow" if bad else "dim")


#: Seconds between two plain progress lines.
LOG_EVERY_S = 10.0
#: ... and every this many seconds during a stage's first minute, so a short command is never silent for long.
FIRST_EVERY_S = 1.0


#: When the last progress line was written, and how many bars are on screen: a heartbeat stays quiet while
#: either says enough.
_last_line = [0.0]
_bars = [0]


def _said(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    _last_line[0] = time.monotonic()


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """The part of rich's ``Progress`` the stages use (``update``), written as plain log lines."""

    def __init__(self, description: str, total: int | None, unit: str, quarantine: bool) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.done, self.quarantined = 0, 0 if quarantine else None
        self.started = self.last = time.monotonic()
        self._line("start")

    def update(self, task: int, advance: float | None = None, completed: float | None = None,
               description: str | None = None, total: int | None = None, quarantined: int | None = None,
               **_: object) -> None:
        if completed is not None:
            self.done = completed
        if advance:
            self.done += advance
        if description is not None:
            self.description = description
        if total is not None:
            self.total = total
        if quarantined is not None:
            self.quarantined = quarantined
        now = time.monotonic()
        every = FIRST_EVERY_S if now - self.started < 60 else LOG_EVERY_S
        if now - self.last >= every:
            self.last = now
            self._line()

    def _line(self, state: str | None = None) -> None:
        elapsed = time.monotonic() - self.started
        done = f"{int(self.done):,}" + (f"/{int(self.total):,}" if self.total else "")
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        rate = self.done / elapsed if elapsed > 0 and self.done else 0.0
        parts = [f"{self.description}: {done}{share}"]
        if state == "start":
            parts = [f"{self.description}: {'start' + (f', {int(self.total):,} {self.unit}' if self.total else '')}"]
        else:
            parts.append(f" {rate:,.0f} {self.unit}/s")
            if self.quarantined is not None:
                parts.append(f", {self.quarantined} quarantined")
            if state == "end":
                parts.append(f", done in {_clock(elapsed)}")
            elif self.total and rate:
                parts.append(f", eta {_clock((self.total - self.done) / rate)}")
        _said("".join(parts))

    def finish(self) -> None:
        self._line("end")


def plain_progress() -> bool:
    """Whether progress is written as log lines (not a terminal, or ``SPP_CURATE_PROGRESS=plain``)."""
    choice = os.environ.get("SPP_CURATE_PROGRESS", "").strip().lower()
    if choice in ("plain", "bar"):
        return choice == "plain"
    return not console.is_terminal


@contextlib.contextmanager
def stage_progress(description: str, total: int | None, unit: str = "img",
                   quarantine: bool = False) -> Iterator[tuple[Progress, int]]:
    """Progress for one stage, a rich bar or log lines (:func:`plain_progress`); yields ``(progress, task_id)``."""
    if plain_progress():
        plain = PlainProgress(description, total, unit, quarantine)
        yield plain, 0  # type: ignore[misc]
        plain.finish()
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
        QuarantineColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, transient=False,
    )
    fields = {"unit": unit}
    if quarantine:
        fields["quarantined"] = 0
    _bars[0] += 1
    try:
        with progress:
            task = progress.add_task(description, total=total, **fields)
            yield progress, task
    finally:
        _bars[0] -= 1


def shard_counter(bar: Any, task: Any) -> tuple[Callable[[], None], Callable[[int, int], None]]:
    """Two callbacks for shards written one process each: ``on_item`` advances the bar item by item where a
    shard is written in this process, ``on_shard(_, written)`` by what a shard wrote beyond what was counted."""
    shown = 0

    def on_item() -> None:
        nonlocal shown
        shown += 1
        bar.update(task, advance=1)

    def on_shard(_: int, written: int) -> None:
        nonlocal shown
        bar.update(task, advance=written - shown)
        shown = 0

    return on_item, on_shard


@contextlib.contextmanager
def quiet_log(name: str | None = None) -> Iterator[None]:
    """Logger ``name`` (the root logger by default) says nothing below CRITICAL while the block runs: a library's
    warnings and retry lines before an error the caller then reports once, in its own words."""
    import logging

    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


#: Seconds without a line after which a step without items of its own says it is still at work.
HEARTBEAT_S = 1.5


@contextlib.contextmanager
def heartbeat(description: str, every: float = HEARTBEAT_S) -> Iterator[None]:
    """While the block runs (one library call, an import), a line ``DESCRIPTION: 0:00:03 so far`` whenever
    ``every`` seconds passed with no progress line and no bar on screen: a log never goes silent for longer.
    The lines come from a thread, which runs between the call's bytecodes (torch's import included)."""
    import threading

    started = time.monotonic()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(min(every, 0.25)):
            now = time.monotonic()
            if not _bars[0] and now - max(_last_line[0], started) >= every:
                _said(f"{description}: {_clock(now - started)} so far")

    thread = threading.Thread(target=beat, name="spp-curate-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def phase(description: str) -> Iterator[None]:
    """One line when a step without items of its own starts and one when it ends, with its time, so no step
    of a command is silent (in a terminal and in a log alike); a heartbeat line between them when it is long."""
    started = time.monotonic()
    _said(f"{description}: start")
    with heartbeat(description):
        yield
    _said(f"{description}: done in {_clock(time.monotonic() - started)}")


def loading(description: str) -> contextlib.AbstractContextManager:
    """A line naming what a command loads (torch and the methods: seconds on a small CPU), and a heartbeat while
    it does."""
    _said(description)
    return heartbeat(description)
