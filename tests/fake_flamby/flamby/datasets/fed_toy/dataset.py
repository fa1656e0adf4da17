"""Raw and per-centre datasets of the stand-in: labels from a linear rule, centres shifted."""

import torch
from torch.utils.data import Dataset


class ToyRaw(Dataset):
    """All samples: 3 centres x (40 train + 12 test), features (2,), label (1,) float."""

    def __init__(self, X_dtype=torch.float32, y_dtype=torch.float32):
        gen = torch.Generator().manual_seed(7)
        self.X, self.y, self.center, self.train = [], [], [], []
        for c in range(3):
            x = torch.randn(52, 2, generator=gen) + 0.3 * c
            y = (x[:, 0] + x[:, 1] > 0.3 * c).to(y_dtype).unsqueeze(1)
            self.X += list(x.to(X_dtype))
            self.y += list(y)
            self.center += [c] * 52
            self.train += [True] * 40 + [False] * 12

    def __len__(self):
        return len(self.X)

    def __getitem__(self, idx):
        return self.X[idx], self.y[idx]


class FedToy(ToyRaw):
    """One centre (or all, pooled), train or test."""

    def __init__(
        self, center=0, train=True, pooled=False, X_dtype=torch.float32, y_dtype=torch.float32
    ):
        super().__init__(X_dtype, y_dtype)
        keep = [
            i
            for i in range(len(self.X))
            if self.train[i] == train and (pooled or self.center[i] == center)
        ]
        self.X = [self.X[i] for i in keep]
        self.y = [self.y[i] for i in keep]
