"""The federation loop: rounds over the clients in turn on one device. Methods decide what is
shared, how the server aggregates and what each client keeps; the engine does everything else
(local training, communication accounting, validation history, checkpoints)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedbench.adapter import TrainedFederation, predict_batched
from fedbench.data import FederatedData, Site, Split
from fedbench.engine import checkpoint
from fedbench.engine.config import Config
from fedbench.engine.profiling import PROFILE
from fedbench.errors import Diverged
from fedbench.method import ClientUpdate, Method, State, clone_state, state_nbytes
from fedbench.task import Task

RoundCallback = Callable[[int, dict[str, float]], None]
ModelBuilder = Callable[[], nn.Module]


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


class Training:
    """One federated training in progress: global model, client states, the method, the cost."""

    def __init__(
        self,
        data: FederatedData,
        sites: list[Site],
        method_cls: type[Method],
        build_model: ModelBuilder,
        config: Config,
        seed: int,
        device: torch.device,
    ) -> None:
        self.task, self.sites, self.config, self.device = data.task, sites, config, device
        self.build_model = build_model
        torch.manual_seed(seed)
        self.model = build_model().to(device)
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

    def snapshot(self) -> dict[str, Any]:
        """Everything the next round depends on: states, method state, RNG states, cost."""
        return {
            "global_state": self.global_state,
            "client_states": self.client_states,
            "method_state": self.method.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cost": self.cost,
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Continue from what `snapshot` returned."""
        self.global_state = snapshot["global_state"]
        self.client_states = snapshot["client_states"]
        self.method.load_state_dict(snapshot["method_state"])
        self.generator.set_state(snapshot["generator"])
        torch.set_rng_state(snapshot["torch_rng"])
        self.cost = snapshot["cost"]

    def result(
        self, history: list[dict[str, Any]], val_best: list[State] | None
    ) -> TrainedFederation:
        """The models handed to unseen sites (independent copies) with cost and history."""
        cost = dict(self.cost)
        # per client per round, each way (every client takes part in every round)
        per = max(1, cost["rounds"] * cost["clients"])
        cost["bytes_up_per_client_round"] = cost["bytes_up"] // per
        cost["bytes_down_per_client_round"] = cost["bytes_down"] // per
        has_global = self.method.has_global_model
        return TrainedFederation(
            build_model=self.build_model,
            global_state=clone_state(self.global_state) if has_global else None,
            personalized=[clone_state(self.personalized(i)) for i in range(len(self.sites))],
            site_names=[s.name for s in self.sites],
            device=self.device,
            shared_keys=list(self.shared),
            cost=cost,
            history=history,
            val_best=val_best,
        )


def train_federation(
    data: FederatedData,
    sites: list[Site],
    method_cls: type[Method],
    build_model: ModelBuilder,
    config: Config,
    seed: int,
    device: torch.device,
    on_round: RoundCallback | None = None,
    checkpoint_path: Path | None = None,
    checkpoint_every: int = 1,
    history: bool = True,
) -> TrainedFederation:
    """Train a federation over `sites` for the configured rounds, resuming from
    `checkpoint_path` when one exists and saving one every `checkpoint_every` rounds.
    `history=False` skips the per-round validation nobody reads (leave-one-site-out
    federations); validation still runs when `eval.val_best` needs it."""
    fed = Training(data, sites, method_cls, build_model, config, seed, device)
    progress: dict[str, Any] = {"history": [], "best_scores": [], "best_states": []}
    start = 1
    saved = checkpoint.load(checkpoint_path, device) if checkpoint_path else None
    if saved is not None:
        try:
            fed.restore(saved["training"])
            start, progress = int(saved["round"]) + 1, saved["progress"]
        except (KeyError, TypeError, ValueError, RuntimeError):  # not one of ours: start afresh
            fed = Training(data, sites, method_cls, build_model, config, seed, device)
    history = history and config["eval"]["history"]
    val_best = config["eval"]["val_best"]
    for round_index in range(start, config["train"]["rounds"] + 1):
        fed.run_round()
        scores = fed.validate() if history or val_best else {}
        if history:
            progress["history"].append({"round": round_index, "val": scores})
        if val_best:
            _update_best(progress, fed, scores)
        if checkpoint_path is not None and round_index % checkpoint_every == 0:
            with PROFILE.phase("checkpointing"):
                payload = {"round": round_index, "training": fed.snapshot(), "progress": progress}
                checkpoint.save(checkpoint_path, payload)
        if on_round is not None:
            on_round(round_index, scores)
    return fed.result(progress["history"], progress["best_states"] if val_best else None)


def _update_best(progress: dict[str, Any], fed: Training, scores: dict[str, float]) -> None:
    """Keep, per site, the personalized state of the round with the best validation score."""
    if not progress["best_scores"]:
        progress["best_scores"] = [-float("inf")] * len(fed.sites)
        progress["best_states"] = [{} for _ in fed.sites]
    for i, site in enumerate(fed.sites):
        if scores[site.name] > progress["best_scores"][i]:
            progress["best_scores"][i] = scores[site.name]
            progress["best_states"][i] = clone_state(fed.personalized(i))
