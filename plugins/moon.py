"""MOON (Li, He and Song, "Model-Contrastive Federated Learning", CVPR 2021): FedAvg whose local
objective adds a model-contrastive term pulling the local representation towards the global
model's and away from the client's own model of the previous round.

Variant: every client in every round, a buffer of one previous model (the paper's default), the
server is FedAvg (every state-dict key shared, sample-weighted mean). Client i's local loss is
    task loss + mu * l_con,
    l_con = -log( exp(sim(z, z_glob)/tau) / (exp(sim(z, z_glob)/tau) + exp(sim(z, z_prev)/tau)) )
averaged over the images of the batch, where sim is the cosine similarity and z, z_glob, z_prev
are the representations of the image under the model being trained, the global model the client
received this round and the client's own model at the end of its previous local update. The two
anchors are frozen copies in eval mode (as in the authors' code), computed without gradients.

Representation: the paper puts a projection head on a classification network; a segmentation
U-Net has none, so z is the network's bottleneck feature map, globally average-pooled per image
(one C-vector each) and no projection head is added. The bottleneck is found generically
(`find_bottleneck`): on a forward pass in eval mode, the leaf module whose output has the
smallest spatial size, ties broken by the most channels, then by the latest to run; for MONAI's
U-Net that is the last activation of the bottom block (channels[-1] wide, input size /
2^(levels-1); with residual units, the block's main path before its residual is added). In
round 1 a client has no previous model: the authors' code then has no negative and the term is
-log 1 = 0, so round 1 is plain FedAvg here too (taking the initial model as the previous one
would give the constant log 2, no gradient either).

Defaults: mu 1.0 (`method.mu`; the paper's best was 5 on CIFAR-10 and 1 on CIFAR-100 and
Tiny-ImageNet: with a Dice + cross-entropy loss we take the smaller, less intrusive value),
tau 0.5 (`method.tau`, the paper's). With mu = 0 the update is FedAvg's, bit for bit."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import LocalContext, Method, State, clone_state
from fedbench.tuning import Range

if TYPE_CHECKING:
    import torch
    from torch import nn


def contrastive_loss(
    z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor, tau: float
) -> torch.Tensor:
    """MOON's l_con for [N, D] representations, the mean over the N rows."""
    import torch
    import torch.nn.functional as F

    positive = F.cosine_similarity(z, z_glob, dim=1) / tau
    negative = F.cosine_similarity(z, z_prev, dim=1) / tau
    logits = torch.stack([positive, negative], dim=1)
    return -(logits.log_softmax(dim=1)[:, 0]).mean()


def pooled(features: torch.Tensor) -> torch.Tensor:
    """[N, C, *spatial] -> [N, C], the global average over the spatial positions."""
    return features.flatten(2).mean(2) if features.dim() > 2 else features


def leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's modules without children, by name."""
    return [(name, m) for name, m in model.named_modules() if not list(m.children())]


def find_bottleneck(model: nn.Module, inputs: torch.Tensor) -> str:
    """Name of the leaf module with the deepest output on `inputs`: smallest spatial size, then
    most channels, then latest to run. The forward runs in eval mode without gradients, so no
    statistic or random state changes."""
    import torch

    seen: list[tuple[int, int, int, str]] = []

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.dim() >= 2:
                spatial = int(output[0, 0].numel())
                seen.append((spatial, -int(output.shape[1]), -len(seen), name))

        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in leaves(model)]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(inputs)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    if not seen:
        raise FedbenchError("moon: the network has no layer whose output can be a representation")
    return min(seen)[3]


@contextmanager
def captured(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While open, `found["out"]` holds the latest output of `module`."""
    found: dict[str, torch.Tensor] = {}

    def hook(mod: nn.Module, args: Any, output: torch.Tensor) -> None:
        found["out"] = output

    handle = module.register_forward_hook(hook)
    try:
        yield found
    finally:
        handle.remove()


@contextmanager
def captured_inputs(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While open, `found["in"]` holds the latest input batch of `model`."""
    found: dict[str, torch.Tensor] = {}

    def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
        found["in"] = args[0]

    handle = model.register_forward_pre_hook(hook)
    try:
        yield found
    finally:
        handle.remove()


def representation(model: nn.Module, bottleneck: str, inputs: torch.Tensor) -> torch.Tensor:
    """The pooled bottleneck features of a frozen model on `inputs`, without gradients."""
    import torch

    with captured(model.get_submodule(bottleneck)) as found, torch.no_grad():
        model(inputs)
    return pooled(found["out"])


def frozen_copy(model: nn.Module, state: State | None = None) -> nn.Module:
    """A deep copy of `model` (holding `state` when given) in eval mode, without gradients."""
    frozen = copy.deepcopy(model)
    if state is not None:
        frozen.load_state_dict(state)
    return frozen.eval().requires_grad_(False)


def number(config: dict[str, Any], key: str) -> Any:
    """The method setting `key`, from the run's config or else MOON's default."""
    return config.get("method", {}).get(key, Moon.defaults[key])


class Moon(Method):
    """FedAvg plus mu * l_con on the pooled bottleneck features; one previous model per client."""

    name = "moon"
    description = "MOON: model-contrastive term on the bottleneck features (method.mu, tau)"
    defaults = {"mu": 1.0, "tau": 0.5}
    #: the paper's grid {0.1, 1, 5, 10} (Li, He and Song, CVPR 2021); tau stays its 0.5
    search_space = {"method.mu": Range(0.1, 10.0, log=True)}

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        #: client side: this client's model as it ended its previous local update
        self.previous: State | None = None

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        mu, tau = number(config, "mu"), number(config, "tau")
        if isinstance(mu, bool) or not isinstance(mu, int | float) or not mu >= 0:
            raise FedbenchError(f"method.mu must be a number >= 0, got {mu!r}")
        if isinstance(tau, bool) or not isinstance(tau, int | float) or not tau > 0:
            raise FedbenchError(f"method.tau must be a number > 0, got {tau!r}")

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """FedAvg's local epochs with the contrastive term once the client has a previous model;
        then that model is remembered for the next round."""
        previous = self.previous
        epochs = int(ctx.train["local_epochs"])
        if previous is None:
            self.train_steps(model, ctx, epochs)
        else:
            self.train_contrastive(model, ctx, previous, epochs)
        self.previous = clone_state(model.state_dict())
        return {}

    def train_contrastive(
        self, model: nn.Module, ctx: LocalContext, previous: State, epochs: int
    ) -> None:
        """`train_steps` with mu * l_con against the received and the previous model."""
        glob, prev = frozen_copy(model), frozen_copy(model, previous)
        bottleneck = find_bottleneck(glob, ctx.split.inputs[:2])
        mu, tau = float(self.params["mu"]), float(self.params["tau"])
        with (
            captured(model.get_submodule(bottleneck)) as local,
            captured_inputs(model) as batch,
        ):

            def term(m: nn.Module) -> torch.Tensor:
                z_glob = representation(glob, bottleneck, batch["in"])
                z_prev = representation(prev, bottleneck, batch["in"])
                return mu * contrastive_loss(pooled(local["out"]), z_glob, z_prev, tau)

            self.train_steps(model, ctx, epochs, penalty=term)

    def state_dict(self) -> dict[str, Any]:
        return {"previous": None if self.previous is None else clone_state(self.previous)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kept = state["previous"]
        self.previous = None if kept is None else clone_state(kept)


@hookimpl
def fedbench_methods() -> list[type]:
    return [Moon]
