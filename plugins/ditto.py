"""Ditto (Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021): FedAvg for the global model plus a personal model per client.

Variant (Algorithm 1 with every client in every round, the global solver being FedAvg): in each
round client i receives w^t and
  1. trains the global model from its view of w^t for `train.local_epochs` epochs exactly as
     FedAvg does (the module the engine passed ends holding it; it is what the server receives
     and averages, sample-weighted, buffers included), then
  2. trains its personal model v_i for `method.personal_epochs` epochs on
         task loss + lam/2 * ||v_i - w^t||^2
     over the trainable parameters (buffers are not penalised), on a deep copy of the model, with
     a fresh `train.optimizer` as every local update has.
v_i starts as the client's view of w^1 and never leaves the client; it is the model the client
is scored with (before its first round: the client's view). The global model trains first so it
draws its batches from the shuffling generator exactly as FedAvg's would from the same point;
the personal model then draws its own, later batches. Both trainings count into the client's
steps. Defaults: lam 0.1 (`method.lam`), one personal epoch (`method.personal_epochs`)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import LocalContext, Method, State, clone_state
from fedbench.tuning import Range

if TYPE_CHECKING:
    import torch
    from torch import nn


def proximal_term(model: nn.Module, anchor: State, lam: float) -> torch.Tensor:
    """lam/2 * sum of ||p - anchor[name]||^2 over the model's parameters found in `anchor`."""
    import torch

    squared = [
        (param - anchor[name]).pow(2).sum()
        for name, param in model.named_parameters()
        if name in anchor
    ]
    return 0.5 * lam * torch.stack(squared).sum()


def setting(config: dict[str, Any], key: str) -> Any:
    """The method setting `key`, from the run's config or else Ditto's default."""
    return config.get("method", {}).get(key, Ditto.defaults[key])


class Ditto(Method):
    """FedAvg on the global model; each client also keeps a personal model v_i pulled to w^t."""

    name = "ditto"
    description = "Ditto: FedAvg + a personal model per client pulled to the global one (lam)"
    defaults = {"lam": 0.1, "personal_epochs": 1}
    #: the paper's grid {0.05, 0.1, 0.2, 0.5, 1, 2} (Li et al., ICML 2021); personal_epochs
    #: sets the compute and is not tuned
    search_space = {"method.lam": Range(0.05, 2.0, log=True)}

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        #: client side: this client's personal model v_i (None before its first round)
        self.personal: State | None = None

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        lam, epochs = setting(config, "lam"), setting(config, "personal_epochs")
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not lam >= 0:
            raise FedbenchError(f"method.lam must be a number >= 0, got {lam!r}")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise FedbenchError(f"method.personal_epochs must be an integer >= 1, got {epochs!r}")

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """The FedAvg update on `model` (what is sent), then the personal model's update."""
        personal = self.personal_model(model)
        extras = super().local_update(model, ctx)
        self.train_personal(personal, ctx)
        self.personal = clone_state(personal.state_dict())
        return extras

    def personal_model(self, model: nn.Module) -> nn.Module:
        """A deep copy of `model` (the client's view of w^t) holding v_i when the client has one."""
        personal = copy.deepcopy(model)
        if self.personal is not None:
            personal.load_state_dict(self.personal)
        return personal

    def train_personal(self, personal: nn.Module, ctx: LocalContext) -> None:
        """`method.personal_epochs` epochs on the task loss plus lam/2 * ||v_i - w^t||^2."""
        lam = float(self.params["lam"])
        anchor = ctx.global_state

        def pull(m: nn.Module) -> torch.Tensor | None:
            return proximal_term(m, anchor, lam) if lam != 0.0 else None

        self.train_steps(personal, ctx, int(self.params["personal_epochs"]), penalty=pull)

    def personalized_state(self, client: int, state: State) -> State:
        return state if self.personal is None else self.personal

    def state_dict(self) -> dict[str, Any]:
        return {"personal": None if self.personal is None else clone_state(self.personal)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kept = state["personal"]
        self.personal = None if kept is None else clone_state(kept)


@hookimpl
def fedbench_methods() -> list[type]:
    return [Ditto]
