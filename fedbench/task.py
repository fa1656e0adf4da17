"""Tasks: what a dataset asks of the engine (training loss, scores, the sizes a network needs).
The engine itself knows no task, so a dataset plugin can bring classification or survival as well
as segmentation. Networks are Model plugins chosen by `model.name`; a task whose dataset defines
its own network (FLamby's baselines) returns it from `build_model` (model `dataset-baseline`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from fedbench.errors import FedbenchError

if TYPE_CHECKING:  # torch loads when a run needs it, not when `fedbench list` reads the classes
    import torch
    from torch import nn


#: the site name of the metric rows that score every site's test set at once (`pooled_test`):
#: a column of its own on the boards, never a site
POOLED = "pooled"


class Task:
    """Model, loss and scoring for one kind of problem."""

    primary_metric: str = "dice"
    #: whether unlabeled test-time adapters (entropy, routing, ...) make sense for this task
    dense_prediction: bool = False
    #: whether records also score all sites' test sets pooled (site "pooled"), FLamby's
    #: headline figure; each site's samples are predicted by that site's own model
    pooled_test: bool = False

    def build_model(self, model_cfg: dict[str, Any]) -> nn.Module:
        """The network this task's dataset defines itself, for model `dataset-baseline`."""
        raise FedbenchError(
            f"{type(self).__name__} defines no network of its own; choose one with model.name"
        )

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(
        self, outputs: torch.Tensor, targets: torch.Tensor, cases: torch.Tensor
    ) -> dict[str, float]:
        """Site-level metrics from the model outputs on every sample of one split."""
        raise NotImplementedError

    def validation_score(
        self, outputs: torch.Tensor, targets: torch.Tensor, cases: torch.Tensor
    ) -> float:
        """The primary metric alone: computed every round, so it should be cheap."""
        return self.score(outputs, targets, cases)[self.primary_metric]

    def ensemble_space(self, outputs: torch.Tensor) -> torch.Tensor:
        """What the `ensemble` adapter averages over models: the outputs themselves (a survival
        model's risk scores, say) unless the task says otherwise."""
        return outputs

    def adaptation_view(
        self, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """What an adapter is given of an unseen site's images, and how its outputs on that
        become outputs of the images: the images themselves here; a volumetric task's windows."""
        return inputs, lambda outputs: outputs

    def predict(self, model: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The model's outputs on whole samples, as the engine scores them (eval mode, no
        gradients, on the model's device, returned on the CPU): batch by batch; a volumetric
        task slides a window over each volume instead (fedbench.volumes)."""
        from fedbench.adapter import predict_batched

        return predict_batched(model, inputs, batch_size)


def predicted_labels(outputs: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] scores -> [N, H, W] class per pixel. The same as argmax(1) (first maximum on
    ties), but max(1) is about 30 times faster on CPU: argmax over a non-last dimension is slow."""
    return outputs.max(1).indices


#: segmentation losses by `data.loss` name: MONAI's Dice + cross-entropy (Dice per sample), or
#: the IOP-FL release's soft Dice over the whole batch, per class with background, then averaged
LOSSES = ("dice_ce", "soft_dice_batch")
#: the release's smoothing constant, added to the numerator and the denominator
RELEASE_SMOOTH = 1e-5


def check_loss(name: Any) -> str:
    """A known loss name, or one clear error naming the setting."""
    if name not in LOSSES:
        raise FedbenchError(f"setting data.loss must be one of {', '.join(LOSSES)}, got {name!r}")
    return name


def segmentation_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss `name` on (logits [N, C, H, W], labels [N, 1, H, W]), softmax taken inside.
    soft_dice_batch: 1 - mean_c (2 sum p_c y_c + eps) / (sum p_c + sum y_c + eps), every sum
    over the batch and the pixels."""
    from monai.losses import DiceCELoss, DiceLoss

    if check_loss(name) == "soft_dice_batch":
        return DiceLoss(
            include_background=True,
            to_onehot_y=True,
            softmax=True,
            batch=True,
            smooth_nr=RELEASE_SMOOTH,
            smooth_dr=RELEASE_SMOOTH,
        )
    return DiceCELoss(to_onehot_y=True, softmax=True)


@dataclass
class SegmentationTask(Task):
    """2D segmentation: a Dice loss (`loss_name`, see LOSSES), Dice/HD95 scores; `in_channels` and
    `num_classes` (background included) size the network. `spacing` is the voxel size in mm
    (slice thickness, row, column) of every case as the network sees it, when the dataset
    knows it: HD95 is then in mm, else in voxels (`hd95_unit`)."""

    in_channels: int
    class_names: list[str] = field(default_factory=lambda: ["foreground"])
    primary_metric: str = "dice"
    dense_prediction: bool = True
    spacing: tuple[float, float, float] | None = None
    #: the spatial axes of a sample: 2 (images) or 3 (volumes)
    spatial_dims: ClassVar[int] = 2

    #: the training loss, one of LOSSES (a segmentation dataset's `data.loss`)
    loss_name: str = "dice_ce"

    def __post_init__(self) -> None:
        self._loss = segmentation_loss(self.loss_name)

    @property
    def num_classes(self) -> int:
        return len(self.class_names) + 1

    @property
    def hd95_unit(self) -> str:
        """What the `hd95` scores count: "mm" with a known spacing, else "voxel"."""
        return "voxel" if self.spacing is None else "mm"

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._loss(outputs, targets.unsqueeze(1))

    def ensemble_space(self, outputs: torch.Tensor) -> torch.Tensor:
        """Class probabilities: an ensemble averages softmax maps, not logits."""
        return outputs.softmax(1)

    def score(
        self, outputs: torch.Tensor, targets: torch.Tensor, cases: torch.Tensor
    ) -> dict[str, float]:
        from fedbench.metrics import segmentation_scores

        labels = predicted_labels(outputs)
        return segmentation_scores(labels, targets, cases, self.class_names, self.spacing)

    def validation_score(
        self, outputs: torch.Tensor, targets: torch.Tensor, cases: torch.Tensor
    ) -> float:
        from fedbench.metrics import mean_case_dice

        return mean_case_dice(predicted_labels(outputs), targets, cases, self.num_classes)
