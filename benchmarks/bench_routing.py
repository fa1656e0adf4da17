"""Cost of IOP-FL routing: forward + backward of the routed U-Net (vectorised grouped convs)
against the plain U-Net and against per-image loops, at batch sizes 1, 5 and 16 (and batch 16 at
the default preset's widths). The four are timed interleaved, round by round, in one process, so
a machine that slows down slows them all; the ratios of their medians are printed (run with -s).

The loops: `released` is the release's layer, image by image, each routed (pooling, router) and
convolved with its own mixed kernel; `conv-loop` routes the batch at once and loops only over the
convolutions, a lower bound for any per-image loop."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch
from torch import nn

from fedbench.task import SegmentationTask
from fedbench_plugins import routed_conv as rc
from fedbench_plugins.unet import UNet

BENCH_WIDTHS = [8, 16, 32, 64]
TASK = SegmentationTask(in_channels=1)
SIZE = 64
EXPERTS = 5  # personalized models; "both" mixes 6
ROUNDS = 15
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


def interleaved_medians(
    variants: dict[str, tuple[nn.Module, Forward]], x: torch.Tensor, patch: pytest.MonkeyPatch
) -> dict[str, float]:
    """Median seconds of each variant's step, timed in turn each round after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(ROUNDS + 1):
        for name, (model, forward) in variants.items():
            patch.setattr(rc.RoutedConv, "forward", forward)
            start = time.perf_counter()
            forward_backward(model, x)
            if round_index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


@pytest.mark.parametrize(
    ("batch_size", "widths"),
    [(1, BENCH_WIDTHS), (5, BENCH_WIDTHS), (16, BENCH_WIDTHS), (16, UNet.defaults["channels"])],
)
def test_routing_cost(
    benchmark, monkeypatch: pytest.MonkeyPatch, batch_size: int, widths: list[int]
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
        t = interleaved_medians(variants, x, patch)
    benchmark.pedantic(forward_backward, (routed, x), rounds=5, warmup_rounds=1)

    ms = ", ".join(f"{name} {seconds * 1e3:6.1f} ms" for name, seconds in t.items())
    print(
        f"\nwidths {widths} batch {batch_size:2d}: {ms} | routed/plain "
        f"{t['routed'] / t['plain']:4.2f}x, released/routed {t['released'] / t['routed']:4.2f}x, "
        f"conv-loop/routed {t['conv-loop'] / t['routed']:4.2f}x"
    )
    benchmark.extra_info.update({f"{name}_s": seconds for name, seconds in t.items()})
    assert all(seconds > 0 for seconds in t.values())
