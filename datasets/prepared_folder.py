"""The prepared folder of a dataset: one .npz per site and a manifest with each file's sha256,
written into a temp folder and renamed into place; read back and verified against the manifest."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedbench.errors import FedbenchError

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: prostate volumes keep each case's voxel size


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


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FedbenchError(f"{path}: unreadable manifest ({exc})") from None


def read_prepared(directory: Path) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """The manifest and every site's arrays (no pickles are ever loaded)."""
    manifest = read_manifest(directory)
    arrays = {}
    for site in manifest["sites"]:
        path = directory / f"{site}.npz"
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays[site] = {key: npz[key] for key in npz.files}
        except (OSError, ValueError) as exc:
            raise FedbenchError(f"{path}: unreadable prepared file ({exc})") from None
    return manifest, arrays


def check_site_arrays(
    path: Path, arrays: dict[str, np.ndarray], mask_values: set[int]
) -> list[str]:
    """Problems of one prepared site: empty, image/mask size mismatch, unexpected mask values."""
    image, mask = arrays.get("image"), arrays.get("mask")
    if image is None or mask is None:
        return [f"{path}: lacks the 'image' or 'mask' array"]
    if len(mask) == 0:
        return [f"{path}: empty site (no samples)"]
    problems = []
    if len(image) != len(mask) or image.shape[-2:] != mask.shape[-2:]:
        problems.append(f"{path}: image {image.shape} and mask {mask.shape} differ in size")
    extra = sorted(set(np.unique(mask).tolist()) - mask_values)
    if extra:
        problems.append(f"{path}: mask holds values {extra} outside {sorted(mask_values)}")
    return problems


def verify_prepared(directory: Path, name: str, mask_values: set[int]) -> list[str]:
    """Every problem of a prepared folder, one line each naming the file; empty when it is good."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path}: missing (not a prepared folder)"]
    try:
        manifest = read_manifest(directory)
    except FedbenchError as exc:
        return [str(exc)]
    if manifest.get("dataset") != name:
        return [f"{manifest_path}: prepared for '{manifest.get('dataset')}', not '{name}'"]
    problems = []
    for file_name, entry in manifest.get("files", {}).items():
        path = directory / file_name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        if sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (modified or corrupt)")
            continue
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: unreadable ({exc})")
            continue
        problems += check_site_arrays(path, arrays, mask_values)
    for site in manifest.get("sites", {}):
        if f"{site}.npz" not in manifest.get("files", {}):
            problems.append(f"{directory / (site + '.npz')}: site '{site}' has no file")
    return problems
