"""fed_nodata: the toy contract, but its data is not generated yet: reading the round count
needs the config file its download script writes (as FLamby's fed_synthetic does)."""

from flamby.datasets.fed_toy import (
    BATCH_SIZE,
    LR,
    NUM_CLIENTS,
    NUM_EPOCHS_POOLED,
    Baseline,
    BaselineLoss,
    FedClass,
    Optimizer,
    metric,
)


def get_nb_max_rounds(num_updates, batch_size=BATCH_SIZE):
    """Needs the generated data's size, which the missing config file would hold."""
    raise FileNotFoundError("Could not find the config to read.")


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
