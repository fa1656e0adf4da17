"""The federation loop: rounds over the clients in turn on one device. Methods decide what is
shared, how the server aggregates and what each client keeps; the engine does everything else
(local training, communication accounting, validation history, checkpoints)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedbench.adapter import TrainedFederation
from fedbench.data import FederatedData, Site, Split
from fedbench.engine import boundary, checkpoint
from fedbench.engine.boundary import copied
from fedbench.engine.clients import Client, Setup, client_stream
from fedbench.engine.config import Config
from fedbench.engine.profiling import PROFILE
from fedbench.engine.server import ModelBuilder, Server, initial_model, instance
from fedbench.errors import PluginFailure
from fedbench.method import Method, State, clone_state
from fedbench.task import Task

#: called after each round with (round, validation scores per site, replayed): replayed is
#: True for a round restored from a checkpoint or a cached federation, heard again
RoundCallback = Callable[[int, dict[str, float], bool], None]


def validation_score(model: nn.Module, split: Split, task: Task, batch_size: int) -> float:
    if len(split) == 0:  # no validation split (e.g. data.val_fraction=0): a NaN score
        return float("nan")
    outputs = task.predict(model, split.inputs, batch_size)
    return task.validation_score(outputs, split.targets, split.cases)


class Training(Server):
    """One federated training in progress, in this process: the server side (`Server`) and the
    clients (`fedbench.engine.clients`), each with its own method instance, state and stream."""

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
        self.task, self.sites, self.device = data.task, sites, device
        self.build_model = build_model
        model = initial_model(build_model, config, seed, device)
        super().__init__(method_cls, model, config, len(sites), seed)
        self.clients = [
            Client(
                i,
                train,
                val,
                instance(method_cls, config, len(sites), i),
                clone_state(self.global_state),
                client_stream(seed, i),
            )
            for i, (train, val) in enumerate(self.client_splits())
        ]
        for client in self.clients:  # each side learns the layout; they must agree
            keys = list(boundary.call(client.method, "shared_keys", self.model))
            if keys != self.shared:
                raise PluginFailure(
                    f"method '{method_cls.name}': shared_keys differs between the server's "
                    f"instance and client {client.index}'s; expected the same keys on every side"
                )
        self.setup = Setup(self.task, config["train"], device, tuple(self.shared))
        self.finished: list[State] | None = None

    def client_splits(self) -> list[tuple[Split, Split]]:
        """Each client's (train, validation) splits on the device: one per site, or a single
        client holding every site's data for pooled training."""
        pairs = [(s.train, s.val) for s in self.sites]
        if self.pooled:
            pairs = [(Split.concat([t for t, _ in pairs]), Split.concat([v for _, v in pairs]))]
        return [(t.to(self.device), v.to(self.device)) for t, v in pairs]

    def run_round(self) -> None:
        """The round's clients train locally from the global model, then the server updates it.
        Every message crosses as a copy and is counted."""
        round_index = self.cost["rounds"] + 1
        shared_global = self.shared_global()
        updates = []
        for i in self.participants():
            payload = self.payload(i)
            with PROFILE.phase("local training"):
                update = self.clients[i].local_update(
                    self.model, self.setup, copied(shared_global), copied(payload), round_index
                )
            self.count(shared_global, payload, update)
            updates.append(update)
        self.apply(shared_global, updates)

    def personalized(self, site_index: int) -> State:
        """The model site `site_index` keeps (the global model for pooled training)."""
        client = 0 if self.pooled else site_index
        if self.finished is not None:
            return self.finished[client]
        return self.clients[client].personalized(self.shared_global())

    def has_final_update(self) -> bool:
        return type(self.server).final_update is not Method.final_update

    def finish(self) -> None:
        """Each client's `Method.final_update` (e.g. fine-tuning) on its personalized model,
        once after the last round, for methods that define one."""
        if self.has_final_update() and self.finished is None:
            clients = range(len(self.clients))
            self.finished = self.finished_states([self.personalized(i) for i in clients])

    def finished_states(self, states: list[State]) -> list[State]:
        """`Method.final_update` applied to each client's given state (its steps counted);
        the validation-best models get it too, so they are the method's models as well."""
        finished = []
        for client, state in zip(self.clients, states, strict=True):
            with PROFILE.phase("local training"):
                shared = copied(self.shared_global())
                done, steps = client.finished(
                    self.model, self.setup, shared, state, self.cost["rounds"]
                )
            self.cost["client_steps"] += steps
            finished.append(done)
        return finished

    def unseen_site_model(self) -> tuple[State, int]:
        """The global model an unseen site receives (`Server.unseen_site_state`), each taking
        part client sending its values of the keys the server never shared."""
        own = self.own_keys()
        taking_part = sorted({i for chosen in self.participation for i in chosen})
        if not own or not taking_part:
            return self.unseen_site_state([], [])
        parts = [copied({k: self.clients[i].state[k] for k in own}) for i in taking_part]
        return self.unseen_site_state(parts, [len(self.clients[i].train) for i in taking_part])

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
        """Everything the next round depends on: the server's and each client's states, method
        instances and random streams, the torch RNG, the cost."""
        return {
            "global_state": self.global_state,
            "client_states": [c.state for c in self.clients],
            "method_state": {
                "server": self.server.state_dict(),
                "clients": [c.method.state_dict() for c in self.clients],
            },
            "generator": [c.generator.get_state() for c in self.clients],
            "torch_rng": torch.get_rng_state(),
            "cost": self.cost,
            "sampler": self.sampler.get_state(),
            "participation": self.participation,
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Continue from what `snapshot` returned."""
        self.global_state = snapshot["global_state"]
        self.server.load_state_dict(snapshot["method_state"]["server"])
        streams = snapshot["generator"]
        for client, state, kept, stream in zip(
            self.clients,
            snapshot["client_states"],
            snapshot["method_state"]["clients"],
            streams,
            strict=True,
        ):
            client.state = state
            client.method.load_state_dict(kept)
            client.generator.set_state(stream)
        torch.set_rng_state(snapshot["torch_rng"])
        self.cost = snapshot["cost"]
        self.sampler.set_state(snapshot["sampler"])
        self.participation = snapshot["participation"]

    def result(
        self,
        history: list[dict[str, Any]],
        best: dict[str, Any] | None = None,
        for_unseen_site: bool = True,
    ) -> TrainedFederation:
        """The models handed to unseen sites (independent copies) with cost and history, and
        the validation-best ones when `best` (what `_update_best` kept) is given. The one-time
        upload of unshared keys happens (and is counted) only `for_unseen_site`."""
        cost: dict[str, Any] = self.round_cost()
        global_state = None
        if self.server.has_global_model and for_unseen_site:
            global_state, sent = self.unseen_site_model()
            cost["bytes_up"] += sent
            cost["bytes_up_final"] = sent
        elif self.server.has_global_model:
            global_state = clone_state(self.global_state)
        final = [clone_state(self.personalized(i)) for i in range(len(self.sites))]
        best_states = list(best["states"]) if best else None
        return TrainedFederation(
            build_model=self.build_model,
            global_state=global_state,
            personalized=final,
            site_names=[s.name for s in self.sites],
            device=self.device,
            shared_keys=list(self.shared),
            cost=cost,
            history=history,
            val_best=best_states,
            val_best_global=best.get("global") if best else None,
            val_best_rounds=dict(best["rounds"]) if best else {},
        )


FROM_SCRATCH = "training from round 1"


def resumable(path: Path, fed: Training) -> dict[str, Any] | None:
    """The checkpoint at `path` when it can resume `fed`; None when there is none or (named in
    one warning) when it does not fit its model, clients or rounds."""
    shapes = {key: value.shape for key, value in fed.global_state.items()}
    rounds, clients = fed.config["train"]["rounds"], len(fed.clients)

    def problem(saved: dict[str, Any]) -> str | None:
        return checkpoint.snapshot_problem(saved, shapes, clients, rounds)

    return checkpoint.load_fitting(path, fed.device, problem, "checkpoint", FROM_SCRATCH)


def replay(rows: list[dict[str, Any]], on_round: RoundCallback | None) -> None:
    """Tell `on_round` the rounds of a history again (restored, or cached)."""
    for row in rows if on_round is not None else ():
        on_round(row["round"], row["val"], True)


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
    for_unseen_site: bool = True,
) -> TrainedFederation:
    """Train a federation over `sites` for the configured rounds, resuming from
    `checkpoint_path` when one exists and saving one every `checkpoint_every` rounds.
    `history=False` skips the per-round validation nobody reads (leave-one-site-out
    federations); validation still runs when `eval.val_best` needs it. Every round gets a row
    of the history, its validation scores (empty when none ran), and is told to `on_round`,
    rounds restored from the checkpoint included. `for_unseen_site`: the federation's global
    model goes to an unseen site (see `Training.result`)."""
    fed = Training(data, sites, method_cls, build_model, config, seed, device)
    progress: dict[str, Any] = {"history": [], "best": {}}
    start = 1
    saved = resumable(checkpoint_path, fed) if checkpoint_path else None
    if saved is not None:
        try:
            fed.restore(saved["training"])
            start, progress = saved["round"] + 1, saved["progress"]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # start afresh
            why = f"it cannot be restored ({type(exc).__name__}: {exc})"
            checkpoint.warn_ignored(checkpoint_path, "checkpoint", why, FROM_SCRATCH)
            fed = Training(data, sites, method_cls, build_model, config, seed, device)
    replay(progress["history"], on_round)  # empty unless restored
    history = history and config["eval"]["history"]
    val_best = config["eval"]["val_best"]
    for round_index in range(start, config["train"]["rounds"] + 1):
        clock = time.perf_counter()
        fed.run_round()
        scores = fed.validate() if history or val_best else {}
        fed.cost["train_s"] = fed.cost.get("train_s", 0.0) + time.perf_counter() - clock
        progress["history"].append({"round": round_index, "val": scores})
        if val_best:
            _update_best(progress["best"], fed, scores, round_index)
        if checkpoint_path is not None and round_index % checkpoint_every == 0:
            with PROFILE.phase("checkpointing"):
                payload = {"round": round_index, "training": fed.snapshot(), "progress": progress}
                checkpoint.save(checkpoint_path, payload)
        if on_round is not None:
            on_round(round_index, scores, False)
    best = progress["best"] if val_best else None
    if best:  # a site whose validation never scored keeps its last model
        states = [b or clone_state(fed.personalized(i)) for i, b in enumerate(best["states"])]
        best = {**best, "states": states}
    clock = time.perf_counter()
    fed.finish()
    if best and fed.has_final_update() and not fed.pooled:
        best = {**best, "states": fed.finished_states(best["states"])}
    fed.cost["train_s"] = fed.cost.get("train_s", 0.0) + time.perf_counter() - clock
    return fed.result(progress["history"], best, for_unseen_site)


def _update_best(
    best: dict[str, Any], fed: Training, scores: dict[str, float], round_index: int
) -> None:
    """Keep, per site, the personalized state of its best validation round and, for unseen
    sites, the global model of the round where the clients' models had the best mean
    validation score (the release's validation-selected snapshots). Reads validation scores
    only; a NaN score never wins."""
    if not best:
        sites = len(fed.sites)
        best.update(scores=[-float("inf")] * sites, states=[{}] * sites, rounds={}, mean=None)
    for i, site in enumerate(fed.sites):
        if scores[site.name] > best["scores"][i]:  # a NaN score is never the best
            best["scores"][i] = scores[site.name]
            best["states"][i] = clone_state(fed.personalized(i))
            best["rounds"][site.name] = round_index
    mean = sum(scores.values()) / len(scores)
    better = mean == mean and (best["mean"] is None or mean > best["mean"])  # NaN never wins
    if fed.server.has_global_model and better:
        best["mean"], best["global"] = mean, fed.unseen_site_model()[0]
        best["rounds"]["global"] = round_index
