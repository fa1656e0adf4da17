"""Where a run's time goes: exclusive seconds per phase (a nested phase's time is not counted
again in its parent), collected always and printed by `fedbench run --profile`."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = (
    "data loading",
    "local training",
    "aggregation",
    "evaluation",
    "adaptation",
    "checkpointing",
    "waiting for workers",  # for a federation another process is training (engine.federations)
)


class Profile:
    """Accumulates exclusive wall time per phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # per open phase: [start, time spent in children]

    def reset(self) -> None:
        self.seconds.clear()
        self._stack.clear()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        frame = [time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - frame[0]
            self.seconds[name] += elapsed - frame[1]
            if self._stack:
                self._stack[-1][1] += elapsed

    def timed(self, name: str, iterator: Iterator) -> Iterator:
        """Yield from `iterator`, counting the time spent producing each item under `name`."""
        while True:
            with self.phase(name):
                item = next(iterator, StopIteration)
            if item is StopIteration:
                return
            yield item

    def summary(self) -> dict[str, float]:
        return {name: round(self.seconds.get(name, 0.0), 4) for name in PHASES}


PROFILE = Profile()
