"""Per-FedAvg (Fallah, Mokhtari and Ozdaglar, "Personalized Federated Learning with Theoretical
Guarantees: A Model-Agnostic Meta-Learning Approach", NeurIPS 2020), first-order variant
(Per-FedAvg (FO)): the federation learns an initialization from which one gradient step on a
client's own data gives that client a good model.

Variant (Algorithm 1 with the FO gradient estimate; the server is FedAvg's):
client i receives w and, for each local step, takes two batches D and D' and
    temp = w - alpha * grad f_i(w; D),     w <- w - beta * grad f_i(temp; D')
(the gradient evaluated at temp, applied to w; alpha: `method.alpha`, beta: `train.lr`). The
batches are those of `train.local_epochs` shuffled passes (`LocalContext.batches`): every batch of
a pass is D' of one step, in the order FedAvg would step on them, and D is the batch after it in
the same pass (the first batch for the last step; D = D' only when a pass has a single batch), so
D and D' share no sample (but across a reshuffle within `train.local_steps`) and a pass takes as
many steps as FedAvg's, each sample in one D and one D' (PFLlib's implementation instead splits
each double-size batch into D and D': half the steps).
The step on w is plain SGD (the paper's), so Per-FedAvg refuses any `train.optimizer` but SGD
with momentum 0. The forward on D leaves the normalization statistics as they were; only the
forward on D' (at temp) updates them (the release lets both update). So with alpha 0 every local
step is FedAvg's SGD step exactly. Each local step counts two steps (two gradients), so the
client's steps are twice FedAvg's. The server takes the sample-weighted mean of every key, as
FedAvg does.

Personalization (`final_update`, once after the last round): from the global model, each client
takes `method.personal_steps` plain gradient steps of size alpha on batches of its train split
(the first batches of a shuffled pass; more passes when it asks more steps than a pass has) and
is scored with the result: the paper's one step of adaptation (default 1; 0 scores the global
model). Default alpha: "lr", `train.lr` (alpha = beta: the paper's step sizes do not carry over
to this task); a number sets it apart."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import LocalContext, Method, State, require_plain_sgd
from fedbench.tuning import Choice, Range

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedbench.task import Task

Batch = tuple["torch.Tensor", "torch.Tensor"]


def step_pairs(batches: Iterator[Batch]) -> Iterator[tuple[Batch, Batch]]:
    """(D, D') for each batch D' of one pass: D is the next batch, the first after the last."""
    first = previous = next(batches, None)
    if first is None:
        return
    for batch in batches:
        yield batch, previous
        previous = batch
    yield first, previous


def loss_of(model: nn.Module, task: Task, batch: Batch, autocast: Callable[[], Any]) -> Any:
    """The task loss of `model` on `batch`; a non-finite one raises Diverged."""
    import torch

    from fedbench.errors import Diverged

    inputs, targets = batch
    with autocast():
        loss = task.loss(model(inputs), targets)
    if not torch.isfinite(loss):
        raise Diverged(f"loss became {loss.item()} in Per-FedAvg's local training")
    return loss


def meta_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    task: Task,
    adapt: Batch,
    meta: Batch,
    alpha: float,
    autocast: Callable[[], Any],
) -> None:
    """One Per-FedAvg (FO) step on `model` (w): the gradient on `meta` at
    temp = w - alpha * grad f(w; adapt), applied to w by `optimizer` (buffers: the meta
    forward's)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    buffers = [b.detach().clone() for b in model.buffers()]
    grads = torch.autograd.grad(loss_of(model, task, adapt, autocast), params)
    with torch.no_grad():
        for param, grad in zip(params, grads, strict=True):
            param -= alpha * grad
        for buffer, kept in zip(model.buffers(), buffers, strict=True):
            buffer.copy_(kept)
    optimizer.zero_grad(set_to_none=True)
    loss_of(model, task, meta, autocast).backward()
    with torch.no_grad():
        for param, kept in zip(params, start, strict=True):
            param.copy_(kept)
    optimizer.step()


def alpha_value(value: Any, train: dict[str, Any]) -> float:
    """alpha: `train.lr` for "lr", else the number `value`; a FedbenchError naming
    `method.alpha` when it is neither a number >= 0."""
    if value == "lr":
        return float(train["lr"])
    try:
        if isinstance(value, bool):
            raise ValueError
        alpha = float(value)
    except (TypeError, ValueError):
        alpha = float("nan")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise FedbenchError(f'method.alpha must be "lr" or a number >= 0, got {value!r}')
    return alpha


class PerFedAvg(Method):
    """FedAvg with MAML's first-order local steps, then one adaptation step before scoring."""

    name = "perfedavg"
    description = "Per-FedAvg (FO): first-order MAML steps, one step of adaptation (alpha)"
    defaults = {"alpha": "lr", "personal_steps": 1}
    #: SGD's lr scale (as scaffold's); alpha "lr" (train.lr) or a step on that scale (the
    #: paper's alpha does not carry over); personal_steps sets the compute, not tuned
    search_space = {
        "train.lr": Range(0.1, 6.4, log=True),
        "method.alpha": Choice(("lr", 0.1, 0.4, 1.6, 6.4)),
    }

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        train = config.get("train", {})
        require_plain_sgd(cls.name, config, "takes plain gradient steps")
        method = config.get("method", {})
        alpha_value(method.get("alpha", cls.defaults["alpha"]), {"lr": train.get("lr", 0.0)})
        steps = method.get("personal_steps", cls.defaults["personal_steps"])
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise FedbenchError(f"method.personal_steps must be an integer >= 0, got {steps!r}")

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """`train.local_epochs` passes of Per-FedAvg (FO) steps on `model`."""
        alpha = alpha_value(self.params["alpha"], ctx.train)
        model.train()
        optimizer = ctx.make_optimizer(model.parameters())
        for _ in range(int(ctx.train["local_epochs"])):
            for adapt, meta in step_pairs(ctx.batches()):
                meta_step(model, optimizer, ctx.task, adapt, meta, alpha, ctx.autocast)
                ctx.steps += 2
        return {}

    def final_update(self, model: nn.Module, ctx: LocalContext) -> None:
        """`method.personal_steps` SGD steps of size alpha from the global model."""
        import torch

        steps = int(self.params["personal_steps"])
        if steps == 0:
            return
        model.train()
        optimizer = torch.optim.SGD(
            model.parameters(), lr=alpha_value(self.params["alpha"], ctx.train)
        )
        taken = 0
        while taken < steps:
            before = taken
            for batch in ctx.batches():
                optimizer.zero_grad(set_to_none=True)
                loss_of(model, ctx.task, batch, ctx.autocast).backward()
                optimizer.step()
                ctx.steps += 1
                taken += 1
                if taken == steps:
                    return
            if taken == before:  # no batches: nothing to adapt on
                return


@hookimpl
def fedbench_methods() -> list[type]:
    return [PerFedAvg]
