"""Real-data datasets `prostate` and `fundus`: the MiDSS samples in ../shared load and align, the
I2CVB mispairing is reported, splits are by case, and the prepared form is checked end to end.
Tests reading ../shared skip when it is absent; the rest build small raw folders in tmp_path."""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED
from PIL import Image
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.errors import FedbenchError
from fedbench_datasets import prepared
from fedbench_datasets.fundus import Fundus, FundusTask, read_pair
from fedbench_datasets.prostate import SITES, Prostate, read_slice_pair

SAMPLES = SHARED / "data" / "realdata" / "midss_multisite_samples"
PROSTATE = SAMPLES / "ProstateSlice"
FUNDUS = SAMPLES / "Fundus"


@pytest.fixture(scope="module")
def samples() -> Path:
    if not SAMPLES.is_dir():
        pytest.skip("../shared/data/realdata/midss_multisite_samples is not present")
    return SAMPLES


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache for the sample tests: the samples are prepared once per module."""
    return tmp_path_factory.mktemp("cache")


def manifest_rows(task: str) -> list[dict[str, str]]:
    with open(SAMPLES / "manifest.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["task"] == task]


def prostate_cfg(path: Path, **extra: object) -> dict:
    return {**Prostate.defaults, "path": str(path), "size": 32, **extra}


def fundus_cfg(path: Path, **extra: object) -> dict:
    return {**Fundus.defaults, "path": str(path), "size": 32, **extra}


def disk(size: int, radius: float, centre: float | None = None) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    c = size / 2 if centre is None else centre
    return (yy - c) ** 2 + (xx - c) ** 2 <= radius**2


def write_slice(root: Path, site: str, part: str, stem: str, size: int = 32) -> None:
    """One 8-bit slice and its inverted mask (0 = prostate) in the slice layout."""
    rng = np.random.default_rng(zlib.crc32(f"{site}/{part}/{stem}".encode()))
    for kind in ("image", "mask"):
        (root / site / part / kind).mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 255, (size, size), dtype=np.uint8)
    Image.fromarray(image).save(root / site / part / "image" / f"{stem}.png")
    mask = np.where(disk(size, size / 6), 0, 255).astype(np.uint8)
    Image.fromarray(mask).save(root / site / part / "mask" / f"{stem}.png")


def make_slice_source(root: Path, sites: tuple[str, ...] = SITES) -> Path:
    """Every site with two train cases and one test case of three slices each."""
    for site in sites:
        for part, cases in (("train", ("00", "01")), ("test", ("00",))):
            for case in cases:
                for k in range(3):
                    write_slice(root, site, part, f"{case}_{k:02d}")
    return root


def make_volume_source(root: Path, cases: int = 5, depth: int = 6) -> Path:
    """The volume layout: CaseNN.nii.gz + CaseNN_segmentation.nii.gz, prostate in middle slices."""
    import nibabel

    rng = np.random.default_rng(0)
    for site in SITES:
        (root / site).mkdir(parents=True)
        for i in range(cases):
            image = rng.normal(100 * (i + 1), 10 * (i + 1), (24, 24, depth)).astype(np.float32)
            label = np.zeros((24, 24, depth), dtype=np.uint8)
            label[..., 1 : depth - 1] = disk(24, 5)[..., None]
            label[12, 12, 2] = 2  # a second label value, binarised as prostate
            suffix = "_Segmentation" if i % 2 else "_segmentation"
            for data, name in ((image, f"Case{i:02d}"), (label, f"Case{i:02d}{suffix}")):
                nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), root / site / f"{name}.nii.gz")
    return root


def case_sets(site) -> dict[str, set[int]]:
    return {s: set(getattr(site, s).cases.tolist()) for s in ("train", "val", "test")}


# --- the MiDSS samples in ../shared ---------------------------------------------------------


def test_all_six_prostate_sites_load(samples, cache):
    data = Prostate().load(prostate_cfg(PROSTATE), 0, cache)
    assert [s.name for s in data.sites] == list(SITES)
    for site in data.sites:
        for split in (site.train, site.val, site.test):
            assert len(split) > 0 and split.inputs.shape[1:] == (3, 32, 32)
            assert set(split.targets.unique().tolist()) <= {0, 1}
    assert data.task.in_channels == 3 and data.task.num_classes == 2


def test_prostate_masks_are_inverted_and_in_the_readme_range(samples):
    for row in (r for r in manifest_rows("prostate") if r["image"] and r["mask"]):
        problems: list[str] = []
        image, mask = read_slice_pair(SAMPLES / row["image"], SAMPLES / row["mask"], problems)
        assert not problems and image.shape == mask.shape == (384, 384)
        fraction = float(mask.mean())
        # the README says 0.6 to 4 %; its manifest lists 0.56 % for two slices
        assert 0.005 <= fraction <= 0.04, row["mask"]
        assert fraction == pytest.approx(float(row["fg_frac"]), abs=1e-4)


def test_i2cvb_mispairing_is_reported_and_never_used(samples, cache, capsys):
    data = Prostate().load(prostate_cfg(PROSTATE), 0, cache)
    err = capsys.readouterr().err
    assert "I2CVB/train/image/00_03.png" in err and "I2CVB/train/mask/00_00.png" in err
    (folder,) = (cache / "datasets").glob("prostate-*")
    orphans = json.loads((folder / "manifest.json").read_text())["orphans"]
    assert any("I2CVB/train/image/00_03.png" in line for line in orphans)
    assert any("I2CVB/train/mask/00_00.png" in line for line in orphans)
    assert len(data.site("I2CVB").train) == 2  # only the pairs 00_01 and 00_02


def test_single_training_case_val_reuses_train_never_test(samples, cache, capsys):
    data = Prostate().load(prostate_cfg(PROSTATE), 0, cache)
    assert "val reuses it" in capsys.readouterr().err
    for site in data.sites:
        torch.testing.assert_close(site.val.inputs, site.train.inputs)
    (split_file,) = (next((cache / "datasets").glob("prostate-*")) / "splits").glob("*.json")
    record = json.loads(split_file.read_text())["sites"]["RUNMC"]
    assert record["val"] == record["train"] == ["train/00"] and record["test"] == ["test/00"]


def test_all_four_fundus_domains_load_and_the_disc_contains_the_cup(samples, cache):
    data = Fundus().load(fundus_cfg(FUNDUS), 0, cache)
    assert [s.name for s in data.sites] == ["Domain1", "Domain2", "Domain3", "Domain4"]
    for site in data.sites:
        assert site.train.inputs.shape[1:] == (3, 32, 32)
        assert set(site.test.targets.unique().tolist()) == {0, 1, 2}
    for row in manifest_rows("fundus"):
        image, labels = read_pair(SAMPLES / row["image"], SAMPLES / row["mask"], [])
        assert image.shape[:2] == labels.shape
        disc, cup = labels >= 1, labels == 2
        assert float(disc.mean()) == pytest.approx(float(row["fg_frac"]), abs=1e-4)
        assert 0 < cup.sum() < disc.sum()
        # the cup lies inside the disc: no cup pixel touches background
        background = np.pad(labels == 0, 1)
        touching = background[:-2, 1:-1] | background[2:, 1:-1]
        touching |= background[1:-1, :-2] | background[1:-1, 2:]
        assert not (cup & touching).any(), row["mask"]


def test_fundus_task_scores_disc_and_cup_regions():
    targets = torch.zeros(2, 16, 16, dtype=torch.long)
    targets[:, 3:13, 3:13] = 1
    targets[:, 6:10, 6:10] = 2
    cases = torch.tensor([0, 1])
    task = FundusTask()
    perfect = torch.nn.functional.one_hot(targets, 3).permute(0, 3, 1, 2).float()
    scores = task.score(perfect, targets, cases)
    assert scores["dice_disc"] == scores["dice_cup"] == scores["dice"] == 1.0
    assert {"hd95", "hd95_disc", "hd95_cup"} <= set(scores)
    no_cup = torch.where(targets == 2, 1, targets)  # cup predicted as rim: disc still right
    scores = task.score(
        torch.nn.functional.one_hot(no_cup, 3).permute(0, 3, 1, 2).float(), targets, cases
    )
    assert scores["dice_disc"] == 1.0 and scores["dice_cup"] == 0.0 and scores["dice"] == 0.5


# --- small raw folders in tmp_path ----------------------------------------------------------


def test_volume_layout_splits_by_case_disjoint_and_fixed_by_seed(tmp_path):
    source = make_volume_source(tmp_path / "raw")
    cfg = prostate_cfg(source, foreground_only=False)
    data = Prostate().load(cfg, 0, tmp_path / "cache")
    for site in data.sites:
        sets = case_sets(site)
        assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"]
        assert not sets["val"] & sets["test"]
        assert sets["train"] | sets["val"] | sets["test"] == set(range(5))
        assert len(site.train) + len(site.val) + len(site.test) == 5 * 6
    again = Prostate().load(cfg, 0, tmp_path / "cache")
    assert [case_sets(s) for s in again.sites] == [case_sets(s) for s in data.sites]
    others = [Prostate().load(cfg, seed, tmp_path / "cache") for seed in (1, 2, 3)]
    assert any(
        [case_sets(s) for s in o.sites] != [case_sets(s) for s in data.sites] for o in others
    )
    (folder,) = (tmp_path / "cache" / "datasets").glob("prostate-*")
    assert len(list((folder / "splits").glob("seed0-*.json"))) == 1


def test_25d_input_foreground_only_and_case_normalisation(tmp_path):
    source = make_volume_source(tmp_path / "raw", cases=3)
    cfg = prostate_cfg(source, foreground_only=False, sites=["RUNMC"])
    site = Prostate().load(cfg, 0, tmp_path / "cache").sites[0]
    every = site.all_samples()
    for case in every.cases.unique():
        x = every.inputs[every.cases == case]  # the case's 6 slices in order
        torch.testing.assert_close(x[1:, 0], x[:-1, 1])  # previous slice
        torch.testing.assert_close(x[:-1, 2], x[1:, 1])  # next slice
        torch.testing.assert_close(x[0, 0], x[0, 1])  # edges replicated
        torch.testing.assert_close(x[-1, 2], x[-1, 1])
        assert abs(float(x[:, 1].mean())) < 1e-2 and float(x[:, 1].std()) == pytest.approx(
            1, abs=0.05
        )
    fg_only = Prostate().load({**cfg, "foreground_only": True}, 0, tmp_path / "cache").sites[0]
    splits = [fg_only.train, fg_only.val, fg_only.test]
    assert sum(len(s) for s in splits) == 3 * 4  # the empty first and last slices are gone
    assert all(s.targets.flatten(1).any(1).all() for s in splits if len(s))


def test_inside_and_outside_score_the_same_slices(tmp_path):
    """One selection for both regimes: every slice by default (a selection made with the unseen
    site's labels would hand the adapter its labels); the release's foreground selection, when
    asked, applies to the splits and to the held-out site alike."""
    source = make_volume_source(tmp_path / "raw", cases=3)
    cfg = prostate_cfg(source, sites=["RUNMC"])  # the defaults: every slice
    site = Prostate().load(cfg, 0, tmp_path / "cache").sites[0]
    splits = torch.cat([site.train.inputs, site.val.inputs, site.test.inputs])
    assert site.unseen is None and len(splits) == 3 * 6  # the empty end slices are scored
    torch.testing.assert_close(site.all_samples().inputs, splits)
    release = Prostate().load({**cfg, "foreground_only": True}, 0, tmp_path / "cache").sites[0]
    held_out = release.all_samples()
    assert len(held_out) == 3 * 4 and held_out.targets.flatten(1).any(1).all()
    assert all(s.targets.flatten(1).any(1).all() for s in (release.train, release.test) if len(s))


def test_prepare_verify_round_trip_and_tampering_reported_by_path(tmp_path):
    source = make_slice_source(tmp_path / "raw")
    dataset = Prostate()
    out = dataset.prepare(source, tmp_path / "prepared", prostate_cfg(source))
    assert dataset.verify(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {f"{s}.npz" for s in SITES}
    with open(out / "BMC.npz", "ab") as handle:
        handle.write(b"tampered")
    (out / "HK.npz").unlink()
    problems = dataset.verify(out)
    assert len(problems) == 2
    assert any(p.startswith(str(out / "BMC.npz")) and "sha256" in p for p in problems)
    assert any(p.startswith(str(out / "HK.npz")) and "missing" in p for p in problems)


def test_verify_reports_bad_prepared_arrays(tmp_path):
    bad_values = {"image": np.zeros((2, 4, 4)), "mask": np.full((2, 4, 4), 3, dtype=np.uint8)}
    mismatch = {"image": np.zeros((2, 5, 5)), "mask": np.zeros((2, 4, 4), dtype=np.uint8)}
    empty = {"image": np.zeros((0, 4, 4)), "mask": np.zeros((0, 4, 4), dtype=np.uint8)}
    sites = {"RUNMC": bad_values, "BMC": mismatch, "HK": empty}
    manifest = {"dataset": "prostate", "sites": {s: {} for s in sites}}
    out = prepared.write_prepared(tmp_path / "p", manifest, sites, replace=True)
    problems = Prostate().verify(out)
    assert len(problems) == 3
    assert problems[0].startswith(str(out / "RUNMC.npz")) and "values [3]" in problems[0]
    assert problems[1].startswith(str(out / "BMC.npz")) and "differ in size" in problems[1]
    assert problems[2].startswith(str(out / "HK.npz")) and "empty site" in problems[2]


def test_non_binary_mask_size_mismatch_and_empty_site_are_reported(tmp_path):
    source = make_slice_source(tmp_path / "raw")
    grey = source / "BMC" / "train" / "mask" / "00_01.png"
    Image.fromarray(np.full((32, 32), 7, dtype=np.uint8)).save(grey)
    small = source / "UCL" / "test" / "mask" / "00_00.png"
    Image.fromarray(np.full((16, 16), 255, dtype=np.uint8)).save(small)
    for path in (source / "HK").rglob("*.png"):
        path.unlink()
    with pytest.raises(prepared.DataProblems) as caught:
        Prostate().prepare(source, tmp_path / "out", prostate_cfg(source))
    lines = caught.value.lines
    assert any(line.startswith(str(grey)) and "not binary" in line for line in lines)
    assert any(line.startswith(str(small)) and "differ in size" in line for line in lines)
    assert any(line.startswith(str(source / "HK")) and "empty site" in line for line in lines)
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out*")) == []


def test_fundus_bad_mask_values_are_reported(tmp_path):
    folder = tmp_path / "raw" / "Domain1" / "train" / "ROIs"
    for kind in ("image", "mask"):
        (folder / kind).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "image" / "a.png")
    Image.fromarray(np.full((8, 8, 3), 60, dtype=np.uint8)).save(folder / "mask" / "a.png")
    cfg = fundus_cfg(tmp_path / "raw", sites=["Domain1"])
    with pytest.raises(prepared.DataProblems) as caught:
        Fundus().prepare(tmp_path / "raw", tmp_path / "out", cfg)
    assert caught.value.lines[0].startswith(str(folder / "mask" / "a.png"))


def test_a_failed_prepare_leaves_nothing_behind(tmp_path, monkeypatch):
    source = make_slice_source(tmp_path / "raw", sites=("RUNMC", "BMC"))
    calls = []

    def failing_savez(path, **arrays):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        np.savez_compressed(path, **arrays)

    monkeypatch.setattr(prepared.np, "savez", failing_savez)
    with pytest.raises(OSError):
        Prostate().prepare(source, tmp_path / "out", prostate_cfg(source, sites=["RUNMC", "BMC"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_data_path_missing_nonexistent_or_empty_is_one_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for path, words in (
        (None, "needs data.path"),
        (tmp_path / "nope", "does not exist"),
        (tmp_path / "empty", "is empty"),
    ):
        with pytest.raises(FedbenchError, match=words):
            Prostate().load({**Prostate.defaults, "path": path}, 0, tmp_path)


def test_a_prepared_folder_can_be_data_path_with_matching_settings(tmp_path):
    source = make_slice_source(tmp_path / "raw", sites=("RUNMC", "BMC", "HK"))
    cfg = prostate_cfg(source, sites=["RUNMC", "BMC", "HK"])
    out = Prostate().prepare(source, tmp_path / "prepared", cfg)
    data = Prostate().load({**cfg, "path": str(out)}, 0, tmp_path / "cache")
    assert [s.name for s in data.sites] == ["RUNMC", "BMC", "HK"]
    assert case_sets(data.sites[0])["test"] == {0}  # "test/00" sorts first
    with pytest.raises(FedbenchError, match="prepared with"):
        Prostate().load({**cfg, "path": str(out), "size": 64}, 0, tmp_path / "cache")


def test_run_on_a_source_with_a_non_image_and_a_mismatched_mask_is_one_line(tmp_path):
    source = make_slice_source(tmp_path / "raw")
    not_png = source / "BMC" / "train" / "image" / "00_01.png"
    not_png.write_text("not a png")
    small = source / "UCL" / "test" / "mask" / "00_00.png"
    Image.fromarray(np.full((16, 16), 255, dtype=np.uint8)).save(small)
    results = tmp_path / "results"
    args = ["run", "--dataset", "prostate", "--method", "fedavg", "--preset", "quick"]
    result = CliRunner().invoke(
        app, [*args, "--set", f"data.path={source}", "--results-dir", str(results)]
    )
    assert result.exit_code != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {not_png}: unreadable image or mask")
    assert line.endswith("(and 1 more problem(s))")
    assert not list(results.rglob("*.json")), "no record, no half-prepared data"
