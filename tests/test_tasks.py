"""The segmentation task's helpers."""

import torch

from fedbench.task import predicted_labels


def test_predicted_labels_equal_argmax_including_ties():
    torch.manual_seed(0)
    scores = torch.randn(4, 3, 8, 8).round()  # rounding makes many ties
    assert torch.equal(predicted_labels(scores), scores.argmax(1))
