"""fed_licensed: the toy data behind a licence question asked on first use, with chatter on
stdout (as FLamby's Fed-TCGA-BRCA asks and prints)."""

from flamby.datasets.fed_toy import (
    BATCH_SIZE,
    LR,
    NUM_CLIENTS,
    NUM_EPOCHS_POOLED,
    Baseline,
    BaselineLoss,
    Optimizer,
    get_nb_max_rounds,
    metric,
)
from flamby.datasets.fed_toy.dataset import FedToy
from flamby.utils import accept_license

TERMS = "https://example.org/terms-of-the-toy-data"


class FedLicensed(FedToy):
    def __init__(self, center=0, train=True, pooled=False):
        accept_license(TERMS, "fed_licensed")
        print("reading the licensed toy data")
        super().__init__(center=center, train=train, pooled=pooled)


FedClass = FedLicensed

__all__ = [
    "BATCH_SIZE",
    "LR",
    "NUM_CLIENTS",
    "NUM_EPOCHS_POOLED",
    "Optimizer",
    "get_nb_max_rounds",
    "FedClass",
    "Baseline",
    "BaselineLoss",
    "metric",
]
