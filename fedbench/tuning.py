"""Search spaces: the settings of a method or adapter worth tuning, and their ranges.

A plugin declares its own on the class, keyed by the full setting name, as `--set` takes it:

    search_space = {"method.mu": Range(1e-3, 1.0, log=True)}

`fedbench tune` samples every declared setting with Optuna, on validation data only. Every
method is tuned on the shared `TRAIN_SPACE` (the client learning rate) as well, unless it
declares `train.lr` itself (e.g. a method that takes plain SGD steps, on SGD's scale), so no
method's row is the only one whose learning rate was chosen for it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedbench.errors import FedbenchError


@dataclass(frozen=True)
class Range:
    """A number in [low, high]: log-uniform when `log` (scales such as learning rates), an
    integer when `integer`."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise FedbenchError(f"Range needs finite low < high, got {self.low}, {self.high}")
        if self.log and self.low <= 0:
            raise FedbenchError(f"a log Range needs low > 0, got {self.low}")
        if self.integer and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise FedbenchError(f"an integer Range needs whole bounds, got {self.low}, {self.high}")


@dataclass(frozen=True)
class Choice:
    """One of a few values (numbers, strings or booleans), such as a paper's grid."""

    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not all(isinstance(v, bool | int | float | str) for v in self.values):
            raise FedbenchError(
                f"Choice values must be numbers, strings or booleans: {self.values!r}"
            )
        if len(self.values) < 2 or len(set(self.values)) != len(self.values):
            raise FedbenchError(f"Choice needs two or more distinct values, got {self.values!r}")


Space = dict[str, Range | Choice]

#: what every method is tuned on besides its own space: the client learning rate, on the scale
#: of the presets' Adam (their default 2e-3 in the middle, log-uniform)
TRAIN_SPACE: Space = {"train.lr": Range(2e-4, 2e-2, log=True)}

#: the sections of the config a plugin's space may name
SECTIONS = ("train", "method", "adapter")


def space_problems(space: Any, section: str, defaults: dict[str, Any]) -> list[str]:
    """What is wrong with a declared space, one line each: `section` is the plugin's own
    ("method" or "adapter"), whose keys must be among its `defaults`."""
    if not isinstance(space, dict):
        return [f"search_space must be a dict of setting -> Range or Choice, got {space!r}"]
    problems = []
    for key, value in space.items():
        head, _, name = str(key).partition(".")
        if head not in SECTIONS or not name or (section == "adapter" and head != "adapter"):
            problems.append(f"search_space key '{key}' is not a setting such as '{section}.x'")
        elif head in ("method", "adapter") and (head != section or name not in defaults):
            problems.append(f"search_space key '{key}' is not one of this {section}'s settings")
        if not isinstance(value, Range | Choice):
            problems.append(f"search_space['{key}'] must be a Range or a Choice, got {value!r}")
    return problems


def checked_space(plugin: type, section: str) -> Space:
    """A plugin's declared space, or one FedbenchError naming the plugin and the problem."""
    problems = space_problems(plugin.search_space, section, plugin.defaults)
    if problems:
        raise FedbenchError(f"{section} '{plugin.name}': {problems[0]}")
    return dict(plugin.search_space)


def full_space(own: Space, shared: Space) -> Space:
    """The space a tuning samples: the shared settings, then the plugin's own (which win)."""
    return {**shared, **own}
