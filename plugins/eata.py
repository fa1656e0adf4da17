"""Adapter `eata`: EATA, Niu, Wu, Zhang, Chen, Zheng, Zhao and Tan, "Efficient Test-Time Model
Adaptation without Forgetting", ICML 2022.

Variant implemented, on the federation's global model (batch statistics, as `tent`): online, per
consecutive test batch, one step on the normalization affine weights, then the batch's
prediction by the updated model. The loss:
(a) sample selection, with two kinds of sample in segmentation:
  - reliability, per pixel (a pixel's softmax is one classification, as an image's in the paper;
    as `sar` here): a pixel counts when its entropy E is below E0 = margin * ln C (C classes,
    margin 0.4 as the paper), weighted by 1 / exp(E - E0) (detached, as the paper's); the loss
    is the weighted entropy averaged over the counted pixels;
  - redundancy, per image: an image's prediction is its softmax map of the classes but the
    background (flattened over pixels: the output the paper compares, less class 0), compared
    by cosine with a moving average (0.9 old + 0.1 new, as the paper) of those of the images
    selected before this batch; an image at or above `d_margin` is dropped with its pixels (the
    first batch is all novel; the average folds in the images kept with a counted pixel). The
    paper's 0.05 is on 1000 classes. With the background channel every similarity here is above
    0.98 (0.9998 for the mean softmax); on the foreground maps, six cached global models of the
    reference grid on their held-out synth-prostate sites gave median similarities 0.67-0.91
    (unadapted, average of all images): 0.05 would drop nearly all, the default 0.9 7-54%;
(b) anti-forgetting: + fisher_alpha * sum_i F_i (w_i - w0_i)^2, w0 the global model's weights
    (fisher_alpha 2000 as the paper). The paper estimates the diagonal Fisher F on unlabeled
    in-distribution images (2,000 in the authors' release), the model's predictions as labels.
    An unseen site has none and the adapter sees no source data, so F is estimated with that
    recipe on the site's own stream: the squared gradient of an unchanged copy of the global
    model's per-pixel cross-entropy against its own argmax, averaged over the first
    `fisher_batches` batches as they arrive (one extra forward and backward pass each). It
    anchors what carries the source model's predictions on this site, not its accuracy on the
    federation's data, which no unseen site can see. fisher_alpha = 0 is the paper's ETA (EATA
    without the regularizer).
A batch with no counted pixel makes no step; the average and F carry over between passes;
`epochs` passes, the last one returned, as every adapter's (fedbench.adapter.ADAPTATION_EPOCHS).
Adam at lr 1e-3 as `tent` and `sar` here (the paper's SGD barely moves on gradients averaged over
saturated background pixels; see `sar`), so margin = d_margin = inf, reweight = false and
fisher_alpha = 0 give `tent` exactly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
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

#: the moving average of selected predictions keeps this much of its previous value (paper: 0.9)
AVERAGE_KEEP = 0.9


def image_predictions(logits: torch.Tensor) -> torch.Tensor:
    """[N, C, ...] scores -> [N, (C - 1) * pixels] each image's softmax map of the classes but
    the background (class 0), flattened (detached)."""
    return logits.detach().softmax(1)[:, 1:].flatten(1)


def weighted_entropy(
    logits: torch.Tensor, e0: float, images: torch.Tensor, reweight: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """EATA's loss on a batch: the entropy of the pixels below `e0` in the kept `images` ([N]
    bool), each times 1 / exp(E - e0) when `reweight`, averaged over them; and the pixel mask."""
    entropy = pixel_entropy(logits)
    kept = images.view(-1, *[1] * (entropy.dim() - 1))
    mask = (entropy < e0) & kept
    if reweight:
        entropy = entropy * (e0 - entropy.detach()).exp()
    return entropy[mask].mean(), mask


@dataclass
class Redundancy:
    """EATA's diversity filter over images: a moving average of past selected predictions."""

    d_margin: float
    average: torch.Tensor | None = None

    def novel(self, predictions: torch.Tensor) -> torch.Tensor:
        """[N, D] image predictions -> [N] bool: cosine to the average below `d_margin`."""
        import torch.nn.functional as F

        if self.average is None:
            return predictions.new_ones(len(predictions), dtype=bool)
        similarity = F.cosine_similarity(predictions, self.average.unsqueeze(0), dim=1)
        return similarity < self.d_margin

    def update(self, selected: torch.Tensor) -> None:
        """Fold the mean of the selected images' [K, D] predictions in (none: unchanged)."""
        if len(selected) == 0:
            return
        new = selected.mean(0)
        if self.average is None:
            self.average = new
        else:
            self.average = AVERAGE_KEEP * self.average + (1 - AVERAGE_KEEP) * new


def pseudo_label_fisher(
    source: nn.Module, params: list[torch.Tensor], batch: torch.Tensor
) -> list[torch.Tensor]:
    """Squared gradients of the source model's per-pixel cross-entropy against its own argmax,
    one per parameter in `params` (the source's affine weights)."""
    import torch
    import torch.nn.functional as F

    logits = source(batch)
    loss = F.cross_entropy(logits, logits.detach().argmax(1))
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g**2 for p, g in zip(params, grads)]


@dataclass
class FisherAnchor:
    """EATA's regularizer on `params`: the diagonal Fisher F (the running mean of per-batch
    squared gradients over up to `batches` batches), measured on `source`, and the values the
    weights started from."""

    params: list[torch.Tensor]
    batches: int
    source: nn.Module | None = None
    initial: list[torch.Tensor] = field(init=False)
    total: list[torch.Tensor] = field(default_factory=list)
    count: int = 0

    def __post_init__(self) -> None:
        self.initial = [p.detach().clone() for p in self.params]

    def add(self, squares: list[torch.Tensor]) -> None:
        """Fold one batch's squared gradients in."""
        self.total = squares if not self.total else [t + s for t, s in zip(self.total, squares)]
        self.count += 1

    def measure(self, batch: torch.Tensor) -> None:
        """Fold in the source model's squared pseudo-label gradients on `batch`."""
        assert self.source is not None
        self.add(pseudo_label_fisher(self.source, affine_parameters(self.source), batch))

    def penalty(self) -> torch.Tensor:
        """sum_i F_i (w_i - w0_i)^2 over every element of the parameters."""
        pairs = zip(self.total, self.params, self.initial)
        terms = [(total / self.count * (p - w0) ** 2).sum() for total, p, w0 in pairs]
        return sum(terms[1:], terms[0])


class Eata(Adapter):
    """Online, per consecutive test batch: one Adam step on the reliable, non-redundant pixels'
    reweighted entropy plus the Fisher anchor (normalization affine weights only, batch
    statistics), then the batch's prediction by the updated model. After `predict`, `updates`
    counts steps and `redundant` the images the diversity filter dropped."""

    name = "eata"
    mode = "online"
    description = "EATA: reliable, non-redundant, reweighted entropy minimisation + Fisher anchor"
    needs_normalization = True
    needs_dense_task = True
    defaults = {
        "lr": 1e-3,
        "epochs": 1,
        "margin": 0.4,
        "d_margin": 0.9,
        "reweight": True,
        "fisher_alpha": 2000.0,
        "fisher_batches": 4,
    }
    #: the lr as tent's; the margin (E0 / ln C) around the paper's 0.4 (Niu et al., ICML 2022)
    search_space = {
        "adapter.lr": Range(1e-4, 1e-2, log=True),
        "adapter.margin": Range(0.2, 0.8),
    }
    updates: int = 0
    redundant: int = 0

    def check_settings(self) -> None:
        """Raise a FedbenchError naming the first setting out of range."""
        p = self.params
        for key in ("epochs", "fisher_batches"):
            if int(p[key]) < 0:
                raise FedbenchError(f"setting adapter.{key} must be at least 0")
        for key in ("lr", "fisher_alpha"):
            if not float(p[key]) >= 0:
                raise FedbenchError(f"setting adapter.{key} must be >= 0")
        if not float(p["margin"]) > 0:
            raise FedbenchError("setting adapter.margin must be > 0 (inf: every pixel reliable)")
        if not float(p["d_margin"]) > -1:
            raise FedbenchError("setting adapter.d_margin must be > -1 (inf: no image redundant)")
        if not isinstance(p["reweight"], bool):
            raise FedbenchError("setting adapter.reweight must be true or false")
        if p["reweight"] and math.isinf(float(p["margin"])):
            raise FedbenchError("setting adapter.margin = inf needs adapter.reweight = false")

    def check(self, method: type, model: nn.Module, task: Task) -> None:
        super().check(method, model, task)
        self.check_settings()

    def step(
        self,
        model: nn.Module,
        batch: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        redundancy: Redundancy,
        anchor: FisherAnchor | None,
    ) -> bool:
        """One EATA update on a batch (`anchor` None: ETA's). Returns whether it stepped."""
        optimizer.zero_grad(set_to_none=True)
        logits = model(batch)
        e0 = float(self.params["margin"]) * math.log(logits.shape[1])
        predictions = image_predictions(logits)
        novel = redundancy.novel(predictions)
        self.redundant += int((~novel).sum())
        loss, mask = weighted_entropy(logits, e0, novel, bool(self.params["reweight"]))
        counted = mask.flatten(1).any(1)
        redundancy.update(predictions[counted])
        if not bool(counted.any()):
            return False
        if anchor is not None and anchor.count > 0:
            loss = loss + float(self.params["fisher_alpha"]) * anchor.penalty()
        loss.backward()
        optimizer.step()
        return True

    def predict(
        self, federation: TrainedFederation, images: UnlabeledImages, ctx: AdaptContext
    ) -> torch.Tensor:
        import torch

        self.check_settings()
        p = self.params
        torch.manual_seed(ctx.seed)
        model = use_batch_statistics(federation.model(federation.global_state)).train()
        params = affine_parameters(model)
        optimizer = torch.optim.Adam(params, lr=float(p["lr"]))
        redundancy, anchor = Redundancy(float(p["d_margin"])), None
        if float(p["fisher_alpha"]) > 0:  # F on a copy of the global model as received
            anchor = FisherAnchor(params, int(p["fisher_batches"]), copy.deepcopy(model))
        self.updates = self.redundant = 0
        epochs = int(p["epochs"])
        for epoch in range(max(epochs, 1)):
            outputs = []
            for index, batch in enumerate(online_batches(images, ctx.batch_size)):
                batch = batch.to(federation.device)
                if epoch < epochs:
                    if anchor is not None and epoch == 0 and index < anchor.batches:
                        anchor.measure(batch)
                    self.updates += self.step(model, batch, optimizer, redundancy, anchor)
                with torch.no_grad():
                    outputs.append(model(batch).float().cpu())
        return torch.cat(outputs)


@hookimpl
def fedbench_adapters() -> list[type]:
    return [Eata]
