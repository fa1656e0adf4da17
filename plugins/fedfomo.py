"""FedFomo (Zhang, Sapra, Fidler, Yeung and Alvarez, "Personalized Federated Learning with First
Order Model Optimization", ICLR 2021): each client moves its own model towards the other clients'
models that lower the loss on its own validation data, by a first-order weighting, then trains.

Variant (Algorithm 1 with M = N - 1 and no epsilon-greedy exploration: every client downloads the
latest model of every other client that has one, so the server's affinity matrix, which only
steers that choice, is not kept): in each round client i
  1. receives theta_j, the latest full state of every other client j that has trained
     (`server_payload`, keys "j/<key>", counted in its bytes down);
  2. computes on its validation split (its train split when that is empty) the loss
     L_i(theta_i) of its own model, as it ended its previous local update, and L_i(theta_j) of
     each received one, in eval mode without gradients: the sample-weighted mean of
     `task.loss` over consecutive batches of `train.batch_size`, in the run's autocast;
  3. takes w_ij = max(0, (L_i(theta_i) - L_i(theta_j)) / ||theta_j - theta_i||) (the L2 norm over
     the trainable parameters, in float64; 0 for a model at distance 0, whose difference adds
     nothing, or for a non-finite ratio), normalized to sum 1 when any is positive, and sets
         theta_i <- theta_i + sum_j w_ij (theta_j - theta_i)
     on every floating key (the parameters and floating buffers such as normalization
     statistics, in float64, cast back; integer buffers stay its own); with every w_ij 0 (all
     received models worse, or none received, as in round 1) theta_i is unchanged;
  4. trains theta_i for `train.local_epochs` epochs exactly as FedAvg does, and sends its full
     state (as extras: the method shares no keys, so the engine's FedAvg averaging never runs;
     the server keeps the latest state of each client).
Each client is scored with its own model. FedFomo defines no model for an unseen site, so its
default adapter is `ensemble` (the mean of the personalized models' predictions), as for `local`.
The engine's weight mean of the clients' states (what `none` scores; each client sends its state
once, after the last round, counted in the bytes up) is no model at all here: the clients drift
into groups far apart in weight space (seed 0, BIDMC held out: RUNMC's model at 0.14-0.15 of its
norm from I2CVB's and UCL's, 0.66-0.67 from BMC's and HK's), and their mean scored 0.012 on
BIDMC and 0.11-0.57 on the clients' own test splits. FedFomo has no settings and draws nothing at
random (its batches come from the client's own stream as FedAvg's)."""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

from fedbench.hookspecs import hookimpl
from fedbench.method import ClientUpdate, LocalContext, Method, State, clone_state, trainable_keys

if TYPE_CHECKING:
    from torch import nn

    from fedbench.data import Split


def improvement(own_loss: float, loss: float, distance: float) -> float:
    """max(0, (own_loss - loss) / distance); 0 at distance 0 or for a non-finite ratio."""
    if not distance > 0:
        return 0.0
    score = (own_loss - loss) / distance
    return score if math.isfinite(score) and score > 0 else 0.0


def fomo_weights(own_loss: float, losses: list[float], distances: list[float]) -> list[float]:
    """The w_ij of the received models: their improvements normalized to sum 1, or all 0."""
    raw = [improvement(own_loss, loss, d) for loss, d in zip(losses, distances, strict=True)]
    total = sum(raw)
    return [r / total for r in raw] if total > 0 else [0.0] * len(raw)


def distance(a: State, b: State, keys: list[str]) -> float:
    """||a - b|| over `keys`, in float64."""
    import torch

    squared = sum(
        float((a[k].to(torch.float64) - b[k].to(torch.float64)).pow(2).sum()) for k in keys
    )
    return math.sqrt(squared)


def combine(own: State, others: list[State], weights: list[float]) -> State:
    """own + sum_j weights[j] * (others[j] - own) on floating keys (float64, cast back); integer
    keys stay own's."""
    import torch

    out: State = {}
    for key, value in own.items():
        if not value.dtype.is_floating_point:
            out[key] = value.clone()
            continue
        base = value.to(torch.float64)
        total = base.clone()
        for weight, other in zip(weights, others, strict=True):
            if weight != 0.0:
                total += weight * (other[key].to(torch.float64) - base)
        out[key] = total.to(value.dtype)
    return out


def split_loss(model: nn.Module, split: Split, ctx: LocalContext) -> float:
    """The mean task loss of `model` over `split` (eval mode, no gradients, batches of
    `train.batch_size` weighted by size); NaN for an empty split."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in split.batches(int(ctx.train["batch_size"])):
            with ctx.autocast():
                loss = ctx.task.loss(model(inputs), targets)
            total += float(loss) * len(targets)
            count += len(targets)
    return total / count if count else float("nan")


def received_models(payload: State) -> dict[int, State]:
    """The payload's "j/<key>" entries grouped by client j, in client order."""
    grouped: dict[int, State] = {}
    for name, tensor in payload.items():
        client, key = name.split("/", 1)
        grouped.setdefault(int(client), {})[key] = tensor
    return dict(sorted(grouped.items()))


class FedFomo(Method):
    """Own models per client, moved towards the others' models that do better on its data."""

    name = "fedfomo"
    description = "FedFomo: own models moved to the others' that lower the own validation loss"
    default_adapter = "ensemble"

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        #: server side: each client's latest full state
        self.models: dict[int, State] = {}

    def shared_keys(self, model: nn.Module) -> list[str]:
        """None: models travel as extras and payloads, never through FedAvg's averaging."""
        return []

    def server_payload(self, client: int) -> State:
        """The latest state of every other client that has one, keys "j/<key>"."""
        return {
            f"{j}/{key}": tensor
            for j, state in sorted(self.models.items())
            if j != client
            for key, tensor in state.items()
        }

    def server_update(self, previous: State, updates: list[ClientUpdate]) -> State:
        """Keeps each sender's state; the (empty) shared state stays as it is."""
        for update in updates:
            self.models[update.client] = clone_state(update.extras)
        return dict(previous)

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """The first-order move towards better received models, FedAvg's training; sends the
        client's full state."""
        others = list(received_models(ctx.received).values())
        if others:
            self.move_towards_better(model, ctx, others)
        super().local_update(model, ctx)
        return clone_state(model.state_dict())

    def move_towards_better(
        self, model: nn.Module, ctx: LocalContext, others: list[State]
    ) -> list[float]:
        """Sets `model` to theta_i + sum_j w_ij (theta_j - theta_i); returns the w_ij."""
        split = ctx.val if ctx.val is not None and len(ctx.val) else ctx.split
        own = clone_state(model.state_dict())
        own_loss = split_loss(model, split, ctx)
        probe = copy.deepcopy(model)
        losses = []
        for state in others:
            probe.load_state_dict(state)
            losses.append(split_loss(probe, split, ctx))
        keys = trainable_keys(model)
        weights = fomo_weights(own_loss, losses, [distance(own, o, keys) for o in others])
        if any(weights):
            model.load_state_dict(combine(own, others, weights))
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {"models": {j: clone_state(s) for j, s in self.models.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.models = {int(j): clone_state(s) for j, s in state["models"].items()}


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedFomo]
