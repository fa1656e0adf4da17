"""FedALA against its paper's definition: each update recomputed
by hand, the limiting cases against FedAvg, and resuming from a checkpoint."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from conftest import (
    LR,
    same_states,
    sgd_config,
    toy_config,
    toy_rounds,
)
from method_checks import (
    BATCH,
    SquaredError,
    linear_grads,
    partial,
    random_linear,
    refuses_by_name,
    resumes_exactly,
    start_spy,
    stream,
)

from fedbench.method import clone_state
from fedbench_plugins.fedala import FedALA, ala_init, learn_weights, top_keys
from fedbench_plugins.fedavg import FedAvg

# FedALA


def test_fedala_initialization_by_hand():
    own = {"w": torch.tensor([1.0, 2.0, 3.0, -2.0]), "b": torch.tensor([0.5])}
    glob = {"w": torch.tensor([3.0, 2.0, -1.0, 6.0]), "b": torch.tensor([-0.5])}
    weights = {"w": torch.tensor([0.0, 0.5, 1.0, 0.25]), "b": torch.tensor([0.5])}
    mixed = ala_init(own, glob, weights)
    assert set(mixed) == {"w", "b"}
    torch.testing.assert_close(mixed["w"], torch.tensor([1.0, 2.0, -1.0, 0.0]))
    torch.testing.assert_close(mixed["b"], torch.tensor([0.0]))
    assert ala_init(own, glob, {"b": weights["b"]}).keys() == {"b"}, "lower layers: theta"
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    assert top_keys(model, 0) == []
    assert top_keys(model, 1) == ["1.bias"]
    assert top_keys(model, 2) == ["1.weight", "1.bias"]
    assert top_keys(model, 9) == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_fedala_weight_learning_by_hand():
    """Two batches, one pass: W <- clip(W - eta * grad(theta_hat) * (theta - theta_i), 0, 1),
    theta_hat recomputed after each batch."""
    gen = torch.Generator().manual_seed(1)
    model = random_linear(gen)
    glob = clone_state(model.state_dict())
    own = {k: v + torch.randn(v.shape, generator=gen) for k, v in glob.items()}
    weights = {k: 0.2 + 0.6 * torch.rand(v.shape, generator=gen) for k, v in glob.items()}
    batches = [(torch.randn(5, 3, generator=gen), torch.randn(5, 2, generator=gen)) for _ in "ab"]
    eta = 2.0
    learned, steps = learn_weights(
        model, own, weights, lambda: iter(batches), SquaredError(), eta, 1, nullcontext
    )
    assert steps == 2
    expected = dict(weights)
    for x, y in batches:
        theta_hat = {k: own[k] + (glob[k] - own[k]) * expected[k] for k in glob}
        grad = linear_grads(theta_hat, x, y)
        expected = {k: (expected[k] - eta * grad[k] * (glob[k] - own[k])).clamp(0, 1) for k in glob}
    for key in glob:
        torch.testing.assert_close(learned[key], expected[key])
        assert torch.equal(model.state_dict()[key], glob[key]), "learns on a copy"
    assert any(((v == 0) | (v == 1)).any() for v in learned.values()), "the clip is exercised"
    assert any(((v > 0) & (v < 1)).any() for v in learned.values())


class Recorded(FedALA):
    """FedALA recording the model local training starts from (after ALA)."""

    trained_from: list[dict] = []

    def train_steps(self, model, ctx, epochs, params=None, penalty=None):
        Recorded.trained_from.append(
            {"client": ctx.client, "round": ctx.round, "state": clone_state(model.state_dict())}
        )
        super().train_steps(model, ctx, epochs, params, penalty)


def test_fedala_local_training_starts_from_theta_hat(data):
    """Round 2 with a hand-made W (eta 0 keeps it): the top layers start from
    theta_i + (theta - theta_i) * W, every other key from the global model."""
    Recorded.trained_from = []
    fed = toy_rounds(Recorded, toy_config(2, layers=4, eta=0.0), data, 1)
    own = [clone_state(c.state) for c in fed.clients]
    glob = clone_state(fed.global_state)
    top = top_keys(fed.model, 4)
    gen = torch.Generator().manual_seed(5)
    hand = [{k: torch.rand(glob[k].shape, generator=gen) for k in top} for _ in fed.clients]
    for client, weights in zip(fed.clients, hand, strict=True):
        assert client.method.weights is None, "no ALA at the first participation"
        client.method.weights = clone_state(weights)
    first = Recorded.trained_from
    assert all(same_states(s["state"], first[0]["state"]) for s in first), "round 1: theta"
    fed.run_round()
    second = [s for s in Recorded.trained_from if s["round"] == 2]
    assert len(second) == len(fed.clients)
    for start in second:
        i = start["client"]
        for key, value in start["state"].items():
            if key in top:
                expected = own[i][key] + (glob[key] - own[i][key]) * hand[i][key]
                torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=key)
                assert not torch.equal(value, glob[key]), key
            else:
                assert torch.equal(value, glob[key]), key
        assert same_states(fed.clients[i].method.weights, hand[i]), "eta 0: W stays"
        assert same_states(fed.personalized(i), fed.clients[i].state), "scored: its own model"


def test_fedala_learns_w_on_its_drawn_subset_as_defined(data):
    """Round 2 replayed: the s% subset drawn from the client's stream, `ala_epochs` passes of
    W's steps from ones (the first ALA), then FedAvg's training from there."""
    spy = start_spy(FedALA)
    cfg = sgd_config(2, layers=3, eta=0.7, rand_percent=75, ala_epochs=2)
    fed = toy_rounds(spy, cfg, data, 2)
    for start in [s for s in spy.starts if s["round"] == 2]:
        i = start["client"]
        split = fed.clients[i].train
        generator = stream(start["generator"])
        count = int(len(split) * 75 / 100)
        order = torch.randperm(len(split), generator=generator)[:count]
        subset = [
            (split.inputs[order[a : a + BATCH]], split.targets[order[a : a + BATCH]])
            for a in range(0, count, BATCH)
            if min(a + BATCH, count) - a > 1
        ]
        model = fed.build_model()
        model.load_state_dict(start["state"])
        model.train()
        top = top_keys(model, 3)
        glob, own = start["global"], start["own"]
        weights = {k: torch.ones_like(glob[k]) for k in top}
        params = dict(model.named_parameters())
        for _ in range(2):
            for x, y in subset:
                with torch.no_grad():
                    for k in top:
                        params[k].copy_(own[k] + (glob[k] - own[k]) * weights[k])
                grads = torch.autograd.grad(fed.task.loss(model(x), y), [params[k] for k in top])
                weights = {
                    k: (weights[k] - 0.7 * g * (glob[k] - own[k])).clamp(0, 1)
                    for k, g in zip(top, grads, strict=True)
                }
        learned = fed.clients[i].method.weights
        assert not all(torch.equal(w, torch.ones_like(w)) for w in learned.values())
        for key in top:
            torch.testing.assert_close(learned[key], weights[key], rtol=1e-5, atol=1e-6)
        # then FedAvg's training from theta_hat, on the batches that follow on the stream
        start_state = {**glob, **ala_init(own, glob, learned)}
        replay = fed.build_model()
        replay.load_state_dict(start_state)
        replay.train()
        for x, y in split.batches(BATCH, generator):
            grads = torch.autograd.grad(fed.task.loss(replay(x), y), list(replay.parameters()))
            with torch.no_grad():
                for p, g in zip(replay.parameters(), grads, strict=True):
                    p -= LR * g
        for key, value in replay.state_dict().items():
            torch.testing.assert_close(fed.clients[i].state[key], value, rtol=1e-4, atol=1e-5)


def test_fedala_without_layers_is_fedavg_bit_for_bit(data):
    fedala = toy_rounds(FedALA, toy_config(2, layers=0), data, 2)
    fedavg = toy_rounds(FedAvg, toy_config(2), data, 2)
    assert same_states(fedala.global_state, fedavg.global_state)
    for i, (mine, theirs) in enumerate(zip(fedala.clients, fedavg.clients, strict=True)):
        assert same_states(mine.state, theirs.state)
        assert mine.method.weights is None
        assert same_states(fedala.personalized(i), mine.state), "scored with its own model"
        assert not same_states(fedala.personalized(i), fedala.global_state)
    assert fedala.cost == fedavg.cost | {"train_s": fedala.cost["train_s"]}


def test_fedala_resumes_exactly_and_checks_settings(data, tmp_path):
    assert resumes_exactly(FedALA, partial(sgd_config(3, ala_epochs=2)), data, tmp_path)
    bad = {"layers": [-1, 1.5], "ala_epochs": [True], "rand_percent": [0, 101], "eta": [-1, "a"]}
    refuses_by_name(FedALA, toy_config, bad)
