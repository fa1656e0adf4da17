"""The progress interface a run reports to. This base is silent (pipes, `--json`, Ray workers,
tests); the command line draws it with rich (fedbench/cli/progress.py)."""

from __future__ import annotations


class Reporter:
    """Silent progress: the calls a run makes as it goes."""

    def start(self, label: str, total: int | None) -> None:
        """A new phase begins (a federation's rounds, or an adaptation with no known length)."""

    def advance(self) -> None:
        """One step (a round) of the current phase is done."""

    def finish(self) -> None:
        """The current phase is done."""

    def close(self) -> None:
        """The run is over."""
