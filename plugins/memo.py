"""Adapter `memo`: MEMO, Zhang, Levine and Finn, "MEMO: Test Time Robustness via Adaptation and
Augmentation", NeurIPS 2022.

Variant implemented, on the federation's global model, episodic: for each test image on its
own, from the same starting weights, `augmentations` (B) augmented copies are segmented, each
copy's output is mapped back to the image's frame, and `steps` plain-SGD steps minimise the
entropy of the marginal prediction: per pixel, the mean over the B copies of the softmax, its
entropy averaged over pixels (each pixel is one of the paper's classification problems). The
original image is then predicted by the adapted model, and the weights are reset before the next
image.

Settings from the paper's code, for the setting nearest a U-Net trained from scratch on two
classes: its CIFAR-10 ResNet-26 (trained by the authors, 10 classes; the ImageNet models are
torchvision's, 1000 classes): all parameters adapt, one step, B = 32, plain SGD with lr 0.005.
That network has GroupNorm; for BatchNorm networks (its ResNet-50s) the paper adds single-point
BatchNorm adaptation with prior strength N = 16, as here: every BatchNorm normalises with
(N * running + own) / (N + 1), the mean and variance of the layer's own input (the B copies
while adapting, the image alone when predicting) detached, as the ImageNet script's
`prior_strength` 16 (< 0 or inf keeps the running statistics: with steps = 0, the `none`
adapter).
Remaining choices:
- the learning rate is not re-tuned: a benchmark cannot tune it on the unseen site. Measured on
  synth-prostate (default preset, HK held out), N = 16 alone moves Dice from 0.553 to 0.588 and
  the step at 0.005 back to 0.571; the paper's ImageNet 0.00025 (B = 64) changes nothing;
- augmentations: the paper's AugMix is not invertible for dense outputs, so each copy is an
  element of the dihedral group D4 (rot90 by k, optional horizontal flip; the copies cycle
  through its 8 elements, or the 4 that keep the shape of a non-square image), combined with a
  random intensity change x * (1 + a) + b * std(x), a and b uniform in [-intensity, intensity]
  (default 0.1; predictions are mapped back by the inverse rotation/flip only).
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

from fedbench.adapter import AdaptContext, Adapter, TrainedFederation
from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.tuning import Range

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
    log_marginal = logits.log_softmax(1).logsumexp(0) - math.log(logits.shape[0])
    return -(log_marginal.exp() * log_marginal).sum(0).mean()


def views_loss(model: nn.Module, copies: torch.Tensor, views: list[View]) -> torch.Tensor:
    """Marginal entropy of the model's outputs on the copies, each mapped back to the image."""
    import torch

    outputs = model(copies)
    back = torch.stack([invert(outputs[i], view) for i, view in enumerate(views)])
    return marginal_entropy(back)


def prior_batch_norm(
    module: nn.modules.batchnorm._BatchNorm, prior: float, x: torch.Tensor
) -> torch.Tensor:
    """BatchNorm with prior * running + (1 - prior) * the input's own statistics (detached;
    unbiased variance, as the running estimate is)."""
    import torch.nn.functional as F

    dims = [0, *range(2, x.dim())]
    own = x.detach()
    mean = prior * module.running_mean + (1 - prior) * own.mean(dims)
    var = prior * module.running_var + (1 - prior) * own.var(dims, unbiased=True)
    return F.batch_norm(x, mean, var, module.weight, module.bias, False, 0.0, module.eps)


def use_prior_statistics(model: nn.Module, strength: float) -> nn.Module:
    """Single-point BatchNorm adaptation (prior strength N: the running statistics weigh N / (N
    + 1)) on every BatchNorm that keeps running statistics; N < 0 or inf: left untouched."""
    from torch import nn

    if strength < 0 or math.isinf(strength):
        return model
    prior = strength / (strength + 1)
    for module in model.modules():
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if is_bn and module.running_mean is not None and module.running_var is not None:
            module.forward = partial(prior_batch_norm, module, prior)  # type: ignore[method-assign]
    return model


class MEMO(Adapter):
    """Episodic: per image, `steps` SGD steps on the marginal entropy over augmented copies
    (all parameters, single-point BatchNorm adaptation), predict the image, reset the model."""

    name = "memo"
    mode = "episodic"
    description = "MEMO: per-image marginal entropy minimisation over invertible augmentations"
    needs_dense_task = True
    defaults = {
        "steps": 1,
        "lr": 0.005,
        "augmentations": 32,
        "intensity": 0.1,
        "prior_strength": 16.0,
    }
    #: SGD's lr from below the paper's ImageNet 2.5e-4 to 10x its CIFAR 5e-3, the prior
    #: strength around its 16; steps and augmentations set the compute, not tuned
    search_space = {
        "adapter.lr": Range(1e-4, 5e-2, log=True),
        "adapter.prior_strength": Range(1.0, 64.0, log=True),
    }

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
        if float(p["prior_strength"]) != float(p["prior_strength"]):
            raise FedbenchError("setting adapter.prior_strength must be a number (< 0: off)")

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
        use_prior_statistics(model, float(self.params["prior_strength"]))
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        outputs = []
        for image in images.inputs:
            model.load_state_dict(initial)
            outputs.append(self.adapt_and_predict(model, image.to(federation.device), generator))
        return torch.cat(outputs)


@hookimpl
def fedbench_adapters() -> list[type]:
    return [MEMO]
