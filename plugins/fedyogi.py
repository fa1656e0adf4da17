"""FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2): FedAdam
(plugins/fedadam.py, same variant, state and defaults) with Yogi's second moment,
    v <- v - (1 - beta2) * delta^2 * sign(v - delta^2),
which moves v towards delta^2 by an additive step instead of Adam's multiplicative decay."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbench.hookspecs import hookimpl
from fedbench_plugins.fedadam import FedAdam

if TYPE_CHECKING:
    import torch


class FedYogi(FedAdam):
    """FedAdam with the Yogi second-moment rule."""

    name = "fedyogi"
    description = "FedYogi: server Yogi on the mean client change (Reddi et al., 2021)"

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        """Yogi: v <- v - (1 - beta2) * delta^2 * sign(v - delta^2)."""
        import torch

        beta2 = float(self.params["beta2"])
        return v - (1.0 - beta2) * squared * torch.sign(v - squared)


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedYogi]
