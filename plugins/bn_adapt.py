"""Adapter `bn-adapt` (Schneider et al., 2020): normalise with the test batch's statistics."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbench.adapter import AdaptContext, Adapter, TrainedFederation, online_batches
from fedbench.hookspecs import hookimpl
from fedbench.models import use_batch_statistics

if TYPE_CHECKING:
    import torch

    from fedbench.data import UnlabeledImages


class BNAdapt(Adapter):
    """The global model with BatchNorm running statistics replaced by each test batch's own;
    batches are consecutive images, as an unseen site would stream them (a trailing single
    image joins the previous batch, as for every adapter)."""

    name = "bn-adapt"
    mode = "per batch"
    description = "BN-Adapt: global model, normalization from the test batch's statistics"
    needs_normalization = True

    def predict(
        self, federation: TrainedFederation, images: UnlabeledImages, ctx: AdaptContext
    ) -> torch.Tensor:
        import torch

        model = use_batch_statistics(federation.model(federation.global_state)).eval()
        with torch.inference_mode():
            batches = online_batches(images, ctx.batch_size)
            outputs = [model(b.to(federation.device)) for b in batches]
        return torch.cat(outputs).float().cpu()


@hookimpl
def fedbench_adapters() -> list[type]:
    return [BNAdapt]
