"""The model an unseen site receives when the server never shared some keys: the trained
shared state, with each unshared key the sample-weighted mean of the clients' own values, sent
once after the last round and counted in the bytes up (never the untrained initial values)."""

from __future__ import annotations

import pytest
import torch
from conftest import toy_config, toy_data, toy_training

from fedbench.method import state_nbytes, weighted_mean
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.fedbn import FedBN
from fedbench_plugins.fedper import FedPer
from fedbench_plugins.lg_fedavg import LGFedAvg
from fedbench_plugins.local import Local

CPU = torch.device("cpu")


def trained(method_cls, rounds: int = 2):
    data = toy_data()
    fed = toy_training(data, data.sites, method_cls, toy_config(rounds), 0, CPU)
    initial = {k: v.clone() for k, v in fed.global_state.items()}
    for _ in range(rounds):
        fed.run_round()
    return fed, initial, fed.result([], None)


def by_hand(fed, keys: list[str]) -> dict:
    """The sample-weighted mean of the clients' own values of `keys`, in float64."""
    sizes = [len(c.train) for c in fed.clients]
    total = sum(sizes)
    return {
        k: sum(c.state[k].double() * n / total for c, n in zip(fed.clients, sizes, strict=True))
        for k in keys
    }


@pytest.mark.parametrize("method_cls", [FedBN, FedPer, LGFedAvg])
def test_unshared_keys_are_the_clients_weighted_mean(method_cls):
    fed, initial, result = trained(method_cls)
    own = [k for k in fed.global_state if k not in fed.shared]
    assert own, "this method keeps some keys local"
    expected = by_hand(fed, own)
    for key in own:
        got = result.global_state[key]
        if got.is_floating_point():
            torch.testing.assert_close(got.double(), expected[key], rtol=1e-6, atol=1e-7)
            assert not torch.equal(got, initial[key]), f"{key} is still untrained"
        else:
            assert torch.equal(got, expected[key].round().to(got.dtype)), key
    for key in fed.shared:
        assert torch.equal(result.global_state[key], fed.global_state[key]), key


@pytest.mark.parametrize("method_cls", [FedBN, FedPer, LGFedAvg])
def test_the_final_upload_is_counted_once(method_cls):
    fed, _, result = trained(method_cls)
    own = [k for k in fed.global_state if k not in fed.shared]
    sent = sum(state_nbytes({k: c.state[k] for k in own}) for c in fed.clients)
    assert result.cost["bytes_up_final"] == sent > 0
    assert result.cost["bytes_up"] == fed.cost["bytes_up"] + sent
    rounds = fed.cost["rounds"] * len(fed.clients)
    assert result.cost["bytes_up_per_client_round"] == fed.cost["bytes_up"] // rounds


def test_fedbn_normalization_for_unseen_sites_is_trained():
    fed, initial, result = trained(FedBN)
    means = [k for k in fed.global_state if k.endswith("running_mean")]
    assert means and all(not torch.equal(result.global_state[k], initial[k]) for k in means)
    mean = weighted_mean(
        [{k: c.state[k] for k in means} for c in fed.clients], [len(c.train) for c in fed.clients]
    )
    assert all(torch.equal(result.global_state[k], mean[k]) for k in means)


def test_fully_shared_methods_send_nothing_more():
    fed, _, result = trained(FedAvg)
    assert result.cost["bytes_up_final"] == 0
    assert all(torch.equal(result.global_state[k], v) for k, v in fed.global_state.items())


def test_local_training_still_has_no_global_model():
    _, _, result = trained(Local)
    assert result.global_state is None
    assert "bytes_up_final" not in result.cost
