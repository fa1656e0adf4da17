"""Local training: each site trains alone on its own data, nothing is communicated."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbench.hookspecs import hookimpl
from fedbench.method import Method

if TYPE_CHECKING:
    from torch import nn


class Local(Method):
    """No parameter is shared, so no global model exists; unseen sites use an ensemble."""

    name = "local"
    description = "Local: each site trains alone (no communication)"
    default_adapter = "ensemble"
    has_global_model = False

    def shared_keys(self, model: nn.Module) -> list[str]:
        return []


@hookimpl
def fedbench_methods() -> list[type]:
    return [Local]
