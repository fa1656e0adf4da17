"""HarmoFL (Jiang, Wang and Dou, "HarmoFL: Harmonizing Local and Global Drifts in Federated
Learning on Heterogeneous Medical Images", AAAI 2022): FedAvg whose clients (a) train on images
whose Fourier amplitude is normalized to the client's own average amplitude (local drift) and
(b) take weight-perturbed steps that seek flat optima (global drift).

Variant, every client in every round, the server a sample-weighted FedAvg of every key:
  (a) amplitude normalization (`method.amplitude`, on by default). Each training batch x, of
      shape [B, C, H, W], is transformed per image and channel by a 2-D FFT over (H, W) into an
      amplitude |F(x)| and a phase. Client k keeps one amplitude A_k [C, H, W], a running mean
      of its batches' mean amplitude: A_k = batch mean on its first batch, then
          A_k <- (1 - m) * A_k + m * mean_b |F(x_b)|          (m = `method.amplitude_momentum`),
      updated before the batch is normalized. Each image becomes real(F^-1(A * exp(i phase)))
      where A is A_k inside the low-frequency box |f_y| <= floor(L * H), |f_x| <= floor(L * W)
      and its own amplitude outside (L = `method.amplitude_band`; the default 0, as released,
      replaces only the zero frequency; 0.5 normalizes the whole spectrum). A_k is kept across
      rounds on the client (in `state_dict`), never sent: nothing but the model goes up.
  (b) weight perturbation (`method.rho`, the paper's alpha). At each step with gradient g of the
      loss at w over the trainable parameters, the weights move to w + rho * g / (||g|| + 1e-12),
      ||g|| the 2-norm over all of them; the gradient there replaces g, the weights return to w
      exactly, and the optimizer (`train.optimizer`, fresh each round) steps with it. The second
      forward pass leaves normalization statistics as the first one set them. rho = 0 skips it.
With `method.rho=0` and `method.amplitude=false` this is FedAvg bit for bit.

Differences from the released code (med-air/HarmoFL), read, not copied: there the amplitude
buffer is a model buffer that the first aggregation averages over the clients and then freezes
(all clients then share one federation-wide amplitude), its helper is called so that only the
zero-frequency amplitude is replaced (the default `amplitude_band=0` here), and the base
optimizers carry weight decay 1e-4. Here A_k never leaves client k and keeps its momentum
update every round.

Not expressible here: the released model applies the normalization in its forward pass, so it
also normalizes test images. fedbench scores `personalized_state` with the plain network on raw
images, so HarmoFL here normalizes training inputs only; the scored model sees raw images.
Defaults: rho 0.05 (the paper's), amplitude on, momentum 0.1 and band 0 (as released). On the
embedded synthetic data (default preset, seed 0) the whole-spectrum band 0.5 scored 0.689 inside
against 0.717 with the amplitude off."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import LocalContext, Method, State

if TYPE_CHECKING:
    import torch
    from torch import nn

EPS = 1e-12


def update_amplitude(
    running: torch.Tensor | None, batch: torch.Tensor, momentum: float
) -> torch.Tensor:
    """The client's new running amplitude from a batch [B, C, H, W]: the batch's mean amplitude
    at first, then (1 - momentum) * running + momentum * that mean."""
    import torch

    mean = torch.fft.fft2(batch, dim=(-2, -1)).abs().mean(0)
    return mean if running is None else (1.0 - momentum) * running + momentum * mean


def band_mask(height: int, width: int, band: float, device: torch.device) -> torch.Tensor:
    """[H, W] True at the frequencies |f_y| <= floor(band * H), |f_x| <= floor(band * W)."""
    import math

    import torch

    fy = (torch.fft.fftfreq(height, device=device) * height).round().abs()
    fx = (torch.fft.fftfreq(width, device=device) * width).round().abs()
    return (fy <= math.floor(band * height))[:, None] & (fx <= math.floor(band * width))[None, :]


def normalize_amplitude(batch: torch.Tensor, target: torch.Tensor, band: float) -> torch.Tensor:
    """Each image of `batch` [B, C, H, W] with its phase kept and its amplitude replaced by
    `target` [C, H, W] inside the frequency band (see `band_mask`)."""
    import torch

    spectrum = torch.fft.fft2(batch, dim=(-2, -1))
    amplitude = spectrum.abs()
    mask = band_mask(batch.shape[-2], batch.shape[-1], band, batch.device)
    mixed = torch.where(mask, target.to(amplitude.dtype), amplitude)
    rebuilt = torch.polar(mixed, spectrum.angle())
    return torch.fft.ifft2(rebuilt, dim=(-2, -1)).real.to(batch.dtype)


def perturbed_gradients(model: nn.Module, closure: Callable[[], torch.Tensor], rho: float) -> None:
    """Replace the gradients g (already computed at w) of `model`'s parameters by the gradient of
    `closure()` at w + rho * g / (||g|| + 1e-12); weights and buffers end as they were."""
    import torch

    from fedbench.errors import Diverged

    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm(2) for p in params]))
    scale = rho / (norm + EPS)
    origins = [p.detach().clone() for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    with torch.no_grad():
        for p in params:
            p.add_(p.grad * scale)
            p.grad = None
    loss = closure()
    if not torch.isfinite(loss):
        raise Diverged(f"loss became {loss.item()} at the perturbed weights")
    loss.backward()
    with torch.no_grad():
        for p, origin in zip(params, origins, strict=True):
            p.copy_(origin)
        for buffer, saved in buffers:
            buffer.copy_(saved)


def setting(config: dict[str, Any], key: str) -> Any:
    """The method setting `key`, from the run's config or else HarmoFL's default."""
    return config.get("method", {}).get(key, HarmoFL.defaults[key])


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class HarmoFL(Method):
    """FedAvg + per-client amplitude normalization of training images + perturbed steps."""

    name = "harmofl"
    description = "HarmoFL: amplitude-normalized training images + weight-perturbed (flat) steps"
    defaults = {"rho": 0.05, "amplitude": True, "amplitude_momentum": 0.1, "amplitude_band": 0.0}

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        self.amplitudes: list[torch.Tensor | None] = [None] * num_clients

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        rho, on = setting(config, "rho"), setting(config, "amplitude")
        momentum, band = setting(config, "amplitude_momentum"), setting(config, "amplitude_band")
        if not is_number(rho) or not rho >= 0:
            raise FedbenchError(f"method.rho must be a number >= 0, got {rho!r}")
        if not isinstance(on, bool):
            raise FedbenchError(f"method.amplitude must be true or false, got {on!r}")
        if not is_number(momentum) or not 0 < momentum <= 1:
            raise FedbenchError(
                f"method.amplitude_momentum must be a number in (0, 1], got {momentum!r}"
            )
        if not is_number(band) or not 0 <= band <= 0.5:
            raise FedbenchError(f"method.amplitude_band must be a number in [0, 0.5], got {band!r}")

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """`train.local_epochs` epochs of perturbed steps on amplitude-normalized batches; sends
        nothing but the model."""
        import torch

        from fedbench.errors import Diverged

        model.train()
        optimizer = ctx.make_optimizer(model.parameters())
        rho = float(self.params["rho"])
        for _ in range(int(ctx.train["local_epochs"])):
            for raw, targets in ctx.batches():
                inputs = self.harmonized(ctx.client, raw)

                def closure(x: torch.Tensor = inputs, y: torch.Tensor = targets) -> torch.Tensor:
                    return self.objective(model, ctx, x, y)

                optimizer.zero_grad(set_to_none=True)
                loss = closure()
                if not torch.isfinite(loss):
                    raise Diverged(f"loss became {loss.item()} in local training")
                loss.backward()
                if rho > 0.0:
                    perturbed_gradients(model, closure, rho)
                self.adjust_gradients(model, ctx)
                optimizer.step()
                ctx.steps += 1
        return {}

    def objective(
        self, model: nn.Module, ctx: LocalContext, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """The task loss plus `local_penalty` (none for HarmoFL), as `train_steps` computes it."""
        with ctx.autocast():  # train.precision
            loss = ctx.task.loss(model(inputs), targets)
            term = self.local_penalty(model, ctx.global_state)
            return loss if term is None else loss + term

    def harmonized(self, client: int, batch: torch.Tensor) -> torch.Tensor:
        """`batch` normalized to client's running amplitude (updated with it first), or `batch`
        itself when `method.amplitude` is off."""
        import torch

        if not self.params["amplitude"]:
            return batch
        if batch.dim() != 4:
            raise FedbenchError(
                "method.amplitude needs image batches [N, C, H, W], got inputs of shape "
                f"{tuple(batch.shape)}; set method.amplitude=false for this dataset"
            )
        with torch.no_grad():
            momentum = float(self.params["amplitude_momentum"])
            running = update_amplitude(self.amplitudes[client], batch, momentum)
            self.amplitudes[client] = running
            return normalize_amplitude(batch, running, float(self.params["amplitude_band"]))

    def state_dict(self) -> dict[str, Any]:
        return {"amplitudes": [None if a is None else a.clone() for a in self.amplitudes]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.amplitudes = [None if a is None else a.clone() for a in state["amplitudes"]]


@hookimpl
def fedbench_methods() -> list[type]:
    return [HarmoFL]
