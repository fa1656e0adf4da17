"""FedAvg written as a bare PyTorch loop, the baseline the engine benchmarks time fedbench
against: the same model, optimizer, batches, precision and weighted mean, nothing else."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedbench.data import FederatedData
from fedbench.engine.clients import client_stream, optimizer_factory
from fedbench.method import weighted_mean


def plain_fedavg(
    data: FederatedData,
    build_model: Callable[[], torch.nn.Module],
    train: dict,
    seed: int,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """`train["rounds"]` rounds of FedAvg over every site, a fresh optimizer per client and
    round as the engine makes it, each client drawing its batches from its own stream as the
    engine's clients do; the final global state."""
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    model = build_model().to(device)
    streams = [client_stream(seed, i) for i in range(len(data.sites))]
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(train["rounds"]):
        states, sizes = [], []
        for site, generator in zip(data.sites, streams, strict=True):
            model.load_state_dict(global_state)
            model.train()
            optimizer = optimizer_factory(train)(model.parameters())
            for inputs, targets in site.train.batches(train["batch_size"], generator):
                inputs, targets = inputs.to(device), targets.to(device)
                optimizer.zero_grad(set_to_none=True)
                data.task.loss(model(inputs), targets).backward()
                optimizer.step()
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            sizes.append(len(site.train))
        global_state = weighted_mean(states, sizes)
    return global_state
