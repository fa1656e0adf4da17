"""FedBN (Li et al., ICLR 2021): normalization layers stay local, everything else is averaged."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbench.hookspecs import hookimpl
from fedbench.method import Method
from fedbench.models import normalization_state_keys

if TYPE_CHECKING:
    from torch import nn


class FedBN(Method):
    """Normalization layers (affine weights and running statistics) are chosen by module type and
    never leave the client; each site's model is the global weights plus its own normalization."""

    name = "fedbn"
    description = "FedBN: normalization layers (weights and statistics) stay local"
    default_adapter = "bn-adapt"

    def shared_keys(self, model: nn.Module) -> list[str]:
        local = normalization_state_keys(model)
        return [key for key in model.state_dict() if key not in local]


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedBN]
