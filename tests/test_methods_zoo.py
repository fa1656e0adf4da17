"""SiloBN and LG-FedAvg against their definitions: exactly which state reaches the server, and
what each site keeps."""

from __future__ import annotations

import torch
from conftest import toy_config, toy_training

from fedbench.method import ClientUpdate
from fedbench.models import normalization_state_keys, output_layer_keys
from fedbench_plugins.lg_fedavg import LGFedAvg
from fedbench_plugins.silobn import SiloBN

CPU = torch.device("cpu")


def spied_round(method_cls, data):
    """One round of `method_cls`, with the updates the server received."""
    received: list[list[ClientUpdate]] = []

    class Spy(method_cls):
        name = method_cls.name

        def server_update(self, previous, updates):
            received.append(list(updates))
            return super().server_update(previous, updates)

    fed = toy_training(data, data.sites, Spy, toy_config(1), 0, CPU)
    fed.run_round()
    return fed, received[0]


def test_silobn_shares_the_affine_weights_and_keeps_the_statistics(data):
    fed, updates = spied_round(SiloBN, data)
    norm = normalization_state_keys(fed.model)
    statistics = {k for k in norm if k.rsplit(".", 1)[1] in ("running_mean", "running_var")}
    counts = {k for k in norm if k.endswith("num_batches_tracked")}
    affine = norm - statistics - counts
    assert statistics and affine
    for update in updates:
        assert affine <= set(update.state), "affine weights are federated"
        assert not (statistics | counts) & set(update.state), "statistics never leave a site"
    key = next(iter(sorted(statistics)))
    personal = [fed.personalized(i) for i in range(len(data.sites))]
    assert not torch.equal(personal[0][key], personal[1][key])
    for i, state in enumerate(personal):
        for k in affine:
            assert torch.equal(state[k], fed.global_state[k]), k
        assert torch.equal(state[key], fed.clients[i].state[key])


def test_lg_fedavg_on_a_two_level_unet_shares_its_one_layer_after_the_bottom(data):
    """The toy U-Net's only layer run after its bottom block is the output layer (deeper
    networks share their whole decoder: test_methods_fidelity.py)."""
    fed, updates = spied_round(LGFedAvg, data)
    head = output_layer_keys(fed.model)
    assert head and all(set(u.state) == head for u in updates)
    personal = [fed.personalized(i) for i in range(len(data.sites))]
    for k in head:
        assert all(torch.equal(p[k], fed.global_state[k]) for p in personal), k
    body = [k for k in personal[0] if k not in head and personal[0][k].is_floating_point()]
    assert any(not torch.equal(personal[0][k], personal[1][k]) for k in body)
