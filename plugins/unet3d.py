"""Model `unet3d`: MONAI's 3D U-Net with BatchNorm, the default network of volumetric datasets.
Width and depth come from `model.channels` (one level per entry, strides of 2 between levels, so
a patch's sides must divide by 2 ** (levels - 1)), residual blocks from `model.res_units`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.models import Model

if TYPE_CHECKING:
    from torch import nn

    from fedbench.task import Task

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"channels": [4, 8, 16], "res_units": 0},
    "paper": {"channels": [32, 64, 128, 256, 320], "res_units": 1},  # nnU-Net's 3D widths
}


class UNet3D(Model):
    """MONAI `UNet(spatial_dims=3, norm="batch")`."""

    name = "unet3d"
    description = "MONAI 3D U-Net with BatchNorm (model.channels, model.res_units)"
    defaults = {"channels": [8, 16, 32], "res_units": 0}

    @classmethod
    def preset(cls, preset: str) -> dict[str, Any]:
        return dict(PRESETS.get(preset, {}))

    @classmethod
    def check(cls, cfg: dict[str, Any]) -> None:
        channels = cfg["channels"]
        if len(channels) < 2 or any(c <= 0 for c in channels):
            raise FedbenchError("setting model.channels needs at least two positive widths")

    def build(self, task: Task, cfg: dict[str, Any]) -> nn.Module:
        from monai.networks.nets import UNet as MonaiUNet

        channels = tuple(int(c) for c in cfg["channels"])
        return MonaiUNet(
            spatial_dims=3,
            in_channels=task.in_channels,
            out_channels=task.num_classes,
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=int(cfg["res_units"]),
            norm="batch",
        )


@hookimpl
def fedbench_models() -> list[type]:
    return [UNet3D]
