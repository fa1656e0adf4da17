"""FedPer (Arivazhagan et al., "Federated Learning with Personalization Layers", 2019): the base
layers are shared and averaged as in FedAvg, the personalization layers never leave the client.

Variant: one personalization layer, the network's output layer (`output_layer_keys`: the last
convolution or linear layer, weight and bias); everything else, normalization statistics
included, is the shared base. Base and head train jointly in every local update, as in the
paper (not alternately, as FedRep does). Each client is scored with the global base plus its own
head. An unseen site receives the global base with the sample-weighted mean of the clients'
heads (each sent once after the last round, counted in the bytes up); by default it uses the
ensemble of that model and the personalized ones."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbench.hookspecs import hookimpl
from fedbench.method import Method
from fedbench.models import output_layer_keys

if TYPE_CHECKING:
    from torch import nn


class FedPer(Method):
    """Shares every state-dict key but the output layer's; the default local update trains all."""

    name = "fedper"
    description = "FedPer: the output layer (head) stays on each client, the base is averaged"
    default_adapter = "ensemble"

    def shared_keys(self, model: nn.Module) -> list[str]:
        head = output_layer_keys(model)
        return [key for key in model.state_dict() if key not in head]


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedPer]
