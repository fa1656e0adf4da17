"""The Model base class (networks come in through the `fedbench_models` hook and are chosen by
the `model.name` setting) and helpers that select layers by type, never by a substring of a name."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # torch loads when a run needs it, not when `fedbench list` reads the classes
    import torch
    from torch import nn

    from fedbench.task import Task


class Model:
    """A network builder. `defaults` are its `model.*` settings (with `preset()` overrides);
    `build` makes a fresh module for a task (the task says the input and output sizes)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    required: ClassVar[tuple[str, ...]] = ("build",)

    @classmethod
    def preset(cls, preset: str) -> dict[str, Any]:
        """Setting overrides this model wants for a preset (e.g. wider layers for `paper`)."""
        return {}

    @classmethod
    def check(cls, cfg: dict[str, Any]) -> None:
        """Raise a FedbenchError naming the setting when `cfg` cannot build a network, before
        any training starts."""

    def build(self, task: Task, cfg: dict[str, Any]) -> nn.Module:
        raise NotImplementedError


def normalization_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every normalization layer (BatchNorm, InstanceNorm, GroupNorm, LayerNorm), chosen by type."""
    from torch import nn

    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, norm_types)]


def output_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The layer that produces the network's output, for methods that keep a personal head
    (FedPer, FedRep, ...): the last convolution or linear layer in module order. That is the
    output layer of MONAI's U-Net (its top-level up path is registered last) and of a linear
    model; a network where it is not should override the method's head selection."""
    from torch import nn

    layers = (nn.modules.conv._ConvNd, nn.Linear)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, layers)]
    if not found:
        raise ValueError("the model has no convolution or linear layer")
    return found[-1]


def output_layer_keys(model: nn.Module) -> set[str]:
    """State-dict keys of `output_layer(model)` (its weight and bias)."""
    prefix, layer = output_layer(model)
    return {f"{prefix}.{key}" if prefix else key for key in layer.state_dict()}


def normalization_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys owned by normalization layers: affine weights and running statistics."""
    keys = set()
    for prefix, module in normalization_modules(model):
        for key in module.state_dict():
            keys.add(f"{prefix}.{key}" if prefix else key)
    return keys


def affine_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Freeze the model but its normalization layers' affine weights, and return those (what
    TENT-style adapters train)."""
    model.requires_grad_(False)
    affine = []
    for _, module in normalization_modules(model):
        for param in module.parameters(recurse=False):
            param.requires_grad_(True)
            affine.append(param)
    return affine


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Make every BatchNorm normalise with the current batch's statistics, in train and eval mode
    alike (test-time normalization): running statistics are dropped."""
    from torch import nn

    for _, module in normalization_modules(model):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            module.num_batches_tracked = None
    return model


def running_batch_norms(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers that keep running statistics (what DUA and VPTTA read)."""
    from torch import nn

    return [
        m
        for _, m in normalization_modules(model)
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
    ]


def pixel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[N, C, ...] scores -> [N, ...] Shannon entropy (nats) of each pixel's softmax."""
    log_probs = logits.log_softmax(1)
    return -(log_probs.exp() * log_probs).sum(1)


@contextmanager
def output_layer_input(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While open, `found["z"]` holds the latest input of the model's output layer: the
    features a representation regularizer (FedSR, ELCFS) works on."""
    found: dict[str, torch.Tensor] = {}
    _, layer = output_layer(model)
    handle = layer.register_forward_pre_hook(lambda m, args: found.__setitem__("z", args[0]))
    try:
        yield found
    finally:
        handle.remove()
