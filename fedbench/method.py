"""The Method base class. The engine owns the loop; a method owns what differs between FL methods:
which parameters are shared, the client's local objective, the server's aggregation and what each
client keeps. The base class is FedAvg."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # torch loads when a run needs it, not when `fedbench list` reads the classes
    import torch
    from torch import nn

State = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class ClientUpdate:
    """All a client transmits to the server: its shared parameters and its sample count."""

    state: State
    num_samples: int


def weighted_mean(states: list[State], weights: list[float]) -> State:
    """Weighted mean of state dicts, key by key; integer buffers are rounded back to their dtype."""
    import torch

    total = float(sum(weights))
    out: State = {}
    for key in states[0]:
        stacked = torch.stack(
            [s[key].to(torch.float64) * (w / total) for s, w in zip(states, weights, strict=True)]
        )
        mean = stacked.sum(0)
        dtype = states[0][key].dtype
        out[key] = (mean.round() if not dtype.is_floating_point else mean).to(dtype)
    return out


def clone_state(state: State) -> State:
    """A true copy of a state dict (never a reference to live module tensors)."""
    return {k: v.detach().clone() for k, v in state.items()}


def state_nbytes(state: State) -> int:
    """Bytes a state dict occupies on the wire (raw tensor payload)."""
    return sum(t.numel() * t.element_size() for t in state.values())


class Method:
    """FedAvg: every parameter and buffer is shared and averaged, weighted by sample count."""

    name: ClassVar[str] = "fedavg"
    description: ClassVar[str] = ""
    default_adapter: ClassVar[str] = "none"
    defaults: ClassVar[dict[str, Any]] = {}
    #: False for methods that never build a global model (e.g. `local`)
    has_global_model: ClassVar[bool] = True
    #: True for pooled training: one virtual client holding every site's data (a reference, not FL)
    pooled: ClassVar[bool] = False
    required: ClassVar[tuple[str, ...]] = ("shared_keys", "aggregate", "personalized_state")

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        self.params = {**self.defaults, **params}
        self.num_clients = num_clients

    def shared_keys(self, model: nn.Module) -> list[str]:
        """State-dict keys sent to and averaged by the server."""
        return list(model.state_dict())

    def local_penalty(self, model: nn.Module, global_state: State) -> torch.Tensor | None:
        """An extra term added to the client's loss (FedProx's proximal term); None for none."""
        return None

    def aggregate(self, updates: list[ClientUpdate]) -> State:
        """Server side: sample-weighted mean of the clients' shared states."""
        return weighted_mean([u.state for u in updates], [u.num_samples for u in updates])

    def after_local_update(self, client: int, state: State) -> None:
        """Called with a client's state right after its local training in every round."""

    def state_dict(self) -> dict[str, Any]:
        """What the method itself remembers between rounds (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def personalized_state(self, client: int, state: State) -> State:
        """The model a client keeps and is scored with; `state` is its own state merged with the
        latest global shared parameters."""
        return state
