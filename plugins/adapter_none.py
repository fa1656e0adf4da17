"""Adapter `none`: the unseen site uses the federation's global model as it is."""

import torch

from fedbench.adapter import AdaptContext, Adapter, TrainedFederation, predict_batched
from fedbench.data import UnlabeledImages
from fedbench.hookspecs import hookimpl


class NoAdaptation(Adapter):
    """The global model in eval mode (running statistics), no test-time change."""

    name = "none"
    description = "None: the global model as trained"

    def predict(
        self, federation: TrainedFederation, images: UnlabeledImages, ctx: AdaptContext
    ) -> torch.Tensor:
        model = federation.model(federation.global_state)
        return predict_batched(model, images.inputs, ctx.batch_size)


@hookimpl
def fedbench_adapters() -> list[type]:
    return [NoAdaptation]
