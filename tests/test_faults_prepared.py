"""Prepared datasets whose files load but have the wrong structure (issue 16, item 5): `fedbench
datasets verify` names each problem on one line and exits non-zero, and loading such a folder is
one line naming the file and saying to prepare it again, never a KeyError or BadZipFile."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_real_data import make_slice_source
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.errors import FedbenchError
from fedbench_datasets.prostate import Prostate

SITES = ["RUNMC", "BMC", "HK"]
AGAIN = "run fedbench datasets prepare again"


@pytest.fixture(scope="module")
def prepared_once(tmp_path_factory) -> Path:
    """A prostate folder prepared once from three small sites (copied by each test)."""
    root = tmp_path_factory.mktemp("prepared")
    source = make_slice_source(root / "raw", sites=tuple(SITES))
    cfg = {**Prostate.defaults, "path": str(source), "size": 32, "sites": SITES}
    return Prostate().prepare(source, root / "prepared", cfg)


@pytest.fixture
def folder(prepared_once, tmp_path) -> Path:
    return Path(shutil.copytree(prepared_once, tmp_path / "prepared"))


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def rewrite_manifest(folder: Path, manifest) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


def rewrite_site(folder: Path, site: str, **arrays: np.ndarray) -> None:
    """Save new arrays for `site` and record their sha256, as a consistent folder would."""
    path = folder / f"{site}.npz"
    np.savez(path, **arrays)
    manifest = manifest_of(folder)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest["files"][path.name] = {"sha256": digest, "bytes": path.stat().st_size}
    rewrite_manifest(folder, manifest)


def verify(folder: Path) -> list[str]:
    """The error lines of `fedbench datasets verify prostate --dir FOLDER` (which must fail)."""
    result = CliRunner().invoke(app, ["datasets", "verify", "prostate", "--dir", str(folder)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    return lines


def load_error(folder: Path) -> str:
    """The message loading the prepared folder gives (it must refuse, in one line)."""
    cfg = {**Prostate.defaults, "path": str(folder), "size": 32, "sites": SITES}
    with pytest.raises(FedbenchError) as caught:
        Prostate().load(cfg, 0, folder.parent / "cache")
    message = str(caught.value)
    assert "\n" not in message
    return message


def without(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def test_a_good_folder_still_verifies_and_loads(folder):
    result = CliRunner().invoke(app, ["datasets", "verify", "prostate", "--dir", str(folder)])
    assert result.exit_code == 0 and f"ok: {folder}" in result.stdout
    cfg = {**Prostate.defaults, "path": str(folder), "size": 32, "sites": SITES}
    assert [s.name for s in Prostate().load(cfg, 0, folder.parent / "cache").sites] == SITES


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (lambda m: without(m, "sites"), "lacks sites"),
        (lambda m: without(m, "files"), "lacks files"),
        (lambda m: [m], "holds a list, not a manifest"),
        (lambda m: {**m, "sites": SITES}, "its sites are a list, not a mapping"),
        (
            lambda m: {**m, "files": {**m["files"], "BMC.npz": {"bytes": 3}}},
            "its entry for BMC.npz lacks sha256",
        ),
        (
            lambda m: {**m, "files": without(m["files"], "HK.npz")},
            "site 'HK' has no file in it",
        ),
    ],
)
def test_a_manifest_of_the_wrong_structure_is_reported_and_refused(folder, tamper, problem):
    rewrite_manifest(folder, tamper(manifest_of(folder)))
    expected = f"{folder / 'manifest.json'}: {problem}; {AGAIN}"
    assert verify(folder) == [f"error: {expected}"]
    assert load_error(folder) == expected


def test_a_manifest_missing_a_site_the_run_asks_for_is_refused(folder):
    manifest = manifest_of(folder)
    manifest["sites"] = without(manifest["sites"], "HK")
    manifest["files"] = without(manifest["files"], "HK.npz")
    rewrite_manifest(folder, manifest)
    assert load_error(folder) == f"{folder / 'manifest.json'}: holds no site HK; {AGAIN}"


def test_a_truncated_site_file_is_one_line_naming_it(folder):
    path = folder / "BMC.npz"
    path.write_bytes(path.read_bytes()[:200])
    assert verify(folder) == [
        f"error: {path}: sha256 differs from the manifest (modified or corrupt)"
    ]
    message = load_error(folder)
    assert message.startswith(f"{path}: unreadable prepared file (") and message.endswith(AGAIN)


def test_a_truncated_site_file_with_a_matching_checksum_is_still_refused(folder):
    """The checksum is not read on every load: a cut file must still be one line there."""
    path = folder / "HK.npz"
    path.write_bytes(path.read_bytes()[:-300])
    rewrite_site_digest = manifest_of(folder)
    rewrite_site_digest["files"]["HK.npz"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    rewrite_manifest(folder, rewrite_site_digest)
    (line,) = verify(folder)
    assert line.startswith(f"error: {path}: unreadable prepared file (") and line.endswith(AGAIN)
    message = load_error(folder)
    assert message.startswith(f"{path}: unreadable prepared file (") and message.endswith(AGAIN)


def test_a_site_file_without_an_array_the_dataset_needs_is_named(folder):
    with np.load(folder / "RUNMC.npz") as npz:
        arrays = {key: npz[key] for key in npz.files if key != "case_names"}
    rewrite_site(folder, "RUNMC", **arrays)
    expected = f"{folder / 'RUNMC.npz'}: lacks the array case_names; {AGAIN}"
    assert verify(folder) == [f"error: {expected}"]
    assert load_error(folder) == expected


def test_a_broken_prepared_folder_is_one_line_from_the_command_line(folder, tmp_path):
    rewrite_manifest(folder, without(manifest_of(folder), "sites"))
    args = ["datasets", "show", "prostate", "--out", str(tmp_path / "a.png"), "--set"]
    args += [f"data.path={folder}", "--set", "data.size=32", "--set", "data.sites=RUNMC,BMC,HK"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert result.stderr.strip() == f"error: {folder / 'manifest.json'}: lacks sites; {AGAIN}"
    assert not (tmp_path / "a.png").exists()
