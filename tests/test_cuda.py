"""The same code on a GPU: the vectorized routed convolution, a whole run with `--device cuda`,
and a CUDA-trained federation reused by a second adapter. Skipped where there is no CUDA (CI)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.engine import federations
from fedbench_plugins import routed_conv as rc

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@contextmanager
def exact_float32() -> Iterator[None]:
    """No TF32 in convolutions or matmuls, so the two code paths can agree to 1e-5."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("kind", [nn.Conv2d, nn.ConvTranspose2d])
def test_vectorized_routing_equals_the_per_image_loop_on_cuda(kind):
    torch.manual_seed(0)
    stride = 2 if kind is nn.ConvTranspose2d else 1
    experts = [kind(8, 16, 3, stride=stride, padding=1).cuda() for _ in range(4)]
    layer = rc.RoutedConv.from_layers(experts).cuda()
    x = torch.randn(5, 8, 24, 24, device="cuda")
    weights = torch.rand(5, 4, device="cuda")
    with exact_float32():
        vectorized = layer.mixed_forward(x, weights)
        looped = rc.per_image_reference(layer, x, weights)
    torch.testing.assert_close(vectorized, looped, atol=1e-5, rtol=1e-5)


def run_json(results, *args: str) -> dict:
    cli = ["run", "--preset", "quick", "--device", "cuda", "--results-dir", str(results), "--json"]
    result = CliRunner().invoke(app, [*cli, *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_iopfl_runs_on_cuda_and_a_second_adapter_reuses_its_federations(tmp_path, monkeypatch):
    first = run_json(tmp_path, "--method", "iopfl", "--holdout", "HK")
    assert first["status"] == "ok" and first["environment"]["device"].startswith("cuda")
    scores = [row["value"] for row in first["metrics"] if row["metric"] == "dice"]
    assert scores and all(0.0 <= s <= 1.0 for s in scores)

    def no_training(*args, **kwargs):
        raise AssertionError("a cached federation was trained again")

    monkeypatch.setattr(federations, "train_federation", no_training)
    second = run_json(tmp_path, "--method", "iopfl", "--holdout", "HK", "--adapter", "tent")
    assert second["status"] == "ok" and second["adapter"] == "tent"


def test_the_deterministic_mode_makes_two_cuda_trainings_bit_identical():
    from conftest import same_states, toy_config, toy_data, toy_train

    from fedbench.engine.precision import deterministic_mode
    from fedbench.method import Method

    class FedAvg(Method):
        name = "fedavg-cuda-determinism"

    config = toy_config(rounds=2)
    config["train"].update(deterministic=True, channels_last=True, precision="bf16")
    data = toy_data()
    device = torch.device("cuda")
    with deterministic_mode(config["train"]):
        first = toy_train(data, data.sites, FedAvg, config, 0, device)
        second = toy_train(data, data.sites, FedAvg, config, 0, device)
    assert same_states(first.global_state, second.global_state)
