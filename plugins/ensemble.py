"""Adapter `ensemble`: the mean prediction of the global and every personalized model, averaged
where the task says (`Task.ensemble_space`): softmax maps for segmentation, risk scores for
survival."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbench.adapter import AdaptContext, Adapter, TrainedFederation, predict_batched
from fedbench.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch

    from fedbench.data import UnlabeledImages


class Ensemble(Adapter):
    """Averages in output space what IOP-FL's routing mixes in parameter space; also the one adapter
    for methods without a global model (`local`)."""

    name = "ensemble"
    description = "Ensemble: mean prediction of the global and all personalized models"
    needs_global_model = False

    def predict(
        self, federation: TrainedFederation, images: UnlabeledImages, ctx: AdaptContext
    ) -> torch.Tensor:
        states = list(federation.personalized)
        if federation.global_state is not None:
            states.append(federation.global_state)
        total = None
        for state in states:
            logits = predict_batched(federation.model(state), images.inputs, ctx.batch_size)
            mixable = ctx.task.ensemble_space(logits)
            total = mixable if total is None else total + mixable
        return total / len(states)


@hookimpl
def fedbench_adapters() -> list[type]:
    return [Ensemble]
