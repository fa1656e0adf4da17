"""FedProx (Li et al., 2020): FedAvg plus a proximal term mu/2 * ||w - w_global||^2 locally."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbench.hookspecs import hookimpl
from fedbench.method import Method, State
from fedbench.tuning import Range

if TYPE_CHECKING:
    import torch
    from torch import nn


class FedProx(Method):
    """Clients are pulled towards the round's global model; with mu = 0 this is FedAvg exactly."""

    name = "fedprox"
    description = "FedProx: FedAvg with a proximal term (method.mu) in the local objective"
    defaults = {"mu": 0.01}
    #: the paper's grid {0.001, 0.01, 0.1, 1} (Li et al., MLSys 2020)
    search_space = {"method.mu": Range(1e-3, 1.0, log=True)}

    def local_penalty(self, model: nn.Module, global_state: State) -> torch.Tensor | None:
        import torch

        mu = float(self.params["mu"])
        if mu == 0.0:
            return None
        squared = [
            (param - global_state[name]).pow(2).sum()
            for name, param in model.named_parameters()
            if name in global_state
        ]
        return 0.5 * mu * torch.stack(squared).sum()


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedProx]
