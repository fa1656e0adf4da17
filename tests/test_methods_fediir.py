"""FedIIR against its definition: the FedAvg limit, the alignment penalty's gradient by hand on a
linear classifier, the penalty training adds and the gradients the clients send recomputed on the
toy U-Net, the server's moving average by hand, the bytes, determinism and resume."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import same_states, toy_config, toy_rounds
from method_checks import (
    SquaredError,
    linear_grads,
    partial,
    random_linear,
    refuses_by_name,
    resumes_exactly,
    start_spy,
)

from fedbench.data import Split
from fedbench.method import ClientUpdate, LocalContext, clone_state
from fedbench.models import output_layer, output_layer_keys
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.fediir import FedIIR, split_gradient

#: the toy U-Net's output layer: a 3x3 transposed convolution from 12 to 2 channels, with bias
GRAD_BYTES = (12 * 2 * 3 * 3 + 2) * 4
LR = 0.1


def linear_context(x, y, received: dict, batch_size: int) -> LocalContext:
    """A one-epoch, one-batch context on (x, y) for a linear model with plain SGD at LR; its
    split is (x, y) too, read in batches of `batch_size` for the sent gradient."""
    return LocalContext(
        client=0,
        split=Split(x, y, torch.zeros(len(x), dtype=torch.long)),
        task=SquaredError(),
        train={"local_epochs": 1, "batch_size": batch_size},
        global_state={},
        received=received,
        generator=torch.Generator().manual_seed(0),
        make_optimizer=lambda params: torch.optim.SGD(params, lr=LR),
        batches=lambda: iter([(x, y)]),
    )


def joined(state: dict) -> torch.Tensor:
    """[A, b] as one [K, D + 1] matrix."""
    return torch.cat([state["weight"], state["bias"].unsqueeze(1)], 1)


def test_fediir_penalty_gradient_on_a_linear_classifier_by_hand():
    gen = torch.Generator().manual_seed(3)
    layer = random_linear(gen).double()
    x, y = torch.randn(5, 3, generator=gen).double(), torch.randn(5, 2, generator=gen).double()
    mean = {"weight": torch.randn(2, 3, generator=gen).double(), "bias": torch.randn(2).double()}
    start = clone_state(layer.state_dict())
    gamma = 0.3
    sent = FedIIR({"gamma": gamma}, 3).local_update(layer, linear_context(x, y, mean, 5))
    # the loss mean((X~ W~^T - Y)^2) over N K entries has gradient G~ = c R^T X~, c = 2 / (N K),
    # linear in W~; so d/dW~ of gamma ||G~ - M~||^2 is 2 gamma c (G~ - M~) X~^T X~
    wide = torch.cat([x, torch.ones(5, 1, dtype=x.dtype)], 1)
    g = joined(linear_grads(start, x, y))
    c = 2.0 / y.numel()
    step = g + 2 * gamma * c * (g - joined(mean)) @ wide.T @ wide
    torch.testing.assert_close(joined(layer.state_dict()), joined(start) - LR * step)
    # what it sends: the task loss's gradient at the start model, on its whole split
    torch.testing.assert_close(joined(sent), g)


def test_fediir_sends_the_split_gradient_in_batches_weighted_by_size():
    gen = torch.Generator().manual_seed(4)
    layer = random_linear(gen).double()
    x, y = torch.randn(8, 3, generator=gen).double(), torch.randn(8, 2, generator=gen).double()
    state = clone_state(layer.state_dict())
    parts = [linear_grads(state, x[s : s + 3], y[s : s + 3]) for s in (0, 3, 6)]
    # batches of 3: (3, 3, 2), weighted by size
    sent = split_gradient(layer, linear_context(x, y, {}, 3))
    for key in state:
        expected = (3 * parts[0][key] + 3 * parts[1][key] + 2 * parts[2][key]) / 8
        torch.testing.assert_close(sent[key], expected)
    assert same_states(layer.state_dict(), state), "no step taken"
    # seven samples: (3, 3, 1), the trailing single sample left out, as in training
    sent = split_gradient(layer, linear_context(x[:7], y[:7], {}, 3))
    for key in state:
        torch.testing.assert_close(sent[key], (parts[0][key] + parts[1][key]) / 2)


def test_fediir_split_gradient_leaves_the_running_statistics(data):
    fed = toy_rounds(FedAvg, toy_config(1), data, 1)
    model = fed.build_model()
    model.load_state_dict(fed.global_state)
    before = clone_state(model.state_dict())
    ctx = linear_context(data.sites[0].train.inputs, data.sites[0].train.targets, {}, 4)
    ctx.task = data.task
    sent = split_gradient(model, ctx)
    assert same_states(model.state_dict(), before)
    assert set(sent) == output_layer_keys(model)


def test_fediir_with_gamma_zero_is_fedavg_bit_for_bit(data):
    mine = toy_rounds(FedIIR, toy_config(2, gamma=0.0), data, 2)
    fedavg = toy_rounds(FedAvg, toy_config(2), data, 2)
    assert same_states(mine.global_state, fedavg.global_state)
    for ours, theirs in zip(mine.clients, fedavg.clients, strict=True):
        assert same_states(ours.state, theirs.state)
    assert mine.cost == fedavg.cost, "nothing extra sent"
    assert mine.server.mean is None
    active = toy_rounds(FedIIR, toy_config(2, gamma=0.05), data, 2)
    assert not same_states(active.global_state, fedavg.global_state)


def test_fediir_repeats_bit_for_bit(data):
    one = toy_rounds(FedIIR, toy_config(2, gamma=0.05), data, 2)
    two = toy_rounds(FedIIR, toy_config(2, gamma=0.05), data, 2)
    assert same_states(one.global_state, two.global_state)
    for a, b in zip(one.clients, two.clients, strict=True):
        assert same_states(a.state, b.state)
    assert same_states(one.server.mean, two.server.mean)


def recording_fediir(calls: list[dict]) -> type[FedIIR]:
    """FedIIR recording, for each local update, the gradient it sends and, for every penalty it
    adds, the value, a copy of the model, the batch and the reference it aligned with."""

    class Spy(start_spy(FedIIR)):
        def local_update(self, model, ctx):
            calls.append({"round": ctx.round, "received": clone_state(ctx.received), "terms": []})
            sent = super().local_update(model, ctx)
            calls[-1]["sent"] = clone_state(sent)
            return sent

        def train_steps(self, model, ctx, epochs, params=None, penalty=None):
            seen = {}
            batches = ctx.batches

            def noted():
                for inputs, targets in batches():
                    seen.update(x=inputs, y=targets)
                    yield inputs, targets

            def recorded(m):
                value = penalty(m)
                calls[-1]["terms"].append((value.detach(), copy.deepcopy(m), seen["x"], seen["y"]))
                return value

            ctx.batches = noted
            try:
                super().train_steps(model, ctx, epochs, params, recorded)
            finally:
                ctx.batches = batches

    return Spy


def classifier_gradient(model, task, inputs, targets) -> dict:
    """d task loss / d output layer, in train mode, by plain autograd on a copy of `model`."""
    model = copy.deepcopy(model).train()
    prefix, layer = output_layer(model)
    loss = task.loss(model(inputs), targets)
    grads = torch.autograd.grad(loss, [layer.weight, layer.bias])
    return {f"{prefix}.weight": grads[0], f"{prefix}.bias": grads[1]}


def test_fediir_penalty_and_sent_gradients_recomputed_on_the_toy_unet(data):
    gamma, ema = 0.5, 0.8
    calls: list[dict] = []
    spy = recording_fediir(calls)
    fed = toy_rounds(spy, toy_config(2, gamma=gamma, ema=ema), data, 2)
    clients = len(data.sites)
    assert len(calls) == 2 * clients and all(c["terms"] for c in calls)
    for call, begun in zip(calls, spy.starts, strict=True):
        # what it sends: the gradient at the round's start model on its split, batches of 4
        model = fed.build_model()
        model.load_state_dict(begun["state"])
        split = fed.clients[begun["client"]].train
        parts = [(len(x), classifier_gradient(model, fed.task, x, y)) for x, y in split.batches(4)]
        for key, value in call["sent"].items():
            expected = sum(n * g[key] for n, g in parts) / len(split)
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
    sizes = [len(c.train) for c in fed.clients]
    first = {
        k: (1 - ema) * sum(n * c["sent"][k].double() for n, c in zip(sizes, calls)) / sum(sizes)
        for k in calls[0]["sent"]
    }
    for call in calls:
        reference = call["received"] or {k: torch.zeros(v.shape) for k, v in first.items()}
        if call["round"] == 2:
            for key, value in first.items():
                torch.testing.assert_close(reference[key], value.float())
        for value, model, inputs, targets in call["terms"]:
            g = classifier_gradient(model, fed.task, inputs, targets)
            expected = gamma * sum((g[k] - reference[k]).pow(2).sum() for k in g)
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-8)
    assert all(not c["received"] for c in calls[:clients]), "nothing to align with in round 1"


def update(client: int, samples: int, value: float, grad: list[float] | None) -> ClientUpdate:
    extras = {} if grad is None else {"w": torch.tensor(grad)}
    return ClientUpdate({"m": torch.tensor([value])}, samples, extras, client=client)


def test_fediir_server_moving_average_by_hand():
    server = FedIIR({"ema": 0.5}, 3)
    assert server.server_payload(0) == {}
    previous = {"m": torch.zeros(1)}
    new = server.server_update(
        previous, [update(0, 2, 1.0, [1.0, 2.0]), update(1, 6, 3.0, [3.0, -2.0])]
    )
    # the models: FedAvg's (2 * 1 + 6 * 3) / 8; the gradients: (2 (1, 2) + 6 (3, -2)) / 8 =
    # (2.5, -1), half of it (from gbar = 0)
    torch.testing.assert_close(new["m"], torch.tensor([2.5]))
    assert torch.equal(server.mean["w"], torch.tensor([1.25, -0.5]))
    sent = server.server_payload(2)
    assert torch.equal(sent["w"], server.mean["w"]) and sent["w"] is not server.mean["w"]
    # round 2, only client 2 sends (client 1 took part and sent nothing):
    # 0.5 * (1.25, -0.5) + 0.5 * (0.25, 1) = (0.75, 0.25)
    server.server_update(new, [update(1, 6, 3.0, None), update(2, 4, 0.0, [0.25, 1.0])])
    assert torch.equal(server.mean["w"], torch.tensor([0.75, 0.25]))
    restored = FedIIR({}, 3)
    restored.load_state_dict(server.state_dict())
    assert same_states(restored.mean, server.mean)


def test_fediir_counts_the_gradients_in_the_bytes(data):
    fed = toy_rounds(FedIIR, toy_config(3, gamma=0.05), data, 3)
    fedavg = toy_rounds(FedAvg, toy_config(3), data, 3)
    model = fed.build_model()
    state = model.state_dict()
    assert sum(state[k].numel() * 4 for k in output_layer_keys(model)) == GRAD_BYTES
    clients = len(data.sites)
    assert fed.cost["bytes_up"] - fedavg.cost["bytes_up"] == 3 * clients * GRAD_BYTES
    assert fed.cost["bytes_down"] - fedavg.cost["bytes_down"] == 2 * clients * GRAD_BYTES
    assert {k: v.dtype for k, v in fed.server.mean.items()} == dict.fromkeys(
        output_layer_keys(model), torch.float32
    )


@pytest.mark.parametrize("clients", ["all", 2])
def test_fediir_resumes_bit_for_bit(data, tmp_path, clients):
    config = toy_config(3, gamma=0.05)
    if clients != "all":
        config = partial(config)
    assert resumes_exactly(FedIIR, config, data, tmp_path)


def test_fediir_refuses_bad_settings_by_name():
    refuses_by_name(
        FedIIR,
        toy_config,
        {"gamma": [-0.1, "x", True, None], "ema": [1.0, -0.1, 1.5, "x", True, None]},
    )
