"""`nifti-volumes`: users' own multi-site NIfTI volumes in the MSD / nnU-Net and SAML layouts,
put on one grid, prepared, verified and run end to end (issue 26). The volumes are written here
with nibabel: a sphere of known radius in mm, on anisotropic voxels that differ per case."""

from __future__ import annotations

import json
import math

import nibabel
import numpy as np
import pytest
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench_datasets.nifti_volumes import NiftiVolumes

RADIUS_MM = 12.0
GRID = {"shape": [16, 32, 32], "spacing": [3.0, 1.5, 1.5]}


def sphere_case(path, name: str, zooms: tuple[float, float, float], seed: int, saml: bool):
    """A (i, j, k) volume of `zooms` mm holding a sphere of RADIUS_MM (label 1) in noise."""
    rng = np.random.default_rng(seed)
    shape = [int(round(60 / z)) for z in zooms]  # 60 mm across on every axis
    axes = [(np.arange(n) - (n - 1) / 2) * z for n, z in zip(shape, zooms)]
    grid = np.meshgrid(*axes, indexing="ij")
    label = (sum(g**2 for g in grid) <= RADIUS_MM**2).astype(np.uint8)
    image = label * 2.0 + rng.normal(0, 0.3, shape)
    affine = np.diag([*zooms, 1.0])
    if saml:
        image_path, label_path = path / f"{name}.nii.gz", path / f"{name}_segmentation.nii.gz"
    else:
        (path / "imagesTr").mkdir(exist_ok=True)
        (path / "labelsTr").mkdir(exist_ok=True)
        image_path = path / "imagesTr" / f"{name}_0000.nii.gz"
        label_path = path / "labelsTr" / f"{name}.nii.gz"
    nibabel.save(nibabel.Nifti1Image(image.astype(np.float32), affine), image_path)
    nibabel.save(nibabel.Nifti1Image(label, affine), label_path)


@pytest.fixture
def source(tmp_path):
    root = tmp_path / "volumes"
    for s, (site, saml) in enumerate((("alpha", False), ("beta", True), ("gamma", False))):
        folder = root / site
        folder.mkdir(parents=True)
        for c in range(4):
            zooms = (1.0 + 0.25 * c, 1.2, 2.5 + s)  # every case its own anisotropic voxels
            sphere_case(folder, f"case{c}", zooms, seed=10 * s + c, saml=saml)
    (root / "beta" / "case9.nii.gz").write_bytes((root / "beta" / "case0.nii.gz").read_bytes())
    return root


def test_both_layouts_load_onto_one_grid_and_keep_the_spheres_volume(source, tmp_path, capsys):
    cfg = {**NiftiVolumes.defaults, **GRID, "path": str(source)}
    data = NiftiVolumes().load(cfg, 0, tmp_path / "cache")
    assert "case9.nii.gz: image without a label" in capsys.readouterr().err
    assert [s.name for s in data.sites] == ["alpha", "beta", "gamma"]
    assert data.task.spacing == (3.0, 1.5, 1.5) and data.task.hd95_unit == "mm"
    expected = 4 / 3 * math.pi * RADIUS_MM**3
    for site in data.sites:
        every = site.all_samples()
        assert every.inputs.shape == (4, 1, 16, 32, 32)
        for labels in every.targets:
            volume = float(labels.sum()) * 3.0 * 1.5 * 1.5  # mm^3 on the grid
            assert volume == pytest.approx(expected, rel=0.12)
            centre = labels.nonzero().float().mean(0)  # the sphere stays in the middle
            assert centre.tolist() == pytest.approx([7.5, 15.5, 15.5], abs=1.0)


def test_prepare_verify_and_a_run_inside_and_outside(source, tmp_path):
    runner = CliRunner()
    out = tmp_path / "prepared"
    sets = [
        f"data.shape={json.dumps(GRID['shape'])}",
        f"data.spacing={json.dumps(GRID['spacing'])}",
    ]
    args = ["datasets", "prepare", "nifti-volumes", "--source", str(source), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    prepared = runner.invoke(app, args)
    assert prepared.exit_code == 0, prepared.output
    verified = runner.invoke(app, ["datasets", "verify", "nifti-volumes", "--dir", str(out)])
    assert verified.exit_code == 0, verified.output
    run = ["run", "--method", "fedavg", "--dataset", "nifti-volumes", "--preset", "quick"]
    run += ["--rounds", "1", "--holdout", "beta", "--results-dir", str(tmp_path / "r"), "--json"]
    run += ["--set", f"data.path={out}", "--set", "data.patch=[16,16,16]"]
    for s in sets:
        run += ["--set", s]
    result = runner.invoke(app, run)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert {(m["regime"], m["site"]) for m in record["metrics"]} >= {
        ("inside", "alpha"),
        ("outside", "beta"),
    }
