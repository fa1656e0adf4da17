"""`train.precision`, `train.channels_last` and `train.deterministic`: bf16 autocast really
wraps the local forward pass (weights stay fp32), channels-last really lays out the model and the
batches and gives the fp32 result, the deterministic mode is on during training and restored
after, and bad values are one line. On CPU; the CUDA checks are in test_cuda.py."""

from __future__ import annotations

import pytest
import torch
from conftest import TOY_MODEL, same_states, toy_builder, toy_config, toy_data, toy_train

from fedbench.engine import precision
from fedbench.engine.config import validate
from fedbench.errors import FedbenchError
from fedbench.method import Method

CPU = torch.device("cpu")


def laid_out_last(inputs: torch.Tensor, model: torch.nn.Module) -> bool:
    """Whether the batch and the 4-D weights are in channels-last layout (a one-channel tensor
    is both layouts at once, so the model's wider kernels must say it)."""
    kernels = [p for p in model.parameters() if p.dim() == 4]
    return (
        inputs.is_contiguous(memory_format=torch.channels_last)
        and all(k.is_contiguous(memory_format=torch.channels_last) for k in kernels)
        and not all(k.is_contiguous() for k in kernels)
    )


class Spy(Method):
    """FedAvg that notes, at every local forward pass, what the engine set up around it."""

    name = "spy"
    seen: list[dict] = []

    def train_steps(self, model, ctx, epochs, params=None, penalty=None):
        def look(module, args):
            (inputs,) = args
            Spy.seen.append(
                {
                    "autocast": torch.is_autocast_enabled(inputs.device.type),
                    "dtype": torch.get_autocast_dtype(inputs.device.type),
                    "channels_last": laid_out_last(inputs, module),
                    "deterministic": torch.are_deterministic_algorithms_enabled(),
                    "weights_fp32": all(p.dtype == torch.float32 for p in module.parameters()),
                }
            )

        handle = model.register_forward_pre_hook(look)
        try:
            super().train_steps(model, ctx, epochs, params, penalty)
        finally:
            handle.remove()


def trained(**train: object):
    Spy.seen = []
    config = toy_config(rounds=1)
    config["train"].update(train)
    data = toy_data()
    return toy_train(data, data.sites, Spy, config, 0, CPU), list(Spy.seen)


def test_bf16_autocasts_the_local_forward_and_keeps_fp32_weights():
    fp32, plain = trained()
    bf16, cast = trained(precision="bf16")
    assert plain and not any(s["autocast"] for s in plain)
    assert cast and all(s["autocast"] and s["dtype"] == torch.bfloat16 for s in cast)
    assert all(s["weights_fp32"] for s in cast)
    assert all(
        t.dtype == torch.float32 for t in bf16.global_state.values() if t.is_floating_point()
    )
    assert not same_states(fp32.global_state, bf16.global_state)  # bf16 arithmetic did happen
    assert all(torch.isfinite(t).all() for t in bf16.global_state.values() if t.is_floating_point())


def test_channels_last_lays_out_batches_and_gives_the_fp32_result():
    contiguous, plain = trained()
    last, seen = trained(channels_last=True)
    assert not any(s["channels_last"] for s in plain)
    assert seen and all(s["channels_last"] for s in seen)
    # the same training up to float rounding, which Adam amplifies where gradients are near zero
    for key, value in contiguous.global_state.items():
        torch.testing.assert_close(last.global_state[key], value, atol=1e-2, rtol=1e-2)
    data = toy_data()
    model = toy_builder(data, TOY_MODEL)().eval()
    x = data.sites[0].train.inputs[:4]
    expected = model(x)
    laid = precision.laid_out(model, {"channels_last": True})
    got = laid(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_deterministic_mode_is_on_while_training_and_restored_after():
    assert not torch.are_deterministic_algorithms_enabled()
    from fedbench.engine.precision import deterministic_mode

    config = toy_config(rounds=1)
    config["train"]["deterministic"] = True
    with deterministic_mode(config["train"]):
        _, seen = trained(deterministic=True)
    assert seen and all(s["deterministic"] for s in seen)
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_run_turns_the_deterministic_mode_on_around_training(monkeypatch, tmp_path):
    from fedbench.engine import precision

    states = []
    original = precision.deterministic_mode

    def watching(train):
        states.append(train["deterministic"])
        return original(train)

    monkeypatch.setattr("fedbench.engine.scoring.deterministic_mode", watching)  # adaptation
    monkeypatch.setattr("fedbench.engine.federations.deterministic_mode", watching)  # training
    from typer.testing import CliRunner

    from fedbench.cli import app

    result = CliRunner().invoke(
        app,
        [
            "run",
            "--method",
            "fedavg",
            "--preset",
            "quick",
            "--rounds",
            "1",
            "--holdout",
            "none",
            "--set",
            "train.deterministic=true",
            "--set",
            "data.size=16",
            "--results-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert states == [True]
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("value", ["fp16", "BF16", ""])
def test_an_unknown_precision_is_one_line(value):
    config = toy_config()
    config["train"]["precision"] = value
    with pytest.raises(FedbenchError, match="train.precision must be one of fp32, bf16"):
        validate(config)
