"""Cost of IOP-FL routing: forward + backward of the routed U-Net (vectorised grouped convs)
against the plain U-Net and against the released per-image loop, at batch sizes 1, 5 and 16.
Ratios are timed in the same process and printed (run with -s to see them)."""

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

CFG = {"channels": [8, 16, 32, 64], "res_units": 0}
TASK = SegmentationTask(in_channels=1)
SIZE = 64
EXPERTS = 5  # personalized models; "both" mixes 6
REPEATS = 5


def forward_backward(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One training-style step without the optimizer: what each test-time forward costs."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).softmax(1).square().mean().backward()

    return step


def median_seconds(step: Callable[[], None]) -> float:
    """Median wall time of a step after one warm-up call."""
    step()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_image_forward(self: rc.RoutedConv, x: torch.Tensor) -> torch.Tensor:
    """RoutedConv.forward as released: one convolution per image in a Python loop."""
    return rc.per_image_reference(self, x, self.routing_weights(x))


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_routing_cost(benchmark, monkeypatch: pytest.MonkeyPatch, batch_size: int) -> None:
    torch.manual_seed(0)
    plain = UNet().build(TASK, CFG).train()
    routed = rc.build_routed_model(plain, [UNet().build(TASK, CFG) for _ in range(EXPERTS)]).train()
    x = torch.randn(batch_size, 1, SIZE, SIZE)

    t_plain = median_seconds(forward_backward(plain, x))
    t_routed = median_seconds(forward_backward(routed, x))
    with monkeypatch.context() as patch:
        patch.setattr(rc.RoutedConv, "forward", per_image_forward)
        t_loop = median_seconds(forward_backward(routed, x))
    benchmark.pedantic(forward_backward(routed, x), rounds=REPEATS, warmup_rounds=1)

    print(
        f"\nbatch {batch_size:2d}: plain {t_plain * 1e3:7.1f} ms, routed {t_routed * 1e3:7.1f} ms, "
        f"per-image loop {t_loop * 1e3:7.1f} ms | routed/plain {t_routed / t_plain:5.2f}x, "
        f"loop/routed {t_loop / t_routed:5.2f}x"
    )
    benchmark.extra_info.update(
        {"plain_s": t_plain, "loop_s": t_loop, "routed_over_plain": t_routed / t_plain}
    )
    assert t_routed > 0 and t_loop > 0
