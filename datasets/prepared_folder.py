"""The prepared folder of a dataset: one .npz per site and a manifest with each file's sha256,
written into a temp folder and renamed into place; read back and verified against the manifest.

A folder is replaced only when it is provably fedbench's: a manifest of ours that lists every
site file in it, our split files, nothing else and no links. Whatever else sits there is the
user's, and preparing into it is refused, naming it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import zipfile
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedbench.errors import FedbenchError
from fedbench.storage import StorageError, cannot_write

MANIFEST = "manifest.json"
SPLITS = "splits"
#: 2: prostate volumes keep each case's voxel size; 3: 16-bit images read by their real range
FORMAT_VERSION = 3
#: what every manifest holds (write_prepared), and what every site file holds at least
MANIFEST_KEYS = ("dataset", "sites", "files")
SITE_ARRAYS = ("image", "mask")
AGAIN = "run fedbench datasets prepare again"
#: what write_split_file leaves under splits/: seed0-1a2b3c4d.json, or its temp file if killed
SPLIT_FILE = re.compile(r"seed-?\d+-[0-9a-f]{8}\.json|\.seed-?\d+-[0-9a-f]{8}\.json\.[^/]+\.tmp")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plain_name(name: object) -> bool:
    """Whether `name` is one file right inside a folder: no separator, no `..`, not absolute."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(char in name for char in "/\\\0")
    )


def regular(path: Path) -> bool:
    """A plain file, not a link (a link's target was never ours to replace)."""
    return path.is_file() and not path.is_symlink()


def not_ours(folder: Path) -> str | None:
    """Why `folder` may hold something fedbench did not write, or None when everything in it is
    ours (the manifest, the site files it lists, our split files), so replacing it loses nothing.
    Names alone prove it: a cut or tampered site file is still ours, and preparing again is
    what every error about one advises."""
    try:
        return _stray_entry(folder)
    except OSError as exc:
        return f"cannot list it: {exc.strerror or exc}"


def _stray_entry(folder: Path) -> str | None:
    """The first entry of `folder` that no manifest of ours accounts for (see `not_ours`)."""
    entries = sorted(folder.iterdir())
    if not entries:
        return None
    path = folder / MANIFEST
    if not regular(path):
        return f"no {MANIFEST}"
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        manifest = None
    if manifest is None or manifest_problems(manifest, path):
        return f"its {MANIFEST} is not one fedbench wrote"
    for entry in entries:
        if entry.is_symlink():
            return f"{entry.name} is a link"
        if entry.name == SPLITS and entry.is_dir():
            stray = [
                p for p in entry.iterdir() if not (SPLIT_FILE.fullmatch(p.name) and regular(p))
            ]
            if stray:
                return f"{SPLITS}/{stray[0].name} is not a split file of fedbench"
        elif entry.name != MANIFEST and not (entry.name in manifest["files"] and regular(entry)):
            return f"{entry.name} is not in its {MANIFEST}"
    return None


def refuse_unowned(out: Path) -> None:
    """One error, changing nothing, unless `out` is missing, empty or provably fedbench's."""
    if out.is_symlink():
        raise FedbenchError(
            f"cannot prepare into {out}: it is a link (to {os.readlink(out)}); nothing was "
            "changed (name the folder itself, or a new one)"
        )
    if out.exists() and not out.is_dir():
        raise FedbenchError(f"cannot prepare into {out}: it is a file; nothing was changed")
    reason = not_ours(out) if out.is_dir() else None
    if reason:
        raise FedbenchError(
            f"cannot prepare into {out}: it holds files fedbench did not prepare ({reason}); "
            "nothing was changed (name a new or empty folder)"
        )


def remove_old(old: Path) -> None:
    """Delete the replaced folder (ours, checked); one warning if it cannot be, never silent."""
    try:
        shutil.rmtree(old)
    except OSError as exc:
        print(
            f"warning: could not delete the replaced folder {old}: {exc.strerror or exc}; "
            "delete it yourself",
            file=sys.stderr,
        )


def _swap_into_place(tmp: Path, out: Path, replace: bool) -> Path:
    """Rename the finished temp folder to `out`; an existing `out` is replaced (checked again
    here: it may have changed while the raw files were read) or kept."""
    old = None
    if replace and (out.exists() or out.is_symlink()):
        refuse_unowned(out)
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
        remove_old(old)
    return out


def temp_folder(out: Path) -> Path:
    """A new folder beside `out`, made as `mkdir` makes one (the umask's permissions, where
    `tempfile.mkdtemp` would give 0700 to the folder users then read)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(6)}"
        tmp.mkdir()
    except OSError as exc:
        raise cannot_write(out, exc) from exc
    return tmp


def write_prepared(
    out: Path, manifest: dict[str, Any], sites: dict[str, dict[str, np.ndarray]], replace: bool
) -> Path:
    """Write one .npz per site and the manifest into a temp folder, then rename it to `out`. A
    write the OS refuses (a full disk) is one StorageError naming the file, and nothing half
    written is left: the temp folder goes, and the old `out` stays as it was."""
    tmp = temp_folder(out)
    writing = out
    try:
        files = {}
        for site, arrays in sites.items():
            writing = out / f"{site}.npz"
            path = tmp / writing.name
            np.savez(path, **arrays)
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        full = {
            **manifest,
            "format": FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": files,
        }
        writing = out / MANIFEST
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2))
        writing = out
        return _swap_into_place(tmp, out, replace)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, StorageError):
            raise
        raise cannot_write(writing, exc) from exc
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
    for name in [*manifest["files"], *(f"{site}.npz" for site in manifest["sites"])]:
        if not plain_name(name):
            return [broken(path, f"its file name '{name}' leads outside the folder")]
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
