"""FedIIR (Guo, Guo, Cao, Wu and Chang, "Out-of-Distribution Generalization of Federated Learning
via Implicit Invariant Relationships", ICML 2023): FedAvg whose clients align the gradients of the
classifier (the output layer) with the federation's mean gradient, so that what the classifier
learns from the features holds at every site, for a model that generalizes to sites never seen.

Variant: the server is FedAvg (every key, sample-weighted mean). Client i's loss on a batch is
    L_i(theta) + gamma * sum_k || dL_i/dw_k (theta) - gbar_k ||^2,
w_k the output layer's parameters (`fedbench.models.output_layer`: its weight and bias), L_i the
task loss of the batch as training computes it, its gradient taken with create_graph so the
penalty trains every parameter (second order through the whole network). gbar is one global
reference, the same for every client: the server's exponential moving average of the clients'
classifier gradients,
    gbar <- ema * gbar + (1 - ema) * sum_i n_i g_i / sum_i n_i,   gbar = 0 at the start,
over the round's clients (n_i their sample counts), where g_i is the gradient of the task loss
at the round's start model theta^r (the global model it received, before any local step) on
client i's train split, in order, in batches of `train.batch_size` weighted by size (a trailing
batch of one sample left out, as training leaves it out), in train mode (batch statistics, as
in training; the running statistics are left as they were). Client i computes g_i before its
local epochs and sends it with its update (`ClientUpdate.extras`, counted in the bytes up); the
server sends gbar to every client the next round (`server_payload`, counted in the bytes down);
before the server has one the client aligns with gbar = 0, the moving average's start. gamma
holds over the whole run (no schedule: the authors' code has none).

What differs from the authors' code (YamingGuo98/FedIIR, which defines the moving average, the
penalty as gamma times the plain squared norm, and gbar = 0 at the start): it computes the
gradients at theta^r and their average before the round's local updates, an extra exchange per
round; here g_i(theta^r) travels with round r's update, so round r + 1 aligns with the average
up to theta^r, one round older. It weighs every batch of every client alike (the sample-weighted
mean when batches are full). On segmentation the classifier, a linear head on image features in
the paper, is the network's output layer, so each g_i is the gradient of the pixel-wise loss
(Dice + cross-entropy by default) for the last convolution, which maps each position's features
to class scores. Defaults: gamma 1e-3 and ema 0.95 (the code's default penalty and EMA; its
per-dataset penalties run from 5e-4 to 1e-2 on the grid 1e-4 .. 1e-2). With gamma 0 the run is
FedAvg's, bit for bit (nothing computed, nothing sent)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import ClientUpdate, LocalContext, Method, State, clone_state, weighted_mean
from fedbench.models import output_layer
from fedbench.tuning import Range

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedbench.task import Task


def classifier_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The output layer's parameters, by state-dict key (`output_layer_keys`' parameters)."""
    prefix, layer = output_layer(model)
    return {f"{prefix}.{n}" if prefix else n: p for n, p in layer.named_parameters()}


def alignment_penalty(
    loss: torch.Tensor, params: dict[str, torch.Tensor], reference: State, gamma: float
) -> torch.Tensor:
    """gamma * sum_k ||d loss / d params_k - reference_k||^2, differentiable in the model (the
    gradients are taken with create_graph)."""
    import torch

    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    squared = [(g - reference[k].to(g)).pow(2).sum() for k, g in zip(params, grads, strict=True)]
    return gamma * torch.stack(squared).sum()


def split_gradient(model: nn.Module, ctx: LocalContext) -> State:
    """The task loss's gradient for the output layer at `model` on the client's train split, in
    order, in batches of `train.batch_size` weighted by size (a trailing batch of one sample left
    out, as training leaves it out); train mode, the running statistics restored afterwards."""
    import torch

    params = classifier_parameters(model)
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    size, whole = int(ctx.train["batch_size"]), len(ctx.split)
    batches = [b for b in ctx.split.batches(size) if len(b[0]) > 1 or whole == 1]
    count = sum(len(inputs) for inputs, _ in batches)
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.train()
    try:
        for inputs, targets in batches:
            with ctx.autocast():
                loss = ctx.task.loss(model(inputs), targets)
            grads = torch.autograd.grad(loss, list(params.values()))
            for t, g in zip(total.values(), grads, strict=True):
                t.add_(g.detach() * (len(inputs) / count))
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])
    return total


class Noting:
    """A task whose `loss` notes the latest loss it returned (`latest`); the rest is the task's."""

    def __init__(self, task: Task) -> None:
        self.task, self.latest = task, None

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.latest = self.task.loss(outputs, targets)
        return self.latest

    def __getattr__(self, name: str) -> Any:
        if name == "task":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.task, name)


@contextmanager
def noting_loss(ctx: LocalContext) -> Iterator[Noting]:
    """While open, `ctx.task` notes each batch's task loss, so the penalty differentiates the
    very loss training minimizes (no second forward pass)."""
    task = ctx.task
    noting = Noting(task)
    ctx.task = noting  # type: ignore[assignment]
    try:
        yield noting
    finally:
        ctx.task = task


def number(config: dict[str, Any], key: str) -> Any:
    """The method setting `key`, from the run's config or else FedIIR's default."""
    return config.get("method", {}).get(key, FedIIR.defaults[key])


def is_number(value: Any) -> bool:
    """A real number (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, int | float)


class FedIIR(Method):
    """FedAvg plus gamma * ||g_i - gbar||^2 on the output layer's gradient."""

    name = "fediir"
    description = "FedIIR: align the output layer's gradients with the federation's (method.gamma)"
    defaults = {"gamma": 1e-3, "ema": 0.95}
    #: log-uniform over the authors' penalty grid {1e-4, 5e-4, 1e-3, 5e-3, 1e-2}
    search_space = {"method.gamma": Range(1e-4, 1e-2, log=True)}

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        #: server side: gbar, the moving average of the clients' gradients (None before any)
        self.mean: State | None = None

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        gamma, ema = number(config, "gamma"), number(config, "ema")
        if not is_number(gamma) or not gamma >= 0:
            raise FedbenchError(f"method.gamma must be a number >= 0, got {gamma!r}")
        if not is_number(ema) or not 0 <= ema < 1:
            raise FedbenchError(f"method.ema must be a number in [0, 1), got {ema!r}")

    def server_payload(self, client: int) -> State:
        """gbar, once there is one."""
        return {} if self.mean is None else clone_state(self.mean)

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """g_i at the round's start model, then FedAvg's local epochs with the alignment
        penalty; g_i is sent up."""
        gamma = float(self.params["gamma"])
        if gamma == 0.0:
            return super().local_update(model, ctx)
        sent = split_gradient(model, ctx)
        reference = self.reference(sent, ctx.received)
        params = classifier_parameters(model)
        with noting_loss(ctx) as noting:

            def term(m: nn.Module) -> torch.Tensor:
                return alignment_penalty(noting.latest, params, reference, gamma)

            self.train_steps(model, ctx, int(ctx.train["local_epochs"]), penalty=term)
        return sent

    @staticmethod
    def reference(like: State, received: State) -> State:
        """gbar as the server sent it, or zeros shaped like the classifier before it has one."""
        import torch

        if all(k in received for k in like):
            return {k: received[k] for k in like}
        return {k: torch.zeros_like(v) for k, v in like.items()}

    def server_update(self, previous: State, updates: list[ClientUpdate]) -> State:
        """FedAvg's mean of the models; gbar moves towards the sample-weighted mean of the
        gradients sent."""
        sent = [u for u in updates if u.extras]
        if sent:
            self.mean = self.averaged(sent)
        return self.aggregate(updates)

    def averaged(self, sent: list[ClientUpdate]) -> State:
        """ema * gbar + (1 - ema) * the round's mean, in float64, cast to the gradients' dtype."""
        import torch

        ema = float(self.params["ema"])
        wide = [{k: v.to(torch.float64) for k, v in u.extras.items()} for u in sent]
        fresh = weighted_mean(wide, [u.num_samples for u in sent])
        old = self.mean or {k: torch.zeros_like(v) for k, v in fresh.items()}
        dtype = {k: v.dtype for k, v in sent[0].extras.items()}
        return {
            k: (ema * old[k].to(torch.float64) + (1.0 - ema) * v).to(dtype[k])
            for k, v in fresh.items()
        }

    def state_dict(self) -> dict[str, Any]:
        return {"mean": None if self.mean is None else clone_state(self.mean)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kept = state["mean"]
        self.mean = None if kept is None else clone_state(kept)


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedIIR]
