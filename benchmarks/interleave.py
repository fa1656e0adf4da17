"""Timing variants so that a busy machine cannot fake a ratio: every round runs each variant once,
in an order that rotates from round to round (no variant always pays the warm-up or always
follows the same neighbour), after warm-up rounds that are not kept, on this process's CPU clock.
A ratio is reported as the ratio of the variants' best rounds, with the spread of the per-round
ratios beside it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Timings:
    """Seconds of each variant, one entry per kept round, in round order."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def best(self, name: str) -> float:
        return min(self.seconds[name])

    def ratio(self, numerator: str, denominator: str) -> float:
        """The ratio of the two variants' best rounds: the figure least touched by other jobs."""
        return self.best(numerator) / self.best(denominator)

    def round_ratios(self, numerator: str, denominator: str) -> list[float]:
        """The ratio within each round, where both variants ran side by side."""
        pairs = zip(self.seconds[numerator], self.seconds[denominator], strict=True)
        return [top / bottom for top, bottom in pairs]

    def describe(self, numerator: str, denominator: str) -> str:
        """'1.02x (best of 5; per round 0.98-1.10)': the figure and how far rounds strayed."""
        spread = self.round_ratios(numerator, denominator)
        return (
            f"{self.ratio(numerator, denominator):.2f}x (best of {len(spread)}; "
            f"per round {min(spread):.2f}-{max(spread):.2f})"
        )


def rotated(names: list[str], round_index: int) -> list[str]:
    """`names` started at a different variant each round: a, b, c; b, c, a; c, a, b; ..."""
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def interleaved(
    variants: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    iterations: int = 1,
    clock: Callable[[], float] | None = None,
) -> Timings:
    """Run each variant `iterations` times in a row per round, the order rotating, and keep the
    seconds per call of the last `rounds` rounds. Several iterations per round make a sample of
    a millisecond-long call long enough that one descheduling does not decide it. The clock is by
    default this process's CPU time: on one torch thread it is the wall time of a quiet machine,
    and other jobs on a busy one do not add to it while they hold the cores (a GPU's work needs
    the wall clock, `time.perf_counter`)."""
    clock = clock or time.process_time
    names = list(variants)
    timings = Timings({name: [] for name in names})
    for round_index in range(warmup + rounds):
        for name in rotated(names, round_index):
            start = clock()
            for _ in range(iterations):
                variants[name]()
            elapsed = (clock() - start) / iterations
            if round_index >= warmup:
                timings.seconds[name].append(elapsed)
    return timings
