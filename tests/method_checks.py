"""Helpers for the personalized methods' definition tests: a toy linear task whose gradients
are computed by hand, a spy on each local update's start, and the resume and settings checks."""

from __future__ import annotations

import pytest
import torch
from conftest import same_states, toy_train

from fedbench.errors import FedbenchError
from fedbench.method import Method, clone_state

CPU = torch.device("cpu")
BATCH = 4  # the toy config's train.batch_size


class SquaredError:
    """A task whose loss is the mean squared error (all the step functions ask of a task)."""

    def loss(self, outputs, targets):
        return (outputs - targets).pow(2).mean()


def linear_grads(state: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """d mean((x A^T + b - y)^2) / d(A, b), by hand."""
    residual = 2 * (x @ state["weight"].T + state["bias"] - y) / y.numel()
    return {"weight": residual.T @ x, "bias": residual.sum(0)}


def random_linear(gen: torch.Generator) -> torch.nn.Linear:
    layer = torch.nn.Linear(3, 2)
    for p in layer.parameters():
        p.data = torch.randn(p.shape, generator=gen)
    return layer


def start_spy(method_cls: type[Method]) -> type[Method]:
    """A subclass recording, at every local update's start, the model, the own state, the global
    state and the client's stream."""

    class Spy(method_cls):
        name = method_cls.name
        starts: list[dict] = []

        def local_update(self, model, ctx):
            Spy.starts.append(
                {
                    "client": ctx.client,
                    "round": ctx.round,
                    "state": clone_state(model.state_dict()),
                    "own": clone_state(ctx.own_state),
                    "global": clone_state(ctx.global_state),
                    "generator": ctx.generator.get_state(),
                }
            )
            return super().local_update(model, ctx)

    Spy.starts = []
    return Spy


def stream(state: torch.Tensor) -> torch.Generator:
    generator = torch.Generator()
    generator.set_state(state)
    return generator


def resumes_exactly(method_cls: type[Method], config: dict, data, tmp_path) -> bool:
    """All the configured rounds in one go equal all but the last, a checkpoint, and the last
    round resumed from it (with `train.clients_per_round`, what a client keeps while it sits a
    round out must survive the checkpoint too)."""
    whole = toy_train(data, data.sites, method_cls, config, 0, CPU)
    rounds = config["train"]["rounds"]
    first = {**config, "train": {**config["train"], "rounds": rounds - 1}}
    path = tmp_path / f"{method_cls.name}.pt"
    toy_train(data, data.sites, method_cls, first, 0, CPU, checkpoint_path=path)
    resumed = toy_train(data, data.sites, method_cls, config, 0, CPU, checkpoint_path=path)
    assert resumed.cost["participation"] == whole.cost["participation"]
    pairs = [(whole.global_state, resumed.global_state)]
    pairs += list(zip(whole.personalized, resumed.personalized, strict=True))
    return all(same_states(a, b) for a, b in pairs)


def refuses_by_name(method_cls: type[Method], make, bad: dict[str, list]) -> None:
    """check_settings names the setting for every bad value, and takes the defaults."""
    for key, values in bad.items():
        for value in values:
            with pytest.raises(FedbenchError, match=f"method.{key}"):
                method_cls.check_settings(make(1, **{key: value}))
    method_cls.check_settings(make(1, **method_cls.defaults))


def partial(config: dict) -> dict:
    """`config` with two of the three toy clients in each round."""
    config["train"]["clients_per_round"] = 2
    return config
