"""FedDG-GA (Zhang, Xu, Yao, Zhang, Tian and Wang, "Federated Domain Generalization with
Generalization Adjustment", CVPR 2023): FedAvg whose server moves each client's aggregation weight
every round by that client's generalization gap, so that the clients the global model fits worst
weigh more, for a model that generalizes to sites never seen.

Variant: the clients train as in FedAvg. Client i's generalization gap after round r is
    G_i = L_i(theta^r) - L_i(theta_i^r),
the mean task loss on its validation split (its train split when that is empty) of the global
model theta^r aggregated in round r, minus that of its own model theta_i^r as its local training
in round r ended. The client computes L_i(theta_i^r) when it finishes round r and L_i(theta^r)
when it receives theta^r at the start of round r + 1, and sends G_i then, one float64 scalar
(`ClientUpdate.extras["gap"]`, counted in the bytes up); only a client that took part in round r
sends one. Before aggregating round r + 1, the server adjusts the weights a of the clients that
sent a gap:
    mu = mean_j G_j,   a_i <- a_i + d_r * (G_i - mu) / max_j |G_j - mu|,
    a_i <- clip(a_i, 0, 1),   a <- a / sum_j a_j,
    d_r = d * max(0, 1 - r / R)     (d = `method.step_size`, R = `method.decay_rounds`),
a taken normalized over those clients, and the result scaled back to their previous total, so
the weights of clients that sent no gap keep their proportions (with every client in every round
the total is the federation's sample count). Nothing moves when all gaps are equal or d_r = 0.
The weights start at the clients' sample counts (FedAvg's weights; a client enters with its own
count when it first takes part), and the server's model is the mean of the round's client states
weighted by them (every key, as in FedAvg; FedAvg's counts for a round whose weights are all 0).
With step_size 0 the run is FedAvg's, bit for bit.

What differs from the paper: the paper evaluates both losses in an exchange after each
aggregation; here the client evaluates theta^r as it arrives, so the gaps of round r arrive with
round r + 1's update and the weights they give are the ones the paper uses in round r + 1 (no
gap follows the last round, whose weights the paper would only use afterwards). The loss is the
task's training loss (`data.loss`: Dice + cross-entropy by default), where the paper's is the
classification loss, computed on the split in batches of `train.batch_size`. The gaps are centred
on their mean as in the paper's update and divided by the largest |G_j - mu|, so no weight moves
by more than d_r before the clip (the authors' code, MediaBrain-SJTU/FedDG-GA, neither centres
nor scales by the spread: it divides G_j by the largest |G_j|, takes a third of its step for its
three clients and starts the weights equal). R is a setting, not the run's `train.rounds`, so
that a run extended from its checkpoint follows the schedule it started with: set it to
train.rounds for the paper's schedule, which decays d to 0 over the run. Defaults: step_size
0.05 (the paper's d; the authors' code defaults to 0.2 / 3), decay_rounds 24 (the reference
protocol's rounds)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import ClientUpdate, LocalContext, Method, State, weighted_mean
from fedbench.tuning import Range

if TYPE_CHECKING:
    from torch import nn

    from fedbench.data import Split


def adjusted(weights: list[float], gaps: list[float], step: float) -> list[float]:
    """The GA step on `weights` (any positive total) from the clients' gaps: the centred gaps over
    their largest magnitude, times `step`, added to the normalized weights; then clipped to
    [0, 1], normalized and scaled back to the weights' total."""
    total = sum(weights)
    if step == 0.0 or total == 0.0 or max(gaps) == min(gaps):
        return list(weights)
    centre = sum(gaps) / len(gaps)
    spread = max(abs(g - centre) for g in gaps)
    moved = [
        min(max(w / total + step * (g - centre) / spread, 0.0), 1.0)
        for w, g in zip(weights, gaps, strict=True)
    ]
    kept = sum(moved)
    return [total * m / kept for m in moved]


def step_at(step_size: float, decay_rounds: int, round_index: int) -> float:
    """d_r = d * max(0, 1 - r / R)."""
    return step_size * max(0.0, 1.0 - round_index / decay_rounds)


def mean_loss(model: nn.Module, split: Split, ctx: LocalContext) -> float:
    """The task loss of `model` on `split`, in eval mode without gradients, in batches of
    `train.batch_size`, weighted by batch size."""
    import torch

    size, total = int(ctx.train["batch_size"]), 0.0
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), ctx.autocast():
            for start in range(0, len(split), size):
                inputs = split.inputs[start : start + size]
                loss = ctx.task.loss(model(inputs), split.targets[start : start + size])
                total += float(loss) * len(inputs)
    finally:
        model.train(training)
    return total / len(split)


def scoring_split(ctx: LocalContext) -> Split:
    """The client's validation split, or its train split when it has none."""
    return ctx.val if ctx.val is not None and len(ctx.val) > 0 else ctx.split


def setting(config: dict[str, Any], key: str) -> Any:
    """The method setting `key`, from the run's config or else FedDG-GA's default."""
    return config.get("method", {}).get(key, FedDGGA.defaults[key])


class FedDGGA(Method):
    """FedAvg whose aggregation weights follow the clients' generalization gaps."""

    name = "feddg-ga"
    description = (
        "FedDG-GA: aggregation weights moved by the generalization gaps (method.step_size)"
    )
    defaults = {"step_size": 0.05, "decay_rounds": 24}
    #: log-uniform around the paper's d = 0.05; the schedule's length stays a setting
    search_space = {"method.step_size": Range(0.01, 0.2, log=True)}

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        #: server side: each client's weight (in sample counts) and the rounds aggregated
        self.weights: dict[int, float] = {}
        self.rounds = 0
        #: client side: its own model's loss as its last local update ended, and that round
        self.local_loss: float | None = None
        self.last_round = 0

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        step, rounds = setting(config, "step_size"), setting(config, "decay_rounds")
        if isinstance(step, bool) or not isinstance(step, int | float) or not step >= 0:
            raise FedbenchError(f"method.step_size must be a number >= 0, got {step!r}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise FedbenchError(f"method.decay_rounds must be an integer >= 1, got {rounds!r}")

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """The gap of the previous round (if it took part), then FedAvg's local training and the
        loss of the model it ends with."""
        import torch

        sent: State = {}
        split = scoring_split(ctx)
        if self.local_loss is not None and self.last_round == ctx.round - 1:
            gap = mean_loss(model, split, ctx) - self.local_loss
            sent["gap"] = torch.tensor(gap, dtype=torch.float64)
        super().local_update(model, ctx)
        self.local_loss, self.last_round = mean_loss(model, split, ctx), ctx.round
        return sent

    def server_update(self, previous: State, updates: list[ClientUpdate]) -> State:
        """The GA step from the gaps received, then the mean weighted by the new weights."""
        self.rounds += 1
        for update in updates:
            self.weights.setdefault(update.client, float(update.num_samples))
        self.adjust([u for u in updates if "gap" in u.extras])
        weights = [self.weights[u.client] for u in updates]
        if sum(weights) == 0.0:
            weights = [float(u.num_samples) for u in updates]
        return weighted_mean([u.state for u in updates], weights)

    def adjust(self, reported: list[ClientUpdate]) -> None:
        """Move the weights of the clients that sent a gap (about the previous round)."""
        if not reported:
            return
        step = step_at(
            float(self.params["step_size"]), int(self.params["decay_rounds"]), self.rounds - 1
        )
        clients = [u.client for u in reported]
        gaps = [float(u.extras["gap"]) for u in reported]
        new = adjusted([self.weights[c] for c in clients], gaps, step)
        self.weights.update(zip(clients, new, strict=True))

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": {str(c): w for c, w in self.weights.items()},
            "rounds": self.rounds,
            "local_loss": self.local_loss,
            "last_round": self.last_round,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = {int(c): float(w) for c, w in state["weights"].items()}
        self.rounds = int(state["rounds"])
        self.local_loss, self.last_round = state["local_loss"], int(state["last_round"])


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedDGGA]
