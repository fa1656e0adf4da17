"""Model `release-unet`: the plain 2D U-Net with BatchNorm of the IOP-FL release (M. Jiang,
H. Yang, C. Chen, Q. Dou, "IOP-FL: Inside-Outside Personalization for Federated Medical Image
Segmentation", IEEE TMI 42(7), 2023), a U-Net in the style of brain-segmentation-pytorch.

Four encoder levels of [3x3 conv (no bias), BatchNorm, ReLU] x 2 with widths f, 2f, 4f, 8f, each
followed by 2x2 max-pooling; a bottleneck of the same block at 16f; four decoder levels of a 2x2
stride-2 transposed conv (with bias), then the skip concatenated after it and the same block; a
1x1 conv (with bias) to the class logits, registered last (the `output_layer`). `model.features`
(f) is 32 as released: with 3 input channels and 2 classes that is 7,763,074 parameters. The
release's auxiliary head (BatchNorm(16f), ReLU, average pooling, a 16f -> 4 linear layer: 3,076
more parameters), used only by a self-supervised task the release never runs, is left out. No
dropout, PyTorch's default initialization; the image sides must be multiples of 16."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.models import Model

if TYPE_CHECKING:
    from torch import nn

    from fedbench.task import Task

#: encoder levels before the bottleneck (each one halves the image side)
LEVELS = 4


def double_conv(c_in: int, c_out: int) -> nn.Sequential:
    """[3x3 conv without bias, BatchNorm, ReLU] twice: one level of the release's U-Net."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


@functools.cache
def network_class() -> type[nn.Module]:
    """The network's class, made on first use (listing plugins imports no torch); the module's
    `ReleaseUNet` attribute names it, so a pickled network can be loaded again."""
    import torch
    from torch import nn

    class ReleaseUNet(nn.Module):
        """The IOP-FL release's U-Net: `features` channels at the top level, doubled per level."""

        def __init__(self, in_channels: int, num_classes: int, features: int) -> None:
            super().__init__()
            widths = [features * 2**level for level in range(LEVELS)]
            inputs = [in_channels, *widths[:-1]]
            self.down = nn.ModuleList(double_conv(a, b) for a, b in zip(inputs, widths))
            self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
            self.bottom = double_conv(widths[-1], 2 * widths[-1])
            self.up = nn.ModuleList(
                nn.ConvTranspose2d(2 * w, w, kernel_size=2, stride=2) for w in reversed(widths)
            )
            self.decode = nn.ModuleList(double_conv(2 * w, w) for w in reversed(widths))
            self.head = nn.Conv2d(features, num_classes, kernel_size=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            for level in self.down:
                x = level(x)
                skips.append(x)
                x = self.pool(x)
            x = self.bottom(x)
            for up, decode, skip in zip(self.up, self.decode, reversed(skips), strict=True):
                x = decode(torch.cat([up(x), skip], dim=1))
            return self.head(x)

    ReleaseUNet.__module__, ReleaseUNet.__qualname__ = __name__, "ReleaseUNet"
    return ReleaseUNet


def __getattr__(name: str) -> Any:
    if name == "ReleaseUNet":
        return network_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ReleaseUNetModel(Model):
    """The IOP-FL release's U-Net, sized by the task (input channels, classes)."""

    name = "release-unet"
    description = "IOP-FL release's plain 2D U-Net with BatchNorm (model.features, 32 = 7.76 M)"
    defaults = {"features": 32}

    @classmethod
    def preset(cls, preset: str) -> dict[str, Any]:
        return {"features": 8} if preset == "quick" else {}

    @classmethod
    def check(cls, cfg: dict[str, Any]) -> None:
        features = cfg["features"]
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise FedbenchError(
                f"setting model.features must be a positive integer, got {features!r}"
            )

    def build(self, task: Task, cfg: dict[str, Any]) -> nn.Module:
        return network_class()(task.in_channels, task.num_classes, int(cfg["features"]))


@hookimpl
def fedbench_models() -> list[type]:
    return [ReleaseUNetModel]
