"""FedALA (Zhang, Hua, Wang, Song, Xue, Ma and Guan, "FedALA: Adaptive Local Aggregation for
Personalized Federated Learning", AAAI 2023): before local training, each client mixes the
global model into its previous own model with element-wise weights it learns on its own data.

Variant (Algorithm 1, with every method setting below; the server is FedAvg's):
client i receives the global theta and, when it has trained before (theta_i: its own model as its
previous local update ended, `LocalContext.own_state`), initializes its local model as
  - lower layers: theta (every parameter but the top `method.layers`),
  - top layers (the last `method.layers` trainable parameter tensors, in the model's
    `named_parameters` order, as the authors' release counts its layer_idx; the default 2 is the
    U-Net's output convolution, weight and bias: the paper's p = 1 layer):
        theta_hat = theta_i + (theta - theta_i) * W_i          (element-wise)
    with W_i, one tensor per top parameter, initialized to ones and kept by the client across
    rounds. Before that, W_i learns on a random `method.rand_percent` % of the client's train
    split (the samples drawn from the client's stream, `LocalContext.generator`, each time ALA
    runs; batches of `train.batch_size` in the drawn order, a trailing batch of one sample
    dropped as in local training, forwards in training mode on a copy of the model):
        W_i <- clip(W_i - eta * grad_theta_hat(loss) * (theta - theta_i), 0, 1)
    and theta_hat is recomputed after every batch (eta: `method.eta`).
Then FedAvg's local training (`train.local_epochs` of `train.optimizer`) from that start; the
model it ends with is sent, every key, and the server takes the sample-weighted mean. Buffers
(normalization statistics) are the global model's, as FedAvg's view gives them (the release
averages parameters only and keeps them local).

How long W_i learns: the paper trains W_i to convergence in the client's first ALA and one pass
afterwards; the release stops that first phase when the standard deviation of its last 10 pass
losses falls below a threshold, so after at least 11 passes. Bounded here: the first ALA makes
`method.ala_epochs` passes over the drawn subset (default 11, the fewest the release's test
allows), every later one a single pass. As in the release, ALA is off at a client's first
participation (it has no own model yet): it starts from theta, W_i untouched, nothing drawn.
With `method.layers` 0 nothing is learned or drawn and FedALA is FedAvg exactly.

The client is scored with its own model as its last local training ended (the paper's local
model; before its first round, the global model); the release scores the ALA initialization of
the next round instead. Each weight step (one batch) counts into the client's steps. Defaults
(the paper's): eta 1.0, rand_percent 80."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import LocalContext, Method, State, clone_state
from fedbench.tuning import Range

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedbench.task import Task

Batch = tuple["torch.Tensor", "torch.Tensor"]


def ala_init(own: State, glob: State, weights: State) -> State:
    """theta_i + (theta - theta_i) * W for every key of `weights` (the top layers)."""
    return {key: own[key] + (glob[key] - own[key]) * w for key, w in weights.items()}


def top_keys(model: nn.Module, layers: int) -> list[str]:
    """The names of the last `layers` trainable parameter tensors (all of them when fewer)."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    return names[len(names) - min(layers, len(names)) :]


def subset_batches(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> Iterator[Batch]:
    """Consecutive batches of the drawn subset; a trailing batch of one sample is dropped."""
    n = len(inputs)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if stop - start == 1 and n > 1:
            return
        yield inputs[start:stop], targets[start:stop]


def learn_weights(
    model: nn.Module,
    own: State,
    weights: State,
    batches: Callable[[], Iterator[Batch]],
    task: Task,
    eta: float,
    passes: int,
    autocast: Callable[[], Any],
) -> tuple[State, int]:
    """`passes` passes of W's projected gradient steps on a copy of `model` (which holds the
    global theta); returns the new weights and the number of steps taken."""
    import torch

    from fedbench.errors import Diverged

    temp = copy.deepcopy(model)
    temp.train()
    params = dict(temp.named_parameters())
    glob = {key: params[key].detach().clone() for key in weights}
    top = [params[key] for key in weights]
    weights = clone_state(weights)
    steps = 0

    def place() -> None:
        with torch.no_grad():
            for key, value in ala_init(own, glob, weights).items():
                params[key].copy_(value)

    place()
    for _ in range(passes):
        for inputs, targets in batches():
            with autocast():
                loss = task.loss(temp(inputs), targets)
            if not torch.isfinite(loss):
                raise Diverged(f"loss became {loss.item()} in FedALA's weight learning")
            grads = torch.autograd.grad(loss, top)
            with torch.no_grad():
                for key, grad in zip(weights, grads, strict=True):
                    step = weights[key] - eta * (grad * (glob[key] - own[key]))
                    weights[key] = step.clamp(0.0, 1.0)
            place()
            steps += 1
    return weights, steps


def setting(config: dict[str, Any], key: str) -> Any:
    """The method setting `key`, from the run's config or else FedALA's default."""
    return config.get("method", {}).get(key, FedALA.defaults[key])


def is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


def is_count(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0


class FedALA(Method):
    """FedAvg whose clients start local training from an adaptive local aggregation."""

    name = "fedala"
    description = "FedALA: learned element-wise mix of the global and own top layers (ALA)"
    defaults = {"layers": 2, "rand_percent": 80, "eta": 1.0, "ala_epochs": 11}
    #: the paper's eta {0.1, 1, 10} and s from 5 up to its default 80 (more would buy ALA
    #: steps); layers and ala_epochs are structure and compute, not tuned
    search_space = {
        "method.eta": Range(0.1, 10.0, log=True),
        "method.rand_percent": Range(5, 80, integer=True),
    }

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        #: client side: W_i by parameter name (None before the first ALA) and its own model
        self.weights: State | None = None
        self.local: State | None = None

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        layers, epochs = setting(config, "layers"), setting(config, "ala_epochs")
        percent, eta = setting(config, "rand_percent"), setting(config, "eta")
        if not is_count(layers):
            raise FedbenchError(f"method.layers must be an integer >= 0, got {layers!r}")
        if not is_count(epochs):
            raise FedbenchError(f"method.ala_epochs must be an integer >= 0, got {epochs!r}")
        if not is_number(percent) or not 0 < percent <= 100:
            raise FedbenchError(
                f"method.rand_percent must be a number in (0, 100], got {percent!r}"
            )
        if not is_number(eta) or not eta >= 0:
            raise FedbenchError(f"method.eta must be a number >= 0, got {eta!r}")

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """ALA (from the second participation on), then FedAvg's local training."""
        keys = top_keys(model, int(self.params["layers"]))
        if keys and self.local is not None:
            self.initialize(model, ctx, keys)
        return super().local_update(model, ctx)

    def initialize(self, model: nn.Module, ctx: LocalContext, keys: list[str]) -> None:
        """Learn W_i, then load theta_hat into `model`'s top layers (its others hold theta)."""
        import torch

        own = {key: ctx.own_state[key] for key in keys}
        first = self.weights is None
        start = self.weights or {key: torch.ones_like(own[key]) for key in keys}
        passes = int(self.params["ala_epochs"]) if first else 1
        inputs, targets = self.drawn_subset(ctx)
        size = int(ctx.train["batch_size"])
        weights, steps = learn_weights(
            model,
            own,
            start,
            lambda: subset_batches(inputs, targets, size),
            ctx.task,
            float(self.params["eta"]),
            passes,
            ctx.autocast,
        )
        ctx.steps += steps
        self.weights = weights
        glob = dict(model.named_parameters())
        with torch.no_grad():
            for key, value in ala_init(own, {k: glob[k] for k in keys}, weights).items():
                glob[key].copy_(value)

    def drawn_subset(self, ctx: LocalContext) -> Batch:
        """`method.rand_percent` % of the train split, drawn from the client's stream."""
        import torch

        n = len(ctx.split)
        count = int(n * float(self.params["rand_percent"]) / 100)
        order = torch.randperm(n, generator=ctx.generator)[:count]
        order = order.to(ctx.split.inputs.device)
        return ctx.split.inputs[order], ctx.split.targets[order]

    def after_local_update(self, client: int, state: State) -> None:
        self.local = clone_state(state)

    def personalized_state(self, client: int, state: State) -> State:
        return state if self.local is None else self.local

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": None if self.weights is None else clone_state(self.weights),
            "local": None if self.local is None else clone_state(self.local),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights, local = state["weights"], state["local"]
        self.weights = None if weights is None else clone_state(weights)
        self.local = None if local is None else clone_state(local)


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedALA]
