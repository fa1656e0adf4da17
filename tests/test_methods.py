"""Each built-in method tested against its definition, not against stored numbers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import toy_config, toy_data, toy_train, toy_training

from fedbench.data import FederatedData
from fedbench.engine.training import Training
from fedbench.method import ClientUpdate, Method
from fedbench.models import normalization_state_keys
from fedbench_plugins.central import Central
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.fedbn import FedBN
from fedbench_plugins.fedprox import FedProx
from fedbench_plugins.iopfl import IOPFL
from fedbench_plugins.local import Local

CPU = torch.device("cpu")


def spy(method_cls: type[Method]) -> type[Method]:
    """A subclass that records what the server receives and every local state."""

    class Spy(method_cls):
        received: list[list[ClientUpdate]] = []
        local_states: list[tuple[int, dict]] = []

        def aggregate(self, updates):
            Spy.received.append(updates)
            return super().aggregate(updates)

        def after_local_update(self, client, state):
            Spy.local_states.append((client, {k: v.clone() for k, v in state.items()}))
            super().after_local_update(client, state)

    Spy.received, Spy.local_states = [], []
    return Spy


def one_round(method_cls: type[Method], data: FederatedData, **params) -> Training:
    fed = toy_training(data, data.sites, method_cls, toy_config(1, **params), seed=0, device=CPU)
    fed.run_round()
    return fed


def test_fedavg_aggregate_is_sample_weighted_mean_including_buffers(data):
    method = spy(FedAvg)
    fed = one_round(method, data)
    (updates,) = method.received
    sizes = [len(s.train) for s in data.sites]
    assert [u.num_samples for u in updates] == sizes
    for key, value in fed.global_state.items():
        expected = sum(u.state[key].double() * n for u, n in zip(updates, sizes)) / sum(sizes)
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
        else:
            assert value == expected.round().to(value.dtype)
    buffers = [k for k in fed.global_state if "running_mean" in k]
    assert buffers, "the U-Net has BatchNorm running statistics"


def test_fedprox_with_mu_zero_equals_fedavg_exactly(data):
    a = toy_train(data, data.sites, FedAvg, toy_config(2), 0, CPU)
    b = toy_train(data, data.sites, FedProx, toy_config(2, mu=0.0), 0, CPU)
    for key, value in a.global_state.items():
        assert torch.equal(value, b.global_state[key]), key


def test_fedprox_penalty_is_mu_half_the_squared_distance_by_hand():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(0.5)
    anchor = {"weight": torch.tensor([[0.0, 4.0]]), "bias": torch.tensor([1.5])}
    penalty = FedProx({"mu": 0.2}, 1).local_penalty(model, anchor)
    # ||w - w_g||^2 = 1 + 4 + 1 = 6; mu / 2 * 6 = 0.6
    assert penalty.item() == pytest.approx(0.6)
    penalty.backward()
    torch.testing.assert_close(model.weight.grad, 0.2 * torch.tensor([[1.0, -2.0]]))
    assert FedProx({"mu": 0.0}, 1).local_penalty(model, anchor) is None


def test_fedprox_penalty_pulls_towards_global(data):
    far = toy_train(data, data.sites, FedProx, toy_config(2, mu=0.0), 0, CPU)
    near = toy_train(data, data.sites, FedProx, toy_config(2, mu=10.0), 0, CPU)
    start = toy_training(data, data.sites, FedAvg, toy_config(1), 0, CPU).global_state

    def drift(result):
        return sum((result.global_state[k] - start[k]).norm() for k in start if "weight" in k)

    assert drift(near) < drift(far)


def test_fedbn_keeps_normalization_local_and_averages_the_rest(data):
    method = spy(FedBN)
    fed = one_round(method, data)
    norm_keys = normalization_state_keys(fed.model)
    assert any("running_var" in k for k in norm_keys) and any(
        k.endswith("weight") for k in norm_keys
    )
    (updates,) = method.received
    for update in updates:
        assert not set(update.state) & norm_keys, "normalization state must never reach the server"
    sizes = [len(s.train) for s in data.sites]
    for key in fed.shared:
        expected = sum(u.state[key].double() * n for u, n in zip(updates, sizes)) / sum(sizes)
        if fed.global_state[key].dtype.is_floating_point:
            torch.testing.assert_close(fed.global_state[key].double(), expected)
    for i, (_, local_state) in enumerate(method.local_states):
        personal = fed.personalized(i)
        for key in norm_keys:
            assert torch.equal(personal[key], local_state[key]), key
        for key in fed.shared:
            assert torch.equal(personal[key], fed.global_state[key]), key
    key = next(k for k in norm_keys if "running_mean" in k)
    assert not torch.equal(fed.personalized(0)[key], fed.personalized(1)[key])


def test_local_never_mixes_sites(data):
    result = toy_train(data, data.sites, Local, toy_config(2), 0, CPU)
    assert result.cost["bytes_up"] == result.cost["bytes_down"] == 0
    assert result.global_state is None
    noisy_sites = list(data.sites)
    other = noisy_sites[1]
    noisy_train = dataclasses.replace(other.train, inputs=torch.randn_like(other.train.inputs))
    noisy_sites[1] = dataclasses.replace(other, train=noisy_train)
    noisy = FederatedData(data.name, noisy_sites, data.task)
    again = toy_train(noisy, noisy.sites, Local, toy_config(2), 0, CPU)
    for key, value in result.personalized[0].items():
        assert torch.equal(value, again.personalized[0][key]), key
    assert not torch.equal(
        result.personalized[1]["model.0.conv.weight"],
        again.personalized[1]["model.0.conv.weight"],
    )


def test_central_pools_every_site_into_one_client(data):
    fed = one_round(Central, data)
    assert len(fed.clients) == 1
    assert len(fed.clients[0].train) == sum(len(s.train) for s in data.sites)
    assert fed.cost["bytes_up"] == 0
    assert all(
        torch.equal(
            fed.personalized(i)["model.0.conv.weight"], fed.global_state["model.0.conv.weight"]
        )
        for i in range(3)
    )


def test_iopfl_ema_equals_closed_form_over_three_rounds(data):
    alpha = 0.1
    method = spy(IOPFL)
    fed = toy_training(data, data.sites, method, toy_config(3, alpha=alpha), seed=0, device=CPU)
    for _ in range(3):
        fed.run_round()
    for client in range(len(data.sites)):
        w1, w2, w3 = [s for c, s in method.local_states if c == client]
        tau = fed.personalized(client)
        for key in w1:
            if key.endswith("num_batches_tracked"):
                continue
            closed = alpha**2 * w1[key] + alpha * (1 - alpha) * w2[key] + (1 - alpha) * w3[key]
            torch.testing.assert_close(tau[key], closed, rtol=1e-5, atol=1e-6)


def test_iopfl_ema_is_a_copy_and_never_uploaded(data):
    method = spy(IOPFL)
    fed = toy_training(data, data.sites, method, toy_config(2, alpha=0.1), seed=0, device=CPU)
    fed.run_round()
    tau_before = {k: v.clone() for k, v in fed.personalized(0).items()}
    fed.model.load_state_dict({k: torch.zeros_like(v) for k, v in fed.model.state_dict().items()})
    for key, value in fed.personalized(0).items():
        assert torch.equal(value, tau_before[key])
    fed.run_round()
    uploaded = method.received[-1][0].state
    local = method.local_states[-3][1]
    for key in uploaded:
        assert torch.equal(uploaded[key], local[key]), "the server receives w_i, not tau_i"


@pytest.mark.parametrize("method_cls", [FedAvg, FedProx, FedBN, Local, Central, IOPFL])
def test_server_never_receives_images_or_masks(method_cls, data):
    method = spy(method_cls)
    fed = toy_training(data, data.sites, method, toy_config(1), seed=0, device=CPU)
    fed.run_round()
    model_shapes = {k: v.shape for k, v in fed.model.state_dict().items()}
    image_shapes = {tuple(s.train.inputs.shape[1:]) for s in data.sites} | {
        tuple(s.train.targets.shape[1:]) for s in data.sites
    }
    for updates in method.received:
        for update in updates:
            assert set(vars(update)) == {"state", "num_samples", "extras", "steps", "client"}
            assert isinstance(update.steps, int) and isinstance(update.client, int)
            for key, tensor in update.state.items():
                assert key in model_shapes and tensor.shape == model_shapes[key]
                assert tuple(tensor.shape[-2:]) not in image_shapes or tensor.dim() > 3
            assert update.extras == {}  # these methods send nothing beyond their state
    if not method.received:
        assert not fed.shared


def test_training_is_bit_for_bit_reproducible():
    data = toy_data()
    a = toy_train(data, data.sites, FedAvg, toy_config(2), 3, CPU)
    b = toy_train(data, data.sites, FedAvg, toy_config(2), 3, CPU)
    for key, value in a.global_state.items():
        assert torch.equal(value, b.global_state[key])
