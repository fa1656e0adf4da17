"""Constants of the stand-in dataset."""

import torch

NUM_CLIENTS = 3
BATCH_SIZE = 4
NUM_EPOCHS_POOLED = 6
LR = 0.05
Optimizer = torch.optim.SGD


def get_nb_max_rounds(num_updates: int, batch_size: int = BATCH_SIZE) -> int:
    """Rounds so that each client does about the pooled epochs (N = 120 samples)."""
    return max(1, (120 // NUM_CLIENTS // batch_size) * NUM_EPOCHS_POOLED // num_updates)
