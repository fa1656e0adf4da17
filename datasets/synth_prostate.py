"""synth-prostate: the embedded dataset, procedural multi-site axial T2 prostate MRI slices.

Each case (patient) is a short stack of adjacent axial slices through a random pelvis: body
outline, fat with vessels, muscles, femoral heads, pubic bone, rectum, seminal vesicles and bladder
near the base, and a prostate gland with a bright peripheral zone, a nodular central gland, a dark
anterior stroma and a faint, partly missing capsule. Every site renders that anatomy through its
own scanner (see the profile table of `SynthProstate`), mimicking the documented differences
between the six sites of the SAML multi-site prostate data. Made from a seed with vectorised
numpy in seconds, cached on disk as a compressed .npz; nothing is downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from fedbench.data import Dataset, FederatedData, Site, Split
from fedbench.errors import FedbenchError, unknown_name
from fedbench.hookspecs import hookimpl
from fedbench.tasks import SegmentationTask

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

# Right-side muscles (mirrored to the left): centre x, y, radii x, y, rotation (radians).
MUSCLES = (
    (0.6, 0.78, 0.44, 0.2, -0.1),  # gluteus maximus
    (0.37, 0.05, 0.11, 0.34, -0.25),  # obturator internus
    (0.62, -0.5, 0.42, 0.15, -0.5),  # obturator externus / pectineus
    (1.0, -0.25, 0.22, 0.4, 0.0),  # iliopsoas
    (1.05, 0.45, 0.25, 0.3, 0.4),  # gluteus medius / tensor
)


@dataclass
class _Canvas:
    """Anatomy coordinates of one case's pixels, its random stream and its slice positions."""

    x: np.ndarray  # [S, H, W] anatomy x of each pixel
    y: np.ndarray  # [S, H, W] anatomy y (posterior is +y, downwards)
    t: np.ndarray  # [S, 1, 1] slice position from apex (-1) to base (+1)
    px: float  # pixel size in anatomy units
    rng: np.random.Generator
    size: int

    def edge(self, radius: float, soft: float = 0.0) -> float:
        """Edge width in normalised-radius units: `soft` anatomy units, at least ~half a pixel."""
        return max(soft, 0.6 * self.px) / radius

    def field(self, cells: int, z: float = 0.7) -> np.ndarray:
        """Smooth random field [S, H, W] of unit std, with about `cells` features across."""
        s, c = self.t.shape[0], min(cells, self.size)
        low = ndimage.gaussian_filter(self.rng.standard_normal((s, c, c)), (z, 0.8, 0.8))
        up = _upsampler(c, self.size)
        out = up @ low.astype(np.float32) @ up.T
        return (out - out.mean()) / (out.std() + 1e-8)


@functools.lru_cache(maxsize=32)
def _upsampler(cells: int, size: int) -> np.ndarray:
    """Linear-interpolation matrix [size, cells] from a coarse grid to pixel centres."""
    pos = np.clip((np.arange(size) + 0.5) * cells / size - 0.5, 0, cells - 1)
    low = np.minimum(pos.astype(int), cells - 2) if cells > 1 else np.zeros(size, int)
    frac = pos - low
    mat = np.zeros((size, cells), np.float32)
    mat[np.arange(size), low] = 1 - frac
    if cells > 1:
        mat[np.arange(size), low + 1] += frac
    return mat


def _rho(cv: _Canvas, cx: Any, cy: Any, rx: Any, ry: Any, angle: float = 0.0) -> np.ndarray:
    """Normalised elliptic radius (1 on the outline) of a rotated ellipse."""
    dx, dy = cv.x - cx, cv.y - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    return np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)


def _step(z: Any) -> Any:
    """Smooth step from 0 (z << 0) to 1 (z >> 0)."""
    return 0.5 + 0.5 * np.tanh(z)


def _inside(rho: np.ndarray, width: float) -> np.ndarray:
    """Soft inside-ness (0..1) of a shape whose outline is rho == 1."""
    return _step((1.0 - rho) / width)


def _paint(img: np.ndarray, alpha: np.ndarray, value: Any) -> np.ndarray:
    """Lay a tissue of intensity `value` over `img` with soft coverage `alpha`."""
    return img + alpha * (value - img)


def _ring(rho: np.ndarray, thickness: float, width: float) -> np.ndarray:
    """Soft band of the given thickness (in rho units) just inside the outline rho == 1."""
    return _inside(rho, width) * (1 - _inside(rho / (1 - thickness), width))


def _streaks(cv: _Canvas, cells: int, width: float) -> np.ndarray:
    """Thin, broken curvilinear streaks (vessels, septa) in [0, 1]."""
    return np.exp(-((cv.field(cells) / width) ** 2)) * _step(2 * cv.field(cells // 2))


def _pelvis(cv: _Canvas, bx: float, by: float) -> tuple[np.ndarray, np.ndarray]:
    """Body, fat with septa, textured muscles, femoral heads and pubic bone: (signal, body rho)."""
    body = _rho(cv, 0.0, 0.05, bx, by)
    fat = (0.68 + 0.06 * cv.field(12)) * (1 - 0.45 * _streaks(cv, 24, 0.1))
    img = _paint(np.zeros_like(fat), _inside(body, cv.edge(1.0, 0.01)), fat)
    fibres = 0.19 + 0.04 * cv.field(32) + 0.3 * _streaks(cv, 20, 0.06)
    sx, sy = bx / 1.35, by / 1.0
    for mx, my, rx, ry, angle in MUSCLES:
        jit = cv.rng.normal(0, 0.02, 4).tolist()
        for side in (-1, 1):
            cx, cy = side * (mx * sx + jit[0]), my * sy + jit[1]
            rho = _rho(cv, cx, cy, rx + jit[2], ry + jit[3], side * angle)
            img = _paint(img, _inside(rho, cv.edge(rx, 0.015)), fibres)
    marrow = 0.42 + 0.08 * cv.field(28)
    fx, fr = 0.72 * sx + cv.rng.normal(0, 0.02), cv.rng.uniform(0.15, 0.2)
    for cx, cy, rx, ry in ((fx, 0.12, fr, fr), (-fx, 0.12, fr, fr), (0.0, -0.64, 0.16, 0.05)):
        rho = _rho(cv, cx, cy, rx, ry)
        img = _paint(img, _inside(rho, cv.edge(rx)), 0.08)  # cortical bone
        img = _paint(img, _inside(rho * 1.1, cv.edge(rx)), marrow)
    return img, body


def _rectum(cv: _Canvas, img: np.ndarray, p: Profile, cx: float, cy: float, rr: float) -> Any:
    """Levator ani sling, rectal wall and lumen: native gas/fluid or an endorectal balloon."""
    sling = _ring(_rho(cv, cx, cy - 0.03, rr + 0.1, rr + 0.09), 0.3, cv.edge(rr, 0.01))
    img = _paint(img, sling * _step((cv.y - cy + 0.1) / 0.06), 0.2 + 0.03 * cv.field(32))
    rho = _rho(cv, cx, cy, rr, rr * 0.95)
    img = _paint(img, _inside(rho / 1.15, cv.edge(rr, 0.01)), 0.25)  # wall
    if p.coil_r:
        img = _paint(img, _inside(rho, cv.edge(rr)), p.lumen)
        img = _paint(img, _ring(rho, 0.12, cv.edge(rr)), p.rim or p.lumen)
        img = _paint(img, 0.3 * _ring(rho / 0.7, 0.08, cv.edge(rr)), 0.5)  # balloon fold
        return _paint(img, _inside(rho / 0.12, cv.edge(rr * 0.12)), 0.5 - p.lumen / 2)
    content = [0.04, 0.9, 0.5][cv.rng.integers(3)]  # gas, fluid, mixed
    lumen = np.where(cv.field(16) > 0.4, 0.85, 0.04) if content == 0.5 else content
    return _paint(img, _inside(rho, cv.edge(rr, 0.01)), lumen)


def _base_organs(cv: _Canvas, img: np.ndarray, cx: float, cy: float, ry: float) -> np.ndarray:
    """Seminal vesicles behind and bladder in front of the gland, fading in towards the base."""
    w = np.clip((cv.t - 0.3) / 0.5, 0, 1)
    tubules = 0.8 + 0.12 * cv.field(40)
    for side in (-1, 1):
        rho = _rho(cv, cx + side * 0.13, cy + 0.75 * ry, 0.11, 0.045, side * 0.35)
        img = _paint(img, w * _inside(rho, cv.edge(0.045, 0.01)), tubules)
    rho = _rho(cv, cx, cy - ry - 0.12, 0.25, 0.14)
    return _paint(img, np.clip(w - 0.3, 0, 1) * _inside(rho, cv.edge(0.14, 0.01)), 0.95)


def _harmonics(rng: np.random.Generator, kmin: int, kmax: int, amp: float) -> np.ndarray:
    """Random (k, amplitude, phase) rows for an outline perturbation."""
    k = np.arange(kmin, kmax + 1)
    return np.stack([k, rng.uniform(0, amp, k.size), rng.uniform(0, 2 * np.pi, k.size)], 1)


def _wobble(theta: np.ndarray, rows: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Sum of cosine harmonics of the polar angle, drifting slowly along the stack."""
    out = np.zeros_like(theta)
    for k, a, phase in rows.tolist():
        out = out + a * np.cos(k * theta + phase + 0.4 * k * t)
    return out


def _gland(
    cv: _Canvas, img: np.ndarray, cx: float, cy: float, rx: float, ry: float, p: Profile
) -> tuple[np.ndarray, np.ndarray]:
    """Paint the prostate with its zones and capsule; returns (signal, label mask)."""
    rng, t = cv.rng, cv.t
    scale = np.sqrt(np.clip(1 - t**2, 0.04, 1)) * (1 + 0.12 * t)
    sx, sy = rx * scale, ry * scale
    dx, dy = cv.x - (cx + 0.02 * t), cv.y - (cy + 0.03 * t)
    flat = rng.uniform(0.1, 0.3) + p.coil_r  # posterior border pressed flat by the rectum
    dy = np.where(dy > 0, dy * (1 + flat), dy)
    xn, yn = dx / sx, dy / sy
    theta, radius = np.arctan2(yn, xn), np.sqrt(xn**2 + yn**2)
    rho = radius / (1 + _wobble(theta, _harmonics(rng, 2, 4, 0.07), t))
    label = rho / (1 + _wobble(theta, _harmonics(rng, 1, 3, 0.025), t)) < 1  # annotator
    tz = 0.4 + 0.09 * cv.field(32)
    pz = tz + 0.3 * p.zone + 0.05 * cv.field(48)
    pz_alpha = _step((rho - 0.62) / 0.07) * _step((yn + 0.15) / 0.12)  # posterior rim
    value = _paint(_paint(tz, pz_alpha, pz), _step(-(yn + 0.55) / 0.1), 0.24)  # anterior stroma
    soft = rng.uniform(0.01, 0.035)
    img = _paint(img, _inside(rho, cv.edge(rx, soft)), value)
    visible = np.clip(0.5 + 0.6 * cv.field(6), 0, 1)
    img = _paint(img, visible * np.exp(-(((rho - 1) / 0.07) ** 2)), 0.2)  # capsule
    for side in (-1, 1):  # neurovascular bundles
        rho_nvb = _rho(cv, cx + side * 0.85 * sx, cy + 0.55 * sy, 0.03, 0.03)
        img = _paint(img, _inside(rho_nvb, cv.edge(0.03)), 0.62)
    return img, label


def _bias(cv: _Canvas, p: Profile, body: np.ndarray, coil: tuple[float, ...]) -> Any:
    """Receive-coil sensitivity, 1 at the gland: brighter near the body surface (surface coil)
    or steeply brighter near an endorectal coil."""
    if not p.coil_r:
        return (1 + p.bias * np.clip(body, 0, 1.3) ** 2) / (1 + 0.3 * p.bias)
    (x, y), gland, d0 = coil[:2], coil[2:], 0.6 * p.coil_r
    ref = (gland[0] - x) ** 2 + (gland[1] - y) ** 2
    return ((d0**2 + ref) / (d0**2 + (cv.x - x) ** 2 + (cv.y - y) ** 2)) ** p.bias


def _acquire(cv: _Canvas, signal: np.ndarray, p: Profile, bias: Any) -> np.ndarray:
    """Contrast, coil sensitivity, blur, Rician noise and 8-bit quantisation."""
    s = np.clip(signal, 0, None) ** p.gamma * bias
    if p.blur > 0:
        sigma = p.blur * cv.size / 64
        s = ndimage.gaussian_filter(s, (0, sigma, sigma * 0.8))
    n = p.noise
    noise = cv.rng.standard_normal((2, *s.shape), dtype=np.float32)
    s = np.hypot(s + n * noise[0], n * noise[1])
    return np.clip(np.rint(s * p.scale), 0, 255).astype(np.uint8)


def _canvas(rng: np.random.Generator, p: Profile, size: int, slices: int) -> _Canvas:
    """Pixel grid of one case in anatomy units: shifted by the patient's position and warped
    by a smooth elastic field so that no outline is a perfect ellipse."""
    u = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    ox, oy = rng.normal(0, 0.04, 2)
    x = (u[None, None, :] * p.fov[0] + ox).astype(np.float32)
    y = (u[None, :, None] * p.fov[1] + oy).astype(np.float32)
    t = np.linspace(-0.9, 0.9, slices) + rng.uniform(-0.05, 0.05)
    cv = _Canvas(x, y, t.astype(np.float32)[:, None, None], 2 * max(p.fov) / size, rng, size)
    cv.x = cv.x + 0.03 * cv.field(5, z=2.0)
    cv.y = cv.y + 0.03 * cv.field(5, z=2.0)
    return cv


def _case(rng: np.random.Generator, p: Profile, size: int, slices: int) -> tuple[Any, Any]:
    """One patient's slice stack: (uint8 image [S, H, W], uint8 mask [S, H, W])."""
    cv = _canvas(rng, p, size, slices)
    img, body = _pelvis(cv, rng.uniform(1.25, 1.6), rng.uniform(0.92, 1.1))
    rx = rng.uniform(0.16, 0.25) * p.organ
    ry = rx * rng.uniform(0.68, 0.88)
    cx, cy = rng.normal(0, 0.03), rng.uniform(-0.24, -0.1)
    rr = p.coil_r or rng.uniform(0.07, 0.12)
    rect = (cx + rng.normal(0, 0.015), cy + ry * 1.1 + rr + 0.04)
    img = _rectum(cv, img, p, rect[0], rect[1], rr)
    img = _base_organs(cv, img, cx, cy, ry)
    img, label = _gland(cv, img, cx, cy, rx, ry, p)
    return _acquire(cv, img, p, _bias(cv, p, body, (*rect, cx, cy))), label.astype(np.uint8)


def site_name(index: int) -> str:
    """Site `index`: the six real names, then `RUNMC-2`, `BMC-2`, ... cycling the profiles."""
    base = PROFILES[index % len(PROFILES)].name
    return base if index < len(PROFILES) else f"{base}-{index // len(PROFILES) + 1}"


def generate(
    size: int, cases: int, slices: int, seed: int, sites: list[int]
) -> dict[str, np.ndarray]:
    """Raw 8-bit images and masks per site: `image_{i}`, `mask_{i}` of shape [C, S, H, W]."""
    out = {}
    for i in sites:
        profile = PROFILES[i % len(PROFILES)]
        stacks = [
            _case(np.random.default_rng([seed % 2**63, i, c]), profile, size, slices)
            for c in range(cases)
        ]
        out[f"image_{i}"] = np.stack([s[0] for s in stacks])
        out[f"mask_{i}"] = np.stack([s[1] for s in stacks])
    return out


def split_counts(cases: int) -> tuple[int, int, int]:
    """Cases for (train, val, test): about 60/20/20, at least one each."""
    val = test = max(1, round(0.2 * cases))
    return cases - val - test, val, test


def _read_cache(path: Path, keys: list[str], shape: tuple[int, ...]) -> dict | None:
    """The cached arrays, or None when the file is missing, corrupt or of another shape."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
        return None
    ok = all(a.shape == shape and a.dtype == np.uint8 for a in arrays.values())
    return arrays if ok else None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write a compressed .npz atomically (temp file + rename); warn if it cannot be written."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"synth-prostate: cannot write cache {path}: {exc}", stacklevel=3)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _site_split(images: np.ndarray, masks: np.ndarray) -> Split:
    """[C, S, H, W] uint8 stacks -> a Split, each case normalised to zero mean, unit variance."""
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
    as SAML does); targets are 1 on the prostate.
    """

    name = "synth-prostate"
    description = "Procedural six-site axial prostate MRI mimicking real scanner differences"
    defaults = {
        "size": 64,
        "cases_per_site": 14,
        "slices_per_case": 8,
        "num_sites": 6,
        "sites": "",
    }

    def preset(self, preset: str) -> dict[str, Any]:
        """Small and coarse for `quick`, the real 384 pixels for `paper`."""
        if preset == "quick":
            return {"data": {"size": 32, "cases_per_site": 4}}
        if preset == "paper":
            return {"data": {"size": 384}}
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
            args = (s["size"], s["cases_per_site"], s["slices_per_case"], int(seed), s["sites"])
            arrays = generate(*args)
            _write_cache(path, arrays)
        n_train, n_val, _ = split_counts(s["cases_per_site"])
        bounds = (0, n_train, n_train + n_val, s["cases_per_site"])
        sites = []
        for i in s["sites"]:
            img, mask = arrays[f"image_{i}"], arrays[f"mask_{i}"]
            splits = [_site_split(img[a:b], mask[a:b]) for a, b in zip(bounds, bounds[1:])]
            sites.append(Site(site_name(i), *splits))
        task = SegmentationTask(in_channels=1, class_names=["prostate"])
        return FederatedData(self.name, sites, task)


@hookimpl
def fedbench_datasets() -> list[type]:
    return [SynthProstate]
