"""Segmentation scores with MONAI's metrics: per-case foreground Dice and HD95, and the IOP-FL
release's own per-slice figure (mean of background and foreground Dice), kept under its own name."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[N, H, W] integer labels -> [N, C, H, W] float one-hot."""
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()


def _case_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Foreground Dice per class over one case's slices stacked as a volume: [C-1]."""
    from monai.metrics import compute_dice

    volume_pred = pred.permute(1, 0, 2, 3).unsqueeze(0)  # [1, C, S, H, W]
    volume_true = target.permute(1, 0, 2, 3).unsqueeze(0)
    return compute_dice(volume_pred, volume_true, include_background=False, ignore_empty=False)[0]


def _case_hd95(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """HD95 in pixels per foreground class, averaged over the case's slices that hold that class.

    A slice whose prediction misses the class entirely scores the image diagonal (the worst
    possible distance) instead of MONAI's NaN, so misses are penalised rather than ignored.
    """
    from monai.metrics import compute_hausdorff_distance

    diagonal = math.hypot(pred.shape[-2], pred.shape[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_slice = compute_hausdorff_distance(
            pred, target, include_background=False, percentile=95
        )
    has_truth = target[:, 1:].flatten(2).any(-1)
    per_slice = torch.where(
        torch.isfinite(per_slice), per_slice, torch.full_like(per_slice, diagonal)
    )
    per_slice = torch.where(has_truth, per_slice, torch.nan)
    return torch.nanmean(per_slice, dim=0)


def release_dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    """IOP-FL's reported figure: per-slice hard Dice of every class incl. background, averaged."""
    from monai.metrics import compute_dice

    per_slice = compute_dice(pred, target, include_background=True, ignore_empty=False)
    return float(per_slice.mean())


def _per_case(
    pred: torch.Tensor, true: torch.Tensor, cases: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prediction, truth) one-hot stacks of each case's slices."""
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
) -> dict[str, float]:
    """Site-level scores from [N, 1 + R, H, W] binary region maps (channel 0 the background;
    regions may overlap, as fundus' disc and cup do): mean over cases of per-case Dice and HD95,
    per region when there are several, their means, and (`release`) the IOP-FL figure."""
    dice_rows, hd_rows = [], []
    for case_pred, case_true in _per_case(pred, true, cases.cpu()):
        dice_rows.append(_case_dice(case_pred, case_true))
        hd_rows.append(_case_hd95(case_pred, case_true))
    dice = torch.stack(dice_rows).mean(0)
    hd95 = torch.nanmean(torch.stack(hd_rows), dim=0)
    scores = {"dice": float(dice.mean()), "hd95": float(torch.nanmean(hd95))}
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
) -> dict[str, float]:
    """Site-level scores of exclusive classes (integer labels, 0 the background)."""
    num_classes = len(class_names) + 1
    pred = _one_hot(pred_labels.cpu(), num_classes)
    true = _one_hot(targets.cpu(), num_classes)
    return region_scores(pred, true, cases, class_names)
