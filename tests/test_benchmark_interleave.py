"""The benchmarks' timing rule (benchmarks/interleave.py): variants rotate, warm-up rounds are
dropped, a ratio is of the best rounds. Timed with a fake clock, so nothing here reads the wall."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "interleave.py"


@pytest.fixture(scope="module")
def interleave() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("bench_interleave", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_each_round_starts_with_another_variant(interleave: ModuleType) -> None:
    names = ["a", "b", "c"]
    firsts = [interleave.rotated(names, i)[0] for i in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    assert all(sorted(interleave.rotated(names, i)) == names for i in range(6))


def test_warmup_rounds_are_run_but_not_kept(
    interleave: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fake clock that advances by the cost of whatever ran: the first call of each variant
    is slow (warm-up), the kept rounds are not."""
    now = [0.0]
    calls: list[str] = []
    monkeypatch.setattr(interleave.time, "process_time", lambda: now[0])

    def variant(name: str, cost: float):
        def run() -> None:
            now[0] += cost * (10 if name not in calls else 1)
            calls.append(name)

        return run

    timings = interleave.interleaved({"x": variant("x", 2.0), "y": variant("y", 1.0)}, rounds=3)
    assert calls == ["x", "y", "y", "x", "x", "y", "y", "x"]
    assert timings.seconds == {"x": [2.0, 2.0, 2.0], "y": [1.0, 1.0, 1.0]}
    assert timings.ratio("x", "y") == 2.0


def test_ratio_is_of_best_rounds_and_spread_of_round_ratios(interleave: ModuleType) -> None:
    timings = interleave.Timings({"x": [3.0, 2.0, 6.0], "y": [1.0, 1.5, 2.0]})
    assert timings.ratio("x", "y") == 2.0
    assert timings.round_ratios("x", "y") == pytest.approx([3.0, 4 / 3, 3.0])
    assert timings.describe("x", "y") == "2.00x (best of 3; per round 1.33-3.00)"


def test_iterations_time_several_calls_as_one_sample(
    interleave: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [0.0]
    monkeypatch.setattr(interleave.time, "process_time", lambda: now[0])
    costs = iter([5.0, 1.0, 1.0, 3.0, 1.0, 2.0])  # warm-up round, then two kept calls

    def run() -> None:
        now[0] += next(costs)

    timings = interleave.interleaved({"x": run}, rounds=2, iterations=2)
    assert timings.seconds == {"x": [2.0, 1.5]}
