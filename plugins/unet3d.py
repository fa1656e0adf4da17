"""Model `unet3d`: MONAI's 3D U-Net with BatchNorm, the default network of volumetric datasets.
The `unet` model's settings in 3D: width and depth from `model.channels` (one level per entry,
strides of 2 between levels, so a patch's sides must divide by 2 ** (levels - 1)), residual
blocks from `model.res_units`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedbench.hookspecs import hookimpl
from fedbench_plugins.unet import UNet

if TYPE_CHECKING:
    from torch import nn

    from fedbench.task import Task

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"channels": [4, 8, 16], "res_units": 0},
    "paper": {"channels": [32, 64, 128, 256, 320], "res_units": 1},  # nnU-Net's 3D widths
}


class UNet3D(UNet):
    """MONAI `UNet(spatial_dims=3, norm="batch")`; its settings are checked as `unet`'s."""

    name = "unet3d"
    description = "MONAI 3D U-Net with BatchNorm (model.channels, model.res_units)"
    defaults = {"channels": [8, 16, 32], "res_units": 0}

    @classmethod
    def preset(cls, preset: str) -> dict[str, Any]:
        return dict(PRESETS.get(preset, {}))

    def build(self, task: Task, cfg: dict[str, Any]) -> nn.Module:
        from monai.networks.nets import UNet as MonaiUNet

        channels = tuple(int(c) for c in cfg["channels"])
        strides = (2,) * (len(channels) - 1)
        return MonaiUNet(
            3,
            task.in_channels,
            task.num_classes,
            channels,
            strides,
            num_res_units=int(cfg["res_units"]),
            norm="batch",
        )


@hookimpl
def fedbench_models() -> list[type]:
    return [UNet3D]
