"""FedDG-ELCFS (Liu, Chen, Qin, Dou and Heng, "FedDG: Federated Domain Generalization on Medical
Image Segmentation via Episodic Learning in Continuous Frequency Space", CVPR 2021): clients share
the amplitude spectra of their training images; each meta-trains on its images and, after one
inner step, meta-tests on them carried towards another client's amplitude; the server is FedAvg.

Variant ("ELCFS, first-order meta step, boundary term on the output layer's input"):
  Bank. The first round it takes part, a client sends |F(x)| of each training image x (2-D FFT,
  unshifted, [N, C, H, W] float32: `extras["amplitude"]`, declared in `shares_data`). The server
  keeps them (its state) and sends client i, when it takes part, those of the other clients not
  yet sent to it (`"amplitude"`, declared; `"amplitude_site"`, each row's sender): never its own,
  each once. The client keeps what it received (its state). No bank when the settings need none.
  CFSI. With A, P the amplitude and phase of x, T that of an image of a random other client
  (uniform over the clients, then over their images) and lambda ~ U(0, 1), all drawn from the
  client's stream: x' = real(F^-1(polar(A + lambda * (T - A) * M, P))), M the centred window
  |f_y|, |f_x| <= floor(beta * min(H, W)) (beta 0: the zero frequency; 0.5: every frequency).
  Meta step, per batch (x, y): g = grad L(theta; x, y), theta' = theta - lr_inner * clip(g, -100,
  100) with g held constant (first order, as the authors' code: no second derivatives), the
  meta-test pass at theta' by torch.func.functional_call; the optimizer (`train.optimizer`) steps
  with the gradient in theta of L(theta; x, y) + w * L(theta'; x', y) + gamma * L_boundary
  (w = `meta_test_weight`, 1 in the paper). L_boundary, per foreground class: the rim of its mask
  (pixels with a 4-neighbour outside it, the image edge outside) and the ring around it (5 cross
  dilations minus the mask), pooled by area to the features z (the input of the output layer, as
  the authors'); the mean z of each image over rim and ring, from both passes: 4 rows per image
  (rims 1, rings 0), NT-Xent over them (cosine, temperature 0.05, mean over positive pairs),
  images with an empty rim or ring left out; summed over the classes. The meta-test pass uses
  its batch's statistics and leaves the running ones as the meta-train pass set them. A meta step
  counts one client step, as every method's optimizer step does (HarmoFL's two passes, FedIIR's
  double backward), though it does two to three passes' work: the board's steps column counts
  optimizer steps, and the wall seconds show the rest.
Differences from the authors' release (liuquande/FedDG-ELCFS, read, not copied): it builds the
bank before training, here it crosses in the rounds, so a client trains as FedAvg until it holds
other clients' spectra (round 1; one first taking part later holds them at once); its loader
keeps a random eighth of each client's spectra and replaces (lambda 1) only the zero frequency
(L 0) where the paper and its demo interpolate (lambda ~ U(0, 1), L 0.003, followed here); it
clips images to [0, 255] (inputs here are normalized: no clip); its losses are Dice (here
`data.loss`), its fast weights the convolutions' (here every trainable parameter).
Defaults: beta 0.003 (the demo's L: below data.size 334 the window is the zero frequency alone),
lr_inner 0.001 and gamma 0.1 (its training script), w 1.
With meta_test_weight 0 and gamma 0 it is FedAvg bit for bit (no bank, nothing extra sent)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fedbench.errors import Diverged, FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import ClientUpdate, LocalContext, Method, State
from fedbench.models import output_layer_input
from fedbench.tuning import Range

if TYPE_CHECKING:
    import torch
    from torch import nn

CLIP, TEMPERATURE, RING = 100.0, 0.05, 5


def spectra(images: torch.Tensor) -> torch.Tensor:
    """|F(x)| of each image [N, C, H, W] (2-D FFT over H, W, unshifted), float32."""
    import torch

    return torch.fft.fft2(images.float()).abs()


def window(height: int, width: int, beta: float, device: torch.device) -> torch.Tensor:
    """[H, W] True in the centred low-frequency window |f| <= floor(beta * min(H, W)) of the
    shifted spectrum, laid out unshifted."""
    import torch

    half = math.floor(beta * min(height, width))
    rows = (torch.arange(height, device=device) - height // 2).abs() <= half
    cols = (torch.arange(width, device=device) - width // 2).abs() <= half
    return torch.fft.ifftshift(rows[:, None] & cols[None, :])


def cfsi(
    images: torch.Tensor, amplitudes: torch.Tensor, lam: torch.Tensor, beta: float
) -> torch.Tensor:
    """Each image [B, C, H, W] with its amplitude moved by lam [B] towards `amplitudes` inside
    the low-frequency window, its phase kept (continuous frequency space interpolation)."""
    import torch

    spectrum = torch.fft.fft2(images.float())
    amplitude = spectrum.abs()
    mask = window(images.shape[-2], images.shape[-1], beta, images.device)
    step = lam.float().view(-1, 1, 1, 1) * (amplitudes.float() - amplitude)
    mixed = amplitude + torch.where(mask, step, torch.zeros_like(step))
    return torch.fft.ifft2(torch.polar(mixed, spectrum.angle())).real.to(images.dtype)


def spread(mask: torch.Tensor, pad: float) -> torch.Tensor:
    """Binary dilation of masks [B, 1, H, W] by the 4-neighbour cross, outside valued `pad`."""
    import torch
    import torch.nn.functional as F

    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], device=mask.device)
    padded = F.pad(mask, (1, 1, 1, 1), value=pad)
    return (F.conv2d(padded, cross.view(1, 1, 3, 3)) > 0).float()


def rims(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rim, ring) of masks [B, 1, H, W]: mask pixels touching the outside (the image's edge
    counts as outside), and `RING` cross dilations of the mask minus the mask."""
    rim = mask * spread(1.0 - mask, 1.0)
    grown = mask
    for _ in range(RING):
        grown = spread(grown, 0.0)
    return rim, grown - mask


def pooled(z: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean features [B, C] of z [B, C, h, w] over `where` [B, 1, H, W] (pooled by area to h x
    w), and whether each image has any of it."""
    import torch.nn.functional as F

    weights = F.adaptive_avg_pool2d(where, z.shape[-2:])
    mass = weights.sum(dim=(-2, -1))
    return (z * weights).sum(dim=(-2, -1)) / mass.clamp_min(1e-12), mass[:, 0] > 0


def nt_xent(
    rows: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, tau: float
) -> torch.Tensor:
    """NT-Xent with labels: for each ordered pair (a, p) of valid rows, a != p, same label,
    -log(e^s_ap / (e^s_ap + sum of e^s_an over valid n of another label)), s the cosine
    similarity over tau; the mean over those pairs (0 when there are none)."""
    import torch
    import torch.nn.functional as F

    unit = F.normalize(rows, dim=1)
    shifted = unit @ unit.T / tau - 1.0 / tau  # <= 0: exp never overflows
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(rows), dtype=torch.bool, device=rows.device)
    pairs = (same & ~eye & valid[:, None] & valid[None, :]).float()
    others = (~same & valid[None, :]).float()
    negatives = (shifted.exp() * others).sum(1, keepdim=True)
    losses = torch.log(shifted.exp() + negatives) - shifted
    return (losses * pairs).sum() / pairs.sum().clamp_min(1.0)


def boundary_loss(
    z_raw: torch.Tensor, z_test: torch.Tensor, targets: torch.Tensor, classes: int
) -> torch.Tensor:
    """L_boundary: per foreground class, NT-Xent of rim (1) and ring (0) mean features of the
    meta-train (z_raw) and meta-test (z_test) passes; summed over the classes."""
    import torch

    if targets.dim() != 3 or targets.dtype.is_floating_point:
        raise FedbenchError("elcfs: method.gamma needs label maps [N, H, W]; set method.gamma=0")
    total = z_raw.new_zeros(())
    for k in range(1, classes):
        rim, ring = rims((targets == k).unsqueeze(1).float())
        found = [pooled(z.float(), where) for where in (rim, ring) for z in (z_raw, z_test)]
        rows = torch.cat([f[0] for f in found])
        valid = (found[0][1] & found[2][1]).repeat(4)
        labels = torch.cat([torch.ones(2 * len(targets)), torch.zeros(2 * len(targets))])
        total = total + nt_xent(rows, labels.to(rows.device), valid, TEMPERATURE)
    return total


class ELCFS(Method):
    """FedAvg + episodic training on images interpolated towards other clients' amplitudes."""

    name = "elcfs"
    description = "FedDG-ELCFS: episodic learning in continuous frequency space (beta, lr_inner)"
    defaults = {"beta": 0.003, "lr_inner": 0.001, "meta_test_weight": 1.0, "gamma": 0.1}
    #: log-uniform around the release's window ratio and inner lr; the loss weights stay the paper's
    search_space = {
        "method.beta": Range(1e-3, 0.1, log=True),
        "method.lr_inner": Range(1e-4, 1e-2, log=True),
    }
    shares_data = {"amplitude": "amplitude spectra of its training images"}

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        #: spectra by client (kept on the CPU): every sender's on the server, the others' on a
        #: client
        self.bank: dict[int, torch.Tensor] = {}
        self.sent = False  # client side: its own spectra are sent
        self.delivered: dict[int, list[int]] = {}  # server side: whose spectra each client has

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        bounds = {"beta": (0.0, 0.5), "lr_inner": (0.0, math.inf)}
        bounds.update(meta_test_weight=(0.0, math.inf), gamma=(0.0, math.inf))
        for key, (low, high) in bounds.items():
            value = config.get("method", {}).get(key, cls.defaults[key])
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise FedbenchError(f"method.{key} must be a number, got {value!r}")
            if not low <= value <= high:
                raise FedbenchError(f"method.{key} must be in [{low}, {high}], got {value!r}")

    def uses_bank(self) -> bool:
        """Whether the loss needs interpolated images (a meta-test or a boundary term)."""
        return float(self.params["meta_test_weight"]) > 0 or float(self.params["gamma"]) > 0

    def server_payload(self, client: int) -> State:
        """The spectra of the other clients not yet sent to `client`, and their senders."""
        import torch

        had = self.delivered.setdefault(client, [])
        new = [c for c in sorted(self.bank) if c != client and c not in had]
        if not new:
            return {}
        had.extend(new)
        amplitude = torch.cat([self.bank[c] for c in new])
        sites = torch.cat([torch.full((len(self.bank[c]),), c) for c in new])
        return {"amplitude": amplitude, "amplitude_site": sites.to(amplitude.device)}

    def server_update(self, previous: State, updates: list[ClientUpdate]) -> State:
        """Banks the spectra received; FedAvg's mean of the models."""
        for update in updates:
            if "amplitude" in update.extras:
                self.bank[update.client] = update.extras["amplitude"].cpu().clone()
        return self.aggregate(updates)

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """Its spectra once; meta steps once it holds another client's spectra, else FedAvg's."""
        if not self.uses_bank():
            return super().local_update(model, ctx)
        sent = {} if self.sent else {"amplitude": spectra(ctx.split.inputs)}
        self.sent = True
        sites = ctx.received.get("amplitude_site")
        for site in [] if sites is None else sorted(set(sites.tolist())):
            self.bank[site] = ctx.received["amplitude"][sites == site].cpu().clone()
        if not self.bank:
            super().local_update(model, ctx)
            return sent
        model.train()
        optimizer = ctx.make_optimizer(model.parameters())
        with output_layer_input(model) as found:
            for _ in range(int(ctx.train["local_epochs"])):
                for inputs, targets in ctx.batches():
                    shifted = self.interpolated(inputs, ctx.generator)
                    optimizer.zero_grad(set_to_none=True)
                    self.meta_step(model, ctx, (inputs, shifted, targets), found)
                    self.adjust_gradients(model, ctx)
                    optimizer.step()
                    ctx.steps += 1
        return sent

    def interpolated(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """CFSI of each image towards a random image of a random other client in the bank."""
        import torch

        sites = sorted(self.bank)
        shape = tuple(self.bank[sites[0]].shape[1:])
        if inputs.dim() != 4 or tuple(inputs.shape[1:]) != shape:
            raise FedbenchError(
                f"elcfs: CFSI needs images of one shape; the bank holds {shape}, the batch is "
                f"{tuple(inputs.shape[1:])}; set method.meta_test_weight=0 and method.gamma=0"
            )
        draws = torch.rand(3, len(inputs), generator=generator, dtype=torch.float64).tolist()
        targets = []
        for u_site, u_row in zip(draws[0], draws[1], strict=True):
            rows = self.bank[sites[min(int(u_site * len(sites)), len(sites) - 1)]]
            targets.append(rows[min(int(u_row * len(rows)), len(rows) - 1)])
        lam = torch.tensor(draws[2], device=inputs.device)
        amplitudes = torch.stack(targets).to(inputs.device)
        return cfsi(inputs, amplitudes, lam, float(self.params["beta"]))

    def meta_step(self, model: nn.Module, ctx: LocalContext, batch: tuple, found: dict) -> None:
        """Leaves in the parameters' .grad the first-order gradient of the episodic loss on
        batch = (raw images, interpolated images, targets)."""
        import torch
        from torch.func import functional_call

        inputs, shifted, targets = batch
        gamma, weight = float(self.params["gamma"]), float(self.params["meta_test_weight"])
        lr = float(self.params["lr_inner"])
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        with ctx.autocast():
            train_loss = ctx.task.loss(model(inputs), targets)
        z_raw = found.get("z")
        grads = torch.autograd.grad(
            train_loss, list(params.values()), retain_graph=gamma > 0, allow_unused=True
        )
        fast = {
            n: p if g is None else p - lr * g.clamp(-CLIP, CLIP)
            for (n, p), g in zip(params.items(), grads, strict=True)
        }
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        with ctx.autocast():
            outputs = functional_call(model, {**fast, **buffers}, (shifted,))
            rest = weight * ctx.task.loss(outputs, targets)
            if gamma > 0:
                classes = max(int(outputs.shape[1]), 2)
                rest = rest + gamma * boundary_loss(z_raw, found["z"], targets, classes)
        total = train_loss.detach() + rest.detach()
        if not torch.isfinite(total):
            raise Diverged(f"loss became {total.item()} in ELCFS's meta step")
        rest.backward()
        for p, g in zip(params.values(), grads, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    def state_dict(self) -> dict[str, Any]:
        return {
            "bank": {str(c): t.clone() for c, t in self.bank.items()},
            "sent": self.sent,
            "delivered": {str(c): list(had) for c, had in self.delivered.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bank = {int(c): t.cpu().clone() for c, t in state["bank"].items()}
        self.sent = bool(state["sent"])
        self.delivered = {int(c): [int(x) for x in had] for c, had in state["delivered"].items()}


@hookimpl
def fedbench_methods() -> list[type]:
    return [ELCFS]
