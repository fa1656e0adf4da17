"""Adapter `dua`: DUA, Mirza, Micorek, Possegger and Bischof, "The Norm Must Go On: Dynamic
Unsupervised Domain Adaptation by Normalization", CVPR 2022.

Variant implemented, on the federation's global model, online over the unseen site's images in
their order, without a gradient: each BatchNorm layer's running mean and variance move towards
the statistics of the incoming image, then the image is predicted in eval mode with the updated
running statistics. Per image (the t-th of the stream, t = 0, 1, ...):
- `augmentations` (paper: 64) augmented copies of it pass through the model with only the
  BatchNorm layers in train mode, each with momentum m_t = max(m_0 * omega^t, m_min) (paper: m_0
  = `momentum` 0.1, omega = `decay` 0.94, m_min = `min_momentum` 0.005), so that every layer
  takes running = (1 - m_t) * running + m_t * the copies' statistics (PyTorch's update: the
  variance unbiased) and the deeper layers see activations normalised by the copies' own
  statistics, as in a training pass; the outputs are discarded;
- the image alone is then predicted in eval mode.
(This max form is the paper's schedule as fedbench's issue 28 gives it; the authors' release sets
m_0 * omega^(t+1) + m_min instead, with the paper's settings within m_min of this one.)
t counts images over all passes: the decay goes on from pass to pass, where `epochs` passes the
stream (fedbench.adapter.ADAPTATION_EPOCHS per preset, as every adapter's; the last one returned;
0: predict without updating, the `none` adapter).
Augmentations, chosen safe for segmentation (they only feed statistics, so they need not be
inverted): each copy is flipped left-right with probability 1/2 (`flip`), and its intensities
are changed to x * (1 + a) + b * std(x), a and b uniform in [-intensity, intensity] (default
0.1, as `memo` here). The release's random crops and quarter turns are left out: a crop
resized to the input's size changes the anatomy's scale, and a turned slice shows an anatomy in
an orientation no site's images have (a left-right flip keeps it plausible).
Only BatchNorm layers that keep running statistics are updated (GroupNorm and InstanceNorm have
none); a model with none is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbench.adapter import AdaptContext, Adapter, TrainedFederation
from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.models import running_batch_norms
from fedbench.tuning import Range

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedbench.data import UnlabeledImages
    from fedbench.task import Task


def momentum_at(t: int, start: float, decay: float, floor: float) -> float:
    """DUA's momentum for the t-th image (t = 0, 1, ...): max(start * decay^t, floor)."""
    return max(start * decay**t, floor)


def augment(
    image: torch.Tensor, count: int, intensity: float, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """[C, H, W] -> [count, C, H, W]: copies, each left-right flipped with probability 1/2 (when
    `flip`) and with a random gain and offset (scaled by the image's std) up to `intensity`."""
    import torch

    flips = (torch.rand(count, generator=generator) < (0.5 if flip else 0.0)).tolist()
    draws = (torch.rand(count, 2, generator=generator) * 2 - 1) * intensity
    draws = draws.to(image.device, image.dtype)
    spread = image.std() if image.numel() > 1 else image.new_zeros(())
    copies = [
        (image.flip(-1) if flip else image) * (1 + draws[i, 0]) + draws[i, 1] * spread
        for i, flip in enumerate(flips)
    ]
    return torch.stack(copies)


def update_statistics(
    model: nn.Module, norms: list[nn.Module], copies: torch.Tensor, momentum: float
) -> None:
    """One forward pass of `copies` with the BatchNorm layers `norms` in train mode at
    `momentum` (the rest in eval mode): their running statistics move, nothing else."""
    import torch

    model.eval()
    for norm in norms:
        norm.momentum = momentum
        norm.train()
    with torch.no_grad():
        model(copies)
    model.eval()


class Dua(Adapter):
    """Online, per image: BatchNorm running statistics updated from augmented copies with a
    decaying momentum, then the image predicted in eval mode; no gradient, no parameter moves.
    After `predict`, `momenta` lists the momentum each update used."""

    name = "dua"
    mode = "online"
    description = "DUA: BatchNorm running statistics from augmented test images, decaying momentum"
    needs_normalization = True
    needs_running_statistics = True
    #: its augmentations flip and re-scale images: segmentation inputs
    needs_dense_task = True
    defaults = {
        "epochs": 1,
        "momentum": 0.1,
        "decay": 0.94,
        "min_momentum": 0.005,
        "augmentations": 64,
        "intensity": 0.1,
        "flip": True,
    }
    #: the decay around the paper's 0.94 (Mirza et al., CVPR 2022); the copies set the compute
    search_space = {"adapter.decay": Range(0.8, 0.99)}

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        self.momenta: list[float] = []

    def check_settings(self) -> None:
        """Raise a FedbenchError naming the first setting out of range."""
        p = self.params
        if int(p["epochs"]) < 0:
            raise FedbenchError("setting adapter.epochs must be at least 0")
        if int(p["augmentations"]) < 1:
            raise FedbenchError("setting adapter.augmentations must be at least 1")
        for key in ("momentum", "decay", "min_momentum"):
            if not 0 <= float(p[key]) <= 1:
                raise FedbenchError(f"setting adapter.{key} must be in [0, 1]")
        if not float(p["intensity"]) >= 0:
            raise FedbenchError("setting adapter.intensity must be >= 0")
        if not isinstance(p["flip"], bool):
            raise FedbenchError("setting adapter.flip must be true or false")

    def check(self, method: type, model: nn.Module, task: Task) -> None:
        super().check(method, model, task)
        self.check_settings()

    def predict(
        self, federation: TrainedFederation, images: UnlabeledImages, ctx: AdaptContext
    ) -> torch.Tensor:
        import torch

        self.check_settings()
        p = self.params
        generator = torch.Generator().manual_seed(ctx.seed)
        model = federation.model(federation.global_state).eval()
        norms = running_batch_norms(model)
        momentum = (float(p["momentum"]), float(p["decay"]), float(p["min_momentum"]))
        copies_of = (int(p["augmentations"]), float(p["intensity"]), bool(p["flip"]))
        self.momenta = []
        epochs = int(p["epochs"])
        for epoch in range(max(epochs, 1)):
            outputs = []
            for image in images.inputs:
                image = image.to(federation.device)
                if epoch < epochs:
                    self.momenta.append(momentum_at(len(self.momenta), *momentum))
                    copies = augment(image, *copies_of, generator)
                    update_statistics(model, norms, copies, self.momenta[-1])
                with torch.no_grad():
                    outputs.append(model(image.unsqueeze(0)).float().cpu())
        return torch.cat(outputs)


@hookimpl
def fedbench_adapters() -> list[type]:
    return [Dua]
