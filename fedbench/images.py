"""Image and mask files of segmentation datasets, read by their real range (public API for
dataset plugins: `read_file`, `read_image_and_mask`, `UnreadableImage`).

Images of any bit depth Pillow opens become floats in [0, 1] (8-bit divided by 255, 16-bit by
65535, float kept when it lies in [0, 1]) so that no 16-bit file is clipped to 8 bits; masks keep
their stored values, 16-bit ones included. Whatever cannot be read that way (an undecodable file,
an unconvertible mode, values with no known range, a decompression bomb) is one problem line
that names the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
MAX_16 = 65535


class UnreadableImage(Exception):
    """A file that cannot become an image in [0, 1] or a mask; the message names the file."""


def span(values: np.ndarray) -> str:
    return f"[{values.min():g}, {values.max():g}]"


def eight_bit(mode: str) -> bool:
    """Whether every band of `mode` holds 8 bits (or 1, as in bilevel images)."""
    from PIL import ImageMode

    try:
        return mode == "1" or ImageMode.getmode(mode).typestr == "|u1"
    except KeyError:
        return False


def grey_by_range(im: Image.Image, path: Path) -> np.ndarray:
    """A 16-bit, 32-bit integer or float single-band image as floats in [0, 1]."""
    values = np.asarray(im)
    if im.mode in SIXTEEN_BIT:
        return values.astype(np.float32) / np.float32(MAX_16)
    if im.mode == "I":  # how Pillow also presents 16-bit files
        if values.min() < 0 or values.max() > MAX_16:
            reason = f"32-bit integer values span {span(values)}, outside 0..{MAX_16}"
            raise UnreadableImage(f"{path}: unreadable image or mask ({reason})")
        return values.astype(np.float32) / np.float32(MAX_16)
    if im.mode == "F":
        if not np.isfinite(values).all():
            reason = "float image holds NaN or infinite values"
        elif values.min() < 0 or values.max() > 1:
            reason = f"float image values span {span(values)}, outside [0, 1]"
        else:
            return values.astype(np.float32)
        raise UnreadableImage(f"{path}: unreadable image or mask ({reason})")
    raise UnreadableImage(f"{path}: unreadable image or mask (mode '{im.mode}' has no known range)")


def converted(im: Image.Image, mode: str, path: Path) -> np.ndarray:
    """`im` converted by Pillow to 8-bit `mode` ('L' or 'RGB'), as an array."""
    try:
        return np.asarray(im.convert(mode))
    except ValueError:
        word = "grey" if mode == "L" else mode
        reason = f"mode '{im.mode}' cannot be read as {word}"
        raise UnreadableImage(f"{path}: unreadable image or mask ({reason})") from None


def unit_image(im: Image.Image, channels: int, path: Path) -> np.ndarray:
    """An opened image as floats in [0, 1]: [H, W] for one channel, [H, W, 3] for three."""
    if eight_bit(im.mode):
        return converted(im, "L" if channels == 1 else "RGB", path).astype(np.float32) / 255
    grey = grey_by_range(im, path)
    return grey if channels == 1 else np.repeat(grey[..., None], 3, axis=2)


def stored_labels(im: Image.Image, path: Path) -> np.ndarray:
    """An opened mask's stored values [H, W]; a colour mask must be grey (R = G = B)."""
    if im.mode in SIXTEEN_BIT or im.mode == "I":
        return np.asarray(im).astype(np.int64)
    if not eight_bit(im.mode):
        reason = f"mode '{im.mode}' is not a mask of integer labels"
        raise UnreadableImage(f"{path}: unreadable image or mask ({reason})")
    bands = converted(im, "RGB", path).astype(np.int64)
    if not (bands == bands[..., :1]).all():
        raise UnreadableImage(f"{path}: mask channels differ (expected R = G = B)")
    return bands[..., 0]


def read_file(path: Path, channels: int | None) -> np.ndarray:
    """An image in [0, 1] with `channels` channels, or a mask's values when `channels` is None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return stored_labels(im, path) if channels is None else unit_image(im, channels, path)
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(f"{path}: {too_large(path, exc)}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # what Pillow raises on a broken file
        raise UnreadableImage(f"{path}: unreadable image or mask ({exc})") from None


def too_large(path: Path, exc: Exception) -> str:
    """Why a file was refused as a decompression bomb, with its declared size where it is a PNG."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        return f"image of {width}x{height} pixels is too large to decode safely ({exc})"
    return f"image too large to decode safely ({exc})"


def read_image_and_mask(
    image_path: Path, mask_path: Path, channels: int, problems: list[str]
) -> tuple[np.ndarray, np.ndarray] | None:
    """An image in [0, 1] ([H, W] or [H, W, 3]) and its mask's stored values [H, W] of the same
    size, or None with the problem noted under the file at fault."""
    try:
        image = read_file(image_path, channels)
        mask = read_file(mask_path, None)
    except UnreadableImage as exc:
        problems.append(str(exc))
        return None
    if image.shape[:2] != mask.shape:
        problems.append(f"{mask_path}: mask {mask.shape} and image {image.shape} differ in size")
        return None
    return image, mask
