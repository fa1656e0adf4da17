"""HarmoFL against its definition: FedAvg in the limit, amplitude normalization by FFT (phase kept,
amplitude set), the perturbed gradient by hand, and the amplitude buffer that stays on clients."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import LR, same_states, sgd_config, toy_config, toy_rounds, toy_training

from fedbench.errors import FedbenchError
from fedbench.method import clone_state
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.harmofl import HarmoFL, normalize_amplitude, perturbed_gradients

CPU = torch.device("cpu")


# the limiting case


def test_without_perturbation_or_amplitude_harmofl_is_fedavg_bit_for_bit(data):
    cfg = toy_config(2, rho=0.0, amplitude=False)
    mine, fedavg = toy_rounds(HarmoFL, cfg, data, 2), toy_rounds(FedAvg, toy_config(2), data, 2)
    assert same_states(mine.global_state, fedavg.global_state)
    for a, b in zip(mine.client_states, fedavg.client_states, strict=True):
        assert same_states(a, b)
    assert mine.cost == fedavg.cost


@pytest.mark.parametrize("params", [{"amplitude": False}, {"rho": 0.0}])
def test_each_part_alone_changes_the_training(data, params):
    fedavg = toy_rounds(FedAvg, toy_config(1), data, 1)
    mine = toy_rounds(HarmoFL, toy_config(1, **params), data, 1)
    assert not same_states(mine.global_state, fedavg.global_state)


# (a) amplitude normalization


def cosine_image(offset: float, contrast: float, height: int = 8, width: int = 6) -> torch.Tensor:
    """offset + contrast * cos(2 pi (2 col / W + row / H)) in float64, [H, W]."""
    rows = torch.arange(height, dtype=torch.float64)[:, None]
    cols = torch.arange(width, dtype=torch.float64)[None, :]
    return offset + contrast * torch.cos(2 * math.pi * (2 * cols / width + rows / height))


def test_normalizing_a_cosine_to_another_cosines_amplitude_gives_that_cosine():
    source = cosine_image(1.0, 0.5)[None, None]
    target = torch.fft.fft2(cosine_image(3.0, 2.0)).abs()[None]
    out = normalize_amplitude(source, target, 0.5)
    torch.testing.assert_close(out[0, 0], cosine_image(3.0, 2.0))
    dc_only = normalize_amplitude(source, target, 0.0)
    torch.testing.assert_close(dc_only[0, 0], cosine_image(3.0, 0.5))


def textured(seed: int) -> torch.Tensor:
    """A float64 [2, 8, 6] image pattern (two channels) with no zero in its spectrum."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(2, 8, 6, generator=gen, dtype=torch.float64) + 1.0


@pytest.mark.parametrize("band", [0.5, 0.25, 0.0])
def test_amplitude_normalization_keeps_the_phase_and_sets_the_amplitude_in_the_band(band):
    image, other = textured(0), textured(1)
    target = torch.fft.fft2(other).abs()
    before = torch.fft.fft2(image)
    after = torch.fft.fft2(normalize_amplitude(image[None], target, band)[0])
    torch.testing.assert_close(after / after.abs(), before / before.abs())
    fy = torch.fft.fftfreq(8, d=1 / 8).abs()[:, None]
    fx = torch.fft.fftfreq(6, d=1 / 6).abs()[None, :]
    inside = (fy <= math.floor(band * 8)) & (fx <= math.floor(band * 6))
    expected = torch.where(inside, target, before.abs())
    torch.testing.assert_close(after.abs(), expected)
    assert inside.all() == (band == 0.5) and inside.sum() >= 1


def test_the_buffer_is_a_running_mean_and_the_model_sees_images_normalized_to_it(data):
    momentum, band = 0.3, 0.25
    cfg = toy_config(1, rho=0.0, amplitude_momentum=momentum, amplitude_band=band)
    seen: list[torch.Tensor] = []

    class Spy(HarmoFL):
        def objective(self, model, ctx, inputs, targets):
            seen.append(inputs.clone())
            return super().objective(model, ctx, inputs, targets)

    fed = toy_training(data, data.sites, Spy, cfg, seed=0, device=CPU)
    generator = torch.Generator().manual_seed(0)
    generator.set_state(fed.generator.get_state())
    fed.run_round()
    expected: list[torch.Tensor] = []
    for client, split in enumerate(fed.clients):
        running = None
        for raw, _ in split.batches(int(cfg["train"]["batch_size"]), generator):
            mean = torch.stack([torch.fft.fft2(x).abs() for x in raw]).mean(0)
            running = mean if running is None else (1 - momentum) * running + momentum * mean
            expected.append(normalize_amplitude(raw, running, band))
        torch.testing.assert_close(fed.method.amplitudes[client], running)
    assert len(seen) == len(expected)
    for got, want in zip(seen, expected, strict=True):
        torch.testing.assert_close(got, want)


# (b) weight perturbation


class Quadratic(torch.nn.Module):
    """loss 0.5 * (||a||^2 + ||b||^2); a buffer the loss's forward pass counts up."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor([[0.5, -2.0]], dtype=torch.float64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def loss(self) -> torch.Tensor:
        self.calls += 1
        return 0.5 * (self.a.pow(2).sum() + self.b.pow(2).sum())


@pytest.mark.parametrize("rho", [0.05, 1.5])
def test_the_perturbed_gradient_of_half_the_squared_norm_is_w_plus_rho_w_over_its_norm(rho):
    model = Quadratic()
    a, b = model.a.detach().clone(), model.b.detach().clone()
    model.loss().backward()
    calls = model.calls.clone()
    perturbed_gradients(model, model.loss, rho)
    norm = torch.sqrt(a.pow(2).sum() + b.pow(2).sum())  # one norm over all parameters
    torch.testing.assert_close(model.a.grad, a + rho * a / norm)
    torch.testing.assert_close(model.b.grad, b + rho * b / norm)
    assert torch.equal(model.a, a) and torch.equal(model.b, b), "weights return exactly"
    assert torch.equal(model.calls, calls), "buffers are as the first pass left them"


def test_a_local_update_steps_with_the_gradient_at_the_perturbed_weights(data):
    rho = 0.5
    cfg = sgd_config(1, rho=rho, amplitude=False)
    fed = toy_training(data, data.sites, HarmoFL, cfg, seed=0, device=CPU)
    start, state = clone_state(fed.client_view(0)), fed.generator.get_state()
    fed.run_round()
    model = fed.build_model()
    model.load_state_dict(start)
    model.train()
    generator = torch.Generator().manual_seed(0)
    generator.set_state(state)
    for inputs, targets in fed.clients[0].batches(int(cfg["train"]["batch_size"]), generator):
        grads = torch.autograd.grad(fed.task.loss(model(inputs), targets), model.parameters())
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            for p, g in zip(shifted.parameters(), grads, strict=True):
                p += rho * g / norm
        loss = fed.task.loss(shifted(inputs), targets)
        sharp = torch.autograd.grad(loss, list(shifted.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), sharp, strict=True):
                p -= LR * g
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fed.client_states[0][key], value, rtol=1e-5, atol=1e-6)


# what stays on the client


def test_the_amplitude_buffer_never_reaches_the_server_and_survives_a_state_dict(data):
    received: list = []

    class Spy(HarmoFL):
        def server_update(self, previous, updates):
            received.extend(updates)
            return super().server_update(previous, updates)

    fed = toy_rounds(Spy, toy_config(2), data, 2)
    buffers = [a.clone() for a in fed.method.amplitudes]
    assert all(a.shape == data.sites[0].train.inputs.shape[1:] for a in buffers)
    assert not torch.equal(buffers[0], buffers[1]), "one buffer per client"
    keys = set(fed.model.state_dict())
    assert len(received) == 2 * len(data.sites)
    for update in received:
        assert update.extras == {} and set(update.state) == keys
        assert all(t.shape != buffers[0].shape for t in update.state.values())
    assert fed.method.server_payload() == {}
    assert fed.cost["bytes_up"] == toy_rounds(FedAvg, toy_config(2), data, 2).cost["bytes_up"]
    saved = fed.method.state_dict()
    restored = HarmoFL(toy_config(2)["method"], len(data.sites))
    restored.load_state_dict(saved)
    saved["amplitudes"][0].add_(1.0)  # neither the method nor the restored one shares it
    for owner in (fed.method, restored):
        for mine, theirs in zip(owner.amplitudes, buffers, strict=True):
            assert torch.equal(mine, theirs)


def test_settings_are_checked_and_name_the_setting():
    HarmoFL.check_settings(toy_config(1))
    HarmoFL.check_settings(toy_config(1, rho=0, amplitude_momentum=1.0, amplitude_band=0))
    bad = {
        "rho": -0.1,
        "amplitude": "yes",
        "amplitude_momentum": 0.0,
        "amplitude_band": 0.6,
    }
    for key, value in bad.items():
        with pytest.raises(FedbenchError, match=f"method.{key}"):
            HarmoFL.check_settings(toy_config(1, **{key: value}))
    with pytest.raises(FedbenchError, match="method.amplitude"):
        HarmoFL({}, 1).harmonized(0, torch.zeros(4, 3))
