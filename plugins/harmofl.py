"""HarmoFL (Jiang, Wang and Dou, "HarmoFL: Harmonizing Local and Global Drifts in Federated
Learning on Heterogeneous Medical Images", AAAI 2022): FedAvg whose network normalizes the Fourier
amplitude of every input image to one federation-wide amplitude (local drift) and whose clients
take weight-perturbed steps that seek flat optima (global drift).

Variant, the server a sample-weighted FedAvg of every key:
  (a) amplitude normalization (`method.amplitude`, on by default), as the release's AmpNorm
      layer: the network HarmoFL trains and scores (`HarmoFL.network`, which the engine builds for
      every run, so each site's model and an unseen site's model have it too) is the configured
      one behind a layer holding an amplitude buffer A [C, H, W] (C the task's input channels,
      H = W = `data.size`, which the setting therefore needs). Its forward pass, in training and
      at test time alike, takes each image and channel of a batch [B, C, H, W] by a 2-D FFT over
      (H, W) to an amplitude and a phase, and returns real(F^-1(A' * exp(i phase))), A' being A
      inside the low-frequency box |f_y| <= floor(L * H), |f_x| <= floor(L * W) and the image's
      own amplitude outside (L = `method.amplitude_band`; the default 0, as released, replaces
      only the zero frequency; 0.5 the whole spectrum). The forward pass never changes A.
      Until the first aggregation, client k sets A to its running amplitude, updated before each
      of its batches x: A_k = mean_b |F(x_b)| on its first batch, then
          A_k <- (1 - m) * A_k + m * mean_b |F(x_b)|          (m = `method.amplitude_momentum`).
      A is a model buffer, so the server averages it as FedAvg averages buffers and the bytes
      count it each way, every round. The first aggregation fixes it (the release's fix_amp):
      clients no longer update it, the server keeps it, and training, each site's model and the
      model an unseen site receives all normalize with that one federation-wide amplitude.
  (b) weight perturbation (`method.rho`, the paper's alpha). At each step with gradient g of the
      loss at w over the trainable parameters, the weights move to w + rho * g / (||g|| + 1e-12),
      ||g|| the 2-norm over all of them; the gradient there replaces g, the weights return to w
      exactly, and the optimizer (`train.optimizer`, fresh each round) steps with it. The second
      forward pass leaves normalization statistics as the first one set them. rho = 0 skips it.
With `method.rho=0` and `method.amplitude=false` this is FedAvg bit for bit (the network is then
the configured one).

Differences from the released code (med-air/HarmoFL), read, not copied: its server weighs the
clients equally (the same as by samples there, as it cuts every client's training set to the
smallest one's unless --imbalance); its clients update the buffer at every forward pass of the
first round, the perturbed one included, here once per batch; its Cython helper declares the
momentum a C int, so under its pinned Cython 0.29 the 0.1 arrives as 0 and the running amplitude
is in effect the first batch's (`amplitude_momentum=0` does that here; the default 0.1 keeps the
paper's running mean); its base optimizers carry weight decay 1e-4. Remaining choice: no client
keeps an amplitude of its own after the first aggregation (as released), so a client that first
takes part later (`train.clients_per_round`) trains with the federation's amplitude throughout.
Defaults: rho 0.05 (the paper's), amplitude on, momentum 0.1 and band 0."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import ClientUpdate, LocalContext, Method, State
from fedbench.tuning import Range

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedbench.task import Task

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


def check_images(batch: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Refuse, naming the settings, inputs that are not images of the amplitude buffer's shape."""
    if batch.dim() != 4:
        raise FedbenchError(
            "method.amplitude needs image batches [N, C, H, W], got inputs of shape "
            f"{tuple(batch.shape)}; set method.amplitude=false for this dataset"
        )
    if tuple(batch.shape[1:]) != tuple(shape):
        raise FedbenchError(
            f"method.amplitude: the amplitude buffer is {tuple(shape)} (the task's channels and "
            f"data.size), the images are {tuple(batch.shape[1:])}"
        )


@functools.cache
def harmonized_class() -> type[nn.Module]:
    """The network behind HarmoFL's amplitude normalization, made on first use (listing plugins
    imports no torch); the module's `Harmonized` attribute names it, so it pickles."""
    import torch
    from torch import nn

    class Harmonized(nn.Module):
        """`network` on images normalized to the `amplitude` buffer (the release's AmpNorm, the
        first layer of its networks, so test images are normalized too); the forward pass never
        changes the buffer: HarmoFL's local update sets it before the first aggregation."""

        def __init__(self, network: nn.Module, shape: tuple[int, int, int], band: float) -> None:
            super().__init__()
            self.register_buffer("amplitude", torch.zeros(shape))
            self.network = network
            self.band = band

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            check_images(x, tuple(self.amplitude.shape))
            with torch.autocast(x.device.type, enabled=False):  # the FFTs in the input's dtype
                x = normalize_amplitude(x, self.amplitude, self.band)
            return self.network(x)

    Harmonized.__module__, Harmonized.__qualname__ = __name__, "Harmonized"
    return Harmonized


def __getattr__(name: str) -> Any:
    if name == "Harmonized":
        return harmonized_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def harmonized(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The amplitude normalization layer of `model` (chosen by type) and its name, or None."""
    kind = harmonized_class()
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, kind)]
    return found[0] if found else None


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


def image_size(config: dict[str, Any]) -> int | None:
    """`data.size`, the side of the square images, when the dataset sets one."""
    size = config.get("data", {}).get("size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


class HarmoFL(Method):
    """FedAvg + amplitude normalization inside the network + weight-perturbed steps."""

    name = "harmofl"
    description = "HarmoFL: amplitude normalization in the network + weight-perturbed (flat) steps"
    defaults = {"rho": 0.05, "amplitude": True, "amplitude_momentum": 0.1, "amplitude_band": 0.0}
    #: a decade either side of the paper's perturbation radius 0.05; the amplitude
    #: settings are the release's variant, not tuned
    search_space = {"method.rho": Range(5e-3, 0.5, log=True)}

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        self.amplitude_key: str | None = None
        #: server side: the release's fix_amp, set by the first aggregation (round 1); a client
        #: knows it from the round
        self.fixed = False

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        rho, on = setting(config, "rho"), setting(config, "amplitude")
        momentum, band = setting(config, "amplitude_momentum"), setting(config, "amplitude_band")
        if not is_number(rho) or not rho >= 0:
            raise FedbenchError(f"method.rho must be a number >= 0, got {rho!r}")
        if not isinstance(on, bool):
            raise FedbenchError(f"method.amplitude must be true or false, got {on!r}")
        if not is_number(momentum) or not 0 <= momentum <= 1:
            raise FedbenchError(
                f"method.amplitude_momentum must be a number in [0, 1], got {momentum!r}"
            )
        if not is_number(band) or not 0 <= band <= 0.5:
            raise FedbenchError(f"method.amplitude_band must be a number in [0, 0.5], got {band!r}")
        if on and image_size(config) is None:
            raise FedbenchError(
                "method.amplitude needs data.size (the side of the square images), which sizes "
                "the amplitude buffer; this dataset sets none: set method.amplitude=false"
            )

    @classmethod
    def network(cls, model: nn.Module, task: Task, config: dict[str, Any]) -> nn.Module:
        """`model` behind the amplitude normalization (buffer [C, data.size, data.size], zero
        until the first round sets it) when `method.amplitude` is on, else `model` itself."""
        if not setting(config, "amplitude"):
            return model
        channels, size = getattr(task, "in_channels", None), image_size(config)
        if not isinstance(channels, int) or size is None:
            raise FedbenchError(
                "method.amplitude needs an image task (input channels) and data.size; "
                "set method.amplitude=false for this dataset"
            )
        band = float(setting(config, "amplitude_band"))
        return harmonized_class()(model, (channels, size, size), band)

    def shared_keys(self, model: nn.Module) -> list[str]:
        """Every key, as in FedAvg, the amplitude buffer's included (its key is noted)."""
        layer = harmonized(model)
        if layer is None and self.params["amplitude"]:
            raise FedbenchError(
                "method.amplitude needs the network HarmoFL.network builds (the configured one "
                "behind the amplitude normalization); this model has no such layer"
            )
        if layer is not None:  # "amplitude" when the layer is the whole network
            self.amplitude_key = f"{layer[0]}.amplitude".lstrip(".")
        return super().shared_keys(model)

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """`train.local_epochs` epochs of perturbed steps (the network normalizes each batch's
        amplitude); before the first aggregation each batch first updates the client's running
        amplitude, which the layer then holds. Sends nothing but the model."""
        import torch

        from fedbench.errors import Diverged

        model.train()
        optimizer = ctx.make_optimizer(model.parameters())
        rho = float(self.params["rho"])
        layer = None if ctx.round > 1 else harmonized(model)
        running: torch.Tensor | None = None
        for _ in range(int(ctx.train["local_epochs"])):
            for inputs, targets in ctx.batches():
                if layer is not None:
                    running = self.learn_amplitude(layer[1], inputs, running)

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

    def learn_amplitude(
        self, layer: nn.Module, batch: torch.Tensor, running: torch.Tensor | None
    ) -> torch.Tensor:
        """The client's running amplitude updated with `batch`, copied into the layer's buffer."""
        import torch

        check_images(batch, tuple(layer.amplitude.shape))
        with torch.no_grad():
            running = update_amplitude(running, batch, float(self.params["amplitude_momentum"]))
            layer.amplitude.copy_(running)
        return running

    def objective(
        self, model: nn.Module, ctx: LocalContext, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """The task loss plus `local_penalty` (none for HarmoFL), as `train_steps` computes it."""
        with ctx.autocast():  # train.precision
            loss = ctx.task.loss(model(inputs), targets)
            term = self.local_penalty(model, ctx.global_state)
            return loss if term is None else loss + term

    def server_update(self, previous: State, updates: list[ClientUpdate]) -> State:
        """FedAvg's mean of every key; the amplitude buffer's mean only at the first aggregation,
        which fixes it: from then on the server keeps it as it is."""
        new = super().server_update(previous, updates)
        if self.amplitude_key is not None:
            if self.fixed:
                new[self.amplitude_key] = previous[self.amplitude_key]
            self.fixed = True
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"fixed": self.fixed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fixed = bool(state["fixed"])


@hookimpl
def fedbench_methods() -> list[type]:
    return [HarmoFL]
