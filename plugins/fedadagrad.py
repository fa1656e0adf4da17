"""FedAdagrad (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2): FedAdam
(plugins/fedadam.py, same variant and state) with Adagrad's second moment, v <- v + delta^2.
Algorithm 2 keeps the momentum m for FedAdagrad too, so beta1 applies (default 0.9; set
method.beta1=0 for plain server Adagrad); there is no beta2."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbench.hookspecs import hookimpl
from fedbench_plugins.fedadam import FedAdam

if TYPE_CHECKING:
    import torch


class FedAdagrad(FedAdam):
    """FedAdam with the Adagrad second-moment rule (a running sum of squared changes)."""

    name = "fedadagrad"
    description = "FedAdagrad: server Adagrad on the mean client change (Reddi et al., 2021)"
    defaults = {"server_lr": 1e-2, "beta1": 0.9, "tau": 1e-3}

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        """Adagrad: v <- v + delta^2."""
        return v + squared


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedAdagrad]
