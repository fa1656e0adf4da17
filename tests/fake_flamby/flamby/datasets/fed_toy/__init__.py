"""fed_toy: three centres of a 2-feature binary classification (stand-in FLamby dataset)."""

from flamby.datasets.fed_toy.common import (
    BATCH_SIZE,
    LR,
    NUM_CLIENTS,
    NUM_EPOCHS_POOLED,
    Optimizer,
    get_nb_max_rounds,
)
from flamby.datasets.fed_toy.dataset import FedToy, ToyRaw
from flamby.datasets.fed_toy.model import Baseline, BaselineLoss, metric

FedClass = FedToy

__all__ = [
    "BATCH_SIZE",
    "LR",
    "NUM_CLIENTS",
    "NUM_EPOCHS_POOLED",
    "Optimizer",
    "get_nb_max_rounds",
    "FedToy",
    "ToyRaw",
    "FedClass",
    "Baseline",
    "BaselineLoss",
    "metric",
]
