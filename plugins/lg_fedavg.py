"""LG-FedAvg (Liang et al., "Think Locally, Act Globally: Federated Learning with Local and
Global Representations", 2020): each client keeps its own representation layers and only the
global layers on top are shared and averaged.

Variant: the global part is the network's output layer (`output_layer_keys`: the last
convolution or linear layer); everything below it, normalization included, is local; all layers
train jointly in each local update. An unseen site receives the global output layer with the
sample-weighted mean of the clients' representation layers (each sent once after the last
round, counted in the bytes up); by default it uses the ensemble of that model and the
personalized ones."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbench.hookspecs import hookimpl
from fedbench.method import Method
from fedbench.models import output_layer_keys

if TYPE_CHECKING:
    from torch import nn


class LGFedAvg(Method):
    """Shares only the output layer; each client's body stays its own."""

    name = "lg-fedavg"
    description = "LG-FedAvg: local representation layers, the output layer is averaged"
    default_adapter = "ensemble"

    def shared_keys(self, model: nn.Module) -> list[str]:
        head = output_layer_keys(model)
        return [key for key in model.state_dict() if key in head]


@hookimpl
def fedbench_methods() -> list[type]:
    return [LGFedAvg]
