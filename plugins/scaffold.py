"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich and Suresh, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML 2020), Algorithm 1 with option II control variates.

Variant: every client takes part in every round (S = all N clients), global step size 1, plain
SGD locally (refused otherwise: option II's (x - y_i) / (K * eta) is the mean corrected gradient
only for plain SGD steps of size eta). Controls cover the trainable parameters: the server's c
and one c_i per client, all zero at the start. Each round the server sends x and c (c in the
server payload, so the bytes down count it); client i, from x, takes K = its local steps of
    y_i <- y_i - eta * (g(y_i) + c - c_i),
with the correction applied to the gradients (`adjust_gradients`), then sets
    c_i+ = c_i - c + (x - y_i) / (K * eta)
and sends y_i (its state) and delta c_i = c_i+ - c_i (extras, so the bytes up count them). The
server sets c <- c + (|S| / N) * mean_i delta c_i and, for every trainable parameter,
x <- mean_i y_i, the uniform mean over the clients as in the paper: c is the uniform mean of the
c_i, so the corrections pull towards the uniform-mean gradient, and a sample-weighted x would
average towards another objective than the one c corrects for. Buffers (normalization
statistics) have no control and are averaged as FedAvg does (sample-weighted): a statistic of
the pooled data is the sample-weighted mean of the clients' statistics. Everything is kept in
the parameters' dtype; the server means are taken in float64 and cast back once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedbench.hookspecs import hookimpl
from fedbench.method import (
    ClientUpdate,
    LocalContext,
    Method,
    State,
    clone_state,
    require_plain_sgd,
    weighted_mean,
)
from fedbench.tuning import Range

if TYPE_CHECKING:
    import torch
    from torch import nn


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters that train, by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def zeros_like_state(state: State) -> State:
    """A zero tensor shaped like each entry of `state`."""
    import torch

    return {key: torch.zeros_like(value) for key, value in state.items()}


def uniform_mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The unweighted mean of same-shaped tensors, in float64."""
    import torch

    return torch.stack([t.to(torch.float64) for t in tensors]).mean(0)


class Scaffold(Method):
    """FedAvg with SCAFFOLD's drift correction: server control c, client controls c_i."""

    name = "scaffold"
    description = "SCAFFOLD: control variates correct client drift (plain SGD only)"
    #: plain SGD's lr scale on this task (FedAvg's best SGD lr was 3.2 on a doubling grid,
    #: 6.4 diverged)
    search_space = {"train.lr": Range(0.1, 6.4, log=True)}

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        #: server side: c
        self.control: State = {}
        #: client side: this client's c_i (None: zero, before its first round) and c - c_i
        self.own_control: State | None = None
        self.correction: State = {}

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        require_plain_sgd(cls.name, config, "needs plain SGD")

    def shared_keys(self, model: nn.Module) -> list[str]:
        """Every key, as in FedAvg; also sets the server control c to zero once, since this is
        the one hook that sees the model before the first round."""
        if not self.control:
            self.control = zeros_like_state(trainable(model))
        return super().shared_keys(model)

    def server_payload(self, client: int) -> State:
        """c, the same for every client."""
        return self.control

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """K corrected SGD steps from x, then the new c_i; sends delta c_i."""
        x = {key: ctx.global_state[key] for key in trainable(model)}
        own = self.own_control
        if own is None:
            own = zeros_like_state(x)
        received = {key: ctx.received[key] for key in x}
        self.correction = {key: received[key] - own[key] for key in x}
        steps_before = ctx.steps
        super().local_update(model, ctx)
        steps, lr = ctx.steps - steps_before, float(ctx.train["lr"])
        new = self.new_control(own, received, x, trainable(model), steps, lr)
        self.own_control = new
        self.correction = {}
        return {key: new[key] - own[key] for key in new}

    @staticmethod
    def new_control(
        own: State, server: State, x: State, y: dict[str, torch.Tensor], steps: int, lr: float
    ) -> State:
        """Option II: c_i+ = c_i - c + (x - y_i) / (K * eta); c_i unchanged after no step."""
        if steps == 0:
            return clone_state(own)
        return {k: own[k] - server[k] + (x[k] - y[k].detach()) / (steps * lr) for k in own}

    def adjust_gradients(self, model: nn.Module, ctx: LocalContext) -> None:
        """g <- g + c - c_i on every trainable parameter."""
        for name, param in trainable(model).items():
            if param.grad is None:
                param.grad = self.correction[name].clone()
            else:
                param.grad.add_(self.correction[name])

    def server_update(self, previous: State, updates: list[ClientUpdate]) -> State:
        """x: uniform mean of the y_i (parameters), FedAvg's mean (buffers); c moves too."""
        self.update_control(updates)
        averaged = weighted_mean([u.state for u in updates], [u.num_samples for u in updates])
        for key in self.control:
            states = [u.state[key] for u in updates]
            averaged[key] = uniform_mean(states).to(states[0].dtype)
        return averaged

    def update_control(self, updates: list[ClientUpdate]) -> None:
        """c <- c + (|S| / N) * mean of the clients' delta c_i."""
        share = len(updates) / self.num_clients
        for key, value in self.control.items():
            step = uniform_mean([u.extras[key] for u in updates])
            self.control[key] = (value.to(step.dtype) + share * step).to(value.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {
            "control": clone_state(self.control),
            "own": None if self.own_control is None else clone_state(self.own_control),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.control = clone_state(state["control"])
        self.own_control = None if state["own"] is None else clone_state(state["own"])


@hookimpl
def fedbench_methods() -> list[type]:
    return [Scaffold]
