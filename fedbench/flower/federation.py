"""A federation trained over a Flower grid: the nodes found and matched to their sites, the
rounds run by `MethodStrategy`, and what the engine's in-process `Training.result` returns
assembled from the nodes' final replies, so the rest of a fedbench run (scoring, adapters,
records) cannot tell the two apart."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedbench.adapter import TrainedFederation
from fedbench.engine.config import Config
from fedbench.engine.server import Server, initial_model
from fedbench.errors import FedbenchError
from fedbench.flower.records import from_record, to_record
from fedbench.flower.strategy import ClientFailed, Exchange, MethodStrategy, cost_of_flower
from fedbench.method import Method, State

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from fedbench.engine.training import RoundCallback

POLL_S = 0.5


def supported(method_cls: type[Method], config: Config) -> None:
    """What the bridge does not do yet, as one line each."""
    if method_cls.pooled:
        raise FedbenchError(f"{method_cls.name} pools every site's data: no federation to run")
    if config["eval"]["val_best"]:
        raise FedbenchError(
            "the Flower bridge keeps the last round's models only: set eval.val_best=false"
        )


def connect(grid: Grid, sites: list[str], timeout: float) -> dict[int, int]:
    """{client index: node id}: every site's node, found by asking each connected node which
    site it is, once as many nodes as sites are connected or `timeout` seconds have passed; a
    site no node answers for fails the run (ClientFailed, naming it)."""
    from flwr.app import Message, RecordDict

    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < len(sites) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    ids = list(grid.get_node_ids())
    asked = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in ids]
    nodes: dict[int, int] = {}
    for reply in grid.send_and_receive(asked, timeout=timeout):
        if reply.has_error() and reply.metadata.src_node_id in ids:
            raise ClientFailed(f"{reply.error.reason} (round 0, connecting)")
        if reply.has_error():  # the SuperLink answers for a node it lost: not a site
            continue
        site = str(reply.content["meta"]["site"])
        if site not in sites:
            raise FedbenchError(f"a node says it is site {site}, not one of {', '.join(sites)}")
        if site in (sites[i] for i in nodes):
            raise FedbenchError(f"two nodes say they are site {site}")
        nodes[sites.index(site)] = reply.metadata.src_node_id
    missing = [s for i, s in enumerate(sites) if i not in nodes]
    if missing:
        raise ClientFailed(
            f"site {', '.join(missing)}: no node answered as this site within {timeout:g} s "
            "(round 0, connecting)"
        )
    return nodes


def train_over_grid(
    grid: Grid,
    sites: list[str],
    method_cls: type[Method],
    build_model: Callable[[], nn.Module],
    config: Config,
    seed: int,
    device: torch.device,
    on_round: RoundCallback | None = None,
    history: bool = True,
    for_unseen_site: bool = True,
    timeout: float = 600.0,
) -> TrainedFederation:
    """`train_federation` with the clients on Flower nodes (checkpoints are not kept)."""
    supported(method_cls, config)
    nodes = connect(grid, sites, timeout)
    clock = time.perf_counter()
    model = initial_model(build_model, config, seed, device)
    server = Server(method_cls, model, config, len(sites), seed)
    rows: list[dict[str, Any]] = []

    def on_scores(round_index: int, scores: dict[str, float]) -> None:
        rows.append({"round": round_index, "val": scores})
        if on_round is not None:
            on_round(round_index, scores, False)

    exchange = Exchange(grid, nodes, sites, timeout)
    validate = history and config["eval"]["history"]
    strategy = MethodStrategy(server, exchange, on_scores, validate)
    rounds = int(config["train"]["rounds"])
    strategy.start(grid, to_record(server.shared_global()), num_rounds=rounds, timeout=timeout)
    done = strategy.finish(rounds, server.own_keys() if for_unseen_site else [])
    server.cost["client_steps"] += sum(int(done[i]["meta"]["steps"]) for i in done)
    personalized = [from_record(done[i]["personalized"], device) for i in range(len(sites))]
    cost = server.round_cost()
    global_state = None
    if server.server.has_global_model:
        global_state, sent = unseen_site_model(server, done, for_unseen_site)
        if for_unseen_site:
            cost["bytes_up"] += sent
            cost["bytes_up_final"] = sent
    cost.update(cost_of_flower(strategy, exchange))
    cost["train_s"] = time.perf_counter() - clock
    return TrainedFederation(
        build_model=build_model,
        global_state=global_state,
        personalized=personalized,
        site_names=list(sites),
        device=device,
        shared_keys=list(server.shared),
        cost=cost,
        history=rows,
    )


def unseen_site_model(server: Server, done: dict, for_unseen_site: bool) -> tuple[State, int]:
    """The global model (for an unseen site: with the taking-part clients' unshared values)."""
    if not for_unseen_site:
        return {k: v.detach().clone() for k, v in server.global_state.items()}, 0
    taking_part = sorted({i for chosen in server.participation for i in chosen})
    if not server.own_keys() or not taking_part:
        return server.unseen_site_state([], [])
    device = next(iter(server.global_state.values())).device
    parts = [from_record(done[i]["own"], device) for i in taking_part]
    sizes = [int(done[i]["meta"]["num_samples"]) for i in taking_part]
    return server.unseen_site_state(parts, sizes)
