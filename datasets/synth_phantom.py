"""The phantom renderer of synth-prostate: a random pelvis and prostate per case, drawn through
one site's scanner profile (datasets/synth_prostate.py holds the profiles and the dataset). Each
case is a short stack of adjacent axial slices: body outline, fat with vessels, muscles, femoral
heads, pubic bone, rectum, seminal vesicles and bladder near the base, and a prostate gland with a
bright peripheral zone, a nodular central gland, a dark anterior stroma and a faint, partly
missing capsule. Vectorised numpy; imported only when a cache is missing."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from collections.abc import Sequence

    from fedbench_datasets.synth_prostate import Profile

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


def generate(
    size: int, cases: int, slices: int, seed: int, sites: list[int], profiles: Sequence[Profile]
) -> dict[str, np.ndarray]:
    """Raw 8-bit images and masks per site: `image_{i}`, `mask_{i}` of shape [C, S, H, W];
    site i is rendered with profiles[i % len(profiles)]."""
    out = {}
    for i in sites:
        profile = profiles[i % len(profiles)]
        stacks = [
            _case(np.random.default_rng([seed % 2**63, i, c]), profile, size, slices)
            for c in range(cases)
        ]
        out[f"image_{i}"] = np.stack([s[0] for s in stacks])
        out[f"mask_{i}"] = np.stack([s[1] for s in stacks])
    return out
