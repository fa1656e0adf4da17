"""FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2), and the base
class of FedYogi and FedAdagrad (plugins/fedyogi.py, plugins/fedadagrad.py).

Variant: Algorithm 2 as written, with every client in every round and no bias correction:
    delta = mean - previous,   m <- beta1 * m + (1 - beta1) * delta,
    v <- beta2 * v + (1 - beta2) * delta^2                      (Adam; Yogi, Adagrad differ here)
    w <- previous + server_lr * m / (sqrt(v) + tau),
where `mean` is the sample-weighted mean of the client states (the paper's unweighted mean
over equal clients), m_0 = 0 and v_0 = tau^2 (the paper asks v_0 >= tau^2). The rule applies to
the trainable parameters (fedbench.method.ServerOptimizer); buffers (BatchNorm running
statistics, num_batches_tracked) take FedAvg's mean: the paper's rule is defined on model
weights, and stepping statistics left the global running variances near their initial values
while the clients' grew. m, v and the step count live in
float64 and in `state_dict`, so a resumed run continues bit for bit.
Defaults: beta1 0.9 and beta2 0.99 (the values the paper fixes in its experiments), tau 1e-3 and
server_lr 1e-2 (from the middle of the paper's tuning grids; the best pair depends on the task)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedbench.hookspecs import hookimpl
from fedbench.method import ClientUpdate, ServerOptimizer, State, clone_state
from fedbench.tuning import Range
from fedbench_plugins.fedavgm import check_fraction, check_positive

if TYPE_CHECKING:
    import torch


class FedAdam(ServerOptimizer):
    """Server Adam on the mean client change; subclasses override `second_moment` only."""

    name = "fedadam"
    description = "FedAdam: server Adam on the mean client change (Reddi et al., 2021)"
    defaults = {"server_lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    #: Reddi et al.'s log grids: server lr 10^-3..10^0, tau around its 1e-3 default (the
    #: betas fixed, as in the paper); FedYogi and FedAdagrad inherit it
    search_space = {
        "method.server_lr": Range(1e-3, 1.0, log=True),
        "method.tau": Range(1e-5, 1e-1, log=True),
    }

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        self.m: State = {}
        self.v: State = {}
        self.step = 0

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        for key in ("server_lr", "tau"):
            check_positive(config, key)
        for key in ("beta1", "beta2"):
            if key in cls.defaults:
                check_fraction(config, key)

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        """Adam: v <- beta2 * v + (1 - beta2) * delta^2."""
        beta2 = float(self.params["beta2"])
        return beta2 * v + (1.0 - beta2) * squared

    def server_update(self, previous: State, updates: list[ClientUpdate]) -> State:
        new = super().server_update(previous, updates)
        self.step += 1
        return new

    def server_step(self, key: str, previous: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """One parameter's new value (its m and v updated) from its previous value and mean."""
        import torch

        lr, beta1, tau = (float(self.params[k]) for k in ("server_lr", "beta1", "tau"))
        start = previous.to(torch.float64)
        delta = mean - start
        if key not in self.m:
            self.m[key] = torch.zeros_like(delta)
            self.v[key] = torch.full_like(delta, tau * tau)
        self.m[key] = beta1 * self.m[key] + (1.0 - beta1) * delta
        self.v[key] = self.second_moment(self.v[key], delta * delta)
        return start + lr * self.m[key] / (self.v[key].sqrt() + tau)

    def state_dict(self) -> dict[str, Any]:
        return {"m": clone_state(self.m), "v": clone_state(self.v), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m, self.v = clone_state(state["m"]), clone_state(state["v"])
        self.step = int(state["step"])


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedAdam]
