"""The client side of the bridge: a Flower ClientApp in which one node is one fedbench client.
It loads its own site's splits through the dataset plugin (the site its node config names, or
in a simulation the site at its partition id), and calls the method's client hooks through the
engine's own `Client`, so a client computes here exactly what it computes in-process.

What a client keeps between rounds (its model state, its method instance's `state_dict`, its
random stream) stays on the node, in the node's `context.state`; nothing of it is sent. Every
reply that fails is an error reply of one line naming the site."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedbench.data import FederatedData, Site
from fedbench.engine.clients import Client, Setup, client_stream
from fedbench.engine.precision import deterministic_mode
from fedbench.engine.registry import load_registry
from fedbench.engine.resolve import Run, resolve
from fedbench.engine.server import initial_model, instance
from fedbench.engine.training import validation_score
from fedbench.errors import Diverged, FedbenchError
from fedbench.flower.plan import Plan
from fedbench.flower.records import from_blob, from_record, to_blob, to_record
from fedbench.method import Method, State, clone_state

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from torch import nn

#: the node config key naming a deployed node's site, and one pointing at its own data
SITE_KEY, DATA_KEY = "site", "data-path"
#: error codes of a node's reply: its client diverged (a non-finite loss), or failed otherwise
FAILED, DIVERGED = 1, 2


@functools.lru_cache(maxsize=4)
def loaded(plan: Plan, data_path: str | None) -> tuple[Run, FederatedData, nn.Module, State]:
    """The run, its data, a scratch network and the federation's first model state, once per
    process (its messages, of any node it serves, reuse them)."""
    spec = plan.spec()
    if data_path:
        spec.overrides.append(f"data.path={data_path}")
    run = resolve(spec, load_registry())
    data = run.dataset.load(run.config["data"], plan.seed, spec.results_dir / "cache")
    model = initial_model(lambda: run.build_model(data.task), run.config, plan.seed, run.device)
    return run, data, model, clone_state(model.state_dict())


def federation_sites(data: FederatedData, holdout: str | None) -> list[Site]:
    return [s for s in data.sites if s.name != holdout]


def own_site(plan: Plan, context: Context, sites: list[Site]) -> int:
    """This node's client index: its site by name (node config `site`), or in a simulation the
    site at its partition id."""
    names = [s.name for s in sites]
    if SITE_KEY in context.node_config:
        name = str(context.node_config[SITE_KEY])
        if name not in names:
            raise FedbenchError(f"node config site '{name}' is not one of {', '.join(names)}")
        return names.index(name)
    return int(context.node_config["partition-id"])


@dataclass
class Node:
    """One node's client, restored from its context for one message and saved after it."""

    run: Run
    site: Site
    client: Client
    setup: Setup
    model: nn.Module

    @classmethod
    def restore(cls, plan: Plan, context: Context) -> Node:
        run, data, model, first = loaded(plan, context.node_config.get(DATA_KEY))
        sites = federation_sites(data, plan.holdout)
        index = own_site(plan, context, sites)
        method = instance(run.method, run.config, len(sites), index)
        shared = tuple(method.shared_keys(model))
        kept = context.state
        if "state" in kept:
            state = from_record(kept["state"], run.device)
            method.load_state_dict(from_blob(kept["method"]))
        else:  # its first message: the federation's first model, as every client starts
            state = clone_state(first)
        generator = client_stream(plan.seed, index)
        if "generator" in kept:
            generator.set_state(from_blob(kept["generator"]))
        site = sites[index]
        client = Client(
            index, site.train.to(run.device), site.val.to(run.device), method, state, generator
        )
        setup = Setup(data.task, run.config["train"], run.device, shared)
        return cls(run, site, client, setup, model)

    def save(self, context: Context) -> None:
        """What the client keeps for its next message, on this node."""
        context.state["state"] = to_record(self.client.state)
        context.state["method"] = to_blob(self.client.method.state_dict())
        context.state["generator"] = to_blob(self.client.generator.get_state())


def hello(node: Node, message: Message) -> dict[str, Any]:
    """Which site this node is (the server matches nodes to clients by it)."""
    return {"meta": {"site": node.site.name, "index": node.client.index}}


def train(node: Node, message: Message) -> dict[str, Any]:
    """One round's local update from the received global state and payload."""
    content = message.content
    device = node.run.device
    update = node.client.local_update(
        node.model,
        node.setup,
        from_record(content["global"], device),
        from_record(content["payload"], device),
        int(content["config"]["round"]),
    )
    meta = {"num_samples": update.num_samples, "steps": update.steps}
    return {"state": to_record(update.state), "extras": to_record(update.extras), "meta": meta}


def evaluate(node: Node, message: Message) -> dict[str, Any]:
    """The validation score of the model this client keeps, under the new global state."""
    shared = from_record(message.content["global"], node.run.device)
    node.model.load_state_dict(node.client.personalized(shared))
    batch = node.run.config["eval"]["batch_size"]
    score = validation_score(node.model, node.site.val.to(node.run.device), node.setup.task, batch)
    return {"scores": {"val": score}}


def finish(node: Node, message: Message) -> dict[str, Any]:
    """After the last round: the model this client keeps (after `final_update`, for methods
    with one), its values of the keys the server never shared, and the steps it took."""
    shared = from_record(message.content["global"], node.run.device)
    state, steps = node.client.personalized(shared), 0
    if type(node.client.method).final_update is not Method.final_update:
        rounds = int(message.content["config"]["round"])
        state, steps = node.client.finished(node.model, node.setup, shared, state, rounds)
    own = [k for k in str(message.content["config"]["own"]).split("\n") if k]
    return {
        "personalized": to_record(state),
        "own": to_record({k: node.client.state[k] for k in own}),
        "meta": {"steps": steps, "num_samples": len(node.client.train)},
    }


Handler = Callable[[Node, "Message"], dict[str, Any]]


def failure(exc: Exception, site: object) -> tuple[int, str]:
    """A node's error reply: DIVERGED or FAILED, and one line naming the site."""
    line = " ".join(f"{type(exc).__name__}: {exc}".split())
    return DIVERGED if isinstance(exc, Diverged) else FAILED, f"site {site}: {line}"


def replying(plan: Plan | None, handler: Handler) -> Callable[[Message, Context], Message]:
    """A ClientApp function: the node restored, `handler` run, the node saved, its result sent
    (ArrayRecords as they are, dicts as a ConfigRecord, `scores` as a MetricRecord); an exception
    is an error reply of one line naming the site."""

    def reply(message: Message, context: Context) -> Message:
        from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

        chosen = plan or Plan.from_run_config(dict(context.run_config))
        site = context.node_config.get(SITE_KEY, context.node_config.get("partition-id"))
        try:
            node = Node.restore(chosen, context)
            site = node.site.name
            with deterministic_mode(node.run.config["train"]):
                result = handler(node, message)
            node.save(context)
        except Exception as exc:  # the server names the site and the round
            return Message(Error(*failure(exc, site)), reply_to=message)
        content = RecordDict()
        for key, value in result.items():
            if isinstance(value, ArrayRecord):
                content[key] = value
            elif key == "scores":
                content[key] = MetricRecord(value)
            else:
                content[key] = ConfigRecord(value)
        return Message(content, reply_to=message)

    return reply


def client_app(plan: Plan | None = None) -> ClientApp:
    """The ClientApp: `plan` for a simulation, else each run's config (a deployed app)."""
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.query()(replying(plan, hello))
    app.train()(replying(plan, train))
    app.evaluate()(replying(plan, evaluate))
    app.query("finish")(replying(plan, finish))
    return app
