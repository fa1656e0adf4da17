"""The federation loop: rounds over the clients in turn on one device. Methods decide what is
shared, how the server aggregates and what each client keeps; the engine does everything else
(local training, communication accounting, validation history)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedbench.adapter import TrainedFederation, predict_batched
from fedbench.config import Config
from fedbench.data import FederatedData, Site, Split
from fedbench.errors import Diverged
from fedbench.method import ClientUpdate, Method, State, state_nbytes
from fedbench.tasks import Task

RoundCallback = Callable[[int, dict[str, float]], None]


@dataclass
class FederationResult:
    """A trained federation plus what it cost and how validation evolved over rounds."""

    federation: TrainedFederation
    cost: dict[str, int]
    history: list[dict[str, Any]] = field(default_factory=list)
    #: per client: the personalized state of its best validation round (when eval.val_best)
    val_best: list[State] | None = None


def clone_state(state: State) -> State:
    """A true copy of a state dict (never a reference to live module tensors)."""
    return {k: v.detach().clone() for k, v in state.items()}


def make_optimizer(model: nn.Module, train_cfg: Config) -> torch.optim.Optimizer:
    if train_cfg["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=train_cfg["lr"], momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=train_cfg["lr"])


def train_local(
    model: nn.Module,
    split: Split,
    task: Task,
    method: Method,
    global_state: State,
    train_cfg: Config,
    generator: torch.Generator,
) -> int:
    """One client's local update (a fresh optimizer each round, as in IOP-FL); returns its steps."""
    model.train()
    optimizer = make_optimizer(model, train_cfg)
    steps = 0
    for _ in range(train_cfg["local_epochs"]):
        for inputs, targets in split.batches(train_cfg["batch_size"], generator):
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(model(inputs), targets)
            penalty = method.local_penalty(model, global_state)
            if penalty is not None:
                loss = loss + penalty
            if not torch.isfinite(loss):
                raise Diverged(f"loss became {loss.item()} in local training")
            loss.backward()
            optimizer.step()
            steps += 1
    return steps


def validation_score(model: nn.Module, split: Split, task: Task, batch_size: int) -> float:
    outputs = predict_batched(model, split.inputs, batch_size)
    return task.validation_score(outputs, split.targets, split.cases)


class Federation:
    """The state of one federated training: global model, client states, the method, the cost."""

    def __init__(
        self,
        data: FederatedData,
        sites: list[Site],
        method_cls: type[Method],
        config: Config,
        seed: int,
        device: torch.device,
    ) -> None:
        self.task, self.sites, self.config, self.device = data.task, sites, config, device
        torch.manual_seed(seed)
        self.model = self.task.build_model(config["model"]).to(device)
        self.method = method_cls(config["method"], len(sites))
        self.clients = (
            [Split.concat([s.train for s in sites])]
            if method_cls.pooled
            else [s.train for s in sites]
        )
        self.clients = [c.to(device) for c in self.clients]
        self.shared = self.method.shared_keys(self.model)
        self.global_state = clone_state(self.model.state_dict())
        self.client_states = [clone_state(self.global_state) for _ in self.clients]
        self.generator = torch.Generator().manual_seed(seed)
        self.cost = {
            "bytes_up": 0,
            "bytes_down": 0,
            "client_steps": 0,
            "rounds": 0,
            "clients": len(self.clients),
        }

    def client_view(self, i: int) -> State:
        """Client i's own state with the latest global shared parameters merged in."""
        return {**self.client_states[i], **{k: self.global_state[k] for k in self.shared}}

    def run_round(self) -> None:
        """Every client trains locally from the global model, then the server aggregates."""
        updates = []
        shared_global = {k: self.global_state[k] for k in self.shared}
        for i, split in enumerate(self.clients):
            self.model.load_state_dict(self.client_view(i))
            if not self.method.pooled:  # pooled training moves data, not models
                self.cost["bytes_down"] += state_nbytes(shared_global)
            self.cost["client_steps"] += train_local(
                self.model,
                split,
                self.task,
                self.method,
                shared_global,
                self.config["train"],
                self.generator,
            )
            self.client_states[i] = clone_state(self.model.state_dict())
            self.method.after_local_update(i, self.client_states[i])
            update = ClientUpdate({k: self.client_states[i][k] for k in self.shared}, len(split))
            if not self.method.pooled:
                self.cost["bytes_up"] += state_nbytes(update.state)
            updates.append(update)
        if self.shared:
            self.global_state.update(self.method.aggregate(updates))
        self.cost["rounds"] += 1

    def personalized(self, site_index: int) -> State:
        """The model site `site_index` keeps (the global model for pooled training)."""
        client = 0 if self.method.pooled else site_index
        return self.method.personalized_state(client, self.client_view(client))

    def validate(self) -> dict[str, float]:
        """Validation score of each site's personalized model."""
        scores = {}
        for i, site in enumerate(self.sites):
            self.model.load_state_dict(self.personalized(i))
            scores[site.name] = validation_score(
                self.model, site.val.to(self.device), self.task, self.config["eval"]["batch_size"]
            )
        return scores


def train_federation(
    data: FederatedData,
    sites: list[Site],
    method_cls: type[Method],
    config: Config,
    seed: int,
    device: torch.device,
    on_round: RoundCallback | None = None,
) -> FederationResult:
    """Train a federation over `sites` for the configured rounds."""
    fed = Federation(data, sites, method_cls, config, seed, device)
    track = config["eval"]["history"] or config["eval"]["val_best"]
    history: list[dict[str, Any]] = []
    best: list[tuple[float, State]] = []
    for round_index in range(1, config["train"]["rounds"] + 1):
        fed.run_round()
        scores = fed.validate() if track else {}
        if scores:
            history.append({"round": round_index, "val": scores})
        if config["eval"]["val_best"]:
            best = _update_best(best, fed, scores)
        if on_round is not None:
            on_round(round_index, scores)
    trained = TrainedFederation(
        method=method_cls.name,
        build_model=lambda: data.task.build_model(config["model"]),
        global_state=clone_state(fed.global_state) if method_cls.has_global_model else None,
        personalized=[clone_state(fed.personalized(i)) for i in range(len(sites))],
        site_names=[s.name for s in sites],
        device=device,
    )
    val_best = [state for _, state in best] if config["eval"]["val_best"] else None
    cost = dict(fed.cost)
    # per client per round, each way (every client takes part in every round)
    cost["bytes_up_per_client_round"] = cost["bytes_up"] // (cost["rounds"] * cost["clients"])
    cost["bytes_down_per_client_round"] = cost["bytes_down"] // (cost["rounds"] * cost["clients"])
    return FederationResult(trained, cost, history if config["eval"]["history"] else [], val_best)


def _update_best(
    best: list[tuple[float, State]], fed: Federation, scores: dict[str, float]
) -> list[tuple[float, State]]:
    """Keep, per site, the personalized state of the round with the best validation score."""
    if not best:
        best = [(-float("inf"), {}) for _ in fed.sites]
    for i, site in enumerate(fed.sites):
        if scores[site.name] > best[i][0]:
            best[i] = (scores[site.name], clone_state(fed.personalized(i)))
    return best
