"""The segmentation network: MONAI's 2D U-Net with BatchNorm, width and depth from the config."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


def build_unet(in_channels: int, out_channels: int, cfg: dict[str, Any]) -> nn.Module:
    """A 2D U-Net: `channels` sets width and depth (one level per entry), `res_units` the blocks."""
    from monai.networks.nets import UNet

    channels = tuple(int(c) for c in cfg["channels"])
    if len(channels) < 2:
        raise ValueError("model.channels needs at least two levels")
    return UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=int(cfg["res_units"]),
        norm="batch",
    )


def normalization_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every normalization layer (BatchNorm, InstanceNorm, GroupNorm, LayerNorm), chosen by type."""
    from torch import nn

    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, norm_types)]


def normalization_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys owned by normalization layers: affine weights and running statistics."""
    keys = set()
    for prefix, module in normalization_modules(model):
        for key in module.state_dict():
            keys.add(f"{prefix}.{key}" if prefix else key)
    return keys


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
