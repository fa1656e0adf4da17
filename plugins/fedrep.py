"""FedRep (Collins, Hassani, Mokhtari and Shakkottai, "Exploiting Shared Representations for
Personalized Federated Learning", ICML 2021): a shared body (representation) and a local head.

Variant: the head is the network's output layer (`output_layer_keys`: the last convolution or
linear layer, weight and bias) and never leaves the client; everything else, normalization
statistics included, is the body, shared and averaged (sample-weighted, as in FedAvg). Each local
update alternates as in the paper's Algorithm 1, from the client's own head and the global body:
  1. the head alone, for `method.head_epochs` epochs, the body frozen;
  2. the body alone, for `train.local_epochs` epochs, the head frozen.
Each phase has a fresh `train.optimizer` over the parameters it trains only, and the other
parameters stop requiring gradients for the phase (their flags are put back afterwards). The
frozen body's BatchNorm layers still normalise with batch statistics in phase 1, as in phase 2,
but their running statistics are restored after it, so phase 1 changes nothing but the head.
Clients are scored with the global body and their own head. An unseen site receives the global
body with the sample-weighted mean of the clients' heads (each sent once after the last round,
counted in the bytes up); by default the ensemble of that model and the personalized ones.
Default: one head epoch (the paper trains the head for several epochs per round, e.g. 10; raise
`method.head_epochs` for that)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import LocalContext, Method, State, clone_state
from fedbench.models import output_layer_keys

if TYPE_CHECKING:
    from torch import nn


class FedRep(Method):
    """Shares the body; each local update trains the head, then the body, never both at once."""

    name = "fedrep"
    description = "FedRep: local head trained first, then the shared body (method.head_epochs)"
    default_adapter = "ensemble"
    defaults = {"head_epochs": 1}

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        epochs = config.get("method", {}).get("head_epochs", cls.defaults["head_epochs"])
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise FedbenchError(f"method.head_epochs must be a whole number >= 0, got {epochs!r}")

    def shared_keys(self, model: nn.Module) -> list[str]:
        head = output_layer_keys(model)
        return [key for key in model.state_dict() if key not in head]

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """The head phase, then the body phase; nothing is sent beyond the body."""
        head = output_layer_keys(model)
        body = set(model.state_dict()) - head
        self.train_part(model, ctx, head, int(self.params["head_epochs"]))
        self.train_part(model, ctx, body, int(ctx.train["local_epochs"]))
        return {}

    def train_part(self, model: nn.Module, ctx: LocalContext, keys: set[str], epochs: int) -> None:
        """Train only the parameters named in `keys`; every other state entry ends unchanged."""
        if epochs == 0:
            return
        kept = clone_state({k: v for k, v in model.state_dict().items() if k not in keys})
        chosen = [p for name, p in model.named_parameters() if name in keys and p.requires_grad]
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        try:
            for name, param in model.named_parameters():
                param.requires_grad_(name in keys and flags[name])
            self.train_steps(model, ctx, epochs, params=chosen)
        finally:
            for name, param in model.named_parameters():
                param.requires_grad_(flags[name])
        model.load_state_dict(kept, strict=False)


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedRep]
