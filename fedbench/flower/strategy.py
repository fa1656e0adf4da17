"""The server side of the bridge: a Flower Strategy whose rounds are the engine's `Server`
driving a fedbench method's server hooks (who takes part, `server_payload`, `server_update`),
its clients being Flower nodes. Bytes are counted as the engine counts them, and the bytes Flower
serialized for the same messages are counted beside them. A node that fails or does not answer
is one line naming its site and the round."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedbench.engine.server import Server
from fedbench.errors import Diverged, PluginFailure
from fedbench.flower.node import DIVERGED
from fedbench.flower.records import from_record, to_record, wire_bytes
from fedbench.method import ClientUpdate, State

if TYPE_CHECKING:
    from flwr.serverapp import Grid

RoundScores = Callable[[int, dict[str, float]], None]


class ClientFailed(PluginFailure):
    """A node's error reply, or its silence, in one line naming the site and the round."""


class Exchange:
    """Messages to nodes by client index, and their replies checked and keyed by client."""

    def __init__(self, grid: Grid, nodes: dict[int, int], sites: list[str], timeout: float):
        self.grid, self.nodes, self.sites, self.timeout = grid, nodes, sites, timeout
        self.flower_bytes = {"down": 0, "up": 0}

    def message(self, client: int, content: RecordDict, kind: str) -> Message:
        return Message(content=content, message_type=kind, dst_node_id=self.nodes[client])

    def replies(self, messages: Iterable[Message], round_index: int, phase: str) -> dict:
        """Send, wait, and return {client: reply content}; any error or missing reply raises."""
        sent = list(messages)
        self.flower_bytes["down"] += sum(wire_bytes(m) for m in sent)
        answers = self.grid.send_and_receive(sent, timeout=self.timeout)
        by_node = {node: client for client, node in self.nodes.items()}
        wanted = [by_node[m.metadata.dst_node_id] for m in sent]
        return self.checked(wanted, list(answers), round_index, phase)

    def checked(
        self, wanted: list[int], answers: list[Message], round_index: int, phase: str
    ) -> dict[int, RecordDict]:
        """{client: reply content} of the clients in `wanted`; an error reply or a client
        without a reply raises ClientFailed."""
        by_node = {node: client for client, node in self.nodes.items()}
        got: dict[int, RecordDict] = {}
        why = f"none within {self.timeout:g} s: its node stopped or lost its connection"
        for answer in answers:
            client = by_node.get(answer.metadata.src_node_id)
            if client is None:  # the SuperLink answers for a node it lost (no heartbeat)
                why = " ".join(answer.error.reason.split()) if answer.has_error() else why
                continue
            if answer.has_error():
                line = f"{answer.error.reason} (round {round_index}, {phase})"
                raise Diverged(line) if answer.error.code == DIVERGED else ClientFailed(line)
            self.flower_bytes["up"] += wire_bytes(answer)
            got[client] = answer.content
        silent = [self.sites[c] for c in wanted if c not in got]
        if silent:
            raise ClientFailed(
                f"site {', '.join(silent)}: no reply in round {round_index} ({phase}): {why}"
            )
        return got


class MethodStrategy(Strategy):
    """Flower's round loop over fedbench's `Server`: `configure_train` sends each chosen client
    the shared global state and its payload, `aggregate_train` hands their updates to the
    method's `server_update` in the order they were chosen, and evaluation (when `validate`)
    scores every client's own model under the new global state; `on_scores` hears each round's
    validation scores (empty when none ran)."""

    def __init__(
        self,
        server: Server,
        exchange: Exchange,
        on_scores: RoundScores,
        validate: bool,
    ) -> None:
        self.server, self.exchange, self.on_scores = server, exchange, on_scores
        self.validate = validate
        self.device = next(iter(server.global_state.values())).device  # the server's states'
        self.round_messages: dict[int, tuple[State, dict[int, State]]] = {}
        self.train_bytes = {"down": 0, "up": 0}

    def summary(self) -> None:
        """Flower logs its strategies' settings; fedbench's are in the run record."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        shared = self.server.shared_global()
        chosen = self.server.participants()
        payloads = {i: self.server.payload(i) for i in chosen}
        self.round_messages[server_round] = (shared, payloads)
        messages = []
        for i in chosen:
            content = RecordDict(
                {
                    "global": to_record(shared),
                    "payload": to_record(payloads[i]),
                    "config": ConfigRecord({"round": server_round}),
                }
            )
            messages.append(self.exchange.message(i, content, "train"))
        sent = sum(wire_bytes(m) for m in messages)
        self.exchange.flower_bytes["down"] += sent
        self.train_bytes["down"] += sent
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        shared, payloads = self.round_messages.pop(server_round)
        before = self.exchange.flower_bytes["up"]
        got = self.exchange.checked(list(payloads), list(replies), server_round, "training")
        self.train_bytes["up"] += self.exchange.flower_bytes["up"] - before
        updates = [self.update(i, got[i], self.device) for i in payloads]
        for update in updates:
            self.server.count(shared, payloads[update.client], update)
        self.server.apply(shared, updates)
        if not self.validate:  # a round without validation still ends with its (empty) row
            self.on_scores(server_round, {})
        return to_record(self.server.shared_global()), None

    @staticmethod
    def update(client: int, content: RecordDict, device: torch.device) -> ClientUpdate:
        meta = content["meta"]
        return ClientUpdate(
            from_record(content["state"], device),
            int(meta["num_samples"]),
            from_record(content["extras"], device),
            int(meta["steps"]),
            client,
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.validate:
            return []
        content = RecordDict({"global": to_record(self.server.shared_global())})
        messages = [self.exchange.message(i, content, "evaluate") for i in self.exchange.nodes]
        self.exchange.flower_bytes["down"] += sum(wire_bytes(m) for m in messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> None:
        if not self.validate:
            return None
        wanted = list(self.exchange.nodes)
        got = self.exchange.checked(wanted, list(replies), server_round, "validation")
        names = self.exchange.sites
        scores = {names[i]: float(got[i]["scores"]["val"]) for i in sorted(got)}
        self.on_scores(server_round, scores)
        return None

    def finish(self, rounds: int, own: list[str]) -> dict[int, RecordDict]:
        """Each client's kept model (after its `final_update`) and its unshared values."""
        content = RecordDict(
            {
                "global": to_record(self.server.shared_global()),
                "config": ConfigRecord({"round": rounds, "own": "\n".join(own)}),
            }
        )
        messages = [self.exchange.message(i, content, "query.finish") for i in self.exchange.nodes]
        return self.exchange.replies(messages, rounds, "final update")


def cost_of_flower(strategy: MethodStrategy, exchange: Exchange) -> dict[str, Any]:
    """What Flower serialized: the training messages both ways, and every message in all."""
    return {
        "flower_bytes_train_down": strategy.train_bytes["down"],
        "flower_bytes_train_up": strategy.train_bytes["up"],
        "flower_bytes_down": exchange.flower_bytes["down"],
        "flower_bytes_up": exchange.flower_bytes["up"],
    }
