"""FLamby bridge: when the `flamby` package is importable, each of its datasets appears here as
`flamby-<name>` (flamby.datasets.fed_heart_disease -> `flamby-heart-disease`).

FLamby is not on the package index, so nothing here is needed for fedbench to work. A FLamby
dataset module that fails to import (its extras are missing) or lacks part of the contract
(NUM_CLIENTS, BATCH_SIZE, LR, Optimizer, NUM_EPOCHS_POOLED, get_nb_max_rounds, Baseline,
BaselineLoss, metric and a FedXxx class) is left out.

What fedbench takes from FLamby: each centre's train and test sets from `FedXxx(center=i,
train=...)` (materialised into tensors; items must be fixed-shape (X, y) pairs), the model
`Baseline()`, the loss `BaselineLoss()` and `metric(y_true, y_pred)`, reported as
"flamby_metric" on the raw model outputs. The preset holds FLamby's constants: batch size, LR,
optimizer (Adam or SGD; others fall back to Adam with a warning), rounds = get_nb_max_rounds(100)
and local_epochs = NUM_EPOCHS_POOLED / rounds (the engine counts epochs, FLamby 100 batches).
FLamby's items carry no patient id, so val is `data.val_fraction` of each centre's training
samples, drawn with the seed.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedbench.data import Dataset, FederatedData, Site, Split
from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.task import Task
from fedbench_datasets.prepared import warn

if TYPE_CHECKING:  # torch loads with the data, not when `fedbench list` runs
    import torch
    from torch import nn

CONTRACT = (
    "NUM_CLIENTS",
    "BATCH_SIZE",
    "LR",
    "Optimizer",
    "NUM_EPOCHS_POOLED",
    "get_nb_max_rounds",
    "Baseline",
    "BaselineLoss",
    "metric",
)


class WrappedTask(Task):
    """A task from parts: a model factory, a loss module and a numpy metric -> scalar."""

    dense_prediction = False

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        loss: nn.Module,
        metric: Callable[[np.ndarray, np.ndarray], float],
        metric_name: str,
    ) -> None:
        self.model_factory, self._loss, self.metric = model_factory, loss, metric
        self.primary_metric = metric_name

    def build_model(self, model_cfg: dict[str, Any]) -> nn.Module:
        return self.model_factory()

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._loss(outputs, targets)

    def score(
        self, outputs: torch.Tensor, targets: torch.Tensor, cases: torch.Tensor
    ) -> dict[str, float]:
        value = self.metric(targets.detach().cpu().numpy(), outputs.detach().cpu().numpy())
        return {self.primary_metric: float(value)}


def fed_class(module: ModuleType) -> type | None:
    """The module's FedXxx dataset class (FedClass when it exports that alias)."""
    if isinstance(getattr(module, "FedClass", None), type):
        return module.FedClass
    for attr in dir(module):
        value = getattr(module, attr)
        if attr.startswith("Fed") and isinstance(value, type):
            return value
    return None


def flamby_modules() -> dict[str, ModuleType]:
    """Importable FLamby dataset modules that fulfil the contract, by fedbench name."""
    try:
        package = importlib.import_module("flamby.datasets")
    except ImportError:
        return {}
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("fed_"):
            continue
        try:
            module = importlib.import_module(f"flamby.datasets.{info.name}")
        except Exception:  # a dataset whose extras are not installed
            continue
        if all(hasattr(module, a) for a in CONTRACT) and fed_class(module) is not None:
            found["flamby-" + info.name.removeprefix("fed_").replace("_", "-")] = module
    return found


def materialise(dataset: Any, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All (X, y) items of a FLamby dataset stacked into two tensors."""
    import torch

    xs, ys = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise FedbenchError(f"{label}: items are not (X, y) pairs; not supported by fedbench")
        xs.append(torch.as_tensor(np.asarray(item[0])))
        ys.append(torch.as_tensor(np.asarray(item[1])))
    if not xs:
        raise FedbenchError(f"{label}: empty")
    try:
        return torch.stack(xs).float(), torch.stack(ys)
    except RuntimeError:
        raise FedbenchError(f"{label}: items differ in shape; not supported by fedbench") from None


class FlambyDataset(Dataset):
    """One FLamby dataset; subclasses made by `dataset_class` set `module`."""

    model = "dataset-baseline"

    module: ClassVar[ModuleType]
    defaults: ClassVar[dict[str, Any]] = {"path": None, "val_fraction": 0.1}

    def preset(self, preset: str) -> dict[str, Any]:
        m = self.module
        rounds = max(1, int(m.get_nb_max_rounds(100)))
        optimizer = {"Adam": "adam", "SGD": "sgd"}.get(m.Optimizer.__name__)
        if optimizer is None:
            warn(f"{self.name}: FLamby uses {m.Optimizer.__name__}; fedbench offers adam or sgd")
        train = {
            "rounds": rounds,
            "local_epochs": max(1, round(m.NUM_EPOCHS_POOLED / rounds)),
            "batch_size": int(m.BATCH_SIZE),
            "lr": float(m.LR),
            "optimizer": optimizer or "adam",
        }
        if preset == "quick":
            train.update(rounds=min(rounds, 2), local_epochs=1)
        return {"train": train}

    def site_names(self, cfg: dict[str, Any]) -> list[str] | None:
        return [f"center{i}" for i in range(int(self.module.NUM_CLIENTS))]

    def load(self, cfg: dict[str, Any], seed: int, cache_dir: Path) -> FederatedData:
        import torch

        fed = fed_class(self.module)
        kwargs = {"data_path": str(cfg["path"])} if cfg.get("path") else {}
        fraction = float(cfg["val_fraction"])
        sites = []
        for i, name in enumerate(self.site_names(cfg) or []):
            try:
                train = fed(center=i, train=True, pooled=False, **kwargs)
                test = fed(center=i, train=False, pooled=False, **kwargs)
            except Exception as exc:
                raise FedbenchError(
                    f"{self.name} centre {i}: {type(exc).__name__}: {exc}"
                ) from None
            x, y = materialise(train, f"{self.name} centre {i} train")
            rng = np.random.default_rng([seed, i])
            n_val = min(len(x) - 1, max(1, round(fraction * len(x))))
            val = torch.from_numpy(np.isin(np.arange(len(x)), rng.permutation(len(x))[:n_val]))
            cases = torch.arange(len(x))
            tx, ty = materialise(test, f"{self.name} centre {i} test")
            sites.append(
                Site(
                    name,
                    Split(x[~val], y[~val], cases[~val]),
                    Split(x[val], y[val], cases[val]),
                    Split(tx, ty, torch.arange(len(tx))),
                )
            )
        task = WrappedTask(
            self.module.Baseline, self.module.BaselineLoss(), self.module.metric, "flamby_metric"
        )
        return FederatedData(self.name, sites, task)


def dataset_class(name: str, module: ModuleType) -> type[FlambyDataset]:
    """A FlambyDataset subclass for one FLamby module."""
    short = module.__name__.rsplit(".", 1)[-1]
    attrs = {"name": name, "module": module, "description": f"FLamby {short} (installed flamby)"}
    return type(f"Flamby_{short}", (FlambyDataset,), attrs)


@hookimpl
def fedbench_datasets() -> list[type]:
    return [dataset_class(name, module) for name, module in flamby_modules().items()]
