"""The prepared (cached) form of real image datasets, shared by `prostate` and `fundus`.

Raw files are converted once into one `.npz` per site plus `manifest.json` (sha256 of every
file, the settings, the orphans found). The folder is built under a temporary name next to its
destination and renamed at the end, so a half-written folder never looks like a good one; it
replaces only a folder that is provably fedbench's, never the raw files or a user's folder.
Case-level splits are written as JSON under `splits/` next to the prepared files.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedbench.data import Dataset, FederatedData, Site, Split, split_cases
from fedbench.errors import FedbenchError, one_line
from fedbench.storage import stable_hash, write_text_atomic
from fedbench_datasets.prepared_folder import (
    AGAIN,
    FORMAT_VERSION,
    MANIFEST,
    read_prepared,
    refuse_unowned,
    verify_prepared,
    write_prepared,
)

if TYPE_CHECKING:
    import torch


class DataProblems(FedbenchError):
    """Files that cannot be used: one line per problem, each starting with the file's path."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        more = f" (and {len(lines) - 1} more problem(s))" if len(lines) > 1 else ""
        super().__init__(lines[0] + more)


def warn(message: str) -> None:
    """One warning line on stderr (stdout stays clean for --json)."""
    print(f"warning: {one_line(message)}", file=sys.stderr)


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


def write_split_file(directory: Path, label: str, payload: dict[str, Any]) -> Path | None:
    """Write the splits as JSON under `directory/splits/` (atomically); None if not writable."""
    target = directory / "splits" / f"{label}.json"
    try:
        write_text_atomic(target, json.dumps(payload, indent=2))
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


def refuse_foreign_target(out: Path, source: Path, replace: bool = True) -> None:
    """Never replace what fedbench did not create: `out` may not be the raw files' folder, hold
    it or (when it would replace a folder) lie inside it, nor be a link; an existing `out` must
    be empty or provably ours (`refuse_unowned`). Anything else is one clear error, before any
    work. A run's first preparation (`replace=False`) only adds a new folder, so a results
    folder inside data.path (`cd DATA && fedbench run --set data.path=.`) is fine."""
    where, raw = out.resolve(), source.resolve()
    if where == raw:
        raise FedbenchError(
            f"cannot prepare into {out}: it is the --source folder; nothing was changed"
        )
    checks = [(raw, where, "contains")] + ([(where, raw, "is inside")] if replace else [])
    for inner, outer, how in checks:
        if outer in inner.parents:
            raise FedbenchError(
                f"cannot prepare into {out}: it {how} the --source folder {source}; "
                "nothing was changed (name a folder outside it)"
            )
    refuse_unowned(out)


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
    #: every site the raw release holds, and what one is called in messages
    known_sites: ClassVar[tuple[str, ...]] = ()
    site_word: ClassVar[str] = "site"
    #: `data.size` per preset
    sizes: ClassVar[dict[str, int]] = {"quick": 64, "default": 128, "paper": 384}
    #: the arrays every prepared site file holds (`build` reads them)
    site_arrays: ClassVar[tuple[str, ...]] = ("image", "mask", "case", "case_names", "case_parts")

    def preset(self, preset: str) -> dict[str, Any]:
        """`data.size` per preset; `paper` adds the IOP-FL release's network, loss and optimizer."""
        if preset == "paper":
            return {
                "data": {"size": self.sizes[preset], "loss": "soft_dice_batch"},
                "model": {"name": "release-unet"},
                "train": {"amsgrad": True},
            }
        return {"data": {"size": self.sizes[preset]}} if preset in self.sizes else {}

    def site_names(self, cfg: dict[str, Any]) -> list[str] | None:
        return list(cfg.get("sites") or self.known_sites)

    def chosen_sites(self, cfg: dict[str, Any]) -> list[str]:
        """The sites `data.sites` asks for, each one checked against the release's."""
        sites = list(cfg.get("sites") or self.known_sites)
        unknown = [s for s in sites if s not in self.known_sites]
        if unknown:
            raise FedbenchError(
                f"unknown {self.name} {self.site_word} '{unknown[0]}'; "
                f"known: {', '.join(self.known_sites)}"
            )
        return sites

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
        refuse_foreign_target(Path(out), source, replace)
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
        return verify_prepared(directory, self.name, self.mask_values, self.site_arrays)

    def load(self, cfg: dict[str, Any], seed: int, cache_dir: Path) -> FederatedData:
        """The sites of the prepared folder; a folder that is not whole (manifest, site files,
        the chosen sites) is one error naming the file and saying to prepare it again."""
        directory = self.prepared_dir(cfg, cache_dir)
        manifest, arrays = read_prepared(directory, self.site_arrays)
        if manifest.get("settings") != self.settings(cfg):
            raise FedbenchError(
                f"{directory} was prepared with {manifest.get('settings')}, but the run asks for "
                f"{self.settings(cfg)}; prepare it again with those settings"
            )
        absent = [site for site in self.chosen_sites(cfg) if site not in arrays]
        if absent:
            raise FedbenchError(
                f"{directory / MANIFEST}: holds no site {', '.join(absent)}; {AGAIN}"
            )
        for line in manifest.get("orphans", []):
            warn(f"left out: {line}")
        return self.build(manifest, arrays, cfg, seed, directory)
