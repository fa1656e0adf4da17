"""Baseline model, loss and metric of the stand-in."""

import numpy as np
import torch


class Baseline(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, x):
        return self.linear(x)


class BaselineLoss(torch.nn.BCEWithLogitsLoss):
    pass


def metric(y_true, y_pred):
    """Accuracy of the logits at 0."""
    return float(((np.asarray(y_pred) > 0) == (np.asarray(y_true) > 0.5)).mean())
