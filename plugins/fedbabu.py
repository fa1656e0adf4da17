"""FedBABU (Oh, Kim and Yun, "FedBABU: Towards Enhanced Representation for Federated Image
Classification", ICLR 2022): federate the body only, with the head frozen at its random
initialization, then fine-tune for personalization.

Variant: the head is the network's output layer (`output_layer_keys`); it never trains during
federated training, so every client holds the same initial head and the server averages it
unchanged (it is shared, so the unseen sites' model is the trained body with that head). The
body (everything else, normalization included) trains and is averaged sample-weighted as in
FedAvg. After the last round each client fine-tunes the whole network (body and head, the
paper's main setting) for `method.finetune_epochs` epochs on its train split and is scored with
it. Default: one fine-tuning epoch (the paper uses a few; raise it for that)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbench.hookspecs import hookimpl
from fedbench.method import LocalContext, State
from fedbench.models import output_layer_keys
from fedbench_plugins.fedavg_ft import FedAvgFT

if TYPE_CHECKING:
    from torch import nn


class FedBABU(FedAvgFT):
    """FedAvg-FT whose federated rounds train the body only, the head frozen at its init."""

    name = "fedbabu"
    description = "FedBABU: body federated, head frozen at init, then local fine-tuning"

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        head = output_layer_keys(model)
        body = [p for name, p in model.named_parameters() if name not in head]
        self.train_steps(model, ctx, int(ctx.train["local_epochs"]), params=body)
        return {}


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedBABU]
