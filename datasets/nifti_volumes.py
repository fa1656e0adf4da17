"""`nifti-volumes`: a user's own multi-site volumes, one folder per site under `data.path`, read
with nibabel as 3D cases (issue 26).

A site folder holds its cases in either layout, paired by name:
- the Medical Segmentation Decathlon / nnU-Net layout: `imagesTr/CASE.nii.gz` (or nnU-Net's
  `CASE_0000.nii.gz`, the first channel) with `labelsTr/CASE.nii.gz`;
- the SAML prostate release: `CASE.nii.gz` with `CASE_segmentation.nii.gz` (or `_Segmentation`),
  so `data.path` may be the prostate release itself, read as volumes.
An image without its label (or the reverse) is listed in the manifest as an orphan, warned about
and never used. Preparation puts every case on one grid, as nnU-Net does: axes ordered (slice,
row, column) from the NIfTI (i, j, k) as (k, j, i), resampled to `data.spacing` mm (images
trilinear, labels nearest), centre-cropped or zero-padded to `data.shape`, each image normalized
to zero mean and unit variance. Labels above `data.labels` count as the last class (1: every
label > 0 is the foreground). HD95 is in mm on that grid. Splits are by case, fixed by the seed
(`data.val_fraction`, `data.test_fraction`), written to `splits/` beside the prepared files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fedbench.data import FederatedData
from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.volumes import PatchSplit, VolumeSegmentationTask, centred
from fedbench_datasets.prepared import (
    PreparedDataset,
    Scan,
    make_site,
    normalize_case,
    require_path,
    split_label,
    write_split_file,
)
from fedbench_datasets.prepared_folder import MANIFEST, read_manifest

SEGMENTATION = re.compile(r"_segmentation$", re.IGNORECASE)
CHANNEL = re.compile(r"_0000$")
#: the most label classes a prepared mask may hold (verification reads masks against it)
MAX_LABELS = 15


def stem(path: Path) -> str:
    return path.name.split(".")[0]


def case_pairs(folder: Path, scan: Scan) -> dict[str, tuple[Path, Path]]:
    """CASE -> (image, label) in either layout; the unpaired ones noted as orphans."""
    if (folder / "imagesTr").is_dir():
        images = {CHANNEL.sub("", stem(p)): p for p in (folder / "imagesTr").glob("*.nii*")}
        images = {c: p for c, p in images.items() if not re.search(r"_000[1-9]$", stem(p))}
        labels = {stem(p): p for p in (folder / "labelsTr").glob("*.nii*")}
    else:
        files = list(folder.glob("*.nii*"))
        labels = {SEGMENTATION.sub("", stem(p)): p for p in files if SEGMENTATION.search(stem(p))}
        images = {stem(p): p for p in files if not SEGMENTATION.search(stem(p))}
    for case in sorted(images.keys() - labels.keys()):
        scan.orphans.append(f"{images[case]}: image without a label of the same name")
    for case in sorted(labels.keys() - images.keys()):
        scan.orphans.append(f"{labels[case]}: label without an image of the same name")
    return {c: (images[c], labels[c]) for c in sorted(images.keys() & labels.keys())}


def read_case(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """A volume as (slice, row, column) and its voxel size in mm along those axes."""
    import nibabel

    image = nibabel.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{data.ndim}D, not a volume")
    scale = {"meter": 1000.0, "micron": 0.001}.get(image.header.get_xyzt_units()[0], 1.0)
    zooms = [float(z) * scale for z in image.header.get_zooms()[:3]]
    return data.transpose(2, 1, 0), (zooms[2], zooms[1], zooms[0])


def on_grid(
    volume: np.ndarray,
    spacing: tuple[float, ...],
    target: tuple[float, ...],
    shape: tuple[int, ...],
    nearest: bool,
) -> np.ndarray:
    """`volume` resampled from `spacing` to `target` mm, then centre-cropped or zero-padded to
    `shape`."""
    import torch
    import torch.nn.functional as F

    size = [max(1, round(n * s / t)) for n, s, t in zip(volume.shape, spacing, target)]
    tensor = torch.from_numpy(np.ascontiguousarray(volume))[None, None]
    mode = "nearest-exact" if nearest else "trilinear"
    resampled = F.interpolate(tensor, size=size, mode=mode)[0, 0].numpy()
    return centred(resampled, shape)


class NiftiVolumes(PreparedDataset):
    """Multi-site NIfTI volumes (MSD / nnU-Net or SAML layout), one grid, 3D cases."""

    name = "nifti-volumes"
    description = "Your multi-site NIfTI volumes, a folder per site (MSD/nnU-Net layout); data.path"
    model = "unet3d"
    defaults: ClassVar[dict[str, Any]] = {
        "path": None,
        "sites": [],
        "shape": [32, 64, 64],
        "spacing": [3.0, 1.5, 1.5],
        "patch": [16, 32, 32],
        "foreground_rate": 0.33,
        "labels": 1,
        "val_fraction": 0.2,
        "test_fraction": 0.25,
        "loss": "dice_ce",
    }
    prepare_keys = ("shape", "spacing", "labels", "sites")
    source_patterns = ("*/*.nii*", "*/imagesTr/*.nii*", "*/labelsTr/*.nii*")
    mask_values = set(range(MAX_LABELS + 1))
    sizes: ClassVar[dict[str, int]] = {}
    site_arrays = ("image", "mask", "case", "case_names", "case_parts")

    def preset(self, preset: str) -> dict[str, Any]:
        """Training counted in steps, as synth-organ-3d's (a site has few volumes)."""
        if preset == "paper":
            return {}
        return {"train": {"batch_size": 2, "local_steps": 10}}

    def site_names(self, cfg: dict[str, Any]) -> list[str] | None:
        return list(cfg.get("sites") or []) or None

    def chosen_sites(self, cfg: dict[str, Any]) -> list[str]:
        """`data.sites`, or every site of a prepared `data.path`, or every folder of a raw one
        (in name order)."""
        if cfg.get("sites"):
            return list(cfg["sites"])
        source = require_path(cfg, self.name)
        if (source / MANIFEST).is_file():
            return sorted(read_manifest(source)["sites"])
        return sorted(p.name for p in source.iterdir() if p.is_dir())

    def grid(self, cfg: dict[str, Any]) -> tuple[tuple[int, ...], tuple[float, ...], int]:
        """The checked shape, spacing and label count."""
        try:
            shape = tuple(int(n) for n in cfg["shape"])
            spacing = tuple(float(s) for s in cfg["spacing"])
            labels = int(cfg["labels"])
        except (TypeError, ValueError):
            raise FedbenchError("data.shape and data.spacing need three numbers each") from None
        if len(shape) != 3 or len(spacing) != 3 or min(shape) < 4 or min(spacing) <= 0:
            raise FedbenchError(f"data.shape {list(shape)} or data.spacing {list(spacing)}")
        if not 1 <= labels <= MAX_LABELS:
            raise FedbenchError(f"data.labels must be 1 to {MAX_LABELS}, got {labels}")
        return shape, spacing, labels

    def scan(self, source: Path, cfg: dict[str, Any]) -> Scan:
        shape, spacing, labels = self.grid(cfg)
        scan = Scan(layout="volumes")
        for site in self.chosen_sites(cfg):
            folder = source / site
            if not folder.is_dir():
                scan.problems.append(f"{folder}: site folder missing")
                continue
            images, masks, names = [], [], []
            for case, (image_path, label_path) in case_pairs(folder, scan).items():
                try:
                    image, steps = read_case(image_path)
                    label, _ = read_case(label_path)
                except Exception as exc:
                    scan.problems.append(f"{image_path}: unreadable volume or label ({exc})")
                    continue
                if image.shape != label.shape:
                    scan.problems.append(f"{label_path}: {label.shape}, image {image.shape}")
                    continue
                image = normalize_case(on_grid(image, steps, spacing, shape, nearest=False))
                label = on_grid(np.minimum(label, labels), steps, spacing, shape, nearest=True)
                images.append(image.astype(np.float16))
                masks.append(label.round().astype(np.uint8))
                names.append(case)
            if not names:
                scan.problems.append(f"{folder}: empty site (no image with its label)")
                continue
            scan.sites[site] = {
                "image": np.stack(images),
                "mask": np.stack(masks),
                "case": np.arange(len(names), dtype=np.int64),
                "case_names": np.asarray(names, dtype=str),
                "case_parts": np.asarray(["all"] * len(names), dtype=str),
            }
        return scan

    def build(
        self,
        manifest: dict[str, Any],
        arrays: dict[str, dict[str, np.ndarray]],
        cfg: dict[str, Any],
        seed: int,
        directory: Path,
    ) -> FederatedData:
        import torch

        _, spacing, labels = self.grid(cfg)
        patch = tuple(int(n) for n in cfg["patch"])
        rate = float(cfg["foreground_rate"])
        sites, record = [], {}
        for index, name in enumerate(self.chosen_sites(cfg)):
            a = arrays[name]
            names = a["case_names"].tolist()
            site, record[name] = make_site(
                name,
                torch.from_numpy(a["image"].astype(np.float32))[:, None],
                torch.from_numpy(a["mask"].astype(np.int64)),
                torch.from_numpy(a["case"]),
                dict(zip(names, a["case_parts"].tolist(), strict=True)),
                names,
                cfg,
                np.random.default_rng([seed, index]),
            )
            train = site.train
            patched = PatchSplit(train.inputs, train.targets, train.cases, patch, rate)
            sites.append(type(site)(site.name, patched, site.val, site.test))
        settings = {k: cfg[k] for k in ("val_fraction", "test_fraction")}
        payload = {"dataset": self.name, "seed": seed, "settings": settings, "sites": record}
        write_split_file(directory, split_label(seed, settings), payload)
        classes = ["foreground"] if labels == 1 else [f"label{i}" for i in range(1, labels + 1)]
        task = VolumeSegmentationTask(
            in_channels=1,
            class_names=classes,
            spacing=spacing,
            loss_name=cfg.get("loss", "dice_ce"),
            patch=patch,
        )
        return FederatedData(self.name, sites, task)


@hookimpl
def fedbench_datasets() -> list[type]:
    return [NiftiVolumes]
