"""FedAvgM (Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", 2019): FedAvg with momentum on the server.

Variant: heavy-ball momentum on the pseudo-gradient, with every client in every round,
    delta = previous - mean,   v <- beta * v + delta,   w <- previous - server_lr * v,
where `mean` is the sample-weighted mean of the client states and v starts at zero. The rule
applies to the trainable parameters (fedbench.method.ServerOptimizer); buffers (BatchNorm
running statistics, num_batches_tracked) take FedAvg's mean, since momentum on a running
variance can drive it below zero. Everything is computed in float64 from the float64 mean and
cast back once; since previous - delta = mean, the new state is
evaluated as mean + (1 - server_lr) * delta - server_lr * beta * v_old, which is the rule above
and is exactly FedAvg's state, bit for bit, when server_lr = 1 and beta = 0.
Defaults: server_lr 1.0, beta 0.9 (the momentum of the paper's FedAvgM experiments; it reports
the effective server rate server_lr / (1 - beta), so tune the two together)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import ServerOptimizer, State, clone_state
from fedbench.tuning import Choice, Range

if TYPE_CHECKING:
    import torch


def is_number(value: object) -> bool:
    """An int or float setting (a bool is no number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_positive(config: dict[str, Any], key: str) -> None:
    """Raise naming method.KEY unless it is a number above zero."""
    value = config["method"].get(key)
    if not is_number(value) or not value > 0:
        raise FedbenchError(f"method.{key} must be a number above 0, got {value!r}")


def check_fraction(config: dict[str, Any], key: str) -> None:
    """Raise naming method.KEY unless 0 <= value < 1 (a decay rate)."""
    value = config["method"].get(key)
    if not is_number(value) or not 0 <= value < 1:
        raise FedbenchError(f"method.{key} must be in [0, 1), got {value!r}")


class FedAvgM(ServerOptimizer):
    """Server momentum on the mean client change; v is kept per parameter in float64."""

    name = "fedavgm"
    description = "FedAvgM: server momentum (method.beta) with step method.server_lr"
    defaults = {"server_lr": 1.0, "beta": 0.9}
    #: the paper's momenta (Hsu et al. 2019), the server lr on Reddi et al.'s log grid
    #: 10^-3..10^0, so the effective rate server_lr / (1 - beta) spans both
    search_space = {
        "method.server_lr": Range(1e-3, 1.0, log=True),
        "method.beta": Choice((0.0, 0.7, 0.9, 0.97, 0.99, 0.997)),
    }

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        self.velocity: State = {}

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        check_positive(config, "server_lr")
        check_fraction(config, "beta")

    def server_step(self, key: str, previous: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """One parameter's new value (and its velocity updated) from its previous value and mean."""
        import torch

        lr, beta = float(self.params["server_lr"]), float(self.params["beta"])
        delta = previous.to(torch.float64) - mean
        old = self.velocity.get(key)
        if old is None:
            old = torch.zeros_like(delta)
        self.velocity[key] = beta * old + delta
        return mean + (1.0 - lr) * delta - (lr * beta) * old

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": clone_state(self.velocity)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.velocity = clone_state(state["velocity"])


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedAvgM]
