"""FedAMP (Huang, Chu, Zhou, Wang, Liu, Pei and Zhang, "Personalized Cross-Silo Federated Learning
on Non-IID Data", AAAI 2021): attentive message passing. Every client keeps its own model w_i;
the server sends each client a personalized cloud model u_i, a convex-like combination of all the
clients' models that weighs most the models nearest to w_i.

Variant (Algorithm 1 with A(x) = 1 - exp(-x / sigma), the paper's choice, and a constant alpha_k):
  1. server, for each of the round's clients i: with w_j every client's latest model,
         xi_ij = alpha_k * A'(||w_i - w_j||^2) = alpha_k * exp(-||w_i - w_j||^2 / sigma) / sigma
     for j != i, xi_ii = 1 - sum_{j != i} xi_ij, and u_i = sum_j xi_ij w_j, sent to client i
     alone (`server_payload`, counted in its bytes down). Distances and u_i are computed in
     float64 over the trainable parameters, u_i cast back to their dtype.
  2. client i trains its own model from its state after its previous local update for
     `train.local_epochs` epochs on
         task loss + lam / (2 alpha_k) * ||w - u_i||^2
     over the trainable parameters (buffers, such as normalization statistics, stay its own and
     are not pulled), with a fresh `train.optimizer` as every local update has, and sends its
     trainable parameters w_i (as extras: the method shares no keys, so the engine's FedAvg
     averaging never runs; the server keeps the latest w_i of each client).
w_j^0, the model of a client that has not trained yet (every client in round 1), is the initial
model, which the server made (it records its trainable parameters when the engine shows it the
model in `shared_keys`): in round 1 every u_i is w^0 (the xi sum to 1), as in the paper where all
clients start from the same model. With `train.clients_per_round`, u_i uses every client's latest
model, trained this far or still w^0, as a non-participating client keeps its model. Each client
is scored with its own w_i (its buffers included). The model an unseen site receives is the
engine's for a method sharing no keys: the sample-weighted mean of the clients' own states (each
sends it once, after the last round, counted in the bytes up); FedAMP itself defines none.

Defaults: alpha_k = 1 (`method.alpha`), lam = 1 (`method.lam`), sigma = 1 (`method.sigma`), the
values of the PFL-Non-IID library's FedAMP (the paper tunes them per dataset). xi_ii >= 0 for all
models when alpha / sigma <= 1 / (N - 1); above that the paper's weights are used as they are,
xi_ii turning negative when models are close (e.g. all N - 1 others at a squared distance below
sigma * ln((N - 1) alpha / sigma)). lam = 0 makes each client train exactly as `local` does."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import ClientUpdate, LocalContext, Method, State, clone_state, trainable_keys
from fedbench.tuning import Range

if TYPE_CHECKING:
    import torch
    from torch import nn


def squared_distance(a: State, b: State) -> float:
    """||a - b||^2 over the keys of `a`, in float64."""
    import torch

    return sum(float((a[k].to(torch.float64) - b[k].to(torch.float64)).pow(2).sum()) for k in a)


def attention_weights(models: list[State], i: int, alpha: float, sigma: float) -> list[float]:
    """xi_ij for every j: alpha * exp(-||w_i - w_j||^2 / sigma) / sigma for j != i, and xi_ii
    = 1 minus the others' sum."""
    weights = [
        0.0 if j == i else alpha * math.exp(-squared_distance(models[i], w) / sigma) / sigma
        for j, w in enumerate(models)
    ]
    weights[i] = 1.0 - sum(weights)
    return weights


def cloud_model(models: list[State], weights: list[float]) -> State:
    """u = sum_j weights[j] * models[j], key by key in float64, cast back to each key's dtype."""
    import torch

    out: State = {}
    for key, value in models[0].items():
        total = sum(w * m[key].to(torch.float64) for w, m in zip(weights, models, strict=True))
        out[key] = total.to(value.dtype)
    return out


def attraction(model: nn.Module, cloud: State, coefficient: float) -> torch.Tensor:
    """coefficient * sum of ||p - cloud[name]||^2 over the model's parameters found in `cloud`."""
    import torch

    squared = [
        (param - cloud[name]).pow(2).sum()
        for name, param in model.named_parameters()
        if name in cloud
    ]
    return coefficient * torch.stack(squared).sum()


def setting(config: dict[str, Any], key: str) -> Any:
    """The method setting `key`, from the run's config or else FedAMP's default."""
    return config.get("method", {}).get(key, FedAMP.defaults[key])


def check_number(config: dict[str, Any], key: str, zero_allowed: bool) -> None:
    """A FedbenchError naming `method.<key>` unless it is a finite number > 0 (or >= 0)."""
    value = setting(config, key)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and (value > 0 or (zero_allowed and value == 0))):
        bound = ">= 0" if zero_allowed else "> 0"
        raise FedbenchError(f"method.{key} must be a finite number {bound}, got {value!r}")


class FedAMP(Method):
    """Own models per client, each pulled to its server-made cloud model u_i (attentive mix)."""

    name = "fedamp"
    description = "FedAMP: own models pulled to per-client attentive mixes (alpha, lam, sigma)"
    defaults = {"alpha": 1.0, "lam": 1.0, "sigma": 1.0}
    #: a decade either side of the PFL-Non-IID defaults (1, 1, 1): the paper tunes all
    #: three per dataset (Huang et al., AAAI 2021)
    search_space = {
        "method.alpha": Range(0.1, 10.0, log=True),
        "method.lam": Range(0.1, 10.0, log=True),
        "method.sigma": Range(0.1, 10.0, log=True),
    }

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        #: server side: the initial model's trainable parameters (w^0) and each client's latest w_j
        self.initial: State = {}
        self.models: dict[int, State] = {}

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        check_number(config, "alpha", zero_allowed=False)
        check_number(config, "lam", zero_allowed=True)
        check_number(config, "sigma", zero_allowed=False)

    def shared_keys(self, model: nn.Module) -> list[str]:
        """None (no FedAvg averaging); the server notes the initial trainable parameters."""
        if self.client is None:
            state, keys = model.state_dict(), trainable_keys(model)
            self.initial = clone_state({k: state[k] for k in keys})
        return []

    def server_payload(self, client: int) -> State:
        """u_i from every client's latest model (w^0 for one that has not trained yet)."""
        if not self.initial:
            return {}
        models = [self.models.get(j, self.initial) for j in range(self.num_clients)]
        alpha, sigma = float(self.params["alpha"]), float(self.params["sigma"])
        return cloud_model(models, attention_weights(models, client, alpha, sigma))

    def server_update(self, previous: State, updates: list[ClientUpdate]) -> State:
        """Keeps each sender's w_i; the (empty) shared state stays as it is."""
        for update in updates:
            self.models[update.client] = clone_state(update.extras)
        return dict(previous)

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """Trains the client's own model on task loss + lam/(2 alpha) ||w - u_i||^2; sends w_i."""
        coefficient = float(self.params["lam"]) / (2.0 * float(self.params["alpha"]))
        cloud = ctx.received

        def pull(m: nn.Module) -> torch.Tensor | None:
            return attraction(m, cloud, coefficient) if coefficient != 0.0 and cloud else None

        self.train_steps(model, ctx, int(ctx.train["local_epochs"]), penalty=pull)
        state = model.state_dict()
        return clone_state({k: state[k] for k in trainable_keys(model)})

    def state_dict(self) -> dict[str, Any]:
        return {"models": {j: clone_state(w) for j, w in self.models.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.models = {int(j): clone_state(w) for j, w in state["models"].items()}


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedAMP]
