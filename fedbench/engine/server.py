"""The server side of a federation, apart from where its clients run: the method's server
instance, the global state, who takes part in each round, and the cost of each exchange as
fedbench counts it. The in-process engine (`fedbench.engine.training`) and the Flower bridge
(`fedbench.flower`) both drive it, so a round's server half is one piece of code."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedbench.engine import boundary, precision
from fedbench.engine.config import Config, clients_per_round
from fedbench.engine.profiling import PROFILE
from fedbench.errors import blamed_on
from fedbench.method import ClientUpdate, Method, State, clone_state, state_nbytes
from fedbench.storage import stable_hash

ModelBuilder = Callable[[], nn.Module]


def instance(method_cls: type[Method], config: Config, clients: int, client: int | None) -> Method:
    """The server's (`client` None) or one client's own instance of the method."""
    with blamed_on(f"method '{method_cls.name}' failed in __init__"):
        method = method_cls(config["method"], clients)
    method.client = client
    return method


def initial_model(build_model: ModelBuilder, config: Config, seed: int, device: torch.device):
    """The federation's first model: seeded, so every side that builds it builds the same."""
    torch.manual_seed(seed)
    return precision.laid_out(build_model().to(device), config["train"])


class Server:
    """The server's half of a federation over `sites` sites: `run_round` of a subclass or a
    bridge sends each chosen client the shared global state and its payload, and hands their
    updates to `apply`."""

    def __init__(
        self,
        method_cls: type[Method],
        model: nn.Module,
        config: Config,
        sites: int,
        seed: int,
    ) -> None:
        self.config, self.model = config, model
        self.pooled = method_cls.pooled
        clients = 1 if self.pooled else sites  # pooled training: one client holding every site
        self.server = instance(method_cls, config, sites, None)
        self.shared = list(boundary.call(self.server, "shared_keys", model))
        self.global_state = clone_state(model.state_dict())
        self.client_count = clients
        # the server's stream: drawing clients never shifts a client's own draws
        self.sampler = torch.Generator().manual_seed(int(stable_hash(["clients", seed])[:15], 16))
        self.participation: list[list[int]] = []
        self.cost = {
            "bytes_up": 0,
            "bytes_down": 0,
            "client_steps": 0,
            "rounds": 0,
            "clients": clients,
            "train_s": 0.0,  # seconds of training and validation, summed over resumed parts
            **({"bytes_data_statistics": 0} if method_cls.shares_data else {}),
        }

    def shared_global(self) -> State:
        """The global shared state as the server holds it (references, not a message)."""
        return {k: self.global_state[k] for k in self.shared}

    def participants(self) -> list[int]:
        """This round's clients: all of them, or `train.clients_per_round` drawn without
        replacement from the sampling stream (nothing is drawn when all take part); noted."""
        total = self.client_count
        count = clients_per_round(self.config["train"]["clients_per_round"], total)
        chosen = list(range(total))
        if count != total:
            chosen = sorted(torch.randperm(total, generator=self.sampler)[:count].tolist())
        self.participation.append(chosen)
        return chosen

    def payload(self, client: int) -> State:
        """The extra tensors the method sends `client` this round, checked."""
        payload = boundary.call(self.server, "server_payload", client)
        return boundary.extras(self.server, "server_payload", payload)

    def count(self, shared_global: State, payload: State, update: ClientUpdate) -> None:
        """One client's exchange this round: its steps, and the bytes both ways."""
        self.cost["client_steps"] += update.steps
        if self.pooled:  # pooled training moves data, not models
            return
        self.cost["bytes_down"] += state_nbytes(shared_global) + state_nbytes(payload)
        self.cost["bytes_up"] += state_nbytes(update.state) + state_nbytes(update.extras)
        for part in (payload, update.extras) if self.server.shares_data else ():
            sent = {k: v for k, v in part.items() if k in self.server.shares_data}
            self.cost["bytes_data_statistics"] += state_nbytes(sent)

    def apply(self, shared_global: State, updates: list[ClientUpdate]) -> None:
        """The method's `server_update` on the round's updates (in the order the clients were
        chosen), checked, into the global state; the round counted."""
        # a method sharing no keys may still send extras (FedAMP), read in server_update
        if self.shared or any(u.extras for u in updates):
            with PROFILE.phase("aggregation"):
                new = boundary.call(self.server, "server_update", shared_global, updates)
                self.global_state.update(
                    boundary.like(self.server, "server_update", new, shared_global)
                )
        self.cost["rounds"] += 1

    def unseen_site_state(self, own: list[State], sizes: list[int]) -> tuple[State, int]:
        """The global model an unseen site receives, and the bytes it took: the shared state,
        with every key the server never shared filled by the sample-weighted mean of `own`, the
        taking-part clients' values of those keys (each sends them once, after the last
        round), then the method's `unseen_site_state`."""
        from fedbench.method import weighted_mean

        state = clone_state(self.global_state)
        sent = 0
        if own:
            state.update(weighted_mean(own, sizes))
            sent = sum(state_nbytes(p) for p in own)
        given = boundary.call(self.server, "unseen_site_state", state)
        return boundary.like(self.server, "unseen_site_state", given, state), sent

    def own_keys(self) -> list[str]:
        """The keys the server never shared (each client keeps its own)."""
        return [k for k in self.global_state if k not in self.shared]

    def round_cost(self) -> dict:
        """The cost so far, with the per-client-round figures and the participation."""
        cost = dict(self.cost)
        per = max(1, sum(len(chosen) for chosen in self.participation))  # client-rounds
        cost["bytes_up_per_client_round"] = cost["bytes_up"] // per
        cost["bytes_down_per_client_round"] = cost["bytes_down"] // per
        cost["participation"] = [list(chosen) for chosen in self.participation]
        return cost
