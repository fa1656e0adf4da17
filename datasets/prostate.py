"""`prostate`: the six-site prostate MRI federation of SAML / MS-Net / FedDG / IOP-FL.

Sites RUNMC, BMC, I2CVB, UCL, BIDMC, HK (folder aliases ISBI, ISBI_1.5, HCRUDB are accepted).
`data.path` holds one folder per site in either layout:

- volumes (the SAML release): `CaseNN.nii.gz` with `CaseNN_segmentation.nii.gz` (or
  `_Segmentation`), read with nibabel; axial slices along the last axis; labels > 0 are prostate;
- slices: `SITE/{train,test}/{image,mask}/CASE_SLICE.png`, 8- or 16-bit (read by their range),
  masks inverted (0 = prostate, 255 = background). Image and mask are paired by file name; an
  unpaired file (such as the I2CVB/train mispairing of the MiDSS samples) is reported as a
  warning, listed in the manifest as an orphan and never used.

Preparation resizes every slice to `data.size` (images bilinear, masks nearest) and normalises
each case to zero mean and unit variance over all its slices. Loading builds the IOP-FL 2.5D input
(a slice with its previous and next slice of the same case as 3 channels, edges replicated) from
the full case. Both regimes score the same slices: every slice by default, so a site's test
split and the same site held out are alike and an adapter never sees a selection made with its
labels. `data.foreground_only=true` is the release's label-based selection (slices with
prostate only), applied to every split and to the held-out site alike, recorded in the config.

HD95 is in mm when every case of the chosen sites has the same voxel size as the network sees it
(NIfTI header zooms, in-plane scaled by the resize; units "mm" and "unknown" read as mm), else
in voxels with a warning saying why: the task scores one spacing per dataset. The PNG slices
state no pixel size, so their HD95 is in voxels.

Splits are by case, fixed by the seed, and written to `splits/` next to the prepared files. Given
train/test folders are used as given, and `data.val_fraction` of the training cases (at least one)
become val. A site with only one training case (as in the MiDSS samples) cannot spare a case: its
val reuses that training case, never test, and a warning and the split file say so. Volumes
without given folders: `data.test_fraction` of the cases become test first.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fedbench.data import FederatedData
from fedbench.hookspecs import hookimpl
from fedbench.images import read_image_and_mask
from fedbench.task import SegmentationTask
from fedbench_datasets.prepared import (
    PreparedDataset,
    Scan,
    make_site,
    normalize_case,
    resize,
    split_label,
    warn,
    write_split_file,
)

SITES = ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK")
ALIASES = {"RUNMC": ("ISBI",), "BMC": ("ISBI_1.5",), "I2CVB": ("HCRUDB",)}
SLICE_NAME = re.compile(r"^(?P<case>.+)_(?P<slice>\d+)$")
SEGMENTATION = re.compile(r"_segmentation$", re.IGNORECASE)
# one slice: (slice index, image [H, W] float, prostate mask [H, W] bool)
Slices = dict[str, list[tuple[int, np.ndarray, np.ndarray]]]
Spacings = dict[str, tuple[float, float, float]]  # a case's (thickness, row, column) in mm
UNITS = {"meter": 1000.0, "micron": 0.001}  # NIfTI units in mm; "mm" and "unknown" read as mm


def site_folder(source: Path, site: str) -> Path | None:
    """The folder of `site` under `source`, by its name or a known alias."""
    for name in (site, *ALIASES.get(site, ())):
        if (source / name).is_dir():
            return source / name
    return None


def read_slice_pair(image_path: Path, mask_path: Path, problems: list[str]) -> tuple | None:
    """A slice of any bit depth read by its real range onto the 8-bit scale (0..255, as 8-bit
    slices always were) and its prostate mask (stored 0 = prostate), or None with the problem
    noted."""
    pair = read_image_and_mask(image_path, mask_path, 1, problems)
    if pair is None:
        return None
    image, mask = pair
    extra = sorted(set(np.unique(mask).tolist()) - {0, 255})
    if extra:
        problems.append(f"{mask_path}: mask is not binary (values {extra[:5]} besides 0/255)")
        return None
    return image * 255, mask == 0


def scan_slices(site_dir: Path, scan: Scan) -> tuple[Slices, dict[str, str], Spacings]:
    """The slice layout of one site: pairs matched by name; unpaired files become orphans.
    PNG slices state no pixel size, so no case has a spacing."""
    cases: Slices = {}
    parts: dict[str, str] = {}
    for part in ("train", "test"):
        images = {p.stem: p for p in (site_dir / part / "image").glob("*.png")}
        masks = {p.stem: p for p in (site_dir / part / "mask").glob("*.png")}
        for stem in sorted(images.keys() - masks.keys()):
            scan.orphans.append(f"{images[stem]}: image without a mask of the same name")
        for stem in sorted(masks.keys() - images.keys()):
            scan.orphans.append(f"{masks[stem]}: mask without an image of the same name")
        for stem in sorted(images.keys() & masks.keys()):
            match = SLICE_NAME.match(stem)
            if match is None:
                scan.problems.append(f"{images[stem]}: name is not CASE_SLICE.png")
                continue
            pair = read_slice_pair(images[stem], masks[stem], scan.problems)
            if pair is not None:
                case = f"{part}/{match['case']}"
                parts[case] = part
                cases.setdefault(case, []).append((int(match["slice"]), *pair))
    return cases, parts, {}


def read_volume(path: Path) -> np.ndarray:
    import nibabel

    data = np.asarray(nibabel.load(str(path)).dataobj)
    return data.reshape(data.shape[:3]) if data.ndim == 4 and data.shape[3] == 1 else data


def read_spacing(path: Path) -> tuple[float, float, float]:
    """Voxel size in mm along the volume's axes 0, 1 and 2, from the NIfTI header."""
    import nibabel

    header = nibabel.load(str(path)).header
    scale = UNITS.get(header.get_xyzt_units()[0], 1.0)
    return tuple(float(z) * scale for z in header.get_zooms()[:3])


def scan_volumes(site_dir: Path, scan: Scan) -> tuple[Slices, dict[str, str], Spacings]:
    """The volume layout of one site: CaseNN.nii.gz with CaseNN_segmentation.nii.gz, and each
    case's voxel size (slice thickness, row, column) in mm."""
    files = sorted(site_dir.glob("*.nii*"))
    stem = {p: p.name.split(".")[0] for p in files}
    segs = {SEGMENTATION.sub("", stem[p]): p for p in files if SEGMENTATION.search(stem[p])}
    vols = {stem[p]: p for p in files if not SEGMENTATION.search(stem[p])}
    for name in sorted(vols.keys() - segs.keys()):
        scan.orphans.append(f"{vols[name]}: volume without a segmentation")
    for name in sorted(segs.keys() - vols.keys()):
        scan.orphans.append(f"{segs[name]}: segmentation without a volume")
    cases: Slices = {}
    spacing: Spacings = {}
    for name in sorted(vols.keys() & segs.keys()):
        try:
            image, label = read_volume(vols[name]), read_volume(segs[name])
            rows, columns, thickness = read_spacing(vols[name])
        except Exception as exc:
            scan.problems.append(f"{vols[name]}: unreadable volume or segmentation ({exc})")
            continue
        if image.shape != label.shape or image.ndim != 3:
            scan.problems.append(
                f"{segs[name]}: segmentation {label.shape} and volume {image.shape} differ"
            )
            continue
        cases[name] = [(k, image[..., k], label[..., k] > 0) for k in range(image.shape[2])]
        spacing[name] = (thickness, rows, columns)
    return cases, {name: "all" for name in cases}, spacing


def site_arrays(
    cases: Slices, parts: dict[str, str], size: int, spacing: Spacings
) -> dict[str, np.ndarray]:
    """One site's prepared arrays, cases in name order and slices in index order; `spacing`
    [cases, 3] (thickness, row, column in mm after the resize) when every case has one."""
    images, masks, case_index, slice_index = [], [], [], []
    names = sorted(cases)
    for i, name in enumerate(names):
        rows = sorted(cases[name], key=lambda row: row[0])
        volume = np.stack([resize(image, size, nearest=False) for _, image, _ in rows])
        images.append(normalize_case(volume).astype(np.float16))
        masks.append(np.stack([resize(m, size, nearest=True) > 0.5 for _, _, m in rows]))
        case_index += [i] * len(rows)
        slice_index += [k for k, _, _ in rows]
    arrays = {
        "image": np.concatenate(images),
        "mask": np.concatenate(masks).astype(np.uint8),
        "case": np.asarray(case_index, dtype=np.int64),
        "slice": np.asarray(slice_index, dtype=np.int64),
        "case_names": np.asarray(names, dtype=str),
        "case_parts": np.asarray([parts[n] for n in names], dtype=str),
    }
    if names and all(n in spacing for n in names):
        steps = [(*spacing[n], *cases[n][0][1].shape) for n in names]
        arrays["spacing"] = np.asarray([(t, r * h / size, c * w / size) for t, r, c, h, w in steps])
    return arrays


def common_spacing(
    arrays: dict[str, dict[str, np.ndarray]], sites: list[str]
) -> tuple[float, float, float] | None:
    """The one voxel size every case of `sites` shares, or None (warned when they differ)."""
    if not all("spacing" in arrays[s] for s in sites):
        return None
    every = np.concatenate([arrays[s]["spacing"] for s in sites])
    if np.allclose(every, every[0], rtol=1e-3, atol=0):
        return tuple(float(v) for v in every[0])
    low, high = every.min(0).round(3).tolist(), every.max(0).round(3).tolist()
    warn(f"cases differ in voxel size (from {low} to {high} mm): hd95 is in voxels")
    return None


def neighbours_25d(image: np.ndarray, case: np.ndarray) -> np.ndarray:
    """[N, H, W] slices sorted by case and slice -> [N, 3, H, W]: previous, slice, next within
    the same case, edges replicated."""
    n = len(case)
    here = np.arange(n)
    prev = np.maximum(here - 1, 0)
    nxt = np.minimum(here + 1, n - 1)
    prev = np.where(case[prev] == case, prev, here)
    nxt = np.where(case[nxt] == case, nxt, here)
    return np.stack([image[prev], image, image[nxt]], axis=1)


class Prostate(PreparedDataset):
    """Six-site prostate T2 MRI (SAML release or the 2D slice layout), 2.5D input."""

    name = "prostate"
    description = "Prostate MRI, 6 sites (RUNMC, BMC, I2CVB, UCL, BIDMC, HK); needs data.path"
    defaults: ClassVar[dict[str, Any]] = {
        "path": None,
        "size": 128,
        "foreground_only": False,
        "val_fraction": 0.2,
        "test_fraction": 0.25,
        "sites": list(SITES),
        "loss": "dice_ce",
    }
    prepare_keys = ("size", "sites")
    source_patterns = ("*/*.nii*", "*/*/*/*.png")
    mask_values = {0, 1}
    known_sites = SITES

    def scan(self, source: Path, cfg: dict[str, Any]) -> Scan:
        scan = Scan()
        layouts = set()
        for site in self.chosen_sites(cfg):
            folder = site_folder(source, site)
            if folder is None:
                scan.problems.append(f"{source / site}: site folder missing")
                continue
            slices = (folder / "train").is_dir() or (folder / "test").is_dir()
            layouts.add("slices" if slices else "volumes")
            read = scan_slices if slices else scan_volumes
            cases, parts, spacing = read(folder, scan)
            if not cases:
                scan.problems.append(f"{folder}: empty site (no image with its mask)")
                continue
            scan.sites[site] = site_arrays(cases, parts, int(cfg["size"]), spacing)
        scan.layout = "+".join(sorted(layouts))
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
            order = np.lexsort((a["slice"], a["case"]))
            image = a["image"][order].astype(np.float32)
            mask, case = a["mask"][order].astype(np.int64), a["case"][order]
            inputs = neighbours_25d(image, case)
            if cfg["foreground_only"]:
                keep = mask.reshape(len(mask), -1).any(1)
                inputs, mask, case = inputs[keep], mask[keep], case[keep]
            names = a["case_names"].tolist()
            parts = dict(zip(names, a["case_parts"].tolist(), strict=True))
            rng = np.random.default_rng([seed, SITES.index(name)])
            site, record[name] = make_site(
                name,
                torch.from_numpy(inputs),
                torch.from_numpy(mask),
                torch.from_numpy(case),
                parts,
                names,
                cfg,
                rng,
            )
            sites.append(site)
        settings = {k: cfg[k] for k in ("foreground_only", "val_fraction", "test_fraction")}
        payload = {"dataset": self.name, "seed": seed, "settings": settings, "sites": record}
        write_split_file(directory, split_label(seed, settings), payload)
        spacing = common_spacing(arrays, self.chosen_sites(cfg))
        loss = cfg.get("loss", self.defaults["loss"])
        task = SegmentationTask(
            in_channels=3, class_names=["prostate"], spacing=spacing, loss_name=loss
        )
        return FederatedData(self.name, sites, task)


@hookimpl
def fedbench_datasets() -> list[type]:
    return [Prostate]
