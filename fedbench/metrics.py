"""Segmentation scores with MONAI's metrics: per-case foreground Dice and HD95, and the IOP-FL
release's own per-slice figure (mean of background and foreground Dice), kept under its own name.

HD95 is MONAI's `compute_hausdorff_distance(percentile=95)` (the larger of the two directed 95th
percentiles of surface distances) on each case as a whole: its slices stacked in order as one
volume, or, for tasks of independent 2D images, per image and then averaged over the case's
images. Distances are in mm when the task knows the voxel spacing, in voxels otherwise. MONAI
1.6 returns NaN whenever the truth or the prediction of a class is empty, so those cases are
decided from the masks:

- truth and prediction both empty: 0, as the Metrics Reloaded reference code does
  (Project-MONAI/MetricsReloaded, `BinaryPairwiseMeasures.measured_distance`);
- exactly one of them empty (a missed structure, or one predicted where there is none): the
  worst value, the diagonal of the volume (image) in the same unit, as BraTS 2023 scores missed
  and false-positive lesions 374 mm (about the 373 mm diagonal of its 240 x 240 x 155 mm grid).

No case is ever skipped, and a false positive on a slice without truth costs its distance to the
truth on the other slices (the per-slice mean this replaces scored it 0).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: voxel spacing (slice thickness, row, column) in mm
Spacing = Sequence[float]


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[N, *spatial] integer labels -> [N, C, *spatial] float one-hot."""
    return F.one_hot(labels.long(), num_classes).movedim(-1, 1).float()


def _volume(stack: torch.Tensor) -> torch.Tensor:
    """A case's [S, C, H, W] slices -> one [1, C, S, H, W] volume; a case that is one volume
    already ([1, C, D, H, W], a 3D task's sample) stays as it is."""
    if stack.ndim == 5:
        if stack.shape[0] != 1:
            raise ValueError(f"a 3D case must be one volume, got {stack.shape[0]}")
        return stack
    return stack.permute(1, 0, 2, 3).unsqueeze(0)


def _case_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Foreground Dice per class over one case's slices stacked as a volume: [C-1]."""
    from monai.metrics import compute_dice

    return compute_dice(
        _volume(pred), _volume(target), include_background=False, ignore_empty=False
    )[0]


def _hd95_with_empty_rule(
    pred: torch.Tensor, target: torch.Tensor, spacing: list[float] | None
) -> torch.Tensor:
    """HD95 per batch item and foreground class of [B, C, *spatial] maps: [B, C-1], with the
    empty-mask rule of the module docstring; `spacing` per spatial axis (None: 1)."""
    from monai.metrics import compute_hausdorff_distance

    steps = spacing or [1.0] * (pred.ndim - 2)
    worst = math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape[2:], steps, strict=True)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on every empty mask
        hd = compute_hausdorff_distance(
            pred, target, include_background=False, percentile=95, spacing=spacing
        )
    has_pred = pred[:, 1:].flatten(2).any(-1)
    has_true = target[:, 1:].flatten(2).any(-1)
    hd = torch.where(has_pred & has_true, hd, torch.full_like(hd, worst))
    return torch.where(has_pred | has_true, hd, torch.zeros_like(hd))


def case_hd95(
    pred: torch.Tensor, target: torch.Tensor, spacing: Spacing | None = None, volume: bool = True
) -> torch.Tensor:
    """HD95 per foreground class of one case's [S, C, H, W] binary maps: [C-1]. `volume`: the
    slices form one volume; else they are independent 2D images (row and column spacing only),
    their HD95s averaged. `spacing` is (thickness, row, column) in mm; None: voxels."""
    steps = [float(s) for s in spacing] if spacing is not None else None
    if volume:
        return _hd95_with_empty_rule(_volume(pred), _volume(target), steps)[0]
    return _hd95_with_empty_rule(pred, target, steps[1:] if steps else None).mean(0)


def release_dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    """IOP-FL's reported figure: per-slice hard Dice of every class incl. background, averaged."""
    from monai.metrics import compute_dice

    per_slice = compute_dice(pred, target, include_background=True, ignore_empty=False)
    return float(per_slice.mean())


def _per_case(
    pred: torch.Tensor, true: torch.Tensor, cases: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prediction, truth) one-hot stacks of each case's slices, in their order."""
    return [(pred[cases == c], true[cases == c]) for c in torch.unique(cases)]


def mean_case_dice(
    pred_labels: torch.Tensor, targets: torch.Tensor, cases: torch.Tensor, num_classes: int
) -> float:
    """Mean over cases of the foreground Dice (averaged over classes): the validation figure."""
    pred = _one_hot(pred_labels.cpu(), num_classes)
    true = _one_hot(targets.cpu(), num_classes)
    dice = [_case_dice(p, t).mean() for p, t in _per_case(pred, true, cases.cpu())]
    return float(torch.stack(dice).mean())


def region_scores(
    pred: torch.Tensor,
    true: torch.Tensor,
    cases: torch.Tensor,
    region_names: list[str],
    release: bool = True,
    spacing: Spacing | None = None,
    volume: bool = True,
) -> dict[str, float]:
    """Site-level scores from [N, 1 + R, H, W] binary region maps (channel 0 the background;
    regions may overlap, as fundus' disc and cup do): mean over cases of per-case Dice and HD95
    (see `case_hd95` for `spacing` and `volume`), per region when there are several, their
    means, and (`release`) the IOP-FL figure. A case's samples must be its slices in order."""
    dice_rows, hd_rows = [], []
    for case_pred, case_true in _per_case(pred, true, cases.cpu()):
        dice_rows.append(_case_dice(case_pred, case_true))
        hd_rows.append(case_hd95(case_pred, case_true, spacing, volume))
    dice = torch.stack(dice_rows).mean(0)
    hd95 = torch.stack(hd_rows).mean(0)
    scores = {"dice": float(dice.mean()), "hd95": float(hd95.mean())}
    if len(region_names) > 1:
        for i, name in enumerate(region_names):
            scores[f"dice_{name}"] = float(dice[i])
            scores[f"hd95_{name}"] = float(hd95[i])
    if release:
        scores["dice_release"] = release_dice(pred, true)
    return scores


def segmentation_scores(
    pred_labels: torch.Tensor,
    targets: torch.Tensor,
    cases: torch.Tensor,
    class_names: list[str],
    spacing: Spacing | None = None,
) -> dict[str, float]:
    """Site-level scores of exclusive classes (integer labels, 0 the background); each case's
    slices form one volume of voxel `spacing` (thickness, row, column; None: voxels)."""
    num_classes = len(class_names) + 1
    pred = _one_hot(pred_labels.cpu(), num_classes)
    true = _one_hot(targets.cpu(), num_classes)
    return region_scores(pred, true, cases, class_names, spacing=spacing)
