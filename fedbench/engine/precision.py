"""How local training runs on the device: `train.precision` (fp32, or bf16 autocast), the
channels-last memory layout (`train.channels_last`) and PyTorch's deterministic mode
(`train.deterministic`). CPU runs are reproducible as they are; on CUDA, cuDNN's autotuner and
atomics make two runs differ unless the deterministic mode is on (slower)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

#: cuBLAS needs a fixed workspace for deterministic matrix products (CUDA's documented value)
CUBLAS_WORKSPACE = ":4096:8"


def autocast(train: dict[str, Any], device: torch.device) -> Callable[[], AbstractContextManager]:
    """A factory of the context the forward pass and loss run in: bf16 autocast on the run's
    device for `train.precision = bf16` (weights and the optimizer stay fp32), else nothing."""
    if train.get("precision", "fp32") != "bf16":
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def memory_format(train: dict[str, Any]) -> torch.memory_format:
    """channels_last when asked (faster convolutions on tensor cores), else PyTorch's default."""
    return torch.channels_last if train.get("channels_last") else torch.contiguous_format


def laid_out(model: nn.Module, train: dict[str, Any]) -> nn.Module:
    """The model in the configured memory layout (state dicts loaded later keep it)."""
    return model.to(memory_format=memory_format(train)) if train.get("channels_last") else model


def laid_out_batches(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], train: dict[str, Any]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Image batches (4-D inputs) in the configured memory layout; others pass unchanged."""
    if not train.get("channels_last"):
        yield from batches
        return
    for inputs, targets in batches:
        if inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        yield inputs, targets


@contextmanager
def deterministic_mode(train: dict[str, Any]) -> Iterator[None]:
    """PyTorch's deterministic algorithms (an op without one warns) and no cuDNN autotuning for
    the duration of one training, restored afterwards; a no-op unless `train.deterministic`."""
    if not train.get("deterministic"):
        yield
        return
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without one warns
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1:]
