"""Server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad) step the trainable parameters only:
BatchNorm running statistics and counters take FedAvg's sample-weighted mean, on a real U-Net
with BatchNorm (the papers' server rules are defined on model weights, not on statistics)."""

from __future__ import annotations

import pytest
import torch
from conftest import toy_config, toy_data, toy_training

from fedbench.method import ClientUpdate, weighted_mean
from fedbench_plugins.fedadagrad import FedAdagrad
from fedbench_plugins.fedadam import FedAdam
from fedbench_plugins.fedavgm import FedAvgM
from fedbench_plugins.fedyogi import FedYogi

SERVER_OPTIMIZERS = [FedAvgM, FedAdam, FedYogi, FedAdagrad]


def spied(cls: type) -> type:
    """`cls` keeping the updates and the previous state of its last server step."""

    class Spy(cls):
        seen: dict = {}

        def server_update(self, previous, updates: list[ClientUpdate]):
            Spy.seen.update(previous=previous, updates=updates)
            return super().server_update(previous, updates)

    return Spy


@pytest.mark.parametrize("cls", SERVER_OPTIMIZERS, ids=lambda c: c.name)
def test_buffers_take_fedavgs_mean_and_parameters_take_the_server_step(cls):
    data = toy_data()
    spy = spied(cls)
    fed = toy_training(data, data.sites, spy, toy_config(2, **cls.defaults), 0, torch.device("cpu"))
    fed.run_round()
    fed.run_round()
    ups = spy.seen["updates"]
    fedavg = weighted_mean([u.state for u in ups], [u.num_samples for u in ups])
    params = {name for name, _ in fed.model.named_parameters()}
    buffers = [k for k in fed.global_state if k not in params]
    assert any(k.endswith("running_var") for k in buffers), "the toy U-Net has BatchNorm"
    for key in buffers:
        assert torch.equal(fed.global_state[key], fedavg[key]), key
    moved = [k for k in params if not torch.equal(fed.global_state[k], fedavg[k])]
    assert len(moved) == len(params), "every parameter takes the server's own step"


@pytest.mark.parametrize("cls", SERVER_OPTIMIZERS, ids=lambda c: c.name)
def test_running_variances_stay_positive_and_eval_outputs_finite(cls):
    """FedAvgM's momentum drove a running variance below zero (NaN outputs in eval mode) when
    statistics took the server step; with FedAvg's mean they are a mean of positive numbers."""
    data = toy_data()
    config = toy_config(4, **{**cls.defaults, "server_lr": 1.0})
    fed = toy_training(data, data.sites, cls, config, 0, torch.device("cpu"))
    for _ in range(4):
        fed.run_round()
    for key, value in fed.global_state.items():
        if key.endswith("running_var"):
            assert bool((value > 0).all()), key
    fed.model.load_state_dict(fed.global_state)
    fed.model.eval()
    with torch.no_grad():
        assert torch.isfinite(fed.model(data.sites[0].test.inputs)).all()


def test_a_server_step_before_the_parameters_are_known_is_refused():
    """Without shared_keys the rule cannot tell parameters from statistics: it must not quietly
    become FedAvg."""
    from fedbench.errors import FedbenchError

    update = ClientUpdate({"w": torch.ones(2)}, 1, client=0)
    with pytest.raises(FedbenchError, match="shared_keys"):
        FedAdam(FedAdam.defaults, 1).server_update({"w": torch.zeros(2)}, [update])
