"""Adapter `memo`: MEMO, Zhang, Levine and Finn, "MEMO: Test Time Robustness via Adaptation and
Augmentation", NeurIPS 2022.

Variant implemented, on the federation's global model, episodic: for each test image on its
own, from the same starting weights, `augmentations` (B, default 8) augmented copies are
segmented, each copy's output is mapped back to the image's frame, and `steps` (default 1)
plain-SGD steps (lr 1e-3; with one step from a fresh optimizer momentum would change nothing)
minimise the entropy of the marginal prediction: per pixel, the mean over the B copies of the
softmax, its entropy averaged over pixels. The original image is then predicted by the adapted
model, and the weights are reset before the next image.
Augmentations: the paper's AugMix is not invertible for dense outputs, so each copy is an
element of the dihedral group D4 (rot90 by k, optional horizontal flip; the copies cycle
through its 8 elements, or the 4 that keep the shape of a non-square image), combined with a
random intensity change x * (1 + a) + b * std(x), a and b uniform in [-intensity, intensity]
(default 0.1; predictions are mapped back by the inverse rotation/flip only).
Parameters: all of them adapt, as the paper; BatchNorm keeps the trained running statistics
(eval mode) for the copies and the final prediction, so steps = 0 is the `none` adapter. The
paper's single-point BN adaptation ("MEMO + BN", a prior-weighted mix of test and training
statistics) is not implemented.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbench.adapter import AdaptContext, Adapter, TrainedFederation
from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedbench.data import UnlabeledImages
    from fedbench.task import Task

#: a view of D4: (number of quarter turns, horizontal flip first)
View = tuple[int, bool]


def dihedral_views(count: int, square: bool) -> list[View]:
    """`count` views cycling through D4 (identity first); only half-turns when not square."""
    turns = (0, 1, 2, 3) if square else (0, 2)
    group = [(k, flip) for flip in (False, True) for k in turns]
    return [group[i % len(group)] for i in range(count)]


def transform(x: torch.Tensor, view: View) -> torch.Tensor:
    """Apply a view to [..., H, W]: flip the width axis (if asked), then rotate k quarter turns."""
    import torch

    k, flip = view
    x = x.flip(-1) if flip else x
    return torch.rot90(x, k, dims=(-2, -1))


def invert(y: torch.Tensor, view: View) -> torch.Tensor:
    """Map [..., H, W] from a view's frame back to the image's: undo the turns, then the flip."""
    import torch

    k, flip = view
    y = torch.rot90(y, -k, dims=(-2, -1))
    return y.flip(-1) if flip else y


def augment(
    image: torch.Tensor, views: list[View], intensity: float, generator: torch.Generator
) -> torch.Tensor:
    """[C, H, W] -> [B, C, H, W]: each view with a random gain and offset (scaled by std)."""
    import torch

    draws = (torch.rand(len(views), 2, generator=generator) * 2 - 1) * intensity
    draws = draws.to(image.device, image.dtype)
    spread = image.std()
    copies = [
        transform(image, view) * (1 + draws[i, 0]) + draws[i, 1] * spread
        for i, view in enumerate(views)
    ]
    return torch.stack(copies)


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[B, C, ...] scores of B copies, in the same frame -> mean over pixels of the entropy of
    the per-pixel mean softmax over the copies."""
    import math

    log_marginal = logits.log_softmax(1).logsumexp(0) - math.log(logits.shape[0])
    return -(log_marginal.exp() * log_marginal).sum(0).mean()


def views_loss(model: nn.Module, copies: torch.Tensor, views: list[View]) -> torch.Tensor:
    """Marginal entropy of the model's outputs on the copies, each mapped back to the image."""
    import torch

    outputs = model(copies)
    back = torch.stack([invert(outputs[i], view) for i, view in enumerate(views)])
    return marginal_entropy(back)


class MEMO(Adapter):
    """Episodic: per image, `steps` SGD steps on the marginal entropy over augmented copies
    (all parameters, frozen BatchNorm statistics), predict the image, reset the model."""

    name = "memo"
    description = "MEMO: per-image marginal entropy minimisation over invertible augmentations"
    needs_dense_task = True
    defaults = {"steps": 1, "lr": 1e-3, "augmentations": 8, "intensity": 0.1}

    def check_settings(self) -> None:
        """Raise a FedbenchError naming the first setting out of range."""
        p = self.params
        if int(p["steps"]) < 0:
            raise FedbenchError("setting adapter.steps must be >= 0")
        if int(p["augmentations"]) < 1:
            raise FedbenchError("setting adapter.augmentations must be at least 1")
        for key in ("lr", "intensity"):
            if not float(p[key]) >= 0:
                raise FedbenchError(f"setting adapter.{key} must be >= 0")

    def check(self, method: type, model: nn.Module, task: Task) -> None:
        super().check(method, model, task)
        self.check_settings()

    def adapt_and_predict(
        self, model: nn.Module, image: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """The adapted model's [1, C, H, W] output for one [C, H, W] image."""
        import torch

        p = self.params
        views = dihedral_views(int(p["augmentations"]), image.shape[-1] == image.shape[-2])
        optimizer = torch.optim.SGD(model.parameters(), lr=float(p["lr"]))
        for _ in range(int(p["steps"])):
            copies = augment(image, views, float(p["intensity"]), generator)
            optimizer.zero_grad(set_to_none=True)
            views_loss(model, copies, views).backward()
            optimizer.step()
        with torch.no_grad():
            return model(image.unsqueeze(0)).float().cpu()

    def predict(
        self, federation: TrainedFederation, images: UnlabeledImages, ctx: AdaptContext
    ) -> torch.Tensor:
        import torch

        self.check_settings()
        torch.manual_seed(ctx.seed)
        generator = torch.Generator().manual_seed(ctx.seed)
        model = federation.model(federation.global_state).eval()
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        outputs = []
        for image in images.inputs:
            model.load_state_dict(initial)
            outputs.append(self.adapt_and_predict(model, image.to(federation.device), generator))
        return torch.cat(outputs)


@hookimpl
def fedbench_adapters() -> list[type]:
    return [MEMO]
