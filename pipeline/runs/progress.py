"""Rich progress bars that report events/s and ETA, shared by every long loop."""
from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)  # diagnostics, progress; logs: no wrap
results = Console(highlight=False)  # stdout: what a command found (tables, summaries), so `> file` keeps just that


class RateColumn(ProgressColumn):
    """Completed units per second of the task (events/s)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("– ev/s", style="progress.data.speed")
        return Text(f"{speed:,.0f} ev/s", style="progress.data.speed")


class InfoColumn(ProgressColumn):
    """Free text a loop updates as it goes (loss, lr): `progress.update(task, info="loss 0.12")`."""

    def render(self, task) -> Text:
        return Text(str(task.fields.get("info", "")))


def progress(disable: bool | None = None) -> Progress:
    """A Progress with description, bar, done/total, events/s, elapsed and ETA.

    Disabled automatically on non-zero ranks and when HEPREG_NO_PROGRESS is set (tests, CI logs).
    """
    if disable is None:
        disable = os.environ.get("HEPREG_NO_PROGRESS") is not None or int(os.environ.get("RANK", "0")) != 0
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), InfoColumn(),
        console=console, disable=disable, transient=not sys.stderr.isatty(),
    )
