"""The client side of a federation. Each client holds what a site would hold in a deployment: its
data, its own model state, its own instance of the method and its own random stream. It takes
the server's messages (the shared global state and its payload) as copies and answers with a
`ClientUpdate` of copies; nothing else of it reaches the server or another client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedbench.data import Split
from fedbench.engine import boundary, precision
from fedbench.engine.config import Config
from fedbench.engine.profiling import PROFILE
from fedbench.errors import Diverged
from fedbench.method import ClientUpdate, LocalContext, Method, State, clone_state
from fedbench.storage import stable_hash
from fedbench.task import Task


def optimizer_factory(train_cfg: Config) -> Callable[[Any], torch.optim.Optimizer]:
    """The `train.optimizer` with its settings, for any iterable of parameters (a fresh
    optimizer each round, as in IOP-FL)."""
    lr = train_cfg["lr"]
    if train_cfg["optimizer"] == "sgd":
        momentum = train_cfg["momentum"]
        return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)
    amsgrad = train_cfg["amsgrad"]
    if train_cfg["optimizer"] == "adamw":  # torch's decoupled weight decay, 0.01 (FLamby's IXI)
        return lambda params: torch.optim.AdamW(params, lr=lr, amsgrad=amsgrad)
    return lambda params: torch.optim.Adam(params, lr=lr, amsgrad=amsgrad)


def budgeted(one_pass: Callable[[], Iterator], steps: int) -> Callable[[], Iterator]:
    """`train.local_steps`: every local pass becomes exactly `steps` batches, taken from as
    many reshuffled passes over the client's data as that needs (FLamby's num_updates)."""

    def batches() -> Iterator:
        taken = 0
        while taken < steps:
            before = taken
            for batch in one_pass():
                yield batch
                taken += 1
                if taken == steps:
                    return
            if taken == before:  # a pass without batches would never fill the budget
                return

    return batches


def client_stream(seed: int, index: int) -> torch.Generator:
    """Client `index`'s own random stream: its draws never depend on who trained before it."""
    return torch.Generator().manual_seed(int(stable_hash(["client", seed, index])[:15], 16))


@dataclass(frozen=True)
class Setup:
    """What every client of a federation is configured with (no client's data or state)."""

    task: Task
    train: Config
    device: torch.device
    shared: tuple[str, ...]


@dataclass
class Client:
    """One site: its splits, its own full model state (as it ended its last local update), its
    own instance of the method (`method.client` is `index`) and its own random stream."""

    index: int
    train: Split
    val: Split
    method: Method
    state: State
    generator: torch.Generator

    def view(self, shared: State) -> State:
        """Its own state with the received global shared state merged in."""
        return {**self.state, **shared}

    def context(
        self, setup: Setup, shared: State, payload: State, round_index: int
    ) -> LocalContext:
        """What its local update may use this round, all of it its own."""
        train, split, generator = setup.train, self.train, self.generator

        def batches() -> Any:
            ordered = split.batches(train["batch_size"], generator)
            return PROFILE.timed("data loading", precision.laid_out_batches(ordered, train))

        steps = int(train.get("local_steps") or 0)
        return LocalContext(
            client=self.index,
            split=split,
            task=setup.task,
            train=train,
            global_state=shared,
            received=payload,
            generator=generator,
            make_optimizer=optimizer_factory(train),
            batches=budgeted(batches, steps) if steps else batches,
            autocast=precision.autocast(train, setup.device),
            round=round_index,
            val=self.val,
            own_state=self.state,
        )

    def local_update(
        self, model: nn.Module, setup: Setup, shared: State, payload: State, round_index: int
    ) -> ClientUpdate:
        """Train `model` from its view of the received state; the update it sends (copies)."""
        model.load_state_dict(self.view(shared))
        ctx = self.context(setup, shared, payload, round_index)
        try:
            sent = boundary.call(self.method, "local_update", model, ctx)
        except Diverged as exc:  # where, so a diverged record says which client and round
            raise Diverged(f"{exc} (client {self.index}, round {round_index})") from None
        sent = boundary.extras(self.method, "local_update", sent)
        self.state = clone_state(model.state_dict())
        boundary.call(self.method, "after_local_update", self.index, self.state)
        own = {k: self.state[k] for k in setup.shared}
        return ClientUpdate(
            boundary.copied(own), len(self.train), boundary.copied(sent), ctx.steps, self.index
        )

    def personalized(self, shared: State) -> State:
        """The model it keeps and is scored with (`Method.personalized_state`), checked."""
        view = self.view(shared)
        kept = boundary.call(self.method, "personalized_state", self.index, view)
        return boundary.like(self.method, "personalized_state", kept, view)

    def finished(
        self, model: nn.Module, setup: Setup, shared: State, state: State, round_index: int
    ) -> tuple[State, int]:
        """`Method.final_update` on `state` (e.g. fine-tuning): the state it ends with, and the
        steps it took."""
        model.load_state_dict(state)
        ctx = self.context(setup, shared, {}, round_index)
        boundary.call(self.method, "final_update", model, ctx)
        return clone_state(model.state_dict()), ctx.steps
