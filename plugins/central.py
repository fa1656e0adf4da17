"""Centralized training on the pooled data of every site: a reference point, not FL."""

from fedbench.hookspecs import hookimpl
from fedbench.method import Method


class Central(Method):
    """One virtual client holds all training data (what FL tries to approach without pooling)."""

    name = "central"
    description = "Central: pooled training on all sites' data (a reference, not FL)"
    pooled = True


@hookimpl
def fedbench_methods() -> list[type]:
    return [Central]
