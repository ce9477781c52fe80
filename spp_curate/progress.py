"""Progress bars for long stages: items done, items/s, ETA, and quarantined count."""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

console = Console(stderr=True)


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


@contextlib.contextmanager
def stage_progress(description: str, total: int | None, unit: str = "img",
                   quarantine: bool = False) -> Iterator[tuple[Progress, int]]:
    """A rich progress bar for one stage; yields ``(progress, task_id)``."""
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
        QuarantineColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, transient=False,
    )
    fields = {"unit": unit}
    if quarantine:
        fields["quarantined"] = 0
    with progress:
        task = progress.add_task(description, total=total, **fields)
        yield progress, task
