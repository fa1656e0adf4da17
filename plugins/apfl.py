"""APFL (Deng, Kamani and Mahdavi, "Adaptive Personalized Federated Learning", arXiv 2003.13461,
2020): each client learns a personal model v_i and is scored with the mixture of it and the
global model, alpha_i * v_i + (1 - alpha_i) * w.

Variant (Algorithm 1, each local step on one batch; with `train.clients_per_round`, only the
round's clients train v_i and alpha_i):
client i receives w, copies it to w_i and, for every batch of `train.local_epochs` epochs,
  1. v_i takes one `train.optimizer` step on the task loss of the mixed model
     alpha_i * v_i + (1 - alpha_i) * w_i (parameters mixed; w_i is detached, so only v_i moves:
     its gradient is alpha_i times the mixed model's), with w_i as it was before this batch;
  2. with `method.adaptive` (the default), alpha_i <- clip(alpha_i - eta * <v_i - w_i, grad>,
     0, 1), the paper's gradient step on alpha_i (grad: the mixed model's, taken at the same point
     as 1; the clip keeps it in [0, 1] as the paper requires);
  3. w_i takes the step FedAvg takes on the same batch (the default `train_steps`, bit for bit
     FedAvg's, so the server receives exactly FedAvg's update; v_i never leaves the client).
The server averages the w_i as FedAvg does (sample-weighted, buffers included). v_i starts as the
client's view of w in its first round and keeps its own normalization statistics, tracked by the
mixed model's training forwards. Each client is scored with
    alpha_i * v_i + (1 - alpha_i) * w   on every key of the state dict:
floating keys (parameters and BatchNorm running statistics) are mixed in float64 and cast back;
integer buffers (num_batches_tracked) take the rounded mix, so alpha 0 gives w's and alpha 1
v_i's counts exactly. Before its first round a client is scored with w. v_i's optimizer is
fresh every round, as w's is; its steps count into the client's steps (so twice FedAvg's).
A model with dropout would draw v_i's masks from the same torch RNG as w_i's, so w_i would then
differ from FedAvg's.

Defaults: adaptive alpha (`method.adaptive`, the paper's headline: its Algorithm 1 updates alpha_i
in every local step), starting at 0.5 (`method.alpha`, the middle of the paper's fixed values
0.25, 0.5, 0.75); `method.adaptive=false` keeps alpha_i fixed at `method.alpha`. The step size eta
(`method.alpha_lr`) is "lr": `train.lr`, the models' step size, as in the paper (one eta_t for w,
v and alpha) and in the authors' code (FedTorch passes the models' learning rate to its alpha
update); a number sets it apart. With Adam (the presets' optimizer) the models' steps are Adam's
and alpha's stays the paper's plain gradient step. The authors' code steps alpha once per round
(first batch) and adds 0.02 * alpha to its gradient; neither is in the paper, and neither is
done here."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import LocalContext, Method, State, clone_state
from fedbench.tuning import Choice

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedbench.task import Task


def mix_states(personal: State, shared: State, alpha: float) -> State:
    """alpha * personal + (1 - alpha) * shared, key by key, in float64; integer keys rounded."""
    import torch

    out: State = {}
    for key, value in shared.items():
        mixed = alpha * personal[key].to(torch.float64) + (1.0 - alpha) * value.to(torch.float64)
        out[key] = (mixed if value.dtype.is_floating_point else mixed.round()).to(value.dtype)
    return out


def mixed_step(
    shared: nn.Module,
    personal: nn.Module,
    optimizer: torch.optim.Optimizer,
    task: Task,
    batch: tuple[torch.Tensor, torch.Tensor],
    alpha: float,
) -> float:
    """One step of `personal` on the loss of alpha * personal + (1 - alpha) * shared (shared
    detached); returns d loss / d alpha = <v - w, grad of the mixed model>."""
    import torch
    from torch.func import functional_call

    from fedbench.errors import Diverged

    fixed = dict(shared.named_parameters())
    first = next(iter(fixed.values()))
    weight = torch.tensor(alpha, dtype=first.dtype, device=first.device, requires_grad=True)
    mixed = {
        name: weight * param + (1.0 - weight) * fixed[name].detach()
        for name, param in personal.named_parameters()
    }
    optimizer.zero_grad(set_to_none=True)
    inputs, targets = batch
    loss = task.loss(functional_call(personal, mixed, (inputs,)), targets)
    if not torch.isfinite(loss):
        raise Diverged(f"loss became {loss.item()} in APFL's personal training")
    loss.backward()
    optimizer.step()
    assert weight.grad is not None
    return float(weight.grad.item())


def number(config: dict[str, Any], key: str) -> Any:
    """The method setting `key`, from the run's config or else APFL's default."""
    return config.get("method", {}).get(key, APFL.defaults[key])


def alpha_rate(value: Any, train: dict[str, Any]) -> float:
    """alpha's step size: `train.lr` for "lr", else the number `value` (a command line gives
    it as text); a FedbenchError naming `method.alpha_lr` when it is neither a number >= 0."""
    if value == "lr":
        return float(train["lr"])
    try:
        if isinstance(value, bool):
            raise ValueError
        rate = float(value)
    except (TypeError, ValueError):
        rate = float("nan")
    if not (math.isfinite(rate) and rate >= 0):
        raise FedbenchError(f'method.alpha_lr must be "lr" or a number >= 0, got {value!r}')
    return rate


class APFL(Method):
    """FedAvg on w; each client also trains v_i inside the mixture and is scored with it."""

    name = "apfl"
    description = "APFL: a personal model mixed with the global one, adaptive alpha (method.alpha)"
    defaults = {"alpha": 0.5, "adaptive": True, "alpha_lr": "lr"}
    #: the paper's fixed mixing weights {0.25, 0.5, 0.75} (Deng et al. 2020), here alpha's
    #: start; adaptive (a variant switch) and alpha_lr (the paper's eta) are not tuned
    search_space = {"method.alpha": Choice((0.25, 0.5, 0.75))}

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        #: client side: this client's personal model v_i (None before its first round), alpha_i
        self.personal: State | None = None
        self.alpha = float(self.params["alpha"])

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        alpha, adaptive = number(config, "alpha"), number(config, "adaptive")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
            raise FedbenchError(f"method.alpha must be a number in [0, 1], got {alpha!r}")
        if not isinstance(adaptive, bool):
            raise FedbenchError(f"method.adaptive must be true or false, got {adaptive!r}")
        alpha_rate(number(config, "alpha_lr"), {"lr": config.get("train", {}).get("lr", 0.0)})

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """FedAvg's update of `model` (w_i), with a step of v_i before each of its steps."""
        personal = copy.deepcopy(model)
        if self.personal is not None:
            personal.load_state_dict(self.personal)
        personal.train()
        optimizer = ctx.make_optimizer(personal.parameters())

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for batch in ctx.batches():
                self.personal_step(model, personal, optimizer, ctx, batch)
                yield batch

        inner = dataclasses.replace(ctx, batches=batches, steps=0)
        extras = super().local_update(model, inner)
        ctx.steps += inner.steps
        self.personal = clone_state(personal.state_dict())
        return extras

    def personal_step(
        self,
        shared: nn.Module,
        personal: nn.Module,
        optimizer: torch.optim.Optimizer,
        ctx: LocalContext,
        batch: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """v_i's step on the mixed model, then (adaptive) alpha_i's projected gradient step."""
        grad = mixed_step(shared, personal, optimizer, ctx.task, batch, self.alpha)
        ctx.steps += 1
        if self.params["adaptive"]:
            self.move_alpha(grad, alpha_rate(self.params["alpha_lr"], ctx.train))

    def move_alpha(self, grad: float, rate: float) -> None:
        """alpha_i <- clip(alpha_i - rate * grad, 0, 1)."""
        self.alpha = min(1.0, max(0.0, self.alpha - rate * grad))

    def personalized_state(self, client: int, state: State) -> State:
        stored = self.personal
        return state if stored is None else mix_states(stored, state, self.alpha)

    def state_dict(self) -> dict[str, Any]:
        return {
            "personal": None if self.personal is None else clone_state(self.personal),
            "alpha": self.alpha,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kept = state["personal"]
        self.personal = None if kept is None else clone_state(kept)
        self.alpha = float(state["alpha"])


@hookimpl
def fedbench_methods() -> list[type]:
    return [APFL]
