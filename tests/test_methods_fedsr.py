"""FedSR against its definition: the FedAvg limit, the regularizer by hand, the term training
uses recomputed from the output layer's input, and the prior shared through the server."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import same_states, toy_config, toy_rounds
from method_checks import refuses_by_name, resumes_exactly

from fedbench.errors import FedbenchError
from fedbench.method import clone_state
from fedbench.models import output_layer
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.fedsr import LOG_SCALE, MEAN, FedSR, labels_at, regularizer

PRIOR_BYTES = 2 * 2 * 12 * 4  # mean and log-scale, [2 classes, 12 features] float32 each


def test_fedsr_with_both_alphas_zero_is_fedavg_bit_for_bit(data):
    fedsr = toy_rounds(FedSR, toy_config(2, alpha_l2r=0.0, alpha_cmi=0.0), data, 2)
    fedavg = toy_rounds(FedAvg, toy_config(2), data, 2)
    assert same_states(fedsr.global_state, fedavg.global_state)
    for mine, theirs in zip(fedsr.clients, fedavg.clients, strict=True):
        assert same_states(mine.state, theirs.state)
    assert fedsr.cost == fedavg.cost, "nothing extra sent"
    assert fedsr.server.prior is None
    one = toy_rounds(FedAvg, toy_config(1), data, 1)
    for alphas in ({"alpha_l2r": 0.01, "alpha_cmi": 0.0}, {"alpha_l2r": 0.0, "alpha_cmi": 0.01}):
        active = toy_rounds(FedSR, toy_config(1, **alphas), data, 1)
        assert not same_states(active.global_state, one.global_state), alphas


def test_fedsr_regularizer_by_hand():
    # z [1 image, 2 channels, 1 x 2 positions]: p1 = (1, 2) of class 0, p2 = (3, -1) of class 1
    z = torch.tensor([[[[1.0, 3.0]], [[2.0, -1.0]]]])
    targets = torch.tensor([[[0, 1]]])
    prior = {
        MEAN: torch.tensor([[0.0, 0.0], [1.0, 1.0]]),
        LOG_SCALE: torch.tensor([[0.0, 0.0], [math.log(2.0)] * 2]),
    }
    l2r = (1 + 4 + 9 + 1) / 2  # mean of ||z_p||^2 over the two positions
    # KL(N(z, I) || N(m, s^2)) = sum_c log s + (1 + (z - m)^2) / (2 s^2) - 1/2
    kl_p1 = (1 + 1) / 2 - 0.5 + (1 + 4) / 2 - 0.5  # s = 1, m = 0: sum_c z_c^2 / 2 = 2.5
    kl_p2 = 2 * (math.log(2.0) + (1 + 4) / 8 - 0.5)  # s = 2, m = 1, z - m = (2, -2)
    expected = 0.01 * l2r + 0.001 * (kl_p1 + kl_p2) / 2
    value = regularizer(z, targets, prior, 0.01, 0.001)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert regularizer(z, targets, prior, 0.01, 0.0).item() == pytest.approx(0.01 * l2r)
    assert regularizer(z, targets, prior, 0.0, 1.0).item() == pytest.approx((kl_p1 + kl_p2) / 2)
    # labels at twice z's resolution: the nearest label of each position (columns 0 and 2)
    fine = torch.tensor([[[0, 9, 1, 9], [9, 9, 9, 9]]])
    assert torch.equal(labels_at(fine, z), targets)
    assert regularizer(z, fine, prior, 0.01, 0.001).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(FedbenchError, match="method.alpha_cmi"):
        labels_at(torch.zeros(1, 1, 2), z)


def recording_fedsr(calls: list[dict]) -> type[FedSR]:
    """FedSR recording every penalty it adds: the value, a copy of the model, the batch, the
    prior as it was then, and the prior each local update started from."""

    class Spy(FedSR):
        def starting_prior(self, model, ctx):
            self.live = super().starting_prior(model, ctx)
            calls.append({"round": ctx.round, "start": clone_state(self.live), "terms": []})
            return self.live

        def train_steps(self, model, ctx, epochs, params=None, penalty=None):
            seen = {}
            handle = model.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
            batches = ctx.batches

            def noted():
                for inputs, targets in batches():
                    seen["y"] = targets
                    yield inputs, targets

            def recorded(m):
                value = penalty(m)
                prior = clone_state(self.live)
                term = (value.detach(), copy.deepcopy(m), seen["x"], seen["y"], prior)
                calls[-1]["terms"].append(term)
                return value

            ctx.batches = noted
            try:
                super().train_steps(model, ctx, epochs, params, recorded)
            finally:
                handle.remove()
                ctx.batches = batches

    return Spy


def output_features(model, inputs) -> torch.Tensor:
    """The input of the model's output layer on `inputs`, in the model's mode (train mode, as in
    training: normalization by the batch's own statistics), without gradients."""
    found = {}
    _, layer = output_layer(model)
    handle = layer.register_forward_pre_hook(lambda m, a: found.update(z=a[0]))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
    return found["z"]


def test_fedsr_penalty_is_the_regularizer_of_the_output_layer_input(data):
    alpha_l2r, alpha_cmi = 0.02, 0.5
    calls: list[dict] = []
    toy_rounds(
        recording_fedsr(calls), toy_config(2, alpha_l2r=alpha_l2r, alpha_cmi=alpha_cmi), data, 2
    )
    assert len(calls) == 2 * len(data.sites) and all(c["terms"] for c in calls)
    for call in calls:
        for value, model, inputs, targets, prior in call["terms"]:
            z = output_features(model, inputs)
            assert z.shape[1:] == (12, 8, 8), "the toy U-Net's top skip + upsampled features"
            labels = targets[:, ::2, ::2]  # nearest neighbour at half the resolution
            rows = z.permute(0, 2, 3, 1).reshape(-1, 12)
            mean, log_scale = prior[MEAN][labels.reshape(-1)], prior[LOG_SCALE][labels.reshape(-1)]
            kl = log_scale + (1 + (rows - mean) ** 2) / (2 * torch.exp(2 * log_scale)) - 0.5
            expected = alpha_l2r * (rows**2).sum(1).mean() + alpha_cmi * kl.sum(1).mean()
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    trained = [t[4] for c in calls for t in c["terms"][1:]]
    assert any(not same_states(p, calls[0]["start"]) for p in trained), "the prior trains"


def test_fedsr_prior_is_shared_through_the_server(data):
    calls: list[dict] = []
    received: list[list] = []

    class Spy(recording_fedsr(calls)):
        def server_update(self, previous, updates):
            received.append([(u.num_samples, clone_state(u.extras)) for u in updates])
            return super().server_update(previous, updates)

    fed = toy_rounds(Spy, toy_config(2), data, 2)
    clients = len(data.sites)
    for call in calls[:clients]:
        assert call["round"] == 1
        assert all(not t.any() for t in call["start"].values()), "N(0, I) to start"
    for call, (_, sent) in zip(calls[:clients], received[0], strict=True):
        assert not same_states(sent, call["start"]), "each sends the prior it trained"
    for client, (_, sent) in zip(fed.clients, received[1], strict=True):
        assert same_states(sent, clone_state(client.method.live)), "as its training ended"
    total = sum(n for n, _ in received[0])
    for key in (MEAN, LOG_SCALE):
        mean = sum(n * sent[key].double() for n, sent in received[0]) / total
        for call in calls[clients:]:
            torch.testing.assert_close(call["start"][key], mean.float())
        latest = sum(n * sent[key].double() for n, sent in received[1]) / total
        torch.testing.assert_close(fed.server.prior[key], latest.float())
    fedavg = toy_rounds(FedAvg, toy_config(2), data, 2)
    assert fed.cost["bytes_up"] - fedavg.cost["bytes_up"] == 2 * clients * PRIOR_BYTES
    assert fed.cost["bytes_down"] - fedavg.cost["bytes_down"] == clients * PRIOR_BYTES


def test_fedsr_resumes_bit_for_bit_and_refuses_negative_alphas(data, tmp_path):
    assert resumes_exactly(FedSR, toy_config(3), data, tmp_path)
    fed = toy_rounds(FedSR, toy_config(1), data, 1)
    restored = FedSR({}, len(data.sites))
    restored.load_state_dict(fed.server.state_dict())
    assert same_states(restored.prior, fed.server.prior)
    refuses_by_name(FedSR, toy_config, {"alpha_l2r": [-0.1, "x", True], "alpha_cmi": [-1e-3, None]})
