"""The federation loop: rounds over the clients in turn on one device. Methods decide what is
shared, how the server aggregates and what each client keeps; the engine does everything else
(local training, communication accounting, validation history, checkpoints)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedbench.adapter import TrainedFederation, predict_batched
from fedbench.checkpoint import restore_checkpoint, save_checkpoint
from fedbench.config import Config
from fedbench.data import FederatedData, Site, Split
from fedbench.errors import Diverged
from fedbench.method import ClientUpdate, Method, State, clone_state, state_nbytes
from fedbench.profiling import PROFILE
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
        batches = split.batches(train_cfg["batch_size"], generator)
        for inputs, targets in PROFILE.timed("data loading", batches):
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
        pooled = [Split.concat([s.train for s in sites])] if method_cls.pooled else None
        self.clients = [c.to(device) for c in (pooled or [s.train for s in sites])]
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
            with PROFILE.phase("local training"):
                self.model.load_state_dict(self.client_view(i))
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
            updates.append(update)
            if not self.method.pooled:  # pooled training moves data, not models
                self.cost["bytes_down"] += state_nbytes(shared_global)
                self.cost["bytes_up"] += state_nbytes(update.state)
        if self.shared:
            with PROFILE.phase("aggregation"):
                self.global_state.update(self.method.aggregate(updates))
        self.cost["rounds"] += 1

    def personalized(self, site_index: int) -> State:
        """The model site `site_index` keeps (the global model for pooled training)."""
        client = 0 if self.method.pooled else site_index
        return self.method.personalized_state(client, self.client_view(client))

    def validate(self) -> dict[str, float]:
        """Validation score of each site's personalized model."""
        scores = {}
        with PROFILE.phase("evaluation"):
            for i, site in enumerate(self.sites):
                self.model.load_state_dict(self.personalized(i))
                scores[site.name] = validation_score(
                    self.model,
                    site.val.to(self.device),
                    self.task,
                    self.config["eval"]["batch_size"],
                )
        return scores

    def trained(self, method_name: str, has_global: bool) -> TrainedFederation:
        """The models handed to unseen sites, as independent copies."""
        return TrainedFederation(
            method=method_name,
            build_model=lambda: self.task.build_model(self.config["model"]),
            global_state=clone_state(self.global_state) if has_global else None,
            personalized=[clone_state(self.personalized(i)) for i in range(len(self.sites))],
            site_names=[s.name for s in self.sites],
            device=self.device,
        )


def train_federation(
    data: FederatedData,
    sites: list[Site],
    method_cls: type[Method],
    config: Config,
    seed: int,
    device: torch.device,
    on_round: RoundCallback | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 1,
    history: bool = True,
) -> FederationResult:
    """Train a federation over `sites` for the configured rounds, resuming from `checkpoint` when
    one exists and saving one every `checkpoint_every` rounds. `history=False` skips the
    per-round validation nobody reads (leave-one-site-out federations)."""
    fed = Federation(data, sites, method_cls, config, seed, device)
    progress: dict[str, Any] = {"history": [], "best_scores": [], "best_states": []}
    start = 1
    if checkpoint is not None:
        restored = restore_checkpoint(checkpoint, fed)
        if restored is not None:
            start, progress = restored[0] + 1, restored[1]
    history = history and config["eval"]["history"]
    track = history or config["eval"]["val_best"]
    for round_index in range(start, config["train"]["rounds"] + 1):
        fed.run_round()
        scores = fed.validate() if track else {}
        if scores:
            progress["history"].append({"round": round_index, "val": scores})
        if config["eval"]["val_best"]:
            _update_best(progress, fed, scores)
        if checkpoint is not None and round_index % checkpoint_every == 0:
            with PROFILE.phase("checkpointing"):
                save_checkpoint(checkpoint, fed, round_index, progress)
        if on_round is not None:
            on_round(round_index, scores)
    cost = dict(fed.cost)
    # per client per round, each way (every client takes part in every round)
    cost["bytes_up_per_client_round"] = cost["bytes_up"] // (cost["rounds"] * cost["clients"])
    cost["bytes_down_per_client_round"] = cost["bytes_down"] // (cost["rounds"] * cost["clients"])
    return FederationResult(
        fed.trained(method_cls.name, method_cls.has_global_model),
        cost,
        progress["history"] if history else [],
        progress["best_states"] if config["eval"]["val_best"] else None,
    )


def _update_best(progress: dict[str, Any], fed: Federation, scores: dict[str, float]) -> None:
    """Keep, per site, the personalized state of the round with the best validation score."""
    if not progress["best_scores"]:
        progress["best_scores"] = [-float("inf")] * len(fed.sites)
        progress["best_states"] = [{} for _ in fed.sites]
    for i, site in enumerate(fed.sites):
        if scores[site.name] > progress["best_scores"][i]:
            progress["best_scores"][i] = scores[site.name]
            progress["best_states"][i] = clone_state(fed.personalized(i))
