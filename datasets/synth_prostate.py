"""synth-prostate: the embedded dataset, procedural multi-site axial T2 prostate MRI slices.

Each case (patient) is a short stack of adjacent axial slices through a random pelvis, rendered
by datasets/synth_phantom.py. Every site renders that anatomy through its own scanner (see the
profile table of `SynthProstate`), mimicking the documented differences between the six sites of
the SAML multi-site prostate data. Made from a seed with vectorised numpy in seconds, cached on
disk as a compressed .npz; nothing is downloaded. numpy, torch and the renderer are imported
when the data is loaded, so `fedbench list` stays instant.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedbench.data import Dataset, FederatedData, Site, Split
from fedbench.errors import FedbenchError, unknown_name
from fedbench.hookspecs import hookimpl
from fedbench.storage import write_atomic
from fedbench.task import SegmentationTask

if TYPE_CHECKING:
    import numpy as np

#: bump whenever the generator's output changes, so stale caches are not reused
GENERATOR_VERSION = 1
CACHE_SUBDIR = "synth-prostate"
#: the smallest accepted value of each integer setting
MINIMA = {"size": 16, "cases_per_site": 3, "slices_per_case": 1, "num_sites": 1}


@dataclass(frozen=True)
class Profile:
    """How one site's scanner renders the anatomy (the columns of SynthProstate's table)."""

    name: str
    scale: float  # 8-bit grey level of signal 1.0 where the coil sensitivity is 1
    gamma: float  # contrast exponent on the signal (>1: darker mid-tones, more contrast)
    zone: float  # peripheral- versus central-zone contrast (field strength)
    coil_r: float  # endorectal coil radius in anatomy units (0: surface coil, native rectum)
    lumen: float  # signal inside the endorectal balloon (0: air void, 0.85: fluid)
    rim: float  # signal of a bright film at the balloon's edge (0: none)
    bias: float  # strength of the coil-sensitivity falloff (0: flat)
    noise: float  # Rician noise sigma, relative to signal 1.0
    blur: float  # Gaussian point-spread sigma in pixels at size 64 (resolution)
    fov: tuple[float, float]  # half-extent (x, y) of the view in anatomy units
    organ: float  # gland size factor


PROFILES = (
    Profile("RUNMC", 110.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.5, 0.02, 0.0, (1.0, 1.0), 1.0),
    Profile("BMC", 80.0, 0.9, 0.6, 0.3, 0.0, 0.0, 0.4, 0.07, 0.3, (0.9, 0.9), 1.15),
    Profile("I2CVB", 70.0, 1.2, 1.1, 0.0, 0.0, 0.0, 0.15, 0.09, 0.0, (1.25, 0.9), 1.0),
    Profile("UCL", 230.0, 1.6, 1.2, 0.0, 0.0, 0.0, 0.0, 0.025, 0.45, (0.95, 0.95), 0.95),
    Profile("BIDMC", 14.0, 1.0, 1.0, 0.24, 0.03, 0.9, 1.1, 0.03, 0.0, (1.15, 1.15), 0.9),
    Profile("HK", 45.0, 1.0, 0.7, 0.17, 0.7, 0.0, 0.6, 0.05, 0.55, (1.0, 1.0), 0.95),
)


def site_name(index: int) -> str:
    """Site `index`: the six real names, then `RUNMC-2`, `BMC-2`, ... cycling the profiles."""
    base = PROFILES[index % len(PROFILES)].name
    return base if index < len(PROFILES) else f"{base}-{index // len(PROFILES) + 1}"


def split_counts(cases: int) -> tuple[int, int, int]:
    """Cases for (train, val, test): about 60/20/20, at least one each."""
    val = test = max(1, round(0.2 * cases))
    return cases - val - test, val, test


def _read_cache(path: Path, keys: list[str], shape: tuple[int, ...]) -> dict | None:
    """The cached arrays, or None when the file is missing, corrupt or of another shape."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
        return None
    ok = all(a.shape == shape and a.dtype == np.uint8 for a in arrays.values())
    return arrays if ok else None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write a compressed .npz atomically (temp file + rename); warn if it cannot be written."""
    import numpy as np

    try:
        write_atomic(path, lambda handle: np.savez_compressed(handle, **arrays))
    except OSError as exc:
        warnings.warn(f"synth-prostate: cannot write cache {path}: {exc}", stacklevel=3)


def _site_split(images: np.ndarray, masks: np.ndarray) -> Split:
    """[C, S, H, W] uint8 stacks -> a Split, each case normalised to zero mean, unit variance."""
    import numpy as np
    import torch

    c, s, h, w = images.shape
    x = images.astype(np.float32)
    x = (x - x.mean((1, 2, 3), keepdims=True)) / (x.std((1, 2, 3), keepdims=True) + 1e-6)
    return Split(
        torch.from_numpy(x.reshape(c * s, 1, h, w)),
        torch.from_numpy(masks.reshape(c * s, h, w).astype(np.int64)),
        torch.arange(c, dtype=torch.int64).repeat_interleave(s),
    )


class SynthProstate(Dataset):
    """Procedural axial T2 prostate MRI, one site per documented scanner difference.

    Per-site profile. Signal is rendered in [0, 1]; `scale` is the 8-bit grey level of signal 1
    where coil sensitivity is 1 (at the gland), `gamma` the contrast exponent, `zone` the
    peripheral/central zone contrast, `noise` the Rician sigma relative to signal 1, `blur` the
    PSF sigma in pixels at size 64, `FOV` the half-extent (x, y) of the view in anatomy units
    (larger shows more of the pelvis, unequal squeezes it), `organ` the gland size factor.

    =====  ==================================  =====  =====  ====  =====  ====  ==========  =====
    site   mimics                              scale  gamma  zone  noise  blur  FOV         organ
    =====  ==================================  =====  =====  ====  =====  ====  ==========  =====
    RUNMC  3T surface coil: sharp, clean,        110  1.0    1.0   0.02   0     1.0, 1.0    1.0
           brighter towards the skin
    BMC    1.5T air-filled endorectal             80  0.9    0.6   0.07   0.3   0.9, 0.9    1.15
           balloon: big dark void, flat gland
    I2CVB  3T narrow rectangular FOV              70  1.2    1.1   0.09   0     1.25, 0.9   1.0
           (squeezed left-right), noisiest
    UCL    bright, high contrast, flat           230  1.6    1.2   0.025  0.45  0.95, 0.95  0.95
    BIDMC  3T endorectal coil: almost black,      14  1.0    1.0   0.03   0     1.15, 1.15  0.9
           bright ring artifact below gland
    HK     1.5T fluid-filled endorectal           45  1.0    0.7   0.05   0.55  1.0, 1.0    0.95
           coil (bright disc), dark, blurred
    =====  ==================================  =====  =====  ====  =====  ====  ==========  =====

    Coil sensitivity exponents: RUNMC 0.5, I2CVB 0.15, UCL 0 (surface coils, brighter near the
    skin); BMC 0.4, HK 0.6, BIDMC 1.1 (endorectal, brighter near the coil). Anatomy (body and
    gland size, shape and position, rectal content, textures, an annotator's small outline
    jitter) is random per case; sites beyond six (`num_sites`) cycle through the profiles with
    new names (`RUNMC-2`, ...) and new anatomy. Each site has `cases_per_site` cases (default
    14, split 60/20/20 by case into train/val/test) of `slices_per_case` adjacent slices of
    `size` pixels. Inputs are the 8-bit images normalised per case (zero mean, unit variance,
    as SAML does); targets are 1 on the prostate. The phantom has no physical size, so HD95 is
    in voxels.
    """

    name = "synth-prostate"
    description = "Procedural six-site axial prostate MRI mimicking real scanner differences"
    defaults = {
        "size": 64,
        "cases_per_site": 14,
        "slices_per_case": 8,
        "num_sites": 6,
        "sites": "",
        "loss": "dice_ce",
    }

    def preset(self, preset: str) -> dict[str, Any]:
        """Small and coarse for `quick`; `default` is the reference protocol (32 pixels, 24
        rounds: FedAvg's inside mean Dice moved 0.010 when the rounds doubled, see
        results/README.md); for `paper` the real 384 pixels and the IOP-FL release's network,
        loss and optimizer."""
        if preset == "quick":
            return {"data": {"size": 32, "cases_per_site": 4}}
        if preset == "default":  # the reference protocol: FedAvg's inside mean converged
            return {"data": {"size": 32}, "train": {"rounds": 24}}
        if preset == "paper":
            return {
                "data": {"size": 384, "loss": "soft_dice_batch"},
                "model": {"name": "release-unet"},
                "train": {"amsgrad": True},
            }
        return {}

    def site_names(self, cfg: dict[str, Any]) -> list[str]:
        return [site_name(i) for i in self._settings(cfg)["sites"]]

    def _settings(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """Validated integer settings and the chosen site indices."""
        merged = {**self.defaults, **cfg}
        out: dict[str, Any] = {}
        for key, low in MINIMA.items():
            try:
                out[key] = int(merged[key])
            except (TypeError, ValueError):
                raise FedbenchError(f"data.{key} must be an integer, got {merged[key]!r}") from None
            if out[key] < low:
                raise FedbenchError(f"data.{key} must be at least {low}, got {out[key]}")
        names = [site_name(i) for i in range(out["num_sites"])]
        wanted = merged["sites"]
        if isinstance(wanted, str):
            wanted = [w.strip() for w in wanted.split(",") if w.strip()]
        for w in wanted:
            if w not in names:
                raise unknown_name(f"site of dataset '{self.name}'", w, names)
        out["sites"] = [i for i, n in enumerate(names) if not wanted or n in wanted]
        return out

    def load(self, cfg: dict[str, Any], seed: int, cache_dir: Path) -> FederatedData:
        s = self._settings(cfg)
        key = json.dumps({"version": GENERATOR_VERSION, "seed": int(seed), **s}, sort_keys=True)
        path = (
            Path(cache_dir) / CACHE_SUBDIR / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
        )
        keys = [f"{kind}_{i}" for i in s["sites"] for kind in ("image", "mask")]
        shape = (s["cases_per_site"], s["slices_per_case"], s["size"], s["size"])
        arrays = _read_cache(path, keys, shape)
        if arrays is None:
            from fedbench_datasets.synth_phantom import generate

            args = (s["size"], s["cases_per_site"], s["slices_per_case"], int(seed), s["sites"])
            arrays = generate(*args, profiles=PROFILES)
            _write_cache(path, arrays)
        n_train, n_val, _ = split_counts(s["cases_per_site"])
        bounds = (0, n_train, n_train + n_val, s["cases_per_site"])
        sites = []
        for i in s["sites"]:
            img, mask = arrays[f"image_{i}"], arrays[f"mask_{i}"]
            splits = [_site_split(img[a:b], mask[a:b]) for a, b in zip(bounds, bounds[1:])]
            sites.append(Site(site_name(i), *splits))
        loss = cfg.get("loss", self.defaults["loss"])
        task = SegmentationTask(in_channels=1, class_names=["prostate"], loss_name=loss)
        return FederatedData(self.name, sites, task)


@hookimpl
def fedbench_datasets() -> list[type]:
    return [SynthProstate]
