"""The Method base class (plugin API v3). The engine owns the loop; a method owns what differs
between FL methods, one overridable hook each.

The engine makes one instance of the method for the server and one for each client, as a
deployment would (`self.client` is None on the server's, the client's index on a client's). An
attribute set on one instance is seen by no other: all that passes between them is counted
messages, the shared state and `ClientUpdate.extras` up, the global state and
`server_payload(client)` down, each a copy. Each instance's `state_dict` is checkpointed.

- Client side: `local_update` (with `local_penalty` and `adjust_gradients` for the common
  variants), `after_local_update`, `final_update` (e.g. fine-tuning), `personalized_state` (the
  model the client keeps and is scored with).
- Server side: `server_payload` (extra tensors for one client), `server_update` (by default
  `aggregate`), `unseen_site_state` (what an unseen site receives).
- Both: `shared_keys` (which state is shared), `state_dict`/`load_state_dict`; on the class:
  `network` (the network it trains around the configured model) and `check_settings`.

The base class is FedAvg; `ServerOptimizer` is the base of server rules on the parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # torch loads when a run needs it, not when `fedbench list` reads the classes
    import torch
    from torch import nn

    from fedbench.data import Split
    from fedbench.task import Task

State = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class ClientUpdate:
    """All a client transmits to the server: its shared state, its sample count, the local steps
    it took and any extra tensors its method sends (all counted in the bytes up but the two
    numbers). `client` is the sender's index, which a real server knows too."""

    state: State
    num_samples: int
    extras: State = field(default_factory=dict)
    steps: int = 0
    client: int = -1


@dataclass
class LocalContext:
    """What a client's local update may use, all of it the client's own. `batches()` yields one
    epoch of shuffled (inputs, targets) batches of the client's train split (exactly
    `train.local_steps` batches when that is set); add every optimizer step to `steps` (the
    engine reports it as the client's cost)."""

    client: int
    split: Split
    task: Task
    train: dict[str, Any]
    #: the shared global state the client received this round (its own copy)
    global_state: State
    #: the extra tensors the server sent this client this round (`Method.server_payload`)
    received: State
    #: the client's own random stream (its batches are drawn from it too)
    generator: torch.Generator
    make_optimizer: Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    steps: int = 0
    #: the round, counting from 1 (`final_update`: the last round)
    round: int = 0
    #: the client's validation split (may be empty)
    val: Split | None = None
    #: the client's own full state as it ended its previous local update, before this round's
    #: global state was merged in (the initial model before its first round)
    own_state: State = field(default_factory=dict)
    #: the context the forward pass and loss run in (`train.precision`: bf16 autocast or none)
    autocast: Callable[[], AbstractContextManager] = nullcontext


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


def require_plain_sgd(name: str, config: dict[str, Any], why: str) -> None:
    """Refuse any optimizer but momentum-free SGD, for a method whose steps are the paper's
    plain gradient steps (a FedbenchError naming both settings)."""
    from fedbench.errors import FedbenchError

    train = config.get("train", {})
    optimizer, momentum = train.get("optimizer"), train.get("momentum")
    if optimizer != "sgd" or momentum != 0:
        raise FedbenchError(
            f"{name} {why}: set train.optimizer=sgd and train.momentum=0 "
            f"(got train.optimizer={optimizer}, train.momentum={momentum})"
        )


def trainable_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the trainable parameters (never buffers such as running statistics)."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def state_nbytes(state: State) -> int:
    """Bytes a state dict occupies on the wire (raw tensor payload)."""
    return sum(t.numel() * t.element_size() for t in state.values())


class Method:
    """FedAvg: every parameter and buffer is shared and averaged, weighted by sample count."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    default_adapter: ClassVar[str] = "none"
    defaults: ClassVar[dict[str, Any]] = {}
    #: the settings `fedbench tune` searches, besides the shared client learning rate
    #: (fedbench.tuning: {"method.mu": Range(1e-3, 1.0, log=True)}); empty: nothing of its own
    search_space: ClassVar[dict[str, Any]] = {}
    #: statistics of client data it sends, by message key (in extras up or payloads down), with
    #: what they are: {"amplitude": "amplitude spectra of its training images"}. Counted apart
    #: in the bytes, named on the board; the conformance kit fails one it finds undeclared
    shares_data: ClassVar[dict[str, str]] = {}
    #: False for methods that never build a global model (e.g. `local`)
    has_global_model: ClassVar[bool] = True
    #: True for pooled training: one virtual client holding every site's data (a reference, not FL)
    pooled: ClassVar[bool] = False
    #: methods a subclass must override (FedAvg, the base, needs none)
    required: ClassVar[tuple[str, ...]] = ()
    #: whose instance this is: None for the server's, the client's index for a client's
    client: int | None = None

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        self.params = {**self.defaults, **params}
        self.num_clients = num_clients

    @classmethod
    def network(cls, model: nn.Module, task: Task, config: dict[str, Any]) -> nn.Module:
        """The network the method trains and scores, made from the configured `model` (itself)."""
        return model

    def shared_keys(self, model: nn.Module) -> list[str]:
        """State-dict keys sent to and averaged by the server. Called once on every instance
        (server and clients), which must agree."""
        return list(model.state_dict())

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        """Raise a FedbenchError naming the setting when this method cannot run with `config`
        (e.g. SCAFFOLD wants plain SGD); called before any training."""

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """Client side: train `model` (holding the client's view: its own state with the
        global shared state merged in) and return the extra tensors to send; FedAvg sends
        none. Default: `train.local_epochs` passes of `train_steps` on every parameter (each
        pass `train.local_steps` batches when that is set)."""
        self.train_steps(model, ctx, int(ctx.train["local_epochs"]))
        return {}

    def train_steps(
        self,
        model: nn.Module,
        ctx: LocalContext,
        epochs: int,
        params: Iterable[torch.Tensor] | None = None,
        penalty: Callable[[nn.Module], torch.Tensor | None] | None = None,
    ) -> None:
        """The standard local loop: a fresh optimizer over `params` (default: all), `epochs`
        passes over the split, task loss plus `penalty(model)` (default: `local_penalty`),
        `adjust_gradients` before each step. A non-finite loss raises Diverged."""
        import torch

        from fedbench.errors import Diverged

        model.train()
        optimizer = ctx.make_optimizer(model.parameters() if params is None else params)
        extra = penalty or (lambda m: self.local_penalty(m, ctx.global_state))
        for _ in range(epochs):
            for inputs, targets in ctx.batches():
                optimizer.zero_grad(set_to_none=True)
                with ctx.autocast():
                    loss = ctx.task.loss(model(inputs), targets)
                    term = extra(model)
                    if term is not None:
                        loss = loss + term
                if not torch.isfinite(loss):
                    raise Diverged(f"loss became {loss.item()} in local training")
                loss.backward()
                self.adjust_gradients(model, ctx)
                optimizer.step()
                ctx.steps += 1

    def local_penalty(self, model: nn.Module, global_state: State) -> torch.Tensor | None:
        """An extra term added to the client's loss (FedProx's proximal term); None for none."""
        return None

    def adjust_gradients(self, model: nn.Module, ctx: LocalContext) -> None:
        """Change the gradients after backward, before the optimizer steps (SCAFFOLD's
        control-variate correction); nothing by default."""

    def server_payload(self, client: int) -> State:
        """Server side: extra tensors the server sends `client` this round, which it reads as
        `LocalContext.received` (counted in that client's bytes down); none by default."""
        return {}

    def server_update(self, previous: State, updates: list[ClientUpdate]) -> State:
        """Server side: the new global shared state from the previous one and the clients'
        updates. Default: `aggregate`, which ignores `previous` (FedAvg); server optimizers
        (FedAvgM, FedAdam) override this."""
        return self.aggregate(updates)

    def aggregate(self, updates: list[ClientUpdate]) -> State:
        """Sample-weighted mean of the clients' shared states."""
        return weighted_mean([u.state for u in updates], [u.num_samples for u in updates])

    def final_update(self, model: nn.Module, ctx: LocalContext) -> None:
        """Client side, once after the last round: a last local step on `model` (the client's
        personalized model), which it then keeps and is scored with (fine-tuning before
        scoring). Nothing is sent. Methods that do not override it keep their models as they
        are."""

    def after_local_update(self, client: int, state: State) -> None:
        """Client side: called with the client's state right after its local training in every
        round (a copy the client keeps; do not modify it)."""

    def state_dict(self) -> dict[str, Any]:
        """What this instance (the server's or one client's) remembers between rounds
        (tensors, numbers, lists, dicts): saved in checkpoints, restored on resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def personalized_state(self, client: int, state: State) -> State:
        """Client side: the model the client keeps and is scored with; `state` is its own state
        merged with the latest global shared parameters."""
        return state

    def unseen_site_state(self, state: State) -> State:
        """Server side: the global model an unseen site receives, from the engine's (the shared
        state, unshared keys filled by the clients' mean): FedRoD adjusts its generic head to the
        federation's class prior; unchanged by default."""
        return state


class ServerOptimizer(Method):
    """A server rule on the trainable parameters (FedAvgM, FedAdam, ...): Reddi et al. and Hsu et
    al. define their steps on model weights, so buffers (normalization statistics, counters)
    take FedAvg's sample-weighted mean. Subclasses define `server_step` for one parameter."""

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        self.parameter_keys: set[str] = set()

    def shared_keys(self, model: nn.Module) -> list[str]:
        """Every key, as in FedAvg; also notes which of them are trainable parameters."""
        self.parameter_keys = set(trainable_keys(model))
        return super().shared_keys(model)

    def server_update(self, previous: State, updates: list[ClientUpdate]) -> State:
        """FedAvg's mean for every key, then `server_step` on each parameter's float64 mean."""
        import torch

        from fedbench.errors import FedbenchError

        weights = [u.num_samples for u in updates]
        new = weighted_mean([u.state for u in updates], weights)
        if not self.parameter_keys and any(v.dtype.is_floating_point for v in new.values()):
            raise FedbenchError(
                f"{type(self).__name__}: server_update before shared_keys(model) named the "
                "parameters (call super().shared_keys in an override)"
            )
        keys = [k for k in new if k in self.parameter_keys and new[k].dtype.is_floating_point]
        if not keys:
            return new
        wide = weighted_mean(
            [{k: u.state[k].to(torch.float64) for k in keys} for u in updates], weights
        )
        for key in keys:
            new[key] = self.server_step(key, previous[key], wide[key]).to(previous[key].dtype)
        return new

    def server_step(self, key: str, previous: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """One parameter's new value (float64) from its previous value and the clients' float64
        mean; FedAvg's is the mean itself."""
        return mean
