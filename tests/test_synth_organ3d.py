"""The embedded volumetric dataset (synth-organ-3d), its patch training and window scoring, end to
end through the CLI (issue 26)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.volumes import PatchSplit, VolumeSegmentationTask
from fedbench_datasets.synth_organ3d import SPACING, SynthOrgan3D

QUICK = SynthOrgan3D().preset("quick")["data"]


def loaded(tmp_path, seed: int = 0):
    return SynthOrgan3D().load(QUICK, seed, tmp_path)


def test_volumes_have_an_organ_with_a_lesion_inside_and_repeat_with_the_seed(tmp_path):
    data = loaded(tmp_path)
    assert [s.name for s in data.sites] == ["A", "B", "C", "D"]
    assert isinstance(data.task, VolumeSegmentationTask) and data.task.spacing == SPACING
    for site in data.sites:
        split = site.all_samples()
        assert split.inputs.shape[1:] == (1, *QUICK["shape"])
        assert len(torch.unique(split.cases)) == len(split)  # one case per volume
        for labels in split.targets:
            assert (labels == 1).any() and (labels == 2).any()
            lesion = (labels == 2).nonzero()
            # the lesion lies inside the organ: its bounding box is within the organ's
            organ = (labels > 0).nonzero()
            assert (lesion.min(0).values >= organ.min(0).values).all()
            assert (lesion.max(0).values <= organ.max(0).values).all()
    again = loaded(tmp_path / "other")
    assert torch.equal(again.sites[2].test.inputs, data.sites[2].test.inputs)


def test_sites_image_the_lesion_their_own_way(tmp_path):
    data = loaded(tmp_path)
    contrast = {}
    for site in data.sites:
        split = site.all_samples()
        x, y = split.inputs[:, 0], split.targets
        contrast[site.name] = float(x[y == 2].mean() - x[y == 1].mean())
    assert contrast["A"] < 0 and contrast["C"] < 0  # dark lesions
    assert contrast["B"] > 0 and contrast["D"] > 0  # bright lesions


def test_training_draws_patches_from_the_clients_stream_and_scoring_sees_whole_volumes(tmp_path):
    data = loaded(tmp_path)
    train = data.sites[0].train
    assert isinstance(train, PatchSplit) and train.patch == tuple(QUICK["patch"])
    first = list(train.batches(2, torch.Generator().manual_seed(0)))
    again = list(train.batches(2, torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert first[0][0].shape[2:] == tuple(QUICK["patch"])
    whole = next(iter(train.batches(2)))
    assert whole[0].shape[2:] == tuple(QUICK["shape"])
    assert isinstance(train.to("cpu"), PatchSplit)


def test_iopfl_runs_inside_and_outside_on_volumes(tmp_path):
    args = ["run", "--method", "iopfl", "--dataset", "synth-organ-3d", "--preset", "quick"]
    args += ["--rounds", "1", "--holdout", "A", "--results-dir", str(tmp_path), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    regimes = {(m["regime"], m["site"]) for m in record["metrics"] if m["metric"] == "hd95"}
    assert ("outside", "A") in regimes and ("inside", "B") in regimes
    assert record["hd95_unit"] == "mm" and record["adapter"] == "iopfl-routing"


def test_a_damaged_cache_file_is_made_again(tmp_path):
    first = loaded(tmp_path)
    (cache,) = (tmp_path / "synth-organ-3d").glob("*.npz")
    cache.write_bytes(cache.read_bytes()[:100])  # truncated, as a killed write could leave it
    again = loaded(tmp_path)
    assert torch.equal(again.sites[0].train.inputs, first.sites[0].train.inputs)


def test_the_labels_are_the_ellipsoids_of_the_geometry_in_mm():
    """A known answer: an organ of radii (15, 12, 12) mm with a 5 mm lesion at its centre, on
    the 3 x 1.5 x 1.5 mm grid, has the volumes of the formula 4/3 pi abc."""
    import math

    import numpy as np

    from fedbench_datasets.synth_organ3d import Geometry, labelled

    centre = np.zeros(3)
    shape = (32, 64, 64)
    g = Geometry(
        np.array([45.0, 45.0, 45.0]), centre, np.array([15.0, 12.0, 12.0]), centre, np.full(3, 5.0)
    )
    _, labels = labelled(shape, g)
    voxel = math.prod(SPACING)
    assert (labels > 0).sum() * voxel == pytest.approx(4 / 3 * math.pi * 15 * 12 * 12, rel=0.03)
    assert (labels == 2).sum() * voxel == pytest.approx(4 / 3 * math.pi * 5**3, rel=0.15)
    assert labels[16, 32, 32] == 2 and labels[0, 0, 0] == 0
    organ = np.argwhere(labels > 0)  # its extent per axis: 2 * radius / spacing voxels
    extent = [int(organ[:, axis].max() - organ[:, axis].min() + 1) for axis in range(3)]
    assert extent == pytest.approx([2 * 15 / 3.0, 2 * 12 / 1.5, 2 * 12 / 1.5], abs=1)
