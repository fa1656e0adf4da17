"""synth-organ-3d: the embedded volumetric dataset, procedural multi-site 3D scans of an organ
with a lesion inside it (issue 26).

Each case is one volume: a body, an organ (label 1) at a random place in it and a small lesion
(label 2) inside the organ, all ellipsoids in millimetres on one voxel grid of `SPACING` (as if
every scan had been resampled to it, as nnU-Net does), so HD95 is in mm on an anisotropic grid.
Every site images that anatomy its own way (the profile table of `SynthOrgan3D`): contrast,
bias field, noise, in-plane resolution, slice thickness and field of view. Made from a seed with
numpy and scipy in seconds, cached as a compressed .npz; nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedbench.data import Dataset, FederatedData, Site, Split
from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.storage import write_atomic
from fedbench.volumes import PatchSplit, VolumeSegmentationTask

if TYPE_CHECKING:
    import numpy as np

#: bump whenever the generator's output changes, so stale caches are not reused
GENERATOR_VERSION = 1
#: voxel size in mm (slice, row, column) of every volume as the network sees it
SPACING = (3.0, 1.5, 1.5)


@dataclass(frozen=True)
class Profile:
    """How one site's scanner images the anatomy."""

    name: str
    gamma: float  # contrast exponent on the signal in [0, 1]
    lesion: float  # the lesion's signal (organ 0.7, body 0.4): darker or brighter
    bias: float  # strength of a linear bias field across the volume (0: flat)
    noise: float  # Gaussian noise sigma relative to signal 1
    blur: float  # in-plane point-spread sigma, in voxels
    thickness: float  # slice profile sigma along the slices, in voxels (thick slices)
    fov: float  # anatomy scale: above 1 the anatomy looks bigger (a tighter field of view)


PROFILES = (
    Profile("A", 1.0, 0.25, 0.0, 0.03, 0.0, 0.0, 1.0),
    Profile("B", 1.5, 0.95, 0.6, 0.06, 0.5, 0.8, 0.9),
    Profile("C", 0.7, 0.2, 0.3, 0.10, 0.0, 0.4, 1.15),
    Profile("D", 1.2, 1.0, 0.9, 0.04, 0.8, 1.2, 1.05),
)


def ellipsoid(grid: tuple[np.ndarray, ...], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Voxels (mm coordinates `grid`) inside the axis-aligned ellipsoid."""
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


@dataclass(frozen=True)
class Geometry:
    """One case's anatomy in mm from the volume's centre: the body's radii (centred), and the
    organ's and the lesion's centre and radii (axis-aligned ellipsoids)."""

    body: np.ndarray
    organ_centre: np.ndarray
    organ_radii: np.ndarray
    lesion_centre: np.ndarray
    lesion_radii: np.ndarray


def drawn_geometry(shape: tuple[int, ...], fov: float, rng: np.random.Generator) -> Geometry:
    """A random case: the organ somewhere in the body, the lesion inside the organ."""
    import numpy as np

    extent = np.array([n * s / 2 for n, s in zip(shape, SPACING)])
    body = extent * fov * rng.uniform(0.85, 0.95, 3)
    organ_radii = fov * np.array([rng.uniform(12, 18), rng.uniform(10, 15), rng.uniform(10, 15)])
    room = np.maximum(extent * fov * 0.8 - organ_radii, 1.0)
    organ_centre = rng.uniform(-room, room) * 0.6
    lesion_radii = fov * rng.uniform(3.5, 6.0) * np.array([1.0, 1.0, 1.0])
    lesion_centre = organ_centre + rng.uniform(-1, 1, 3) * (organ_radii - lesion_radii) * 0.5
    return Geometry(body, organ_centre, organ_radii, lesion_centre, lesion_radii)


def labelled(shape: tuple[int, ...], g: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """The body mask and the labels (0 background, 1 organ, 2 lesion) of `g` on the grid."""
    import numpy as np

    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, SPACING)]
    grid = np.meshgrid(*axes, indexing="ij")
    body = ellipsoid(grid, np.zeros(3), g.body)
    organ = ellipsoid(grid, g.organ_centre, g.organ_radii) & body
    lesion = ellipsoid(grid, g.lesion_centre, g.lesion_radii) & organ
    return body, organ.astype(np.uint8) + lesion.astype(np.uint8)


def anatomy(
    shape: tuple[int, ...], fov: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One case: signal in [0, 1] and labels (0 background, 1 organ, 2 lesion)."""
    import numpy as np

    body, labels = labelled(shape, drawn_geometry(shape, fov, rng))
    signal = 0.4 * body + 0.3 * (labels > 0)
    texture = rng.normal(0.0, 0.03, shape)
    return np.clip(signal + texture * body, 0.0, 1.0), labels


def imaged(
    signal: np.ndarray, labels: np.ndarray, site: Profile, rng: np.random.Generator
) -> np.ndarray:
    """The site's image of one case's signal: lesion contrast, gamma, bias field, blur (in-plane
    and across slices), noise; as float32."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    image = np.where(labels == 2, site.lesion, signal) ** site.gamma
    ramp = np.linspace(-1.0, 1.0, signal.shape[2])[None, None, :]
    image = image * np.exp(site.bias * ramp)
    image = gaussian_filter(image, sigma=(site.thickness, site.blur, site.blur), mode="nearest")
    return (image + rng.normal(0.0, site.noise, image.shape)).astype(np.float32)


def normalized(volume: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per volume (as nnU-Net normalizes MRI)."""
    return (volume - volume.mean()) / (volume.std() + 1e-6)


def generate(shape: tuple[int, ...], cases: int, sites: list[int], seed: int) -> dict[str, Any]:
    """Every chosen site's volumes and labels: arrays image_i [cases, D, H, W] float16 and
    mask_i [cases, D, H, W] uint8, from one seed (anatomy and scanner noise per site)."""
    import numpy as np

    out: dict[str, Any] = {}
    for i in sites:
        site = PROFILES[i]
        rng = np.random.default_rng([seed, i])
        images, masks = [], []
        for _ in range(cases):
            signal, labels = anatomy(shape, site.fov, rng)
            images.append(normalized(imaged(signal, labels, site, rng)).astype(np.float16))
            masks.append(labels)
        out[f"image_{i}"], out[f"mask_{i}"] = np.stack(images), np.stack(masks)
    return out


def cached(path: Path, make: Any) -> dict[str, Any]:
    """The arrays in the .npz at `path`, or made and written there (atomically)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error):
        pass  # missing or damaged: made again
    arrays = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda handle: np.savez_compressed(handle, **arrays))
    return arrays


def split_of(images: np.ndarray, masks: np.ndarray, kind: type[Split], **extra: Any) -> Split:
    """[N, D, H, W] volumes -> a split of N cases (inputs [N, 1, D, H, W])."""
    import torch

    return kind(
        torch.from_numpy(images.astype("float32"))[:, None],
        torch.from_numpy(masks.astype("int64")),
        torch.arange(len(images)),
        **extra,
    )


class SynthOrgan3D(Dataset):
    """Procedural 3D scans, four sites, one organ with a lesion inside per case.

    ====  =====  ======  ====  =====  ====  =========  ====
    site  gamma  lesion  bias  noise  blur  thickness  fov
    ====  =====  ======  ====  =====  ====  =========  ====
    A     1.0    0.25    0     0.03   0     0          1.0
    B     1.5    0.95    0.6   0.06   0.5   0.8        0.9
    C     0.7    0.2     0.3   0.10   0     0.4        1.15
    D     1.2    1.0     0.9   0.04   0.8   1.2        1.05
    ====  =====  ======  ====  =====  ====  =========  ====

    Signal: body 0.4, organ 0.7, the lesion the site's `lesion` (dark on A and C, bright on B
    and D), a mild texture; blur and thickness are Gaussian sigmas in voxels, noise relative to
    signal 1, `fov` scales the anatomy. Each site has `cases_per_site` volumes of `shape`
    (default 32 x 64 x 64 voxels of 3 x 1.5 x 1.5 mm, split 60/20/20 by case); training draws
    patches of `patch` (16 x 32 x 32), a share `foreground_rate` of them centred on foreground;
    scoring slides that window over each volume."""

    name = "synth-organ-3d"
    description = "Procedural four-site 3D scans of an organ with a lesion (volumes, patches)"
    model = "unet3d"
    defaults = {
        "shape": [32, 64, 64],
        "patch": [16, 32, 32],
        "foreground_rate": 0.33,
        "cases_per_site": 10,
        "loss": "dice_ce",
    }

    def preset(self, preset: str) -> dict[str, Any]:
        """Training counted in steps, not passes (a site has a handful of volumes): batches of
        two patches, 10 local steps a round; 40 rounds by default (FedAvg, seed 0, every site:
        inside mean Dice 0.52 at 40 rounds against 0.41 at 20), smaller volumes for `quick`."""
        train = {"batch_size": 2, "local_steps": 10}
        if preset == "quick":
            data = {"shape": [16, 32, 32], "patch": [16, 16, 16], "cases_per_site": 5}
            return {"data": data, "train": {**train, "local_steps": 2}}
        return {"train": {**train, "rounds": 40}}

    def site_names(self, cfg: dict[str, Any]) -> list[str]:
        return [p.name for p in PROFILES]

    def settings(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """Checked settings: shapes of three positive ints, a patch no larger than the volume."""
        merged = {**self.defaults, **cfg}
        try:
            shape = tuple(int(n) for n in merged["shape"])
            patch = tuple(int(n) for n in merged["patch"])
            cases, rate = int(merged["cases_per_site"]), float(merged["foreground_rate"])
        except (TypeError, ValueError):
            raise FedbenchError("data.shape and data.patch need three integers each") from None
        if len(shape) != 3 or len(patch) != 3 or min(*shape, *patch) < 4:
            raise FedbenchError(f"data.shape {list(shape)} and data.patch {list(patch)}: 3 >= 4")
        if any(p > n for p, n in zip(patch, shape)):
            raise FedbenchError(f"data.patch {list(patch)} is larger than data.shape {list(shape)}")
        if cases < 3 or not 0.0 <= rate <= 1.0:
            raise FedbenchError("data.cases_per_site must be >= 3, data.foreground_rate in [0, 1]")
        return {"shape": shape, "patch": patch, "cases": cases, "rate": rate}

    def load(self, cfg: dict[str, Any], seed: int, cache_dir: Path) -> FederatedData:
        s = self.settings(cfg)
        sites = list(range(len(PROFILES)))
        key = json.dumps([GENERATOR_VERSION, seed, s["shape"], s["cases"]])
        path = Path(cache_dir) / self.name / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
        arrays = cached(path, lambda: generate(s["shape"], s["cases"], sites, int(seed)))
        n_val = n_test = max(1, round(0.2 * s["cases"]))
        n_train = s["cases"] - n_val - n_test
        out = []
        for i in sites:
            images, masks = arrays[f"image_{i}"], arrays[f"mask_{i}"]
            train = split_of(
                images[:n_train],
                masks[:n_train],
                PatchSplit,
                patch=s["patch"],
                foreground_rate=s["rate"],
            )
            val = split_of(
                images[n_train : n_train + n_val], masks[n_train : n_train + n_val], Split
            )
            test = split_of(images[n_train + n_val :], masks[n_train + n_val :], Split)
            out.append(Site(PROFILES[i].name, train, val, test))
        task = VolumeSegmentationTask(
            in_channels=1,
            class_names=["organ", "lesion"],
            spacing=SPACING,
            loss_name=cfg.get("loss", self.defaults["loss"]),
            patch=s["patch"],
        )
        return FederatedData(self.name, out, task)


@hookimpl
def fedbench_datasets() -> list[type]:
    return [SynthOrgan3D]
