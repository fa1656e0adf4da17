"""Shared test helpers: a tiny in-memory federation that trains in milliseconds."""

from __future__ import annotations

import copy
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does, before torch starts OpenMP

import pytest
import torch

from fedbench.data import FederatedData, Site, Split
from fedbench.engine.config import preset_config
from fedbench.engine.training import Training, train_federation
from fedbench.task import SegmentationTask
from fedbench_plugins.unet import UNet

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def one_process_per_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs in this process train every federation here, where a test's patches and spies
    are; tests of the worker processes ask for them with RunSpec.workers or --workers."""
    monkeypatch.setattr("fedbench.engine.federations.cpu_count", lambda: 1)


def toy_split(n: int, size: int, seed: int, shift: float = 0.0) -> Split:
    """Bright squares on noise: a segmentation problem a tiny U-Net can start to learn."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        y, x = torch.randint(2, size // 2, (2,), generator=gen).tolist()
        targets[i, y : y + size // 3, x : x + size // 3] = 1
    inputs = (
        targets.unsqueeze(1).float() + shift + 0.5 * torch.randn(n, 1, size, size, generator=gen)
    )
    return Split(inputs, targets, torch.arange(n) // 2)


def toy_data(sizes: tuple[int, ...] = (8, 12, 6), size: int = 16) -> FederatedData:
    sites = [
        Site(
            f"site{i}",
            toy_split(n, size, seed=10 * i, shift=0.3 * i),
            toy_split(4, size, seed=10 * i + 1, shift=0.3 * i),
            toy_split(4, size, seed=10 * i + 2, shift=0.3 * i),
        )
        for i, n in enumerate(sizes)
    ]
    return FederatedData("toy", sites, SegmentationTask(in_channels=1, class_names=["square"]))


TOY_MODEL = {"channels": [4, 8], "res_units": 0}


def toy_builder(data: FederatedData, model_cfg: dict | None = None):
    """Builds the tiny U-Net the toy federations train."""
    return lambda: UNet().build(data.task, model_cfg or TOY_MODEL)


def toy_train(data: FederatedData, sites, method, config: dict, seed: int, device, **kwargs):
    """train_federation with the toy U-Net."""
    builder = toy_builder(data, config["model"])
    return train_federation(data, sites, method, builder, config, seed, device, **kwargs)


def toy_training(data: FederatedData, sites, method, config: dict, seed: int, device) -> Training:
    """A Training (one federation in progress) of the toy U-Net."""
    return Training(data, sites, method, toy_builder(data, config["model"]), config, seed, device)


def toy_config(rounds: int = 2, **method: object) -> dict:
    config = preset_config("quick")
    config["model"] = {"name": "unet", **TOY_MODEL}
    config["train"].update(rounds=rounds, batch_size=4)
    config["eval"]["history"] = False
    config["method"] = dict(method)
    config["adapter"] = {}
    config["data"] = {}
    return copy.deepcopy(config)


LR = 0.05


def sgd_config(rounds: int, momentum: float = 0.0, **method: object) -> dict:
    """The toy config with plain SGD at lr 0.05 (what SCAFFOLD and FedNova's checks need)."""
    config = toy_config(rounds, **method)
    config["train"].update(optimizer="sgd", momentum=momentum, lr=LR)
    return config


def toy_rounds(method_cls, config: dict, data: FederatedData, rounds: int) -> Training:
    """A toy Training of `method_cls` on all sites after `rounds` rounds (seed 0, CPU)."""
    fed = toy_training(data, data.sites, method_cls, config, 0, torch.device("cpu"))
    for _ in range(rounds):
        fed.run_round()
    return fed


def same_states(a: dict, b: dict) -> bool:
    """Two state dicts with the same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def data() -> FederatedData:
    return toy_data()


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED


@pytest.fixture(scope="module")
def toy():
    """For the adapters' tests: a one-round FedAvg federation on two toy sites, the third held
    out, and the held-out site's images."""
    from fedbench.data import UnlabeledImages
    from fedbench_plugins.fedavg import FedAvg

    data = toy_data()
    federation = toy_train(data, data.sites[1:], FedAvg, toy_config(1), 0, torch.device("cpu"))
    return data, federation, UnlabeledImages(data.sites[0].all_samples().inputs)


def predict(adapter, toy, batch_size: int = 4) -> torch.Tensor:
    """An adapter's outputs on the `toy` fixture's unseen site."""
    from fedbench.adapter import AdaptContext

    data, federation, images = toy
    return adapter.predict(federation, images, AdaptContext(batch_size, 0, data.task))
