"""MOON and FedRoD against their papers' definitions (recomputations, not stored numbers)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LR, same_states, sgd_config, toy_builder, toy_config, toy_rounds, toy_training

from fedbench.errors import FedbenchError
from fedbench.method import ClientUpdate, clone_state
from fedbench.models import output_layer, output_layer_keys
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.fedrod import FedRoD, balanced_logits, class_prior
from fedbench_plugins.moon import Moon, captured, contrastive_loss, find_bottleneck

CPU = torch.device("cpu")
BOTTOM = "model.1.submodule"  # the toy U-Net's bottom block, written out by hand


def spying(method_cls):
    """A subclass that records what the server receives."""

    class Spy(method_cls):
        name = method_cls.name
        received: list[list[ClientUpdate]] = []

        def server_update(self, previous, updates):
            Spy.received.append(list(updates))
            return super().server_update(previous, updates)

    Spy.received = []
    return Spy


# MOON


def test_moon_with_mu_zero_is_fedavg_bit_for_bit(data):
    moon = toy_rounds(Moon, toy_config(3, mu=0.0), data, 3)
    fedavg = toy_rounds(FedAvg, toy_config(3), data, 3)
    assert all(c.method.previous is not None for c in moon.clients), "rounds 2-3 had one"
    assert same_states(moon.global_state, fedavg.global_state)
    for mine, theirs in zip(moon.clients, fedavg.clients, strict=True):
        assert same_states(mine.state, theirs.state)
    assert moon.cost == fedavg.cost
    active = toy_rounds(Moon, toy_config(2, mu=1.0), data, 2)
    assert not same_states(active.global_state, fedavg.global_state), "mu > 0 changes round 2"
    first = toy_rounds(Moon, toy_config(1, mu=1.0), data, 1)
    assert same_states(first.global_state, toy_rounds(FedAvg, toy_config(1), data, 1).global_state)


def test_moon_contrastive_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    z_glob = torch.tensor([[1.0, 1.0], [3.0, 4.0]])  # cosines 1/sqrt(2) and 1
    z_prev = torch.tensor([[0.0, 2.0], [-3.0, -4.0]])  # cosines 0 and -1
    tau = 0.5
    first = -math.log(math.exp(2**-0.5 / tau) / (math.exp(2**-0.5 / tau) + math.exp(0.0)))
    second = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(-1 / tau)))
    value = contrastive_loss(z, z_glob, z_prev, tau)
    assert value.item() == pytest.approx((first + second) / 2, rel=1e-6)
    same_anchor = contrastive_loss(z, z_glob, z_glob, tau)
    assert same_anchor.item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize(("channels", "size"), [([4, 8], 8), ([4, 8, 16], 4)])
def test_moon_finds_the_toy_unet_bottleneck(data, channels, size):
    model = toy_builder(data, {"channels": channels, "res_units": 0})()
    inputs = torch.randn(3, 1, 16, 16)
    name = find_bottleneck(model, inputs[:2])
    with captured(model.get_submodule(name)) as found, torch.no_grad():
        model(inputs)
    assert tuple(found["out"].shape) == (3, channels[-1], size, size)
    bottom = BOTTOM + ".1.submodule" * (len(channels) - 2)
    with captured(model.get_submodule(bottom)) as block, torch.no_grad():
        model(inputs)
    assert torch.equal(found["out"], block["out"]), "the bottom block's own output"


def test_moon_penalty_is_mu_times_lcon_against_global_and_previous(data):
    mu, tau = 2.0, 0.5
    calls: list[dict] = []

    class Spy(Moon):
        def train_contrastive(self, model, ctx, previous, epochs):
            calls.append({"global": clone_state(ctx.global_state), "prev": clone_state(previous)})
            super().train_contrastive(model, ctx, previous, epochs)

        def train_steps(self, model, ctx, epochs, params=None, penalty=None):
            if penalty is None:
                return super().train_steps(model, ctx, epochs, params, penalty)
            seen = {}
            handle = model.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))

            def recorded(m):
                value = penalty(m)
                calls[-1].setdefault("terms", []).append(
                    (value.detach(), seen["x"], copy.deepcopy(m))
                )
                return value

            try:
                super().train_steps(model, ctx, epochs, params, recorded)
            finally:
                handle.remove()

    fed = toy_rounds(Spy, toy_config(2, mu=mu, tau=tau), data, 2)
    assert len(calls) == len(data.sites), "round 2 only"
    previous = [c.method.previous for c in fed.clients]
    for call, state in zip(calls, previous, strict=True):
        assert not same_states(call["global"], call["prev"])
        for value, inputs, local in call["terms"]:
            z = bottom_features(local, None, inputs)
            z_glob = bottom_features(fed.build_model(), call["global"], inputs)
            z_prev = bottom_features(fed.build_model(), call["prev"], inputs)
            pos, neg = F.cosine_similarity(z, z_glob) / tau, F.cosine_similarity(z, z_prev) / tau
            expected = mu * (-torch.log(pos.exp() / (pos.exp() + neg.exp()))).mean()
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        assert state is not None


def bottom_features(model, state, inputs) -> torch.Tensor:
    """Mean over positions of the toy U-Net's bottom block: the local model as it trains (train
    mode), anchors (`state` given) in eval mode."""
    if state is not None:
        model.load_state_dict(state)
        model.eval()
    with captured(model.get_submodule(BOTTOM)) as found, torch.no_grad():
        model(inputs)
    return found["out"].mean(dim=(2, 3))


def test_moon_previous_models_survive_a_state_dict_round_trip(data):
    fed = toy_rounds(Moon, toy_config(2), data, 2)
    for client in fed.clients:
        mine = client.method.previous
        assert same_states(mine, client.state), "the previous model is the client's trained model"
        saved = client.method.state_dict()
        restored = Moon({}, len(data.sites))
        restored.load_state_dict(saved)
        first = next(iter(saved["previous"]))
        saved["previous"][first].add_(1.0)
        assert same_states(restored.previous, client.state), "restored as copies"
    whole = toy_rounds(Moon, toy_config(3), data, 3)
    resumed = toy_training(data, data.sites, Moon, toy_config(3), seed=0, device=CPU)
    resumed.restore(copy.deepcopy(toy_rounds(Moon, toy_config(3), data, 2).snapshot()))
    resumed.run_round()
    assert same_states(resumed.global_state, whole.global_state)


def test_moon_checks_its_settings():
    for key, value in (("mu", -1.0), ("tau", 0.0), ("tau", "x")):
        with pytest.raises(FedbenchError, match=f"method.{key}"):
            Moon.check_settings(toy_config(1, **{key: value}))
    Moon.check_settings(toy_config(1, mu=5, tau=0.1))


# FedRoD


class UniformPrior(FedRoD):
    def class_prior(self, split, num_classes):
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)


def test_fedrod_without_personal_head_scores_the_generic_model(data):
    fed = toy_rounds(FedRoD, sgd_config(2, personal_head=False), data, 2)
    assert [c.method.personal for c in fed.clients] == [None] * len(data.sites)
    generic = fed.server.unseen_site_state(fed.global_state)  # adjusted to the pooled prior
    for i in range(len(data.sites)):
        assert same_states(fed.personalized(i), generic)
    fedavg = toy_rounds(FedAvg, sgd_config(2), data, 2)
    assert not same_states(fed.global_state, fedavg.global_state), (
        "the balanced risk is not FedAvg's"
    )
    uniform = toy_rounds(UniformPrior, sgd_config(2, personal_head=False), data, 2)
    for key, value in fedavg.global_state.items():  # a constant shift leaves softmax unchanged
        torch.testing.assert_close(uniform.global_state[key], value, rtol=1e-4, atol=1e-5)
    joint = toy_rounds(FedRoD, sgd_config(2, personal_head=True), data, 2)
    assert same_states(joint.global_state, fed.global_state), (
        "the personal head trains nothing shared"
    )


def test_fedrod_balanced_softmax_by_hand():
    targets = torch.tensor([[0, 0], [0, 2]])  # 3 zeros, no one, one two, C = 3
    prior = class_prior(targets, 3)
    torch.testing.assert_close(prior, torch.tensor([4 / 7, 1 / 7, 2 / 7], dtype=torch.float64))
    logits = torch.tensor([[2.0, 0.5]])
    pi = torch.tensor([0.8, 0.2], dtype=torch.float64)
    loss = F.cross_entropy(balanced_logits(logits, pi), torch.tensor([1]))
    by_hand = -math.log(0.2 * math.exp(0.5) / (0.8 * math.exp(2.0) + 0.2 * math.exp(0.5)))
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    maps = torch.randn(2, 2, 3, 3)
    shifted = balanced_logits(maps, pi)
    for c in range(2):  # every pixel's class-c logit moves by log pi_c
        torch.testing.assert_close(
            shifted[:, c] - maps[:, c], torch.full((2, 3, 3), math.log(pi[c]))
        )
    with pytest.raises(FedbenchError, match="class labels"):
        class_prior(torch.rand(4), 2)


def test_fedrod_server_never_receives_the_personal_head(data):
    spy = spying(FedRoD)
    fed = toy_rounds(spy, toy_config(2), data, 2)
    head = output_layer_keys(fed.model)
    every = set(fed.model.state_dict())
    for round_index, updates in enumerate(spy.received):
        for update in updates:
            assert set(update.state) == every
            assert set(update.extras) == ({"class_counts"} if round_index == 0 else set())
    fedavg = toy_rounds(FedAvg, toy_config(2), data, 2)
    counts = len(data.sites) * 2 * 8  # C = 2 int64 label counts per client, sent once
    assert (fed.cost["bytes_up"], fed.cost["bytes_down"]) == (
        fedavg.cost["bytes_up"] + counts,
        fedavg.cost["bytes_down"],
    )
    for i, personal in enumerate(c.method.personal for c in fed.clients):
        assert set(personal) == head
        assert all(v.abs().sum() > 0 for v in personal.values()), "the head trained"
        scored = fed.personalized(i)
        for key in head:
            assert torch.equal(scored[key], fed.global_state[key] + personal[key])
            sent = spy.received[-1][i].state[key]
            assert not torch.equal(sent, scored[key]) and not torch.equal(sent, personal[key])


@pytest.mark.parametrize("res_units", [0, 1])
def test_fedrod_summed_head_model_is_generic_plus_personal_logits(data, res_units):
    build = toy_builder(data, {"channels": [4, 8], "res_units": res_units})
    generic = build().eval()
    prefix, layer = output_layer(generic)
    method = FedRoD({}, 1)
    personal = {key: torch.randn_like(v) for key, v in layer.state_dict().items()}
    method.client = 0
    method.personal = {f"{prefix}.{k}": v for k, v in personal.items()}
    summed = build().eval()
    summed.load_state_dict(method.personalized_state(0, clone_state(generic.state_dict())))
    inputs = torch.randn(2, 1, 16, 16)
    seen = {}
    handle = layer.register_forward_pre_hook(lambda m, a: seen.update(z=a[0]))
    with torch.no_grad():
        expected = generic(inputs)
        head = copy.deepcopy(layer)
        head.load_state_dict(personal)
        expected = expected + head(seen["z"])
        torch.testing.assert_close(summed(inputs), expected, rtol=1e-5, atol=1e-5)
    handle.remove()


def inputs_of(layer) -> dict:
    """A dict whose "z" is, after each forward, the latest input of `layer`."""
    seen: dict = {}
    layer.register_forward_pre_hook(lambda m, a: seen.update(z=a[0]))
    return seen


def test_fedrod_one_step_by_hand_balanced_network_plain_summed_head(data):
    cfg = sgd_config(1)
    cfg["train"]["batch_size"] = 16  # one batch, one step per client
    fed = toy_training(data, data.sites, FedRoD, cfg, seed=0, device=CPU)
    start = clone_state(fed.global_state)
    fed.run_round()
    for client in fed.clients:
        split = client.train
        counts = torch.stack([(split.targets == c).sum() for c in range(2)]).double()
        prior = (counts + 1) / (counts.sum() + 2)
        model = fed.build_model()
        model.load_state_dict(start)
        model.train()
        prefix, layer = output_layer(model)
        head = {k: torch.zeros_like(v, requires_grad=True) for k, v in layer.named_parameters()}
        seen = inputs_of(layer)
        outputs = model(split.inputs)
        generic_loss = fed.task.loss(
            outputs + prior.log().float().reshape(1, 2, 1, 1), split.targets
        )
        personal_out = outputs.detach() + torch.func.functional_call(
            layer, head, seen["z"].detach()
        )
        personal_loss = fed.task.loss(personal_out, split.targets)
        names, params = zip(*model.named_parameters(), strict=True)
        grads = torch.autograd.grad(generic_loss, params)
        head_grads = torch.autograd.grad(personal_loss, list(head.values()))
        for name, param, grad in zip(names, params, grads, strict=True):
            expected = param.detach() - LR * grad
            torch.testing.assert_close(client.state[name], expected, rtol=1e-4, atol=1e-5)
        for key, grad in zip(head, head_grads, strict=True):
            got = client.method.personal[f"{prefix}.{key}"]
            torch.testing.assert_close(got, -LR * grad, rtol=1e-4, atol=1e-6)


def test_fedrod_personal_heads_and_counts_survive_a_resume(data):
    whole = toy_rounds(FedRoD, toy_config(3), data, 3)
    resumed = toy_training(data, data.sites, FedRoD, toy_config(3), seed=0, device=CPU)
    resumed.restore(copy.deepcopy(toy_rounds(FedRoD, toy_config(3), data, 2).snapshot()))
    resumed.run_round()
    for i in range(len(data.sites)):
        assert same_states(resumed.personalized(i), whole.personalized(i))
    assert same_states(resumed.unseen_site_model()[0], whole.unseen_site_model()[0])


def test_fedrod_checks_its_settings():
    with pytest.raises(FedbenchError, match="method.personal_head"):
        FedRoD.check_settings(toy_config(1, personal_head="yes"))
    FedRoD.check_settings(toy_config(1, personal_head=False))
