"""`fundus`: optic disc and cup segmentation on four domains (the DoFE / FedDG / IOP-FL split).

Domain1 Drishti-GS, Domain2 RIM-ONE-r3, Domain3 REFUGE train (Zeiss), Domain4 REFUGE validation
(Canon). `data.path` holds `DomainN/{train,test}/ROIs/{image,mask}/*.png`: RGB crops around the
disc, masks with R = G = B where 0 is the cup, 128 the rim and 255 background. Images and masks
are paired by file name; unpaired files are reported and never used.

Targets are labels 0 background, 1 rim (disc without cup), 2 cup. The disc and the cup overlap
(the disc contains the cup), so the scores are per region: disc = label >= 1, cup = label == 2,
with MONAI's Dice and HD95 per case (fedbench.metrics), reported as dice_disc, dice_cup and their
mean dice (likewise hd95_*). The IOP-FL release has no fundus code, so no `dice_release` here.

Preparation resizes to `data.size` (images bilinear, masks nearest) and keeps 8-bit images
(16-bit files are read by their real range, then stored at 8 bits);
loading normalises each image per channel to zero mean and unit variance. A case is a patient:
RIM-ONE's two eyes `G-N-L` and `G-N-R` are one case. Given train/test folders are used as
given; `data.val_fraction` of the training cases (at least one) become val.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedbench.data import FederatedData
from fedbench.hookspecs import hookimpl
from fedbench.images import read_image_and_mask
from fedbench.task import SegmentationTask, predicted_labels
from fedbench_datasets.prepared import (
    PreparedDataset,
    Scan,
    make_site,
    resize,
    split_label,
    write_split_file,
)

if TYPE_CHECKING:  # torch loads with the data, not when `fedbench list` runs
    import torch

DOMAINS = ("Domain1", "Domain2", "Domain3", "Domain4")
EYE_SUFFIX = re.compile(r"[-_][LR]$")
MASK_LABELS = {255: 0, 128: 1, 0: 2}  # background, rim, cup


def regions(labels: torch.Tensor) -> torch.Tensor:
    """[N, H, W] labels -> [N, 3, H, W] regions: background, disc (rim or cup), cup."""
    import torch

    return torch.stack([labels == 0, labels >= 1, labels == 2], dim=1).float()


def fundus_scores(
    pred_labels: torch.Tensor, targets: torch.Tensor, cases: torch.Tensor
) -> dict[str, float]:
    """Mean over cases of per-case Dice and HD95 for the disc and the cup, and their means.
    A case's images (RIM-ONE's two eyes) are separate 2D images, not slices of a volume: HD95
    is per image, in pixels (the crops state no pixel size), averaged over the case."""
    from fedbench.metrics import region_scores

    pred, true = regions(pred_labels.cpu()), regions(targets.cpu())
    return region_scores(pred, true, cases, ["disc", "cup"], release=False, volume=False)


@dataclass
class FundusTask(SegmentationTask):
    """A 3-class U-Net (background, rim, cup) scored on the overlapping disc and cup regions."""

    in_channels: int = 3
    class_names: list[str] = field(default_factory=lambda: ["rim", "cup"])

    def score(
        self, outputs: torch.Tensor, targets: torch.Tensor, cases: torch.Tensor
    ) -> dict[str, float]:
        return fundus_scores(predicted_labels(outputs), targets, cases)


def read_pair(image_path: Path, mask_path: Path, problems: list[str]) -> tuple | None:
    """An RGB crop [H, W, 3] of any bit depth read by its real range onto the 8-bit scale
    (0..255) and its labels [H, W], or None with the problem noted."""
    pair = read_image_and_mask(image_path, mask_path, 3, problems)
    if pair is None:
        return None
    image, gray = pair
    extra = sorted(set(np.unique(gray).tolist()) - set(MASK_LABELS))
    if extra:
        problems.append(f"{mask_path}: mask holds values {extra[:5]} besides 0/128/255")
        return None
    labels = np.zeros(gray.shape, dtype=np.uint8)
    for value, label in MASK_LABELS.items():
        labels[gray == value] = label
    return image * 255, labels


def scan_domain(folder: Path, size: int, scan: Scan) -> dict[str, np.ndarray] | None:
    """One domain's prepared arrays (images 8-bit [N, 3, S, S], labels [N, S, S])."""
    images, labels, patients, parts = [], [], [], {}
    for part in ("train", "test"):
        found = {p.stem: p for p in (folder / part / "ROIs" / "image").glob("*.png")}
        masks = {p.stem: p for p in (folder / part / "ROIs" / "mask").glob("*.png")}
        for stem in sorted(found.keys() - masks.keys()):
            scan.orphans.append(f"{found[stem]}: image without a mask of the same name")
        for stem in sorted(masks.keys() - found.keys()):
            scan.orphans.append(f"{masks[stem]}: mask without an image of the same name")
        for stem in sorted(found.keys() & masks.keys()):
            pair = read_pair(found[stem], masks[stem], scan.problems)
            if pair is None:
                continue
            patient = EYE_SUFFIX.sub("", stem)
            if parts.setdefault(patient, part) != part:
                scan.problems.append(f"{found[stem]}: patient {patient} is in train and test")
            planes = [resize(pair[0][..., c], size, nearest=False) for c in range(3)]
            images.append(np.clip(np.rint(np.stack(planes)), 0, 255).astype(np.uint8))
            labels.append(resize(pair[1], size, nearest=True).astype(np.uint8))
            patients.append(patient)
    if not images:
        return None
    names = sorted(parts)
    return {
        "image": np.stack(images),
        "mask": np.stack(labels),
        "case": np.asarray([names.index(p) for p in patients], dtype=np.int64),
        "case_names": np.asarray(names, dtype=str),
        "case_parts": np.asarray([parts[n] for n in names], dtype=str),
    }


def normalize_images(images: np.ndarray) -> np.ndarray:
    """8-bit [N, 3, H, W] -> float, each image and channel at zero mean and unit variance."""
    x = images.astype(np.float32)
    mean = x.mean(axis=(2, 3), keepdims=True)
    std = x.std(axis=(2, 3), keepdims=True)
    return (x - mean) / np.where(std > 0, std, 1.0)


class Fundus(PreparedDataset):
    """Four fundus domains, optic disc and cup."""

    name = "fundus"
    description = "Fundus optic disc/cup, 4 domains (Drishti-GS, RIM-ONE, REFUGE x2); data.path"
    defaults: ClassVar[dict[str, Any]] = {
        "path": None,
        "size": 128,
        "val_fraction": 0.2,
        "test_fraction": 0.25,
        "sites": list(DOMAINS),
        "loss": "dice_ce",
    }
    prepare_keys = ("size", "sites")
    source_patterns = ("*/*/ROIs/*/*.png",)
    mask_values = {0, 1, 2}
    display_rgb = True
    known_sites = DOMAINS
    site_word = "domain"

    def scan(self, source: Path, cfg: dict[str, Any]) -> Scan:
        scan = Scan(layout="rois")
        for site in self.chosen_sites(cfg):
            if not (source / site).is_dir():
                scan.problems.append(f"{source / site}: domain folder missing")
                continue
            arrays = scan_domain(source / site, int(cfg["size"]), scan)
            if arrays is None:
                scan.problems.append(f"{source / site}: empty site (no image with its mask)")
            else:
                scan.sites[site] = arrays
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

        sites, record = [], {}
        for name in self.chosen_sites(cfg):
            a = arrays[name]
            names = a["case_names"].tolist()
            site, record[name] = make_site(
                name,
                torch.from_numpy(normalize_images(a["image"])),
                torch.from_numpy(a["mask"].astype(np.int64)),
                torch.from_numpy(a["case"]),
                dict(zip(names, a["case_parts"].tolist(), strict=True)),
                names,
                cfg,
                np.random.default_rng([seed, DOMAINS.index(name)]),
            )
            sites.append(site)
        settings = {k: cfg[k] for k in ("val_fraction", "test_fraction")}
        payload = {"dataset": self.name, "seed": seed, "settings": settings, "sites": record}
        write_split_file(directory, split_label(seed, settings), payload)
        loss = cfg.get("loss", self.defaults["loss"])
        return FederatedData(self.name, sites, FundusTask(loss_name=loss))


@hookimpl
def fedbench_datasets() -> list[type]:
    return [Fundus]
