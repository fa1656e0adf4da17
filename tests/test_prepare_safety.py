"""`fedbench datasets prepare` and the prepared folder, as a careless user and an attacker would
use them (issue 31, items 1, 2 and two of item 7): prepare replaces a folder only when its manifest
proves fedbench wrote everything in it, and never the --source folder, a folder around or inside
it, or a link; a full disk is one line naming the file, with nothing half written left; manifest
names never lead outside the folder; the folder gets the permissions the umask gives."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_faults_storage import error_line
from test_real_data import make_slice_source
from typer.testing import CliRunner

from fedbench.backends.grid import Cell
from fedbench.backends.local import run_cell
from fedbench.cli import app
from fedbench.engine.registry import load_registry
from fedbench.engine.reporter import Reporter
from fedbench.engine.resolve import RunSpec
from fedbench.errors import FedbenchError
from fedbench.storage import StorageError
from fedbench_datasets.prostate import Prostate

SITES = ["RUNMC", "BMC", "HK"]
DATA = ["--set", "data.sites=RUNMC,BMC,HK", "--set", "data.size=32"]
FULL = os.strerror(errno.ENOSPC)
AGAIN = "run fedbench datasets prepare again"


def prepare(source: Path, out: Path):
    """`fedbench datasets prepare prostate --source SOURCE --out OUT` on three small sites."""
    args = ["datasets", "prepare", "prostate", "--source", str(source), "--out", str(out)]
    return CliRunner().invoke(app, [*args, *DATA])


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry below `folder` (links by their target, files by their bytes)."""
    found: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = f"-> {os.readlink(path)}"
        elif path.is_file():
            found[key] = path.read_bytes()
    return found


def cfg_for(path: Path) -> dict:
    return {**Prostate.defaults, "path": str(path), "size": 32, "sites": SITES}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    """A raw source and a folder fedbench prepared from it (each test copies them)."""
    root = tmp_path_factory.mktemp("made")
    source = make_slice_source(root / "raw", sites=tuple(SITES))
    assert prepare(source, root / "prepared").exit_code == 0
    return source, root / "prepared"


@pytest.fixture
def source(made, tmp_path) -> Path:
    return Path(shutil.copytree(made[0], tmp_path / "data" / "raw"))


@pytest.fixture
def prepared(made, tmp_path) -> Path:
    return Path(shutil.copytree(made[1], tmp_path / "prepared"))


# --- item 1: prepare never deletes what fedbench did not create --------------------------


@pytest.mark.parametrize("manifest", ["{}", "copied"])
def test_out_around_the_source_is_refused_and_the_raw_images_stay(
    source, prepared, tmp_path, manifest
):
    around = source.parent
    if manifest == "copied":
        shutil.copy(prepared / "manifest.json", around / "manifest.json")
    else:
        (around / "manifest.json").write_text(manifest)
    before = tree(tmp_path)
    line = error_line(prepare(source, around))
    assert line == (
        f"error: cannot prepare into {around}: it contains the --source folder {source}; "
        "nothing was changed (name a folder outside it)"
    )
    assert tree(tmp_path) == before


def test_out_inside_the_source_is_refused(source, tmp_path):
    before = tree(tmp_path)
    line = error_line(prepare(source, source / "prepared"))
    assert f"it is inside the --source folder {source}" in line
    assert tree(tmp_path) == before and not (source / "prepared").exists()


def test_a_run_whose_results_folder_lies_inside_data_path_still_prepares(source):
    """`cd DATA && fedbench run --set data.path=.`: the cache is a new folder inside the raw
    one; adding it replaces nothing, so it is allowed (only replacing is refused there)."""
    from test_real_data import prostate_cfg

    cfg = prostate_cfg(source, sites=list(SITES))
    data = Prostate().load(cfg, 0, source / "results" / "cache")
    assert [s.name for s in data.sites] == list(SITES)
    assert prepare(source, source / "results" / "again").exit_code != 0  # --out: refused


@pytest.mark.parametrize(
    ("manifest", "reason"),
    [
        (None, "no manifest.json"),
        ("{}", "its manifest.json is not one fedbench wrote"),
        ("not json", "its manifest.json is not one fedbench wrote"),
        ("prepared", "notes.txt is not in its manifest.json"),
    ],
)
def test_a_users_folder_with_any_manifest_is_refused_and_kept(
    source, prepared, tmp_path, manifest, reason
):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my thesis")
    if manifest == "prepared":  # a real manifest, copied beside a user's file
        for entry in prepared.iterdir():
            shutil.copy(entry, mine / entry.name)
    elif manifest is not None:
        (mine / "manifest.json").write_text(manifest)
    before = tree(tmp_path)
    line = error_line(prepare(source, mine))
    assert line == (
        f"error: cannot prepare into {mine}: it holds files fedbench did not prepare ({reason}); "
        "nothing was changed (name a new or empty folder)"
    )
    assert tree(tmp_path) == before


def test_a_link_named_as_out_is_refused_and_stays_a_link(source, prepared, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(prepared, target_is_directory=True)
    before = tree(tmp_path)
    line = error_line(prepare(source, link))
    assert line == (
        f"error: cannot prepare into {link}: it is a link (to {prepared}); nothing was changed "
        "(name the folder itself, or a new one)"
    )
    assert link.is_symlink() and tree(tmp_path) == before
    assert not list(tmp_path.glob(".link.*")), "no stray folder or link beside it"


def test_a_file_in_a_prepared_folder_that_is_a_link_is_not_replaced(source, prepared, tmp_path):
    keep = tmp_path / "keep.npz"
    keep.write_bytes(b"mine")
    (prepared / "BMC.npz").unlink()
    (prepared / "BMC.npz").symlink_to(keep)
    line = error_line(prepare(source, prepared))
    assert "(BMC.npz is a link)" in line and keep.read_bytes() == b"mine"


def test_a_prepared_folder_is_replaced_with_its_splits_and_when_broken(source, prepared, tmp_path):
    """What fedbench wrote there (site files, manifest, split files, even cut ones) is its own
    to replace: every error about a broken folder says to prepare it again."""
    Prostate().load(cfg_for(prepared), 0, tmp_path / "cache")
    assert list((prepared / "splits").glob("seed0-*.json"))
    site = prepared / "HK.npz"
    site.write_bytes(site.read_bytes()[:100])
    result = prepare(source, prepared)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in prepared.iterdir()) == [f"{s}.npz" for s in sorted(SITES)] + [
        "manifest.json"
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    verify = ["datasets", "verify", "prostate", "--dir", str(prepared)]
    assert CliRunner().invoke(app, verify).exit_code == 0


# --- item 2: a full disk ------------------------------------------------------------------


def full_disk_on(monkeypatch, victim: str) -> None:
    """The disk fills while `victim` (a site file or the manifest) is half written."""
    real_savez, real_write_text = np.savez, Path.write_text

    def savez(path, *args, **kwargs):
        if Path(path).name == victim:
            Path(path).write_bytes(b"PK\x03\x04half")
            raise OSError(errno.ENOSPC, FULL)
        return real_savez(path, *args, **kwargs)

    def write_text(self, text, *args, **kwargs):
        if self.name == victim:
            real_write_text(self, text[:10])
            raise OSError(errno.ENOSPC, FULL)
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(np, "savez", savez)
    monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("victim", ["BMC.npz", "manifest.json"])
def test_a_full_disk_in_prepare_is_one_line_and_the_old_folder_stays(
    source, prepared, tmp_path, monkeypatch, victim
):
    before = tree(tmp_path)
    full_disk_on(monkeypatch, victim)
    assert (
        error_line(prepare(source, prepared)) == f"error: cannot write {prepared / victim}: {FULL}"
    )
    assert tree(tmp_path) == before, "the old folder whole, nothing half written beside it"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_full_disk_in_a_first_prepare_leaves_nothing(source, tmp_path, monkeypatch):
    out = tmp_path / "new"
    full_disk_on(monkeypatch, "HK.npz")
    assert error_line(prepare(source, out)) == f"error: cannot write {out / 'HK.npz'}: {FULL}"
    assert not out.exists() and not list(tmp_path.glob(".new*"))


def test_a_full_disk_when_a_run_prepares_is_one_line_and_stops_a_grid(
    source, tmp_path, monkeypatch
):
    """`run` prints one line and writes no record; the error a grid cell raises is a
    StorageError, which stops the grid (backends/local.py) instead of a failed record."""
    results = tmp_path / "results"
    full_disk_on(monkeypatch, "BMC.npz")
    args = ["run", "--method", "fedavg", "--dataset", "prostate", "--preset", "quick"]
    args += ["--rounds", "1", "--holdout", "none", "--results-dir", str(results)]
    args += ["--set", f"data.path={source}", *DATA]
    line = error_line(CliRunner().invoke(app, args))
    assert line.startswith(f"error: cannot write {results / 'cache' / 'datasets'}/prostate-")
    assert line.endswith(f"/BMC.npz: {FULL}")
    assert not list(results.rglob("*.json")) and not list(results.rglob("*.npz"))
    overrides = [f"data.path={source}", "data.sites=RUNMC,BMC,HK", "data.size=32"]
    spec = RunSpec("fedavg", dataset="prostate", holdout="none", preset="quick", rounds=1)
    spec = replace(spec, overrides=overrides, results_dir=results)
    with pytest.raises(StorageError, match=f"/BMC.npz: {FULL}$"):
        run_cell(Cell(spec, "hash"), load_registry(), Reporter())
    assert not list(results.rglob("*.json")), "no failed record: the grid stops"


# --- item 7: manifest names and the folder's permissions -----------------------------------


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_manifest_names_leading_outside_the_folder_are_refused(prepared, tmp_path, how):
    outside = tmp_path / "elsewhere" / "HK.npz"
    outside.parent.mkdir()
    shutil.copy(prepared / "HK.npz", outside)
    name = "../elsewhere/HK" if how == "relative" else str(outside.with_suffix(""))
    manifest = json.loads((prepared / "manifest.json").read_text())
    manifest["sites"] = {name if s == "HK" else s: v for s, v in manifest["sites"].items()}
    manifest["files"][f"{name}.npz"] = manifest["files"].pop("HK.npz")
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    expected = f"{prepared / 'manifest.json'}: its file name '{name}.npz' leads outside the folder"
    with pytest.raises(FedbenchError) as caught:
        Prostate().load(cfg_for(prepared), 0, tmp_path / "cache")
    assert str(caught.value) == f"{expected}; {AGAIN}"
    result = CliRunner().invoke(app, ["datasets", "verify", "prostate", "--dir", str(prepared)])
    assert result.stderr.splitlines()[0] == f"error: {expected}; {AGAIN}"


def test_the_prepared_folder_gets_the_umask_permissions(source, tmp_path):
    old = os.umask(0o022)
    try:
        assert prepare(source, tmp_path / "out").exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "manifest.json").stat().st_mode) == 0o644
