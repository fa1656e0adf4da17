"""HarmoFL against its definition: FedAvg in the limit, amplitude normalization by FFT (phase kept,
amplitude set) inside the network every scored model runs, the amplitude buffer each client sets
in the first round, averaged once and then fixed, and the perturbed gradient by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import LR, same_states, sgd_config, toy_builder, toy_config, toy_rounds, toy_training

from fedbench.adapter import predict_batched
from fedbench.conformance import counted
from fedbench.engine.federations import load_or_train
from fedbench.engine.registry import load_registry
from fedbench.engine.resolve import RunSpec, resolve
from fedbench.engine.training import Training
from fedbench.errors import FedbenchError
from fedbench.method import clone_state, state_nbytes, weighted_mean
from fedbench.models import normalization_modules
from fedbench.task import SegmentationTask
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.harmofl import (
    HarmoFL,
    check_images,
    harmonized_class,
    normalize_amplitude,
    perturbed_gradients,
)

CPU = torch.device("cpu")
KEY = "amplitude"  # the buffer's key: the amplitude layer wraps the whole network


def harmo_config(rounds: int, **method: object) -> dict:
    """The toy config with the toy images' side as data.size (the amplitude buffer needs it)."""
    config = toy_config(rounds, **method)
    config["data"]["size"] = 16
    return config


def harmo_training(data, config: dict, method_cls: type = HarmoFL) -> Training:
    """A toy Training of the network `method_cls.network` makes, as a run builds it."""
    plain = toy_builder(data, config["model"])
    build = lambda: method_cls.network(plain(), data.task, config)  # noqa: E731
    return Training(data, data.sites, method_cls, build, config, 0, CPU)


def harmo_rounds(config: dict, data, rounds: int, method_cls: type = HarmoFL) -> Training:
    fed = harmo_training(data, config, method_cls)
    for _ in range(rounds):
        fed.run_round()
    return fed


def inner(state: dict) -> dict:
    """The plain network's part of a state (the amplitude buffer left out)."""
    return {k.removeprefix("network."): v for k, v in state.items() if k != KEY}


def plain_model(data, state: dict) -> torch.nn.Module:
    model = toy_builder(data)()
    model.load_state_dict(inner(state))
    return model


def network_inputs(model: torch.nn.Module) -> list[torch.Tensor]:
    """A list that collects every input the wrapped plain network receives from now on."""
    seen: list[torch.Tensor] = []
    model.network.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    return seen


# the limiting case


def test_without_perturbation_or_amplitude_harmofl_is_fedavg_bit_for_bit(data):
    cfg = harmo_config(2, rho=0.0, amplitude=False)
    network = toy_builder(data)()
    assert HarmoFL.network(network, data.task, cfg) is network, "the configured network itself"
    mine, fedavg = harmo_rounds(cfg, data, 2), toy_rounds(FedAvg, toy_config(2), data, 2)
    assert same_states(mine.global_state, fedavg.global_state)
    for a, b in zip(mine.clients, fedavg.clients, strict=True):
        assert same_states(a.state, b.state)
    assert counted(mine.cost) == counted(fedavg.cost)


@pytest.mark.parametrize("params", [{"amplitude": False}, {"rho": 0.0}])
def test_each_part_alone_changes_the_training(data, params):
    fedavg = toy_rounds(FedAvg, toy_config(1), data, 1)
    mine = harmo_rounds(harmo_config(1, **params), data, 1)
    assert inner(mine.global_state).keys() == fedavg.global_state.keys()
    assert not same_states(inner(mine.global_state), fedavg.global_state)


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


def test_the_first_round_sets_each_clients_running_amplitude_then_it_is_fixed(data):
    momentum, band = 0.3, 0.25
    cfg = harmo_config(2, rho=0.0, amplitude_momentum=momentum, amplitude_band=band)
    fed = harmo_training(data, cfg)
    seen = network_inputs(fed.model)
    generators = [torch.Generator().set_state(c.generator.get_state()) for c in fed.clients]
    fed.run_round()
    expected, runnings = [], []
    for client, generator in zip(fed.clients, generators, strict=True):
        running = None
        for raw, _ in client.train.batches(int(cfg["train"]["batch_size"]), generator):
            mean = torch.stack([torch.fft.fft2(x).abs() for x in raw]).mean(0)
            running = mean if running is None else (1 - momentum) * running + momentum * mean
            expected.append(normalize_amplitude(raw, running, band))
        torch.testing.assert_close(client.state[KEY], running)
        runnings.append(running)
    sizes = [len(client.train) for client in fed.clients]
    federation = weighted_mean([{KEY: r} for r in runnings], sizes)[KEY]
    torch.testing.assert_close(fed.global_state[KEY], federation)
    fixed = fed.global_state[KEY].clone()
    assert fed.server.fixed
    fed.run_round()  # the second round trains on images normalized to the federation's amplitude
    for client, generator in zip(fed.clients, generators, strict=True):
        for raw, _ in client.train.batches(int(cfg["train"]["batch_size"]), generator):
            expected.append(normalize_amplitude(raw, fixed, band))
    assert len(seen) == len(expected)
    for got, want in zip(seen, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert torch.equal(fed.global_state[KEY], fixed), "the server keeps it as it is"
    assert all(torch.equal(client.state[KEY], fixed) for client in fed.clients)
    restored = HarmoFL(cfg["method"], len(fed.clients))
    restored.load_state_dict(fed.server.state_dict())
    assert restored.fixed


def test_the_scored_models_normalize_test_images_with_the_federations_amplitude(data):
    band = 0.0  # the release's: the zero frequency alone
    fed = harmo_rounds(harmo_config(1, amplitude_band=band), data, 1)
    federation = fed.result([], None)
    states = [federation.global_state, *federation.personalized]
    assert all(torch.equal(state[KEY], fed.global_state[KEY]) for state in states)
    for i, state in enumerate(states):
        images = data.sites[i % len(data.sites)].test.inputs
        scored, plain = federation.model(state), plain_model(data, state)
        normalized = normalize_amplitude(images, state[KEY], band)
        outputs = predict_batched(scored, images, 4)
        assert torch.equal(outputs, predict_batched(plain, normalized, 4))
        assert not torch.allclose(outputs, predict_batched(plain, images, 4), atol=1e-4)


def test_the_unseen_sites_model_carries_the_federations_amplitude(tmp_path, capsys):
    tiny = ["model.channels=[4,8]", "data.cases_per_site=3", "data.size=16", "data.num_sites=3"]
    tiny += ["data.slices_per_case=2"]
    spec = RunSpec("harmofl", preset="quick", rounds=2, overrides=tiny, results_dir=tmp_path)
    run = resolve(spec, load_registry())
    data = run.dataset.load(run.config["data"], 0, tmp_path / "cache")
    holdout = data.sites[0].name
    trained = load_or_train(run, data, holdout, lambda *_: None)
    loaded = load_or_train(run, data, holdout, lambda *_: None)
    assert "warning" not in capsys.readouterr().err, "the cached federation fits the network"
    amplitude = trained.global_state[KEY]
    assert amplitude.shape == (1, 16, 16) and amplitude.abs().sum() > 0
    for federation in (trained, loaded):
        assert torch.equal(federation.global_state[KEY], amplitude)
        assert all(torch.equal(state[KEY], amplitude) for state in federation.personalized)
        model = federation.model(federation.global_state)
        seen = network_inputs(model)
        images = data.site(holdout).all_samples().inputs[:4]
        predict_batched(model, images, 4)
        torch.testing.assert_close(seen[0], normalize_amplitude(images, amplitude, 0.0))


def test_runs_build_the_network_behind_the_amplitude_layer_and_adapters_find_its_norms():
    task = SegmentationTask(in_channels=3, class_names=["x"])
    run = resolve(RunSpec("harmofl", preset="quick"), load_registry())
    network = run.build_model(task)
    assert isinstance(network, harmonized_class())
    size = run.config["data"]["size"]
    assert network.amplitude.shape == (3, size, size) and not network.amplitude.any()
    assert len(normalization_modules(network)) == len(normalization_modules(network.network))
    network.train()
    before = network.amplitude.clone()
    network(torch.randn(2, 3, size, size))  # what bn-adapt and tent do: train-mode forwards
    assert torch.equal(network.amplitude, before), "the forward pass never changes it"
    for spec in (RunSpec("harmofl", overrides=["method.amplitude=false"]), RunSpec("fedavg")):
        plain = resolve(spec, load_registry()).build_model(task)
        assert not isinstance(plain, harmonized_class())


def test_the_amplitude_buffer_is_shared_and_counted_each_way(data):
    received: list = []

    class Spy(HarmoFL):
        def server_update(self, previous, updates):
            received.append([clone_state(u.state) for u in updates])
            return super().server_update(previous, updates)

    cfg = harmo_config(2, rho=0.0)
    fed = harmo_rounds(cfg, data, 2, Spy)
    fedavg = toy_rounds(FedAvg, toy_config(2), data, 2)
    first, second = received
    for state, client in zip(first, fed.clients, strict=True):
        assert KEY in state and state[KEY].abs().sum() > 0 and len(client.train) > 0
    assert all(torch.equal(state[KEY], fed.global_state[KEY]) for state in second)
    buffer = state_nbytes({KEY: fed.global_state[KEY]})
    sends = 2 * len(data.sites)
    assert fed.cost["bytes_up"] == fedavg.cost["bytes_up"] + sends * buffer
    assert fed.cost["bytes_down"] == fedavg.cost["bytes_down"] + sends * buffer
    assert all(fed.server.server_payload(i) == {} for i in range(len(data.sites)))


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
    client = fed.clients[0]
    start = clone_state(client.view({k: fed.global_state[k] for k in fed.shared}))
    state = client.generator.get_state()
    fed.run_round()
    model = fed.build_model()
    model.load_state_dict(start)
    model.train()
    generator = torch.Generator().manual_seed(0)
    generator.set_state(state)
    for inputs, targets in client.train.batches(int(cfg["train"]["batch_size"]), generator):
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
        torch.testing.assert_close(client.state[key], value, rtol=1e-5, atol=1e-6)


# settings


def test_settings_are_checked_and_name_the_setting(data):
    HarmoFL.check_settings(harmo_config(1))
    HarmoFL.check_settings(harmo_config(1, rho=0, amplitude_momentum=0.0, amplitude_band=0))
    HarmoFL.check_settings(toy_config(1, amplitude=False))  # no data.size needed then
    bad = {
        "rho": -0.1,
        "amplitude": "yes",
        "amplitude_momentum": 1.5,
        "amplitude_band": 0.6,
    }
    for key, value in bad.items():
        with pytest.raises(FedbenchError, match=f"method.{key}"):
            HarmoFL.check_settings(harmo_config(1, **{key: value}))
    with pytest.raises(FedbenchError, match="method.amplitude needs data.size"):
        HarmoFL.check_settings(toy_config(1))
    with pytest.raises(FedbenchError, match="method.amplitude needs image batches"):
        check_images(torch.zeros(4, 3), (1, 16, 16))
    with pytest.raises(FedbenchError, match="data.size"):
        check_images(torch.zeros(4, 1, 8, 8), (1, 16, 16))
    with pytest.raises(FedbenchError, match="method.amplitude needs the network"):
        toy_training(data, data.sites, HarmoFL, harmo_config(1), 0, CPU)  # the plain network
