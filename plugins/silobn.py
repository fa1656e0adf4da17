"""SiloBN (Andreux et al., "Siloed Federated Learning for Multi-Centric Histopathology Datasets",
DART 2020): every parameter is shared and averaged, BatchNorm's learned affine weights
included; only BatchNorm's running statistics (mean, variance, batch count) stay on each site.

Variant: as published, with every site in every round; statistics are chosen by module type
(BatchNorm buffers), never by name. Unlike FedBN, the affine weights are federated."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbench.hookspecs import hookimpl
from fedbench.method import Method
from fedbench.models import normalization_modules

if TYPE_CHECKING:
    from torch import nn


def batch_statistics_keys(model: nn.Module) -> set[str]:
    """State-dict keys of BatchNorm running statistics (buffers, not learned weights)."""
    from torch import nn

    keys = set()
    for prefix, module in normalization_modules(model):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            keys |= {f"{prefix}.{name}" if prefix else name for name, _ in module.named_buffers()}
    return keys


class SiloBN(Method):
    """Shares all but the BatchNorm running statistics; each site normalizes with its own."""

    name = "silobn"
    description = "SiloBN: BatchNorm statistics stay local, affine weights are averaged"
    default_adapter = "bn-adapt"

    def shared_keys(self, model: nn.Module) -> list[str]:
        local = batch_statistics_keys(model)
        return [key for key in model.state_dict() if key not in local]


@hookimpl
def fedbench_methods() -> list[type]:
    return [SiloBN]
