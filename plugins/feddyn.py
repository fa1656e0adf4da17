"""FedDyn (Acar, Zhao, Matas, Mattina, Whatmough and Saligrama, "Federated Learning Based on
Dynamic Regularization", ICLR 2021), Algorithm 1: every client in every round by default; with
`train.clients_per_round` the paper's partial participation (means over the round's clients).

Variant: over the trainable parameters theta, client i, from the server's theta^{t-1}, trains
`train.local_epochs` epochs of `train.optimizer` on the dynamically regularized objective
    L_i(theta) - <g_i, theta> + alpha/2 * ||theta - theta^{t-1}||^2
(`local_penalty`'s place: the two terms are added to the task loss of every batch), then updates
its state g_i <- g_i - alpha * (theta_i - theta^{t-1}) (g_i, the gradient of L_i at the client's
last model, starts at zero and never leaves the client). The server updates
    h <- h - alpha/m * sum_i (theta_i - theta^{t-1}),   theta^t = mean_i theta_i - h / alpha,
with m the number of all clients (h starts at zero) and the uniform mean over the round's clients,
as in the paper (not sample-weighted: FedDyn's objective is the plain mean of the clients' losses).
Buffers (normalization statistics, counts) are not optimized: they take FedAvg's sample-weighted
mean, integer counts rounded. With alpha = 0, g_i and h stay zero and the server returns the
mean (no division by alpha), so the run is FedAvg's whenever the sites are of equal size. h is
kept in float64 and g_i in the parameters' dtype; the means are taken in float64 and cast back
once. Default: alpha 0.01 (`method.alpha`, from the paper's grid {0.1, 0.01, 0.001})."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import ClientUpdate, LocalContext, Method, State, clone_state, weighted_mean
from fedbench.tuning import Range

if TYPE_CHECKING:
    import torch
    from torch import nn


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters that train, by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def dynamic_term(
    model: nn.Module, grads: State, anchor: State, alpha: float
) -> torch.Tensor | None:
    """-<g, theta> + alpha/2 * ||theta - anchor||^2 over the parameters named in `grads`."""
    import torch

    params = trainable(model)
    terms = [
        alpha / 2 * (params[k] - anchor[k]).pow(2).sum() - (grads[k] * params[k]).sum()
        for k in grads
    ]
    return torch.stack(terms).sum() if terms else None


def updated_gradient(grads: State, theta: State, anchor: State, alpha: float) -> State:
    """The client's new state: g_i - alpha * (theta_i - theta^{t-1})."""
    return {k: grads[k] - alpha * (theta[k].detach() - anchor[k]) for k in grads}


def uniform_mean(states: list[State]) -> State:
    """The unweighted mean of the clients' states, in float64."""
    import torch

    wide = [{k: v.to(torch.float64) for k, v in s.items()} for s in states]
    return weighted_mean(wide, [1.0] * len(wide))


def server_step(
    h: State, previous: State, states: list[State], alpha: float, num_clients: int
) -> tuple[State, State]:
    """(new h, new theta) in float64: h - alpha/m * sum_i (theta_i - previous) and
    mean_i theta_i - h_new / alpha, for every key of `previous`."""
    import torch

    mean = uniform_mean([{k: s[k] for k in previous} for s in states])
    new_h: State = {}
    for key, value in previous.items():
        start = value.to(torch.float64)
        drift = torch.stack([s[key].to(torch.float64) - start for s in states]).sum(0)
        old = h.get(key, torch.zeros_like(start))
        new_h[key] = old - (alpha / num_clients) * drift
    return new_h, {k: mean[k] - new_h[k] / alpha for k in previous}


class FedDyn(Method):
    """Clients correct their objective with g_i; the server keeps h and shifts the mean by it."""

    name = "feddyn"
    description = "FedDyn: dynamic regularization (method.alpha) of each client's objective"
    defaults = {"alpha": 0.01}
    #: the paper's grid {0.1, 0.01, 0.001} (Acar et al., ICLR 2021)
    search_space = {"method.alpha": Range(1e-3, 0.1, log=True)}

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        #: client side: this client's g_i (None before its first round)
        self.grads: State | None = None
        #: server side: h
        self.h: State = {}
        self.param_keys: list[str] = []

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        alpha = config.get("method", {}).get("alpha", cls.defaults["alpha"])
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha >= 0:
            raise FedbenchError(f"method.alpha must be a number >= 0, got {alpha!r}")

    def shared_keys(self, model: nn.Module) -> list[str]:
        """Every key, as in FedAvg; also notes which keys are trainable parameters."""
        self.param_keys = list(trainable(model))
        return super().shared_keys(model)

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """The regularized local training, then g_i's update; nothing extra is sent."""
        import torch

        alpha = float(self.params["alpha"])
        params = trainable(model)
        grads = self.grads or {k: torch.zeros_like(p) for k, p in params.items()}
        anchor = {k: ctx.global_state[k] for k in grads}

        def penalty(m: nn.Module) -> torch.Tensor | None:
            return dynamic_term(m, grads, anchor, alpha)

        self.train_steps(model, ctx, int(ctx.train["local_epochs"]), penalty=penalty)
        self.grads = updated_gradient(grads, trainable(model), anchor, alpha)
        return {}

    def server_update(self, previous: State, updates: list[ClientUpdate]) -> State:
        """Parameters: FedDyn's shifted uniform mean; buffers: FedAvg's mean."""
        states = [u.state for u in updates]
        out = weighted_mean(states, [u.num_samples for u in updates])
        keys = [k for k in self.param_keys if k in previous]
        alpha = float(self.params["alpha"])
        if alpha == 0.0:
            params = uniform_mean([{k: s[k] for k in keys} for s in states])
        else:
            self.h, params = server_step(
                self.h, {k: previous[k] for k in keys}, states, alpha, self.num_clients
            )
        out.update({k: params[k].to(previous[k].dtype) for k in keys})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "grads": None if self.grads is None else clone_state(self.grads),
            "h": clone_state(self.h),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.grads = None if state["grads"] is None else clone_state(state["grads"])
        self.h = clone_state(state["h"])


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedDyn]
