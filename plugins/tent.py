"""Adapter `tent` (Wang et al., ICLR 2021): entropy minimisation on normalization affine weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbench.adapter import AdaptContext, Adapter, TrainedFederation, online_batches
from fedbench.hookspecs import hookimpl
from fedbench.models import affine_parameters, use_batch_statistics
from fedbench.tuning import Range

if TYPE_CHECKING:
    import torch

    from fedbench.data import UnlabeledImages


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel Shannon entropy of the softmax prediction."""
    log_probs = logits.log_softmax(1)
    return -(log_probs.exp() * log_probs).sum(1).mean()


class Tent(Adapter):
    """Online: for each consecutive test batch, one Adam step on the prediction's entropy (batch
    statistics, only normalization weights trainable), then predict with the updated model;
    `epochs` such passes, as every adapter's (fedbench.adapter.ADAPTATION_EPOCHS)."""

    name = "tent"
    mode = "online"
    description = "TENT: entropy minimisation of normalization affine weights at test time"
    needs_normalization = True
    needs_dense_task = True
    defaults = {"lr": 1e-3, "epochs": 1}
    #: Adam's lr, a decade either side of the paper's 1e-3 (Wang et al., ICLR 2021);
    #: epochs are the preset's, as every adapter's
    search_space = {"adapter.lr": Range(1e-4, 1e-2, log=True)}

    def predict(
        self, federation: TrainedFederation, images: UnlabeledImages, ctx: AdaptContext
    ) -> torch.Tensor:
        import torch

        torch.manual_seed(ctx.seed)
        model = use_batch_statistics(federation.model(federation.global_state)).train()
        affine = affine_parameters(model)
        optimizer = torch.optim.Adam(affine, lr=float(self.params["lr"]))
        epochs = int(self.params["epochs"])
        for epoch in range(max(epochs, 1)):
            outputs = []
            for batch in online_batches(images, ctx.batch_size):
                batch = batch.to(federation.device)
                if epoch < epochs:
                    optimizer.zero_grad(set_to_none=True)
                    mean_entropy(model(batch)).backward()
                    optimizer.step()
                with torch.no_grad():
                    outputs.append(model(batch).float().cpu())
        return torch.cat(outputs)


@hookimpl
def fedbench_adapters() -> list[type]:
    return [Tent]
