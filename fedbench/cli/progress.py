"""Progress display: rich bars on a terminal, nothing in pipes or under --json."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedbench.engine.reporter import Reporter
from fedbench.errors import one_line


class RichReporter(Reporter):
    """A progress bar per phase, on stderr so stdout stays clean."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description}", markup=False),  # labels name sites: literal
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.progress.start()
        self.task = None

    def start(self, label: str, total: int | None) -> None:
        self.task = self.progress.add_task(one_line(label), total=total)

    def advance(self) -> None:
        if self.task is not None:
            self.progress.advance(self.task)

    def finish(self) -> None:
        if self.task is not None:
            task = self.progress.tasks[self.task]
            self.progress.update(self.task, total=task.total or 1, completed=task.total or 1)
        self.task = None

    def close(self) -> None:
        self.progress.stop()


def make_reporter(console: Console, quiet: bool) -> Reporter:
    return Reporter() if quiet or not console.is_terminal else RichReporter(console)
