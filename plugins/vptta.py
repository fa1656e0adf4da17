"""Adapter `vptta`: VPTTA, Chen, Pan, Ye, Lu and Xia, "Each Test Image Deserves A Specific
Prompt: Continual Test-Time Adaptation for 2D Medical Image Segmentation", CVPR 2024.

Variant implemented, on the federation's global model, frozen, online over the stream, one
image at a time (a batch of one by design: each image gets its own prompt):
- the prompt P [C, s, s] multiplies the amplitude of the image's spectrum by 1 + P in a
  centred square of side s, the phase kept (`apply_prompt`). The paper's prompt multiplies the
  amplitude and starts at one; P is it minus one, so a zero prompt leaves the image exactly
  unchanged (same Adam steps). s = `ratio` * the shorter side (paper 0.01: 5 of 512 pixels, 3
  of 384), at least 1 (at 32 or 64 pixels the zero frequency alone: a gain on the image's
  mean), odd: symmetric about the zero frequency, so no frequency outside it changes;
- it starts from a memory bank of (key, prompt) pairs of earlier images, key = the amplitude in
  the square: the prompts of the K = `neighbours` (paper 16) most cosine-similar keys, softmax
  weighted (`PromptBank`), once there are K; before, zero. The bank keeps `bank_size` (paper 40);
- one Adam step (betas 0.9, 0.99, one optimizer over the stream, as the release) on the BatchNorm
  alignment loss (`statistics_term`, mean over layers): the prompted image's per-channel means
  and standard deviations against the statistics each layer normalises with, the source
  model's running ones mixed by the paper's warm-up with the image's own (`warm_moment`, paper
  warm_n 5; 0: the running statistics alone);
- the image is predicted with the trained prompt; its key and prompt go into the bank.
The bank, optimizer and warm-up count carry over between images and passes: `epochs` passes,
one iteration per image per pass (fedbench.adapter.ADAPTATION_EPOCHS, as every adapter's; the
last returned; 0: no prompt, the `none` adapter). lr 0.05 as the release's fundus (optic disc
and cup) setting (polyps 0.01). A model without BatchNorm running statistics is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
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

#: softmax temperature of the bank's similarity weights (the release's)
TEMPERATURE = 0.2


def prompt_side(height: int, width: int, ratio: float) -> int:
    """The prompt square's side: ratio * the shorter side, at least 1, rounded down to odd."""
    side = max(1, int(min(height, width) * ratio))
    return side if side % 2 else side - 1


def square(height: int, width: int, side: int) -> tuple[slice, slice]:
    """Rows and columns of the centred square in the fftshift-ed spectrum."""
    top, left = height // 2 - side // 2, width // 2 - side // 2
    return slice(top, top + side), slice(left, left + side)


def apply_prompt(images: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] images with the amplitude of their spectrum times 1 + `prompt` ([C, s, s])
    in the centred square, the phase unchanged: x + Re(ifft2(fft2(x) * P))."""
    import torch

    height, width = images.shape[-2:]
    rows, cols = square(height, width, prompt.shape[-1])
    full = prompt.new_zeros(prompt.shape[0], height, width)
    full[:, rows, cols] = prompt
    factor = torch.fft.ifftshift(full, dim=(-2, -1))
    return images + torch.fft.ifft2(torch.fft.fft2(images) * factor).real


def low_frequency_key(image: torch.Tensor, side: int) -> torch.Tensor:
    """[C, H, W] image -> the amplitude of its spectrum in the centred square, flattened."""
    import torch

    rows, cols = square(*image.shape[-2:], side)
    amplitude = torch.fft.fftshift(torch.fft.fft2(image).abs(), dim=(-2, -1))
    return amplitude[:, rows, cols].flatten()


@dataclass
class PromptBank:
    """The memory bank: the latest `size` (key, prompt) pairs, first in, first out."""

    size: int
    neighbours: int
    keys: list[torch.Tensor] = field(default_factory=list)
    prompts: list[torch.Tensor] = field(default_factory=list)

    def ready(self) -> bool:
        """Whether it holds the K entries a recall needs."""
        return len(self.keys) >= self.neighbours

    def recall(self, key: torch.Tensor) -> torch.Tensor:
        """The K prompts with the keys most cosine-similar to `key`, softmax-weighted."""
        import torch
        import torch.nn.functional as F

        keys = torch.stack(self.keys)
        similarity = F.cosine_similarity(keys, key.unsqueeze(0), dim=1)
        top = similarity.topk(self.neighbours)
        weights = (top.values / TEMPERATURE).softmax(0)
        chosen = torch.stack(self.prompts)[top.indices]
        return (weights.view(-1, *[1] * (chosen.dim() - 1)) * chosen).sum(0)

    def store(self, key: torch.Tensor, prompt: torch.Tensor) -> None:
        """Add a pair, dropping the oldest beyond `size`."""
        self.keys.append(key.detach())
        self.prompts.append(prompt.detach().clone())
        if len(self.keys) > self.size:
            del self.keys[0], self.prompts[0]


def warm_moment(t: int, warm_n: float) -> float:
    """The weight of the image's own statistics at the t-th adapted image (t = 1, 2, ...):
    1 / (sqrt(t) / warm_n + 1), the paper's warm-up; 0 when warm_n is 0."""
    return 0.0 if warm_n <= 0 else 1 / (math.sqrt(t) / warm_n + 1)


@dataclass
class Alignment:
    """Shared by the patched BatchNorm layers: the warm-up weight of the input's own statistics
    and, while `recording`, each layer's alignment term."""

    moment: float = 0.0
    recording: bool = False
    terms: list[torch.Tensor] = field(default_factory=list)


def statistics_term(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """mean |mu - mean| + mean |sigma - sqrt(var)|, mu and sigma each image's per-channel mean
    and standard deviation (unbiased but over one pixel) over space, over channels and images."""
    dims = tuple(range(2, x.dim()))
    sigma = x.std(dims, correction=int(math.prod(x.shape[2:]) > 1))
    return (x.mean(dims) - mean).abs().mean() + (sigma - var.sqrt()).abs().mean()


def aligned_batch_norm(
    module: nn.modules.batchnorm._BatchNorm, alignment: Alignment, x: torch.Tensor
) -> torch.Tensor:
    """BatchNorm with the running statistics mixed with the input's own (the warm-up), and the
    alignment term recorded."""
    import torch.nn.functional as F

    mean, var = module.running_mean, module.running_var
    if alignment.moment > 0:
        dims, own, m = [0, *range(2, x.dim())], x.detach(), alignment.moment
        mean = m * own.mean(dims) + (1 - m) * mean
        var = m * own.var(dims, correction=int(own.numel() > own.shape[1])) + (1 - m) * var
    if alignment.recording:
        alignment.terms.append(statistics_term(x, mean, var))
    return F.batch_norm(x, mean, var, module.weight, module.bias, False, 0.0, module.eps)


def use_alignment(model: nn.Module, alignment: Alignment) -> None:
    """Patch every BatchNorm with running statistics to `aligned_batch_norm`."""
    for module in running_batch_norms(model):
        module.forward = partial(aligned_batch_norm, module, alignment)  # type: ignore[method-assign]


@dataclass
class Stream:
    """What carries over the stream: the frozen model, the prompt, its optimizer, the bank."""

    model: nn.Module
    prompt: torch.Tensor
    optimizer: torch.optim.Optimizer
    bank: PromptBank
    alignment: Alignment


class VPTTA(Adapter):
    """Online, carried over the stream (the memory bank, the optimizer, the warm-up), per image:
    a prompt from the bank, one Adam step on the BatchNorm alignment loss, the prediction with
    it, the prompt stored; the model frozen. After `predict`, `adapted` counts the steps."""

    name = "vptta"
    mode = "online"
    description = "VPTTA: per-image low-frequency amplitude prompt from a memory bank, BN alignment"
    needs_normalization = True
    needs_running_statistics = True
    #: its prompts act on images' spectra: segmentation inputs
    needs_dense_task = True
    defaults = {
        "lr": 0.05,
        "epochs": 1,
        "ratio": 0.01,
        "bank_size": 40,
        "neighbours": 16,
        "warm_n": 5.0,
    }
    #: Adam's lr around the release's 0.05 (fundus) and 0.01 (polyps); epochs are the preset's
    search_space = {"adapter.lr": Range(1e-3, 1e-1, log=True)}
    adapted: int = 0

    def check_settings(self) -> None:
        """Raise a FedbenchError naming the first setting out of range."""
        p = self.params
        if int(p["epochs"]) < 0:
            raise FedbenchError("setting adapter.epochs must be at least 0")
        for key in ("bank_size", "neighbours"):
            if int(p[key]) < 1:
                raise FedbenchError(f"setting adapter.{key} must be at least 1")
        if int(p["neighbours"]) > int(p["bank_size"]):
            raise FedbenchError("setting adapter.neighbours must be at most adapter.bank_size")
        for key in ("lr", "warm_n"):
            if not float(p[key]) >= 0:
                raise FedbenchError(f"setting adapter.{key} must be >= 0")
        if not 0 < float(p["ratio"]) <= 1:
            raise FedbenchError("setting adapter.ratio must be in (0, 1]")

    def check(self, method: type, model: nn.Module, task: Task) -> None:
        super().check(method, model, task)
        if getattr(task, "spatial_dims", 2) != 2:
            raise FedbenchError(
                "adapter 'vptta' prompts a 2D image's amplitude spectrum (its paper segments 2D "
                "images); this task's samples are volumes"
            )
        self.check_settings()

    def adapt_and_predict(self, s: Stream, image: torch.Tensor) -> torch.Tensor:
        """The [1, C, H, W] output for one [C, H, W] image with its trained prompt."""
        import torch

        key = low_frequency_key(image, s.prompt.shape[-1])
        with torch.no_grad():
            s.prompt.copy_(s.bank.recall(key) if s.bank.ready() else torch.zeros_like(s.prompt))
        self.adapted += 1
        s.alignment.moment = warm_moment(self.adapted, float(self.params["warm_n"]))
        s.alignment.recording = True
        s.optimizer.zero_grad(set_to_none=True)
        s.model(apply_prompt(image.unsqueeze(0), s.prompt))
        torch.stack(s.alignment.terms).mean().backward()  # the mean over layers
        s.optimizer.step()
        s.alignment.recording = False
        s.alignment.terms.clear()
        with torch.no_grad():
            output = s.model(apply_prompt(image.unsqueeze(0), s.prompt))
        s.bank.store(key, s.prompt)
        return output.float().cpu()

    def predict(
        self, federation: TrainedFederation, images: UnlabeledImages, ctx: AdaptContext
    ) -> torch.Tensor:
        import torch

        self.check_settings()
        p = self.params
        torch.manual_seed(ctx.seed)
        model = federation.model(federation.global_state).eval().requires_grad_(False)
        channels, height, width = images.inputs.shape[1:]
        side = prompt_side(height, width, float(p["ratio"]))
        prompt = torch.zeros(channels, side, side, device=federation.device, requires_grad=True)
        optimizer = torch.optim.Adam([prompt], lr=float(p["lr"]), betas=(0.9, 0.99))
        bank = PromptBank(int(p["bank_size"]), int(p["neighbours"]))
        stream = Stream(model, prompt, optimizer, bank, Alignment())
        use_alignment(model, stream.alignment)
        self.adapted = 0
        epochs = int(p["epochs"])
        for epoch in range(max(epochs, 1)):
            outputs = []
            for image in images.inputs:
                image = image.to(federation.device)
                if epoch < epochs:
                    outputs.append(self.adapt_and_predict(stream, image))
                else:
                    with torch.no_grad():
                        outputs.append(model(image.unsqueeze(0)).float().cpu())
        return torch.cat(outputs)


@hookimpl
def fedbench_adapters() -> list[type]:
    return [VPTTA]
