"""pFedMe (Dinh, Tran and Nguyen, "Personalized Federated Learning with Moreau Envelopes", NeurIPS
2020): each client's personalized model theta_i solves its loss plus lambda/2 ||theta_i - w_i||^2,
and the local model w_i moves towards it.

Variant (Algorithm 1, the sampled clients' models averaged as below):
client i receives w and sets w_i = w, theta_i = w (the release resets both at every round). For
each local step, one batch D of `train.local_epochs` epochs (R = every batch of them):
  1. K = `method.inner_steps` gradient steps on the same D, theta_i carried over from the
     previous step (the release's pFedMeOptimizer, without its optional L2 term mu):
         theta_i <- theta_i - personal_lr * (grad f_i(theta_i; D) + lambda * (theta_i - w_i))
     (personal_lr: `method.personal_lr`, lambda: `method.lam`);
  2. w_i <- w_i - eta * lambda * (w_i - theta_i), with eta = `train.lr`.
The client sends w_i; the server sets w <- (1 - beta) w + beta * mean_i w_i over the trainable
parameters (the sample-weighted mean of the round's participants; beta: `method.beta`, 1 gives
FedAvg's mean exactly). Both updates are the paper's plain gradient steps, so pFedMe refuses any
`train.optimizer` but plain SGD (momentum 0) rather than silently ignore it.

Buffers (normalization statistics) are those theta_i's training forwards left (every forward of
step 1 runs in training mode, as in the release); they travel with w_i and take FedAvg's
sample-weighted mean (the release keeps them local). The client is scored with theta_i as its last
round ended (the release's personalized model) with those buffers; before its first round, with
the global model. Each of the K inner steps counts into the client's steps.

A limiting case: K = 1, lambda = 1 / eta and personal_lr = eta make every round FedAvg with plain
SGD of step eta, up to rounding (w_i follows theta_i, which starts each step from w_i).
Defaults (the paper's MNIST setting): lam 15, inner_steps 5, personal_lr 0.1, beta 1.0."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import LocalContext, ServerOptimizer, State, clone_state, require_plain_sgd
from fedbench.tuning import Choice, Range

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedbench.task import Task


def moreau_steps(
    model: nn.Module,
    anchor: State,
    batch: tuple[torch.Tensor, torch.Tensor],
    task: Task,
    lam: float,
    personal_lr: float,
    inner: int,
    autocast: Callable[[], Any] | None = None,
) -> None:
    """`inner` steps of theta <- theta - personal_lr * (grad f(theta; batch) + lam (theta - w))
    on `model`'s trainable parameters (theta), w being `anchor` (by parameter name)."""
    import contextlib

    import torch

    from fedbench.errors import Diverged

    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    inputs, targets = batch
    for _ in range(inner):
        with (autocast or contextlib.nullcontext)():
            loss = task.loss(model(inputs), targets)
        if not torch.isfinite(loss):
            raise Diverged(f"loss became {loss.item()} in pFedMe's personalized steps")
        grads = torch.autograd.grad(loss, [p for _, p in params])
        with torch.no_grad():
            for (name, param), grad in zip(params, grads, strict=True):
                param -= personal_lr * (grad + lam * (param - anchor[name]))


def pull_anchor(anchor: State, model: nn.Module, lam: float, lr: float) -> None:
    """w <- w - lr * lam * (w - theta), in place, for every entry of `anchor`."""
    import torch

    theta = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in anchor.items():
            anchor[name] = value - lr * lam * (value - theta[name])


def setting(config: dict[str, Any], key: str) -> Any:
    """The method setting `key`, from the run's config or else pFedMe's default."""
    return config.get("method", {}).get(key, PFedMe.defaults[key])


def is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


class PFedMe(ServerOptimizer):
    """Clients move w_i towards their Moreau-envelope personalized models; w <- (1-beta)w + beta
    mean w_i on the server."""

    name = "pfedme"
    description = "pFedMe: personalized models from Moreau envelopes (lam, inner_steps, beta)"
    defaults = {"lam": 15.0, "inner_steps": 5, "personal_lr": 0.1, "beta": 1.0}
    #: SGD's lr scale (as scaffold's); lam and personal_lr around the paper's values (lam
    #: 15 to 30, personal_lr 0.01 to 0.1) widened to that scale, beta its {1, 2};
    #: inner_steps sets the compute and is not tuned
    search_space = {
        "train.lr": Range(0.1, 6.4, log=True),
        "method.lam": Range(0.01, 30.0, log=True),
        "method.personal_lr": Range(0.01, 6.4, log=True),
        "method.beta": Choice((1.0, 2.0)),
    }

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        #: client side: theta_i as the client's last round ended (None before its first round)
        self.personal: State | None = None

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        require_plain_sgd(cls.name, config, "takes plain gradient steps")
        inner = setting(config, "inner_steps")
        if isinstance(inner, bool) or not isinstance(inner, int) or inner < 1:
            raise FedbenchError(f"method.inner_steps must be an integer >= 1, got {inner!r}")
        for key in ("lam", "personal_lr"):
            value = setting(config, key)
            if not is_number(value) or not value >= 0:
                raise FedbenchError(f"method.{key} must be a number >= 0, got {value!r}")
        beta = setting(config, "beta")
        if not is_number(beta) or not beta > 0:
            raise FedbenchError(f"method.beta must be a number > 0, got {beta!r}")

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """R local steps of theta_i (on `model`) and w_i; `model` ends holding w_i."""
        import torch

        lam, lr = float(self.params["lam"]), float(ctx.train["lr"])
        personal_lr, inner = float(self.params["personal_lr"]), int(self.params["inner_steps"])
        model.train()
        anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        for _ in range(int(ctx.train["local_epochs"])):
            for batch in ctx.batches():
                moreau_steps(model, anchor, batch, ctx.task, lam, personal_lr, inner, ctx.autocast)
                ctx.steps += inner
                pull_anchor(anchor, model, lam, lr)
        self.personal = clone_state(model.state_dict())
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in anchor.items():
                params[name].copy_(value)
        return {}

    def server_step(self, key: str, previous: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """(1 - beta) * w + beta * mean_i w_i (float64); the mean itself for beta 1."""
        beta = float(self.params["beta"])
        if beta == 1.0:
            return mean
        return (1.0 - beta) * previous.to(mean.dtype) + beta * mean

    def personalized_state(self, client: int, state: State) -> State:
        return state if self.personal is None else self.personal

    def state_dict(self) -> dict[str, Any]:
        return {"personal": None if self.personal is None else clone_state(self.personal)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kept = state["personal"]
        self.personal = None if kept is None else clone_state(kept)


@hookimpl
def fedbench_methods() -> list[type]:
    return [PFedMe]
