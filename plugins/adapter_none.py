"""Adapter `none`: the unseen site uses the federation's global model as it is."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbench.adapter import AdaptContext, Adapter, TrainedFederation, predict_batched
from fedbench.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch

    from fedbench.data import UnlabeledImages


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
