"""The progress bar evaluation and fine-tuning both show on stderr: samples done, samples/s, ETA."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def progress_bar(
    description: str,
    total: int,
    *,
    enabled: bool | None = None,
    done: int = 0,
    keep: bool = False,
    metrics: str = "",
) -> Iterator[Callable[..., None]]:
    """Yield ``advance(count, **values)``; a rich bar on stderr when enabled (None: when stderr
    is a terminal), a no-op otherwise.

    ``done``: samples already counted (a resumed epoch). ``metrics``: a format string of the
    values passed to ``advance`` (``"loss {loss:.4f}"``), shown once some are. ``keep``: the bar
    stays on screen when it ends, as a summary line, instead of vanishing.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda _count, **_values: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Metrics(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(metrics.format(**task.fields) if task.fields else "")

    class SamplesPerSecond(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            shown = "" if speed is None else f"{speed:,.0f} samples/s"
            return Text(shown, style="progress.data.speed")

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *((Metrics(),) if metrics else ()),
        SamplesPerSecond(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=not keep) as bar:
        task = bar.add_task(description, total=total, completed=done)
        yield lambda count, **values: bar.update(task, advance=count, **values)
