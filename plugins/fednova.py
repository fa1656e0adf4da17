"""FedNova (Wang, Liu, Liang, Joshi and Poor, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020); every client in every round by default
(with `train.clients_per_round`, the sums and p_i run over the round's clients).

Variant: clients train exactly as in FedAvg (`train.local_epochs` epochs of SGD, so a site with
more batches takes more steps tau_i, `ClientUpdate.steps`). The server normalizes each client's
change by the l1 norm a_i of its local solver's gradient weights and rescales the mean:
    d_i = (theta_prev - theta_i) / a_i,   tau_eff = sum_i p_i a_i,
    theta_new = theta_prev - tau_eff * sum_i p_i d_i,
with p_i = n_i / n (sample weights, the paper's p_i) and tau_eff the paper's FedAvg-like choice.
For plain SGD a_i = tau_i; for SGD with heavy-ball momentum rho = `train.momentum` (PyTorch's
form, the buffer fresh every round) a_i = [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho),
the paper's momentum case (rho = `train.momentum`). Each client computes its a_i and sends it
with its update (one float64, counted in the bytes up), as the paper's clients send their
normalized steps. Adam has no such norm: fednova refuses it (set train.optimizer=sgd).
The rule applies to the trainable parameters; buffers (normalization statistics, integer counts)
are not gradient steps and take FedAvg's sample-weighted mean (counts rounded). Computed in
float64 as mean_i theta_i + sum_i p_i (1 - tau_eff / a_i)(theta_prev - theta_i), the same value,
so equal steps give FedAvg's state bit for bit; a client that took no step adds nothing.
No setting of its own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import ClientUpdate, LocalContext, Method, State, weighted_mean
from fedbench.tuning import Range

if TYPE_CHECKING:
    from torch import nn


def gradient_weight(steps: int, momentum: float) -> float:
    """a_i, the sum of the weights local SGD (with heavy-ball momentum) puts on its gradients."""
    if momentum == 0.0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1.0 - rho**steps) / (1.0 - rho)) / (1.0 - rho)


def effective_steps(samples: list[int], weights: list[float]) -> float:
    """tau_eff = sum_i p_i a_i with p_i = n_i / n (exactly a when every a_i is a)."""
    if len(set(weights)) == 1:
        return weights[0]
    return sum(n * a for n, a in zip(samples, weights, strict=True)) / sum(samples)


def nova_step(
    previous: State, states: list[State], samples: list[int], weights: list[float]
) -> State:
    """theta_prev - tau_eff * sum_i p_i (theta_prev - theta_i) / a_i for every key of
    `previous`, in float64."""
    import torch

    wide = [{k: s[k].to(torch.float64) for k in previous} for s in states]
    out = weighted_mean(wide, [float(n) for n in samples])
    tau, total = effective_steps(samples, weights), float(sum(samples))
    for key, value in previous.items():
        start = value.to(torch.float64)
        for state, n, a in zip(wide, samples, weights, strict=True):
            if a > 0:
                out[key] = out[key] + (n / total) * (1.0 - tau / a) * (start - state[key])
    return out


class FedNova(Method):
    """FedAvg's clients; the server averages normalized changes and rescales by tau_eff."""

    name = "fednova"
    description = "FedNova: the server normalizes each client's change by its local steps"
    #: plain SGD's lr scale on this task (FedAvg's best SGD lr was 3.2 on a doubling grid,
    #: 6.4 diverged)
    search_space = {"train.lr": Range(0.1, 6.4, log=True)}

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        self.param_keys: list[str] = []

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        optimizer = config.get("train", {}).get("optimizer")
        if optimizer != "sgd":
            raise FedbenchError(
                "fednova normalizes SGD steps: set train.optimizer=sgd "
                f"(got train.optimizer={optimizer})"
            )

    def shared_keys(self, model: nn.Module) -> list[str]:
        """Every key, as in FedAvg; also notes which keys are trainable parameters."""
        self.param_keys = [n for n, p in model.named_parameters() if p.requires_grad]
        return super().shared_keys(model)

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """FedAvg's update; sends a_i, the weight of its gradients."""
        import torch

        before = ctx.steps
        super().local_update(model, ctx)
        weight = gradient_weight(ctx.steps - before, float(ctx.train["momentum"]))
        return {"a": torch.tensor(weight, dtype=torch.float64)}

    def server_update(self, previous: State, updates: list[ClientUpdate]) -> State:
        """Parameters: FedNova's normalized step; buffers: FedAvg's mean."""
        states, samples = [u.state for u in updates], [u.num_samples for u in updates]
        out = weighted_mean(states, samples)
        keys = {k: previous[k] for k in self.param_keys if k in previous}
        weights = [float(u.extras["a"]) for u in updates]
        new = nova_step(keys, states, samples, weights)
        out.update({k: new[k].to(v.dtype) for k, v in keys.items()})
        return out


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedNova]
