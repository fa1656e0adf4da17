"""HD95 per case on the case's slices stacked as a volume (fedbench.metrics), against distances
worked out by hand: a false positive on a slice without truth costs its distance, spacing scales
each axis, empty masks follow the documented rule, and the prostate loader carries the spacing.

Every mask is a 2 x 2 square on one slice, so each of its voxels is on its surface; the 95th
percentile (linear interpolation) of 8 distances is the largest when the two largest are equal."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED

from fedbench.metrics import case_hd95, segmentation_scores
from fedbench.task import SegmentationTask
from fedbench_datasets.fundus import fundus_scores
from fedbench_datasets.prostate import Prostate

SLICES, SIZE = 4, 16


def labels(*squares: tuple[int, int, int]) -> torch.Tensor:
    """[SLICES, SIZE, SIZE] labels: 1 on a 2 x 2 square at each (slice, row, column)."""
    out = torch.zeros(SLICES, SIZE, SIZE, dtype=torch.long)
    for k, r, c in squares:
        out[k, r : r + 2, c : c + 2] = 1
    return out


def one_case(pred: torch.Tensor, true: torch.Tensor, spacing=None) -> float:
    return segmentation_scores(pred, true, torch.zeros(len(true)), ["prostate"], spacing)["hd95"]


def logits(pred: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(pred, 2).permute(0, 3, 1, 2).float()


def test_a_false_positive_on_a_slice_without_truth_costs_its_distance():
    truth = labels((0, 4, 4))  # slices 1 to 3 hold no prostate
    assert one_case(truth, truth) == 0.0
    with_fp = labels((0, 4, 4), (3, 4, 4))  # the same square, three slices away
    assert one_case(with_fp, truth) == pytest.approx(3.0)  # the per-slice mean gave 0
    assert one_case(with_fp, truth, (2.5, 0.5, 0.5)) == pytest.approx(7.5)  # 3 slices * 2.5 mm
    one_voxel = labels((0, 4, 4))
    one_voxel[3, 4, 4] = 1  # 1 of 5 surface voxels: the 95th percentile of 0, 0, 0, 0, 3
    assert one_case(one_voxel, truth) == pytest.approx(0.8 * 3.0)  # interpolated; the HD is 3


def test_spacing_scales_each_axis_thickness_row_column():
    truth = labels((0, 4, 4))
    pred = labels((0, 4, 4), (2, 4, 8))  # 2 slices up, nearest truth column 4 columns away
    assert one_case(pred, truth) == pytest.approx(math.sqrt(2**2 + 4**2))
    assert one_case(pred, truth, (3.0, 0.5, 0.8)) == pytest.approx(math.hypot(2 * 3.0, 4 * 0.8))
    assert one_case(pred, truth, (3.0, 0.8, 0.5)) == pytest.approx(math.hypot(6.0, 4 * 0.5))
    task = SegmentationTask(in_channels=1, class_names=["prostate"], spacing=(3.0, 0.5, 0.8))
    score = task.score(logits(pred), truth, torch.zeros(SLICES))["hd95"]
    assert score == pytest.approx(6.8) and task.hd95_unit == "mm"
    assert SegmentationTask(in_channels=1).hd95_unit == "voxel"


def test_both_empty_scores_zero_and_one_empty_the_volume_diagonal():
    spacing = (3.0, 0.5, 0.8)
    diagonal = math.sqrt((SLICES * 3.0) ** 2 + (SIZE * 0.5) ** 2 + (SIZE * 0.8) ** 2)
    empty, square = labels(), labels((1, 4, 4))
    hd = {
        name: float(case_hd95(logits(p), logits(t), spacing)[0])
        for name, p, t in (
            ("both empty", empty, empty),
            ("false positive", square, empty),
            ("missed", empty, square),
        )
    }
    assert hd == pytest.approx({"both empty": 0.0, "false positive": diagonal, "missed": diagonal})
    assert one_case(square, empty) == pytest.approx(math.sqrt(SLICES**2 + 2 * SIZE**2))


def test_the_site_score_is_the_mean_over_cases_each_its_own_volume():
    truth = torch.cat([labels((0, 4, 4)), labels((0, 4, 4))])
    pred = torch.cat([labels((0, 4, 4)), labels((0, 4, 4), (3, 4, 4))])
    cases = torch.arange(2).repeat_interleave(SLICES)
    assert segmentation_scores(pred, truth, cases, ["prostate"])["hd95"] == pytest.approx(1.5)


def test_fundus_images_of_one_patient_are_separate_2d_images():
    truth = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
    truth[0, 4:6, 4:6] = truth[1, 4:6, 10:12] = 1  # rim only: disc present, cup absent
    pred = truth.clone()
    pred[1, 4:6, 4:6] = 1  # where the other eye's disc is: 1 slice away if stacked
    scores = fundus_scores(pred, truth, torch.zeros(2))
    assert scores["hd95_disc"] == pytest.approx(6 / 2)  # eye 1's FP 5 or 6 columns off, eye 0 0
    assert scores["hd95_cup"] == 0.0  # no cup in truth or prediction


# --- the prostate loader's spacing ----------------------------------------------------------


def write_volumes(root: Path, zooms: list[tuple[float, float, float]]) -> Path:
    """RUNMC cases of 24 x 24 x 4 voxels, case i with voxel size zooms[i] (axes 0, 1, 2)."""
    import nibabel

    (root / "RUNMC").mkdir(parents=True)
    label = np.zeros((24, 24, 4), dtype=np.uint8)
    label[8:16, 8:16, 1:3] = 1
    for i, zoom in enumerate(zooms):
        affine = np.diag([*zoom, 1.0])
        image = np.random.default_rng(i).normal(size=label.shape).astype(np.float32)
        for data, name in ((image, f"Case{i:02d}"), (label, f"Case{i:02d}_segmentation")):
            nibabel.save(nibabel.Nifti1Image(data, affine), root / "RUNMC" / f"{name}.nii.gz")
    return root


def load_task(source: Path, cache: Path) -> SegmentationTask:
    cfg = {**Prostate.defaults, "path": str(source), "size": 32, "sites": ["RUNMC"]}
    return Prostate().load(cfg, 0, cache).task


def test_prostate_volumes_carry_their_voxel_size_rescaled_by_the_resize(tmp_path):
    source = write_volumes(tmp_path / "raw", [(0.6, 0.7, 3.0)] * 3)
    task = load_task(source, tmp_path / "cache")
    assert task.spacing == pytest.approx((3.0, 0.6 * 24 / 32, 0.7 * 24 / 32))
    assert task.hd95_unit == "mm"


def test_prostate_cases_of_different_voxel_size_fall_back_to_voxels(tmp_path, capsys):
    source = write_volumes(tmp_path / "raw", [(0.6, 0.6, 3.0), (0.6, 0.6, 3.0), (0.5, 0.5, 4.0)])
    assert load_task(source, tmp_path / "cache").spacing is None
    assert "cases differ in voxel size" in capsys.readouterr().err


def test_prostate_png_slices_state_no_pixel_size(tmp_path):
    samples = SHARED / "data" / "realdata" / "midss_multisite_samples" / "ProstateSlice"
    if not samples.is_dir():
        pytest.skip("../shared/data/realdata/midss_multisite_samples is not present")
    assert load_task(samples, tmp_path / "cache").hd95_unit == "voxel"


def test_a_3d_task_scores_each_volume_as_one_case_with_anisotropic_spacing():
    """Samples that are volumes ([N, D, H, W] labels, one case each, issue 26): a single voxel
    predicted 2 slices and 1 row away from the true one is sqrt((2 * 3)^2 + 1^2) mm off at
    spacing (3, 1, 1) mm, and sqrt(5) voxels off without spacing."""
    true = torch.zeros(2, 6, 8, 8, dtype=torch.long)
    pred = torch.zeros_like(true)
    true[0, 1, 2, 2], pred[0, 3, 3, 2] = 1, 1  # volume 0: one voxel, moved
    true[1, 2:4, 2:4, 2:4], pred[1, 2:4, 2:4, 2:4] = 1, 1  # volume 1: exact
    cases = torch.arange(2)
    in_mm = segmentation_scores(pred, true, cases, ["organ"], (3.0, 1.0, 1.0))
    assert in_mm["hd95"] == pytest.approx((math.sqrt(37) + 0.0) / 2, rel=1e-5)
    assert in_mm["dice"] == pytest.approx((0.0 + 1.0) / 2)
    in_voxels = segmentation_scores(pred, true, cases, ["organ"])
    assert in_voxels["hd95"] == pytest.approx(math.sqrt(5) / 2, rel=1e-5)
