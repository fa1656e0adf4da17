"""Adapter `sar`: SAR, Niu, Wu, Zhang, Wen, Chen, Zhao and Tan, "Towards Stable Test-Time
Adaptation in Dynamic Wild World", ICLR 2023.

Variant implemented, on the federation's global model (batch statistics, as `tent`): online
entropy minimisation of every normalization layer's affine weights (the paper leaves out the
top blocks of its networks; here all are adapted, as `tent` does), with
(i) reliable-sample filtering, a pixel being the sample: a pixel's softmax prediction is one
    classification, as one image's is in the paper, and only pixels whose entropy is below
    E0 = margin * ln C (C classes; margin 0.4 as the paper) contribute to the loss, their mean
    entropy (an image's mean pixel entropy would pass any such E0: most pixels are confident
    background);
(ii) sharpness-aware minimisation (SAM) of that loss: ascend to w + rho * g / ||g|| (rho 0.05 as
    the paper), take the gradient of the filtered entropy there (pixels reliable in both passes,
    as the paper's second filter), restore w and step with that gradient;
(iii) model recovery against collapse, relative to the source model: each batch's second-pass
    loss is divided by the source model's loss on the same batch (the federation's global model,
    batch statistics, the same E0 filter; one extra forward pass per batch), and an exponential
    moving average of that ratio (0.9 old + 0.1 new, started at the first value, as the paper's
    average of the loss) resets the affine weights and the optimizer to their initial state
    when it falls below `reset` (default 0.2; 0 disables). The paper resets when the average
    loss falls below an absolute 0.2 nats, on ImageNet a small fraction of a working model's
    entropy, i.e. near collapse. On segmentation the mean over mostly saturated background
    pixels is far below any absolute level (about 0.01 nats on synth-prostate), so an absolute
    threshold fires after every step and SAR becomes bn-adapt; the ratio keeps the meaning:
    collapse to one class drives it to 0 (measured without recovery, synth-prostate at 64
    pixels and 12 rounds, HK held out: at Adam lr 1e-2 the average crosses 0.2 in the third
    pass, Dice down from 0.64 to 0.09, and the mask is empty in the fourth; at lr 1e-3 it
    stays above 0.4 for 10 passes).
A batch without a reliable pixel makes no step. Per batch: one update, then that batch is
predicted with the updated (or just recovered) model, as `tent` here (the paper's code returns
the pre-update forward); `epochs` passes, the last one returned, as every adapter's
(fedbench.adapter.ADAPTATION_EPOCHS per preset).
Remaining choice, the base optimizer: Adam, lr 1e-3, as `tent` here (so rho = 0, margin = inf
and reset = 0 give `tent` exactly). The paper's SGD (momentum 0.9, `optimizer=sgd`) steps in
proportion to the gradient, and that of a mean over saturated pixels is tiny: at lr 1e-3 it
changed 9 of 458,752 pixels of HK in two passes (Adam: 1,126).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedbench.adapter import AdaptContext, Adapter, TrainedFederation, online_batches
from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.models import affine_parameters, pixel_entropy, use_batch_statistics
from fedbench.tuning import Range

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedbench.data import UnlabeledImages
    from fedbench.task import Task

EMA_MOMENTUM = 0.9
OPTIMIZERS = ("sgd", "adam")


def reliable_entropy(logits: torch.Tensor, e0: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean entropy of the pixels whose entropy is below `e0`, and that reliability mask."""
    entropy = pixel_entropy(logits)
    mask = entropy < e0
    return entropy[mask].mean(), mask


def ascend(params: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """SAM's first step: move to w + rho * g / ||g|| (global L2 norm); returns w to restore."""
    import torch

    saved = [p.detach().clone() for p in params]
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = rho / (norm + 1e-12)
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.add_(p.grad * scale)
    return saved


def restore(params: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """Put back the weights `ascend` moved away from, exactly."""
    import torch

    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)


def sar_step(
    model: nn.Module,
    batch: torch.Tensor,
    params: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    margin: float,
    rho: float,
) -> float | None:
    """One SAR update on a batch: filter (E0 = margin * ln C), SAM ascent, filtered entropy at
    the perturbed weights, step from the restored weights. Returns the second-pass loss (nats),
    or None when nothing stepped."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(batch)
    e0 = margin * math.log(logits.shape[1])
    loss, mask = reliable_entropy(logits, e0)
    if not bool(mask.any()):
        return None
    loss.backward()
    saved = ascend(params, rho)
    optimizer.zero_grad(set_to_none=True)
    entropy = pixel_entropy(model(batch))
    keep = mask & (entropy < e0)
    if not bool(keep.any()):
        restore(params, saved)
        return None
    second = entropy[keep].mean()
    second.backward()
    restore(params, saved)
    optimizer.step()
    return float(second.item())


def source_level(source: nn.Module, batch: torch.Tensor, margin: float) -> float | None:
    """The source model's filtered entropy on a batch (nats): the recovery's yardstick; None
    when it has no reliable pixel or is exactly 0."""
    import torch

    with torch.no_grad():
        logits = source(batch)
        loss, mask = reliable_entropy(logits, margin * math.log(logits.shape[1]))
    level = float(loss.item()) if bool(mask.any()) else 0.0
    return level if level > 0 else None


@dataclass
class Recovery:
    """SAR's collapse signal: a moving average of each batch's loss over the source model's."""

    threshold: float
    ema: float | None = None

    def collapsed(self, loss: float, level: float | None) -> bool:
        """Fold in one batch's ratio; True (and the average restarts) when it fell below the
        threshold."""
        if level is None:
            return False
        ratio = loss / level
        self.ema = (
            ratio if self.ema is None else EMA_MOMENTUM * self.ema + (1 - EMA_MOMENTUM) * ratio
        )
        if self.ema < self.threshold:
            self.ema = None
            return True
        return False


class SAR(Adapter):
    """Online, per consecutive test batch: one sharpness-aware step on the entropy of the
    reliable pixels (normalization affine weights only, batch statistics), model recovery when
    the loss average relative to the source model's collapses, then the batch's prediction by
    the updated model. After `predict`, `updates` and `recoveries` count steps and resets."""

    name = "sar"
    mode = "online"
    description = "SAR: reliable, sharpness-aware entropy minimisation with model recovery"
    needs_normalization = True
    needs_dense_task = True
    defaults = {
        "lr": 1e-3,
        "epochs": 1,
        "rho": 0.05,
        "margin": 0.4,
        "reset": 0.2,
        "optimizer": "adam",
    }
    #: the lr as tent's; the margin (E0 / ln C) around the paper's 0.4 (Niu et al., ICLR 2023)
    search_space = {
        "adapter.lr": Range(1e-4, 1e-2, log=True),
        "adapter.margin": Range(0.2, 0.8),
    }
    updates: int = 0
    recoveries: int = 0

    def check_settings(self) -> None:
        """Raise a FedbenchError naming the first setting out of range."""
        p = self.params
        if p["optimizer"] not in OPTIMIZERS:
            raise FedbenchError(f"setting adapter.optimizer must be one of {', '.join(OPTIMIZERS)}")
        if int(p["epochs"]) < 0:
            raise FedbenchError("setting adapter.epochs must be at least 0")
        for key in ("lr", "rho", "reset"):
            if not float(p[key]) >= 0:
                raise FedbenchError(f"setting adapter.{key} must be >= 0")
        if not float(p["margin"]) > 0:
            raise FedbenchError("setting adapter.margin must be > 0 (inf: every pixel reliable)")

    def check(self, method: type, model: nn.Module, task: Task) -> None:
        super().check(method, model, task)
        self.check_settings()

    def optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """A fresh base optimizer over the affine weights."""
        import torch

        lr = float(self.params["lr"])
        if self.params["optimizer"] == "adam":
            return torch.optim.Adam(params, lr=lr)
        return torch.optim.SGD(params, lr=lr, momentum=0.9)

    def predict(
        self, federation: TrainedFederation, images: UnlabeledImages, ctx: AdaptContext
    ) -> torch.Tensor:
        import torch

        self.check_settings()
        p = self.params
        margin, rho, reset = float(p["margin"]), float(p["rho"]), float(p["reset"])
        torch.manual_seed(ctx.seed)
        model = use_batch_statistics(federation.model(federation.global_state)).train()
        source = copy.deepcopy(model).requires_grad_(False) if reset > 0 else None
        params = affine_parameters(model)
        initial = [q.detach().clone() for q in params]
        optimizer = self.optimizer(params)
        levels: dict[int, float | None] = {}  # the source model's, per batch (all passes)
        recovery = Recovery(reset)
        self.updates = self.recoveries = 0
        epochs = int(p["epochs"])
        for epoch in range(max(epochs, 1)):
            outputs = []
            for index, batch in enumerate(online_batches(images, ctx.batch_size)):
                batch = batch.to(federation.device)
                loss = None
                if epoch < epochs:
                    loss = sar_step(model, batch, params, optimizer, margin, rho)
                if loss is not None:
                    self.updates += 1
                if loss is not None and source is not None:
                    if index not in levels:
                        levels[index] = source_level(source, batch, margin)
                    if recovery.collapsed(loss, levels[index]):
                        restore(params, initial)
                        optimizer = self.optimizer(params)
                        self.recoveries += 1
                with torch.no_grad():
                    outputs.append(model(batch).float().cpu())
        return torch.cat(outputs)


@hookimpl
def fedbench_adapters() -> list[type]:
    return [SAR]
