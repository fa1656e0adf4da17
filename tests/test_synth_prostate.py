"""Tests of the embedded synth-prostate dataset: determinism, shapes, case splits, realism bounds,
site differences, the disk cache and extra sites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedbench.errors import FedbenchError
from fedbench_datasets import synth_phantom as phantom
from fedbench_datasets import synth_prostate as sp

SMALL = {"size": 32, "cases_per_site": 3, "slices_per_case": 4}


@pytest.fixture(scope="module")
def default_size() -> dict[str, np.ndarray]:
    """Three cases of every site at the default size 64 and slice count."""
    return phantom.generate(64, 3, 8, seed=0, sites=list(range(6)), profiles=sp.PROFILES)


def test_same_seed_same_arrays_and_other_seed_differs() -> None:
    a = phantom.generate(32, 2, 3, seed=7, sites=[0, 4], profiles=sp.PROFILES)
    b = phantom.generate(32, 2, 3, seed=7, sites=[0, 4], profiles=sp.PROFILES)
    c = phantom.generate(32, 2, 3, seed=8, sites=[0, 4], profiles=sp.PROFILES)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image_0"], c["image_0"])
    assert not np.array_equal(a["mask_4"], c["mask_4"])


def test_shapes_dtypes_and_per_case_normalisation(tmp_path: Path) -> None:
    data = sp.SynthProstate().load(SMALL, seed=0, cache_dir=tmp_path)
    assert [s.name for s in data.sites] == ["RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK"]
    assert data.task.class_names == ["prostate"] and data.task.in_channels == 1
    for site in data.sites:
        for split in (site.train, site.val, site.test):
            assert split.inputs.shape == (4, 1, 32, 32) and split.inputs.dtype == torch.float32
            assert split.targets.shape == (4, 32, 32) and split.targets.dtype == torch.int64
            assert split.cases.tolist() == [0, 0, 0, 0]
            assert set(split.targets.unique().tolist()) <= {0, 1}
            assert abs(float(split.inputs.mean())) < 1e-4
            assert abs(float(split.inputs.std()) - 1) < 1e-2


def test_splits_hold_disjoint_generated_cases(tmp_path: Path) -> None:
    cfg = {**SMALL, "cases_per_site": 5, "sites": "UCL"}
    site = sp.SynthProstate().load(cfg, seed=3, cache_dir=tmp_path).sites[0]
    raw = phantom.generate(32, 5, 4, seed=3, sites=[3], profiles=sp.PROFILES)
    masks = raw["mask_3"]
    assert sp.split_counts(5) == (3, 1, 1) and sp.split_counts(10) == (6, 2, 2)
    assert site.train.cases.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    np.testing.assert_array_equal(site.train.targets.numpy(), masks[:3].reshape(12, 32, 32))
    np.testing.assert_array_equal(site.val.targets.numpy(), masks[3].reshape(4, 32, 32))
    np.testing.assert_array_equal(site.test.targets.numpy(), masks[4].reshape(4, 32, 32))
    images = raw["image_3"].reshape(5, -1)
    assert len({row.tobytes() for row in images}) == 5  # every case is its own patient


def test_foreground_fraction_is_realistic(default_size: dict[str, np.ndarray]) -> None:
    for i in range(6):
        masks = default_size[f"mask_{i}"]
        assert 0.005 < masks.mean() < 0.08, sp.site_name(i)
        area = masks.reshape(masks.shape[0], masks.shape[1], -1).sum(-1)
        assert (area > 0).all()  # every slice crosses the gland
        assert (area[:, [0, -1]].mean() < area[:, [3, 4]].mean()).all()  # grows, then shrinks


def test_sites_differ(default_size: dict[str, np.ndarray]) -> None:
    """Mean grey level, roughness (noise versus blur) or the contrast of the image centre (coil
    near the gland) tells every pair of sites apart."""
    stats = []
    for i in range(6):
        img = default_size[f"image_{i}"].astype(np.float64)
        rough = np.abs(np.diff(img, axis=-1)).mean() / img.std()
        centre = img[..., 24:40, 24:40].std() / img.std()
        stats.append(np.log([img.mean(), rough, centre]))
    for i in range(6):
        for j in range(i):
            assert np.abs(stats[i] - stats[j]).max() > 0.2, (sp.site_name(i), sp.site_name(j))


def test_cache_is_used_and_a_corrupt_file_regenerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = sp.SynthProstate()
    first = ds.load(SMALL, seed=1, cache_dir=tmp_path)
    files = list((tmp_path / "synth-prostate").glob("*.npz"))
    assert len(files) == 1 and not list((tmp_path / "synth-prostate").glob("*.tmp"))

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("generator called despite a valid cache")

    monkeypatch.setattr(phantom, "generate", boom)
    second = ds.load(SMALL, seed=1, cache_dir=tmp_path)
    assert torch.equal(first.sites[2].test.inputs, second.sites[2].test.inputs)
    with pytest.raises(AssertionError):
        ds.load(SMALL, seed=2, cache_dir=tmp_path)  # another seed is another file
    monkeypatch.undo()

    files[0].write_bytes(b"not a zip file")
    third = ds.load(SMALL, seed=1, cache_dir=tmp_path)
    assert torch.equal(first.sites[5].train.targets, third.sites[5].train.targets)
    assert files[0].read_bytes()[:2] == b"PK"  # rewritten as a valid .npz


def test_more_sites_cycle_the_profiles_with_new_anatomy(tmp_path: Path) -> None:
    ds = sp.SynthProstate()
    names = ds.site_names({"num_sites": 12})
    assert len(set(names)) == 12 and names[6] == "RUNMC-2" and names[11] == "HK-2"
    data = ds.load({**SMALL, "num_sites": 12, "sites": "RUNMC,RUNMC-2"}, 0, tmp_path)
    a, b = data.sites
    assert (a.name, b.name) == ("RUNMC", "RUNMC-2")
    assert not torch.equal(a.train.targets, b.train.targets)


def test_settings_are_validated() -> None:
    ds = sp.SynthProstate()
    assert ds.site_names({"sites": "HK, BMC"}) == ["BMC", "HK"]
    with pytest.raises(FedbenchError, match="unknown site"):
        ds.site_names({"sites": "Nowhere"})
    with pytest.raises(FedbenchError, match="cases_per_site"):
        ds.site_names({"cases_per_site": 2})
    assert ds.preset("quick")["data"]["size"] == 32
    assert ds.preset("paper")["data"] == {"size": 384, "loss": "soft_dice_batch"}
    assert ds.preset("default") == {"data": {"size": 32}, "train": {"rounds": 24}}
    assert sp.fedbench_datasets() == [sp.SynthProstate]
