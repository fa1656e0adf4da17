"""The prepared folder of a dataset: one .npz per site and a manifest with each file's sha256,
written into a temp folder and renamed into place; read back and verified against the manifest."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
import zipfile
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedbench.errors import FedbenchError

MANIFEST = "manifest.json"
#: 2: prostate volumes keep each case's voxel size; 3: 16-bit images read by their real range
FORMAT_VERSION = 3
#: what every manifest holds (write_prepared), and what every site file holds at least
MANIFEST_KEYS = ("dataset", "sites", "files")
SITE_ARRAYS = ("image", "mask")
AGAIN = "run fedbench datasets prepare again"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _swap_into_place(tmp: Path, out: Path, replace: bool) -> Path:
    """Rename the finished temp folder to `out`; an existing `out` is replaced or kept."""
    old = None
    if out.exists() and replace:
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        if not replace and (out / MANIFEST).is_file():  # someone else prepared it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            return out
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def write_prepared(
    out: Path, manifest: dict[str, Any], sites: dict[str, dict[str, np.ndarray]], replace: bool
) -> Path:
    """Write one .npz per site and the manifest into a temp folder, then rename it to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        files = {}
        for site, arrays in sites.items():
            path = tmp / f"{site}.npz"
            np.savez(path, **arrays)
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        full = {
            **manifest,
            "format": FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2))
        return _swap_into_place(tmp, out, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def broken(path: Path, what: str) -> str:
    """One problem line: the file, what is wrong with it, and the way out."""
    return f"{path}: {what}; {AGAIN}"


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest as it was written: a mapping with sites and files, or one error naming it."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FedbenchError(broken(path, f"unreadable manifest ({exc})")) from None
    problems = manifest_problems(manifest, path)
    if problems:
        raise FedbenchError(problems[0])
    return manifest


def manifest_problems(manifest: Any, path: Path) -> list[str]:
    """Why `manifest` (read from `path`) is not one `write_prepared` wrote, one line each."""
    if not isinstance(manifest, dict):
        return [broken(path, f"holds a {type(manifest).__name__}, not a manifest")]
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        return [broken(path, f"lacks {', '.join(missing)}")]
    for key in ("sites", "files"):
        if not isinstance(manifest[key], dict):
            return [broken(path, f"its {key} are a {type(manifest[key]).__name__}, not a mapping")]
    problems = []
    for name, entry in manifest["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            problems.append(broken(path, f"its entry for {name} lacks sha256"))
    for site in manifest["sites"]:
        if f"{site}.npz" not in manifest["files"]:
            problems.append(broken(path, f"site '{site}' has no file in it"))
    return problems


def read_site(path: Path, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """One site's arrays (no pickles are ever loaded), or one error naming the file: unreadable
    (truncated, not a zip) or lacking an array the dataset needs."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        what = f"unreadable prepared file ({type(exc).__name__}: {exc})"
        raise FedbenchError(broken(path, what)) from None
    missing = [key for key in required if key not in arrays]
    if missing:
        raise FedbenchError(broken(path, f"lacks the array {', '.join(missing)}"))
    return arrays


def read_prepared(
    directory: Path, required: tuple[str, ...] = SITE_ARRAYS
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """The manifest and every site's arrays, each holding the `required` ones."""
    manifest = read_manifest(directory)
    arrays = {site: read_site(directory / f"{site}.npz", required) for site in manifest["sites"]}
    return manifest, arrays


def check_site_arrays(
    path: Path, arrays: dict[str, np.ndarray], mask_values: set[int]
) -> list[str]:
    """Problems of one prepared site: empty, image/mask size mismatch, unexpected mask values."""
    image, mask = arrays["image"], arrays["mask"]
    if len(mask) == 0:
        return [f"{path}: empty site (no samples)"]
    problems = []
    if len(image) != len(mask) or image.shape[-2:] != mask.shape[-2:]:
        problems.append(f"{path}: image {image.shape} and mask {mask.shape} differ in size")
    extra = sorted(set(np.unique(mask).tolist()) - mask_values)
    if extra:
        problems.append(f"{path}: mask holds values {extra} outside {sorted(mask_values)}")
    return problems


def verify_prepared(
    directory: Path, name: str, mask_values: set[int], required: tuple[str, ...] = SITE_ARRAYS
) -> list[str]:
    """Every problem of a prepared folder, one line each naming the file; empty when it is good."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path}: missing (not a prepared folder)"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        return [broken(manifest_path, f"unreadable manifest ({exc})")]
    structure = manifest_problems(manifest, manifest_path)
    if structure:
        return structure
    if manifest["dataset"] != name:
        return [f"{manifest_path}: prepared for '{manifest['dataset']}', not '{name}'"]
    problems = []
    for file_name, entry in manifest["files"].items():
        problems += file_problems(directory / file_name, entry["sha256"], mask_values, required)
    return problems


def file_problems(
    path: Path, sha256: str, mask_values: set[int], required: tuple[str, ...]
) -> list[str]:
    """What is wrong with one site file of a prepared folder, one line each: its image and
    mask first, then the other arrays the dataset needs."""
    if not path.is_file():
        return [f"{path}: missing"]
    if sha256_file(path) != sha256:
        return [f"{path}: sha256 differs from the manifest (modified or corrupt)"]
    try:
        arrays = read_site(path, SITE_ARRAYS)
    except FedbenchError as exc:
        return [str(exc)]
    missing = [key for key in required if key not in arrays]
    content = check_site_arrays(path, arrays, mask_values)
    return content or ([broken(path, f"lacks the array {', '.join(missing)}")] if missing else [])
