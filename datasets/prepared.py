"""The prepared (cached) form of real image datasets, shared by `prostate` and `fundus`.

Raw files are converted once into one `.npz` per site plus `manifest.json` (sha256 of every
file, the settings, the orphans found). The folder is built under a temporary name next to its
destination and renamed at the end, so a half-written folder never looks like a good one.
Case-level splits are written as JSON under `splits/` next to the prepared files.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedbench.config import stable_hash
from fedbench.data import Dataset, FederatedData, Site, Split
from fedbench.errors import FedbenchError

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class DataProblems(FedbenchError):
    """Files that cannot be used: one line per problem, each starting with the file's path."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        more = f" (and {len(lines) - 1} more problem(s))" if len(lines) > 1 else ""
        super().__init__(lines[0] + more)


def warn(message: str) -> None:
    """One warning line on stderr (stdout stays clean for --json)."""
    print(f"warning: {message}", file=sys.stderr)


def require_path(cfg: dict[str, Any], dataset: str) -> Path:
    """`data.path` as an existing, non-empty folder, or one error naming it."""
    raw = cfg.get("path")
    if raw in (None, ""):
        raise FedbenchError(f"dataset '{dataset}' needs data.path: add --set data.path=FOLDER")
    path = Path(str(raw)).expanduser()
    if not path.exists():
        raise FedbenchError(f"data.path {path} does not exist")
    if not path.is_dir():
        raise FedbenchError(f"data.path {path} is not a folder")
    if not any(path.iterdir()):
        raise FedbenchError(f"data.path {path} is empty")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(root: Path, patterns: tuple[str, ...]) -> str:
    """A cheap identity of the raw files (relative path, size, mtime): edits re-prepare."""
    rows = sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
        for pattern in patterns
        for p in root.glob(pattern)
        if p.is_file()
    )
    return stable_hash(rows)


@dataclass
class Scan:
    """What a dataset read from its raw files: arrays per site, plus what it left out and why."""

    sites: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    orphans: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    layout: str = ""


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


def resize(plane: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """One 2D plane to size x size: bilinear (antialiased) for images, nearest for masks."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(plane, dtype=np.float32))[None, None]
    if nearest:
        out = F.interpolate(tensor, size=(size, size), mode="nearest-exact")
    else:
        out = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True)
    return out[0, 0].numpy()


def normalize_case(volume: np.ndarray) -> np.ndarray:
    """Zero mean and unit variance over all slices of one case."""
    std = float(volume.std())
    return (volume - volume.mean()) / (std if std > 0 else 1.0)


def split_cases(
    parts: dict[str, str], val_fraction: float, test_fraction: float, rng: np.random.Generator
) -> tuple[dict[str, list[str]], list[str]]:
    """Case-level train/val/test from each case's given part ('train', 'test' or 'all').

    Given test cases stay test; without any, `test_fraction` of the cases become test. Then
    `val_fraction` of the training cases (at least one) become val. A site left with a single
    training case cannot spare one: its val reuses that training case (never test), noted.
    """
    test = sorted(c for c, p in parts.items() if p == "test")
    pool = sorted(c for c, p in parts.items() if p != "test")
    notes = []
    if not test:
        if len(pool) < 2:
            raise FedbenchError(f"{len(pool)} case(s): at least two needed for a test split")
        order = [pool[i] for i in rng.permutation(len(pool))]
        n_test = min(len(pool) - 1, max(1, round(test_fraction * len(pool))))
        test, pool = sorted(order[:n_test]), sorted(order[n_test:])
    if not pool:
        raise FedbenchError("no training case")
    if len(pool) == 1:
        notes.append(f"one training case ({pool[0]}): val reuses it (selection is not independent)")
        return {"train": pool, "val": list(pool), "test": test}, notes
    order = [pool[i] for i in rng.permutation(len(pool))]
    n_val = min(len(pool) - 1, max(1, round(val_fraction * len(pool))))
    return {"train": sorted(order[n_val:]), "val": sorted(order[:n_val]), "test": test}, notes


def write_split_file(directory: Path, label: str, payload: dict[str, Any]) -> Path | None:
    """Write the splits as JSON under `directory/splits/` (atomically); None if not writable."""
    target = directory / "splits" / f"{label}.json"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2)
        os.replace(tmp, target)
    except OSError as exc:
        warn(f"could not write the split file {target}: {exc.strerror}")
        return None
    return target


def make_site(
    name: str,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    cases: torch.Tensor,
    parts: dict[str, str],
    case_names: list[str],
    cfg: dict[str, Any],
    rng: np.random.Generator,
) -> tuple[Site, dict[str, Any]]:
    """A Site split by case (cases indexed into `case_names`), and its split record."""
    import torch

    present = {case_names[i] for i in torch.unique(cases).tolist()}
    try:
        splits, notes = split_cases(
            {c: p for c, p in parts.items() if c in present},
            float(cfg["val_fraction"]),
            float(cfg["test_fraction"]),
            rng,
        )
    except FedbenchError as exc:
        raise FedbenchError(f"site {name}: {exc}") from None
    index = {c: i for i, c in enumerate(case_names)}
    chosen = {}
    for split, names in splits.items():
        sel = torch.isin(cases, torch.tensor([index[c] for c in names], dtype=cases.dtype))
        chosen[split] = Split(inputs[sel], targets[sel], cases[sel])
    for note in notes:
        warn(f"site {name}: {note}")
    return Site(name, chosen["train"], chosen["val"], chosen["test"]), {**splits, "notes": notes}


def split_label(seed: int, settings: dict[str, Any]) -> str:
    """File name of a split: the seed and a hash of the settings that change the split."""
    return f"seed{seed}-{stable_hash(settings)[:8]}"


class PreparedDataset(Dataset):
    """A dataset read from raw files once (`scan`) into a prepared folder, then built (`build`)
    into sites and splits on every load."""

    #: `data.*` settings that change the prepared files (others only change `build`)
    prepare_keys: ClassVar[tuple[str, ...]] = ("size",)
    #: raw files whose change invalidates a prepared folder
    source_patterns: ClassVar[tuple[str, ...]] = ("**/*.png",)
    #: values a prepared mask may hold
    mask_values: ClassVar[set[int]] = {0, 1}
    #: whether `fedbench datasets show` draws the 3 input channels as one RGB picture
    display_rgb: ClassVar[bool] = False

    def scan(self, source: Path, cfg: dict[str, Any]) -> Scan:
        raise NotImplementedError

    def build(
        self,
        manifest: dict[str, Any],
        arrays: dict[str, dict[str, np.ndarray]],
        cfg: dict[str, Any],
        seed: int,
        directory: Path,
    ) -> FederatedData:
        raise NotImplementedError

    def settings(self, cfg: dict[str, Any]) -> dict[str, Any]:
        return {key: cfg.get(key, self.defaults.get(key)) for key in self.prepare_keys}

    def default_dir(self, source: Path, cfg: dict[str, Any], cache_dir: Path) -> Path:
        """Where `load` keeps the prepared form: keyed by source path, raw files and settings."""
        key = stable_hash(
            {
                "dataset": self.name,
                "source": str(source.resolve()),
                "files": fingerprint(source, self.source_patterns),
                "settings": self.settings(cfg),
                "format": FORMAT_VERSION,
            }
        )
        return Path(cache_dir) / "datasets" / f"{self.name}-{key}"

    def prepare(self, source: Path, out: Path, cfg: dict[str, Any], replace: bool = True) -> Path:
        """Convert the raw files under `source` into the prepared folder `out` (orphans are
        listed in its manifest and warned about on every load)."""
        source = require_path({"path": source}, self.name)
        scan = self.scan(source, cfg)
        if scan.problems:
            raise DataProblems(scan.problems)
        sites = {
            site: {"samples": int(len(a["mask"])), "cases": int(len(a["case_names"]))}
            for site, a in scan.sites.items()
        }
        manifest = {
            "dataset": self.name,
            "source": str(source.resolve()),
            "layout": scan.layout,
            "settings": self.settings(cfg),
            "sites": sites,
            "orphans": scan.orphans,
        }
        return write_prepared(out, manifest, scan.sites, replace)

    def prepared_dir(self, cfg: dict[str, Any], cache_dir: Path) -> Path:
        """The prepared folder for `cfg`: data.path itself when it is one, else the cache
        (prepared on first use)."""
        source = require_path(cfg, self.name)
        if (source / MANIFEST).is_file():
            return source
        out = self.default_dir(source, cfg, cache_dir)
        if not (out / MANIFEST).is_file():
            self.prepare(source, out, cfg, replace=False)
        return out

    def verify(self, directory: Path) -> list[str]:
        return verify_prepared(directory, self.name, self.mask_values)

    def load(self, cfg: dict[str, Any], seed: int, cache_dir: Path) -> FederatedData:
        directory = self.prepared_dir(cfg, cache_dir)
        manifest, arrays = read_prepared(directory)
        if manifest.get("settings") != self.settings(cfg):
            raise FedbenchError(
                f"{directory} was prepared with {manifest.get('settings')}, but the run asks for "
                f"{self.settings(cfg)}; prepare it again with those settings"
            )
        for line in manifest.get("orphans", []):
            warn(f"left out: {line}")
        return self.build(manifest, arrays, cfg, seed, directory)
