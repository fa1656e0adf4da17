"""Cost of IOP-FL routing: forward + backward of the routed U-Net (vectorised grouped convs)
against the plain U-Net and against per-image loops, at batch sizes 1, 5 and 16 (and batch 16 at
the default preset's widths). The four are timed interleaved, round by round, in one process
(benchmarks/interleave.py), so a machine that slows down slows them all; the ratios of their best
rounds, with the per-round spread, are printed (run with -s).

The loops: `released` is the release's layer, image by image, each routed (pooling, router) and
convolved with its own mixed kernel; `conv-loop` routes the batch at once and loops only over the
convolutions, a lower bound for any per-image loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from interleave import interleaved
from torch import nn

from fedbench.task import SegmentationTask
from fedbench_plugins import routed_conv as rc
from fedbench_plugins.unet import UNet

BENCH_WIDTHS = [8, 16, 32, 64]
TASK = SegmentationTask(in_channels=1)
SIZE = 64
EXPERTS = 5  # personalized models; "both" mixes 6
ROUNDS = 20
Forward = Callable[[rc.RoutedConv, torch.Tensor], torch.Tensor]


def released_forward(self: rc.RoutedConv, x: torch.Tensor) -> torch.Tensor:
    """RoutedConv.forward as released: a Python loop over the images of the batch."""
    images = x.split(1)
    return torch.cat([rc.per_image_reference(self, i, self.routing_weights(i)) for i in images])


def conv_loop_forward(self: rc.RoutedConv, x: torch.Tensor) -> torch.Tensor:
    """The batch routed at once, then one convolution per image."""
    return rc.per_image_reference(self, x, self.routing_weights(x))


def forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    """One training-style step without the optimizer: what each test-time forward costs."""
    model.zero_grad(set_to_none=True)
    model(x).softmax(1).square().mean().backward()


def patched_step(
    model: nn.Module, forward: Forward, x: torch.Tensor, patch: pytest.MonkeyPatch
) -> Callable[[], None]:
    """One forward + backward of `model` with RoutedConv's forward set to `forward`."""

    def step() -> None:
        patch.setattr(rc.RoutedConv, "forward", forward)
        forward_backward(model, x)

    return step


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread, as each process of a run trains (fedbench.engine.federations): on two,
    millisecond convolutions mostly time the threads' wake-ups, and rounds scatter."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("batch_size", "widths", "iterations"),  # iterations: a sample of each variant ~50 ms
    [
        (1, BENCH_WIDTHS, 16),
        (5, BENCH_WIDTHS, 6),
        (16, BENCH_WIDTHS, 4),
        (16, UNet.defaults["channels"], 2),
    ],
)
def test_routing_cost(
    benchmark, monkeypatch: pytest.MonkeyPatch, batch_size: int, widths: list[int], iterations: int
) -> None:
    torch.manual_seed(0)
    cfg = {"channels": widths, "res_units": 0}
    plain = UNet().build(TASK, cfg).train()
    routed = rc.build_routed_model(plain, [UNet().build(TASK, cfg) for _ in range(EXPERTS)]).train()
    x = torch.randn(batch_size, 1, SIZE, SIZE)
    vectorised = rc.RoutedConv.forward
    variants = {
        "plain": (plain, vectorised),
        "routed": (routed, vectorised),
        "conv-loop": (routed, conv_loop_forward),
        "released": (routed, released_forward),
    }
    with monkeypatch.context() as patch:
        steps = {name: patched_step(*pair, x, patch) for name, pair in variants.items()}
        timings = interleaved(steps, rounds=ROUNDS, iterations=iterations)
    t = {name: timings.best(name) for name in variants}
    benchmark.pedantic(forward_backward, (routed, x), rounds=5, warmup_rounds=1)

    ms = ", ".join(f"{name} {seconds * 1e3:6.1f} ms" for name, seconds in t.items())
    print(
        f"\nwidths {widths} batch {batch_size:2d}: {ms} | routed/plain "
        f"{timings.describe('routed', 'plain')}, released/routed "
        f"{timings.describe('released', 'routed')}, conv-loop/routed "
        f"{timings.describe('conv-loop', 'routed')}"
    )
    benchmark.extra_info.update({f"{name}_s": seconds for name, seconds in t.items()})
    assert all(seconds > 0 for seconds in t.values())
