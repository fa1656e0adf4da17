"""Adapter `iopfl-routing`: IOP-FL outside personalization (Jiang et al., IEEE TMI 2023).

An unseen site rebuilds the network so that every convolution mixes, per image and per layer,
the frozen kernels of the federation's models (K personalized + global) with weights from a small
router (CondConv-style), then adapts the routers and the normalization affine weights online with
entropy + consistency + shape losses on its own unlabeled images (batch statistics throughout).
The routed layers and the routed network are in plugins/routed_conv.py. Torch is imported inside
the functions, so listing the adapter (`fedbench list`) stays instant."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fedbench.adapter import AdaptContext, Adapter, TrainedFederation, online_batches
from fedbench.data import UnlabeledImages
from fedbench.errors import Diverged, FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.tuning import Range

if TYPE_CHECKING:
    import torch
    from torch import nn


def entropy_loss(probs: torch.Tensor) -> torch.Tensor:
    """Entropy as released: summed over the batch, averaged over classes and pixels, / log C."""
    import torch

    entropy = -probs * torch.log(probs + 1e-6) / math.log(probs.shape[1])
    return entropy.sum(0).mean()


def shape_loss(probs: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of the 21x21 local range (max - min pool) of the foreground probabilities:
    small for compact masks with short boundaries. A volume's range is taken in each slice."""
    import torch
    import torch.nn.functional as F

    foreground = probs[:, 1:]
    if foreground.ndim == 5:  # [B, C, D, H, W] -> the B * D slices [B * D, C, H, W]
        foreground = foreground.transpose(1, 2).flatten(0, 1)
    dilated = F.max_pool2d(foreground, 21, stride=1, padding=10)
    eroded = -F.max_pool2d(-foreground, 21, stride=1, padding=10)
    return torch.linalg.vector_norm(dilated - eroded)


def perturb(x: torch.Tensor, noise_std: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """View 1: Gaussian noise, a per-image vertical flip (p = 0.5), then one rot90 by k for the
    batch (k = 0 when H != W, as rot90 would change the shape); a volume's in its slices (the
    last two axes). Returns view, flips, k."""
    import torch

    view = x + noise_std * torch.randn_like(x)
    flips = torch.rand(x.shape[0], device=x.device) < 0.5
    view = torch.where(per_image(flips, x), view.flip(-2), view)
    k = int(torch.randint(0, 4, ()).item()) if x.shape[-2] == x.shape[-1] else 0
    return torch.rot90(view, k, dims=(-2, -1)), flips, k


def per_image(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] flags shaped to broadcast over `like`'s [B, ...] images."""
    return flags.view(-1, *([1] * (like.ndim - 1)))


def unperturb(y: torch.Tensor, flips: torch.Tensor, k: int) -> torch.Tensor:
    """Map view-1 outputs back to the input frame: inverse rotation, then inverse flip."""
    import torch

    y = torch.rot90(y, -k, dims=(-2, -1))
    return torch.where(per_image(flips, y), y.flip(-2), y)


def consistency_loss(model: nn.Module, x: torch.Tensor, noise_std: float) -> torch.Tensor:
    """MSE between the softmax maps of the perturbed view (mapped back) and a second clean
    forward pass; gradients flow through both branches (no teacher, no stop-grad)."""
    import torch.nn.functional as F

    view, flips, k = perturb(x, noise_std)
    perturbed = unperturb(model(view).softmax(1), flips, k)
    return F.mse_loss(perturbed, model(x).softmax(1))


def adaptation_loss(model: nn.Module, x: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    """entropy_weight * L_ent + consistency_weight * L_cons + shape_weight * L_shape."""
    probs = model(x).softmax(1)
    loss = float(p["entropy_weight"]) * entropy_loss(probs)
    loss = loss + float(p["shape_weight"]) * shape_loss(probs)
    if float(p["consistency_weight"]):
        loss = loss + float(p["consistency_weight"]) * consistency_loss(
            model, x, float(p["noise_std"])
        )
    return loss


def adapt_online(
    model: nn.Module,
    batches: list[torch.Tensor],
    p: dict[str, Any],
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """Online test-time training: per batch one Adam step, then that batch's prediction by the
    updated model in train mode. Returns the last pass's softmax maps [N, C, H, W] on CPU."""
    import torch

    params = [q for q in model.parameters() if q.requires_grad]
    if not params:
        raise FedbenchError("iopfl-routing: the routed model has nothing to adapt")
    optimizer = torch.optim.Adam(params, lr=float(p["lr"]))
    epochs, reseed = int(p["epochs"]), bool(p["quirk_reseed"])
    model.train()
    outputs: list[torch.Tensor] = []
    for epoch in range(max(epochs, 1)):
        outputs = []
        for batch in batches:
            batch = batch.to(device)
            if reseed:  # release: the same noise, flips and dropout masks for every batch
                torch.manual_seed(seed)
            if epoch < epochs:
                optimizer.zero_grad(set_to_none=True)
                loss = adaptation_loss(model, batch, p)
                if not torch.isfinite(loss):
                    raise Diverged(f"iopfl-routing: test-time loss became {loss.item()}")
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                outputs.append(model(batch).softmax(1).float().cpu())
    return torch.cat(outputs)


class IOPFLRouting(Adapter):
    """IOP-FL outside personalization. `space` picks the experts (both: K personalized + global;
    global; personalized). The release's three quirks, each its own flag (all off by default):
    `quirk_drop_expert` (non-transposed convs leave out the last personalized expert),
    `quirk_frozen_bottleneck` (bottleneck routers, the convs of the largest width, stay frozen
    at their random init) and `quirk_reseed` (the RNG is reseeded before every batch).
    `epochs` as every adapter's (fedbench.adapter.ADAPTATION_EPOCHS: 10 as released for paper)."""

    name = "iopfl-routing"
    mode = "online"
    description = (
        "IOP-FL outside personalization: per-image routing of frozen expert kernels, "
        "routers + norm affine adapted online (entropy, consistency, shape)"
    )
    needs_global_model = True
    needs_normalization = True
    needs_dense_task = True
    defaults = {
        "epochs": 10,
        "lr": 1e-3,
        "entropy_weight": 10.0,
        "consistency_weight": 0.1,
        "shape_weight": 1e-6,
        "noise_std": 0.5,
        "space": "both",
        "quirk_drop_expert": False,
        "quirk_frozen_bottleneck": False,
        "quirk_reseed": False,
    }
    #: Adam's lr around the released 1e-3 (as tent's); epochs are the preset's
    search_space = {"adapter.lr": Range(1e-4, 1e-2, log=True)}

    def predict(
        self, federation: TrainedFederation, images: UnlabeledImages, ctx: AdaptContext
    ) -> torch.Tensor:
        import torch

        from fedbench_plugins.routed_conv import build_routed_model, expert_sources

        p = self.params
        expert_sources(str(p["space"]), len(federation.personalized))  # validate before any work
        torch.manual_seed(ctx.seed)
        global_model = federation.model(federation.global_state)
        personalized = [federation.model(state) for state in federation.personalized]
        routed = build_routed_model(
            global_model,
            personalized,
            str(p["space"]),
            drop_expert=bool(p["quirk_drop_expert"]),
            frozen_bottleneck=bool(p["quirk_frozen_bottleneck"]),
        )
        del global_model, personalized
        batches = online_batches(images, ctx.batch_size)
        return adapt_online(routed.to(federation.device), batches, p, ctx.seed, federation.device)


@hookimpl
def fedbench_adapters() -> list[type]:
    return [IOPFLRouting]
