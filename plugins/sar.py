"""Adapter `sar`: SAR, Niu, Wu, Zhang, Wen, Chen, Zhao and Tan, "Towards Stable Test-Time
Adaptation in Dynamic Wild World", ICLR 2023.

Variant implemented, on the federation's global model (batch statistics, as `tent`): online
entropy minimisation of every normalization layer's affine weights (the paper leaves out the
top blocks of its networks; here all are adapted, as `tent` does), with
(i) reliable-sample filtering decided PER PIXEL: a pixel's softmax prediction is a sample, and
    only pixels whose entropy is below E0 = margin * ln C (C classes; margin 0.4 as the paper)
    contribute to the loss, which is their mean entropy;
(ii) sharpness-aware minimisation (SAM) of that loss: ascend to w + rho * g / ||g|| (rho 0.05 as
    the paper), take the gradient of the filtered entropy there (pixels reliable in both passes,
    as the paper's second filter), restore w and step with that gradient;
(iii) model recovery: an exponential moving average of the second-pass loss (0.9 old + 0.1 new);
    when it falls below reset * ln C, the affine weights and the optimizer go back to their
    initial state. The paper's absolute 0.2 on ImageNet (ln 1000) is expressed relative to ln C
    (default reset = 0.2 / ln 1000), so it means the same on two-class segmentation; 0 disables.
A batch without a reliable pixel makes no step. Per batch: one update, then that batch is
predicted with the updated (or just recovered) model, as `tent` here (the paper's code returns
the pre-update forward); `epochs` passes, the last one returned, as every adapter's
(fedbench.adapter.ADAPTATION_EPOCHS per preset). Defaults: lr 1e-3 (tent's), optimizer "sgd"
(momentum 0.9, SAM's base optimizer in the paper; "adam" is tent's, with which rho = 0,
margin = inf and reset = 0 give `tent` exactly).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fedbench.adapter import AdaptContext, Adapter, TrainedFederation, online_batches
from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.models import affine_parameters, use_batch_statistics

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedbench.data import UnlabeledImages
    from fedbench.task import Task

EMA_MOMENTUM = 0.9
OPTIMIZERS = ("sgd", "adam")


def pixel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[N, C, ...] scores -> [N, ...] Shannon entropy of each pixel's softmax prediction."""
    log_probs = logits.log_softmax(1)
    return -(log_probs.exp() * log_probs).sum(1)


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
    the perturbed weights, step from the restored weights. Returns the second-pass loss over
    ln C, or None when nothing stepped."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(batch)
    log_c = math.log(logits.shape[1])
    e0 = margin * log_c
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
    return float(second.item()) / log_c


class SAR(Adapter):
    """Online, per consecutive test batch: one sharpness-aware step on the entropy of the
    reliable pixels (normalization affine weights only, batch statistics), model recovery when
    the loss average collapses, then the batch's prediction by the updated model."""

    name = "sar"
    description = "SAR: reliable, sharpness-aware entropy minimisation with model recovery"
    needs_normalization = True
    needs_dense_task = True
    defaults = {
        "lr": 1e-3,
        "epochs": 1,
        "rho": 0.05,
        "margin": 0.4,
        "reset": 0.2 / math.log(1000),
        "optimizer": "sgd",
    }

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
        torch.manual_seed(ctx.seed)
        model = use_batch_statistics(federation.model(federation.global_state)).train()
        params = affine_parameters(model)
        initial = [q.detach().clone() for q in params]
        optimizer = self.optimizer(params)
        ema: float | None = None
        epochs = int(p["epochs"])
        for epoch in range(max(epochs, 1)):
            outputs = []
            for batch in online_batches(images, ctx.batch_size):
                batch = batch.to(federation.device)
                loss = None
                if epoch < epochs:
                    loss = sar_step(
                        model, batch, params, optimizer, float(p["margin"]), float(p["rho"])
                    )
                if loss is not None:
                    ema = loss if ema is None else EMA_MOMENTUM * ema + (1 - EMA_MOMENTUM) * loss
                if ema is not None and ema < float(p["reset"]):
                    restore(params, initial)
                    optimizer, ema = self.optimizer(params), None
                with torch.no_grad():
                    outputs.append(model(batch).float().cpu())
        return torch.cat(outputs)


@hookimpl
def fedbench_adapters() -> list[type]:
    return [SAR]
