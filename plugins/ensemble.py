"""Adapter `ensemble`: the mean softmax output of the global and every personalized model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbench.adapter import AdaptContext, Adapter, TrainedFederation, predict_batched
from fedbench.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch

    from fedbench.data import UnlabeledImages


class Ensemble(Adapter):
    """Averages in output space what IOP-FL's routing mixes in parameter space; the fallback for
    methods without a global model (`local`)."""

    name = "ensemble"
    description = "Ensemble: mean softmax of the global and all personalized models"
    needs_global_model = False
    needs_dense_task = True

    def predict(
        self, federation: TrainedFederation, images: UnlabeledImages, ctx: AdaptContext
    ) -> torch.Tensor:
        states = list(federation.personalized)
        if federation.global_state is not None:
            states.append(federation.global_state)
        total = None
        for state in states:
            logits = predict_batched(federation.model(state), images.inputs, ctx.batch_size)
            probs = logits.softmax(1)
            total = probs if total is None else total + probs
        return total / len(states)


@hookimpl
def fedbench_adapters() -> list[type]:
    return [Ensemble]
