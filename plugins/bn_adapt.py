"""Adapter `bn-adapt` (Schneider et al., 2020): normalise with the test batch's statistics."""

import torch

from fedbench.adapter import AdaptContext, Adapter, TrainedFederation
from fedbench.data import UnlabeledImages
from fedbench.hookspecs import hookimpl
from fedbench.models import use_batch_statistics


class BNAdapt(Adapter):
    """The global model with BatchNorm running statistics replaced by each test batch's own;
    batches are consecutive images, as an unseen site would stream them."""

    name = "bn-adapt"
    description = "BN-Adapt: global model, normalization from the test batch's statistics"
    needs_normalization = True

    @torch.inference_mode()
    def predict(
        self, federation: TrainedFederation, images: UnlabeledImages, ctx: AdaptContext
    ) -> torch.Tensor:
        model = use_batch_statistics(federation.model(federation.global_state)).eval()
        outputs = [model(batch.to(federation.device)) for batch in images.batches(ctx.batch_size)]
        return torch.cat(outputs).float().cpu()


@hookimpl
def fedbench_adapters() -> list[type]:
    return [BNAdapt]
