"""FLamby's volumetric datasets through the bridge as 3D tasks (issue 26): Fed-IXI (`flamby-ixi`,
brain masks in T1 MRI, 3 centres) and Fed-KiTS19 (`flamby-kits19`, kidney and tumour in CT,
6 centres).

FLamby's own classes list each centre's train and test cases and read them (Fed-IXI's item, as
FLamby resizes it to 48 x 60 x 48 with MONAI, AddChannel supplied by the bridge; Fed-KiTS19's
nnU-Net-preprocessed case file, whole, where FLamby's item is one random patch). What fedbench
does instead of FLamby: training on patches (`PatchSplit`, `data.patch`, default FLamby's own
patch for KiTS19 and 32^3 for IXI), scoring every whole test volume in sliding windows with
fedbench's Dice of the foreground classes per volume and HD95 (FLamby's Fed-IXI Dice counts the
background, its Fed-KiTS19 scores one random patch per case). HD95 is in mm for KiTS19 (nnU-Net
resampled every case to one spacing) and in voxels for IXI (FLamby resizes each head to one shape
whatever its extent, so a voxel's size differs by case). Cases of different shapes are
centre-cropped or zero-padded to `data.shape` (default: the largest case). Validation is
`data.val_fraction` of each centre's training cases, drawn with the seed. The default model is
`unet3d`; `dataset-baseline` runs FLamby's own network (IXI's softmax output turned into
log-probabilities, so fedbench's loss and argmax see logits of the same prediction)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedbench.data import FederatedData, Site, Split
from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.volumes import PatchSplit, VolumeSegmentationTask, centred
from fedbench_datasets.flamby_bridge import (
    VOLUMETRIC,
    FlambyDataset,
    dataset_class,
    fed_class,
    flamby_modules,
)
from fedbench_datasets.flamby_support import carve_val, pandas_values_for_torch

if TYPE_CHECKING:
    import torch
    from torch import nn

Case = tuple[np.ndarray, np.ndarray]  # image [C, *spatial] float32, label [*spatial] int


def ixi_cases(fed: Any) -> Iterator[Case]:
    """FLamby's Fed-IXI items: a normalized T1 volume and its one-hot brain mask."""
    for i in range(len(fed)):
        image, one_hot = fed[i]
        yield np.asarray(image, dtype=np.float32), np.asarray(one_hot).argmax(0)


def kits_cases(fed: Any) -> Iterator[Case]:
    """Fed-KiTS19's nnU-Net case files, whole: image channels then the label map, whose -1
    (outside the cropped body) is background."""
    for entry in fed.images_path.values():
        npy = Path(entry["data_file"][:-4] + ".npy")
        if npy.is_file():
            data = np.load(npy)
        else:
            with np.load(entry["data_file"]) as archive:
                data = archive["data"]
        yield data[:-1].astype(np.float32), np.clip(data[-1], 0, None).astype(np.int64)


def kits_spacing(feds: list[Any]) -> tuple[float, ...] | None:
    """The one spacing nnU-Net resampled every case to, from the cases' properties."""
    spacings = {
        tuple(float(s) for s in entry["properties"]["spacing_after_resampling"])
        for fed in feds
        for entry in fed.images_path.values()
    }
    if len(spacings) > 1:
        raise FedbenchError(f"Fed-KiTS19 cases of several spacings: {sorted(spacings)}")
    return spacings.pop() if spacings else None


@dataclass(frozen=True)
class Source:
    """How one FLamby module's cases become volumes."""

    cases: Callable[[Any], Iterator[Case]]
    classes: tuple[str, ...]
    patch: Callable[[Any], tuple[int, ...]]
    spacing: Callable[[list[Any]], tuple[float, ...] | None] = lambda feds: None
    takes_path: bool = True  # whether FLamby's class accepts data_path
    softmax_output: bool = False  # whether FLamby's Baseline ends in a softmax


SOURCES = {
    "fed_ixi": Source(ixi_cases, ("brain",), lambda fed: (32, 32, 32), softmax_output=True),
    "fed_kits19": Source(
        kits_cases,
        ("kidney", "tumour"),
        lambda fed: tuple(int(n) for n in fed.patch_size),
        spacing=kits_spacing,
        takes_path=False,
    ),
}


def log_probabilities(net: nn.Module) -> nn.Module:
    """`net`, which ends in a softmax, returning log-probabilities instead: the same prediction as
    logits (the softmax of log p is p), which fedbench's losses and argmax expect."""
    from torch import nn

    class LogProbabilities(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).clamp_min(1e-12).log()

    return LogProbabilities()


@dataclass
class FlambyVolumeTask(VolumeSegmentationTask):
    """A volume task whose own network (`dataset-baseline`) is FLamby's Baseline."""

    baseline: Callable[[], nn.Module] | None = None
    softmax_output: bool = False

    def build_model(self, model_cfg: dict[str, Any]) -> nn.Module:
        net = self.baseline()
        return log_probabilities(net) if self.softmax_output else net


class FlambyVolumes(FlambyDataset):
    """A volumetric FLamby dataset: its cases as whole volumes, trained on patches."""

    model = "unet3d"
    defaults: ClassVar[dict[str, Any]] = {
        "path": None,
        "val_fraction": 0.1,
        "patch": None,
        "shape": None,
        "foreground_rate": 0.33,
        "loss": "dice_ce",
    }

    @property
    def source(self) -> Source:
        return SOURCES[self.module_name]

    def centre(self, i: int, train: bool, cfg: dict[str, Any]) -> Any:
        """FLamby's dataset object of centre i's train or test cases."""
        kwargs = {"data_path": str(cfg["path"])} if cfg.get("path") else {}
        if kwargs and not self.source.takes_path:
            raise FedbenchError(
                f"{self.name}: FLamby's {fed_class(self.module).__name__} takes no data path; "
                "it reads its data's location from the config FLamby's download script writes "
                "(leave data.path unset)"
            )
        fed = fed_class(self.module)
        label = f"{self.name} centre {i}"
        return self.call(lambda: fed(center=i, train=train, pooled=False, **kwargs), label)

    def read(self, fed: Any, label: str) -> list[Case]:
        """Every case of one FLamby dataset object."""
        with pandas_values_for_torch():
            cases = self.call(lambda: list(self.source.cases(fed)), label)
        if not cases:
            raise FedbenchError(f"{label}: no cases")
        return cases

    def load(self, cfg: dict[str, Any], seed: int, cache_dir: Path) -> FederatedData:
        fraction = float(cfg["val_fraction"])
        if not 0 <= fraction < 1:
            raise FedbenchError(f"setting data.val_fraction must be in [0, 1), got {fraction}")
        names = self.site_names(cfg) or []
        read, feds = {}, []
        for i, name in enumerate(names):
            train, test = self.centre(i, True, cfg), self.centre(i, False, cfg)
            feds += [train, test]
            read[name] = (self.read(train, f"{name} train"), self.read(test, f"{name} test"))
        every = [case for pair in read.values() for part in pair for case in part]
        shape = self.shape(cfg, every)
        patch = tuple(int(n) for n in (cfg.get("patch") or self.source.patch(feds[0])))
        if len(patch) != len(shape) or any(p > n for p, n in zip(patch, shape)):
            raise FedbenchError(f"{self.name}: data.patch {list(patch)} does not fit {list(shape)}")
        rate = float(cfg["foreground_rate"])
        sites = [
            self.site(name, *read[name], shape, patch, rate, fraction, [seed, i])
            for i, name in enumerate(names)
        ]
        m = self.module
        task = FlambyVolumeTask(
            in_channels=every[0][0].shape[0],
            class_names=list(self.source.classes),
            spacing=self.source.spacing(feds),
            loss_name=cfg.get("loss", "dice_ce"),
            patch=patch,
            baseline=m.Baseline,
            softmax_output=self.source.softmax_output,
        )
        return FederatedData(self.name, sites, task)

    def shape(self, cfg: dict[str, Any], cases: list[Case]) -> tuple[int, ...]:
        """`data.shape`, or the largest extent of any case on each axis."""
        if cfg.get("shape"):
            return tuple(int(n) for n in cfg["shape"])
        return tuple(int(n) for n in np.max([label.shape for _, label in cases], axis=0))

    @staticmethod
    def site(
        name: str,
        train: list[Case],
        test: list[Case],
        shape: tuple[int, ...],
        patch: tuple[int, ...],
        rate: float,
        fraction: float,
        seed: list[int],
    ) -> Site:
        """One centre's splits on `shape`; validation carved from its training cases."""
        import torch

        x, y = stacked(train, shape)
        val = torch.from_numpy(carve_val(None, len(x), fraction, np.random.default_rng(seed)))
        cases = torch.arange(len(x))
        tx, ty = stacked(test, shape)
        return Site(
            name,
            PatchSplit(x[~val], y[~val], cases[~val], patch, rate),
            Split(x[val], y[val], cases[val]),
            Split(tx, ty, torch.arange(len(tx))),
        )


def stacked(cases: list[Case], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, C, *shape] and labels [N, *shape], each case centred on `shape`."""
    import torch

    images = np.stack([centred(image, shape) for image, _ in cases])
    labels = np.stack([centred(label, shape) for _, label in cases]).round()
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


@hookimpl
def fedbench_datasets() -> list[type]:
    found = flamby_modules()
    modules = sorted(VOLUMETRIC & found.keys())
    return [dataset_class(m, found[m], FlambyVolumes, " as volumes") for m in modules]
