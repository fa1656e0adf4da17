"""Every built-in method and adapter declares a valid search space: its own settings only, each
default inside its range, SGD's learning-rate scale for the methods that refuse anything but
SGD; and `space_problems` names what is wrong with a bad one."""

from __future__ import annotations

from typing import Any

import pytest

from fedbench.engine.registry import load_registry
from fedbench.errors import FedbenchError
from fedbench.tuning import Choice, Range, space_problems

REGISTRY = load_registry()
METHODS = {name: REGISTRY.get("methods", name) for name in REGISTRY.names("methods")}
ADAPTERS = {name: REGISTRY.get("adapters", name) for name in REGISTRY.names("adapters")}
PLUGINS = [("method", name, cls) for name, cls in METHODS.items()] + [
    ("adapter", name, cls) for name, cls in ADAPTERS.items()
]
#: the methods whose steps are plain SGD's (`require_plain_sgd`, fednova's own check)
SGD_ONLY = {"scaffold", "fednova", "pfedme", "perfedavg"}
#: FedAvg's best plain-SGD learning rate on this task (a doubling grid)
SGD_BEST_LR = 3.2


def contains(domain: Range | Choice, value: Any) -> bool:
    """Whether `value` is a point of the declared range or one of the choice's values."""
    if isinstance(domain, Choice):
        return value in domain.values
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return domain.low <= value <= domain.high


def refuses(cls: type, optimizer: str, momentum: float, lr: float) -> bool:
    """Whether the method's `check_settings` refuses a run with its defaults and this optimizer."""
    config = {
        "train": {"optimizer": optimizer, "momentum": momentum, "lr": lr},
        "method": dict(cls.defaults),
        "data": {"size": 64},
    }
    try:
        cls.check_settings(config)
    except FedbenchError:
        return True
    return False


@pytest.mark.parametrize(("section", "name", "cls"), PLUGINS, ids=lambda v: str(v))
def test_every_declared_space_is_valid(section: str, name: str, cls: type) -> None:
    assert space_problems(cls.search_space, section, cls.defaults) == [], name


@pytest.mark.parametrize(("section", "name", "cls"), PLUGINS, ids=lambda v: str(v))
def test_every_default_lies_inside_its_range(section: str, name: str, cls: type) -> None:
    for key, domain in cls.search_space.items():
        head, _, setting = key.partition(".")
        if head == section:
            default = cls.defaults[setting]
            assert contains(domain, default), f"{name}: {key} default {default!r} not in {domain}"
        if key == "train.lr" and name in SGD_ONLY:
            assert contains(domain, SGD_BEST_LR), f"{name}: train.lr {domain} misses 3.2"


def test_the_sgd_only_methods_are_those_that_refuse_adam() -> None:
    refusing = {
        name
        for name, cls in METHODS.items()
        if refuses(cls, "adam", 0.0, 2e-3) and not refuses(cls, "sgd", 0.0, SGD_BEST_LR)
    }
    assert refusing == SGD_ONLY


def test_only_the_sgd_methods_declare_their_own_learning_rate() -> None:
    for name, cls in METHODS.items():
        declared = "train.lr" in cls.search_space
        assert declared == (name in SGD_ONLY), name
        if declared:
            lr = cls.search_space["train.lr"]
            assert isinstance(lr, Range) and lr.log and lr.low >= 0.1, name


def test_a_key_of_another_section_is_named() -> None:
    problems = space_problems({"adapter.lr": Range(1e-4, 1e-2)}, "method", {"mu": 0.1})
    assert len(problems) == 1 and "'adapter.lr'" in problems[0]


def test_an_unknown_key_is_named() -> None:
    for key in ("method.nope", "data.size", "lr"):
        problems = space_problems({key: Range(0.0, 1.0)}, "method", {"mu": 0.1})
        assert len(problems) == 1 and f"'{key}'" in problems[0], key


def test_a_value_that_is_no_range_is_named() -> None:
    problems = space_problems({"method.mu": 0.1}, "method", {"mu": 0.1})
    assert len(problems) == 1
    assert "'method.mu'" in problems[0] and "Range or a Choice" in problems[0]


def test_a_space_that_is_no_dict_is_refused() -> None:
    problems = space_problems([("method.mu", Range(0.0, 1.0))], "method", {"mu": 0.1})
    assert len(problems) == 1 and "dict" in problems[0]


def test_a_sound_space_has_no_problem() -> None:
    space = {"method.mu": Range(1e-3, 1.0, log=True), "train.lr": Choice((0.1, 0.2))}
    assert space_problems(space, "method", {"mu": 0.1}) == []
