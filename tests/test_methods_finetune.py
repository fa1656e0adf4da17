"""FedAvg-FT and FedBABU against their definitions: fine-tuning once after the last round, on the
client's own data, nothing sent; FedBABU's head frozen during federated training."""

from __future__ import annotations

import pytest
import torch
from conftest import same_states, toy_config, toy_data, toy_train, toy_training

from fedbench.errors import FedbenchError
from fedbench.method import clone_state
from fedbench.models import output_layer_keys
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.fedavg_ft import FedAvgFT
from fedbench_plugins.fedbabu import FedBABU

CPU = torch.device("cpu")


def test_finetuning_for_zero_epochs_is_fedavg_bit_for_bit():
    data = toy_data()
    plain = toy_train(data, data.sites, FedAvg, toy_config(2), 0, CPU)
    tuned = toy_train(data, data.sites, FedAvgFT, toy_config(2, finetune_epochs=0), 0, CPU)
    assert same_states(plain.global_state, tuned.global_state)
    for mine, theirs in zip(tuned.personalized, plain.personalized, strict=True):
        assert same_states(mine, theirs)
    assert tuned.cost["client_steps"] == plain.cost["client_steps"]


def test_finetuning_trains_each_client_on_its_own_data_from_the_global_model():
    data = toy_data()
    config = toy_config(2, finetune_epochs=1)
    fed = toy_training(data, data.sites, FedAvgFT, config, 0, CPU)
    for _ in range(2):
        fed.run_round()
    global_before = clone_state(fed.global_state)
    steps_before = fed.cost["client_steps"]
    generators = [c.generator.get_state() for c in fed.clients]
    fed.finish()
    assert same_states(fed.global_state, global_before), "fine-tuning never reaches the server"
    # recompute client 1's fine-tuning by hand: one epoch of the standard loop from the global model
    for i, (client, generator) in enumerate(zip(fed.clients, generators, strict=True)):
        client.generator.set_state(generator)
        model = fed.build_model()
        model.load_state_dict(global_before)
        ctx = client.context(fed.setup, {}, {}, fed.cost["rounds"])
        FedAvg({}, 3).train_steps(model, ctx, 1)
        assert same_states(fed.personalized(i), model.state_dict()), i
    batches = sum(-(-len(c.train) // config["train"]["batch_size"]) for c in fed.clients)
    assert fed.cost["client_steps"] == steps_before + batches
    assert not same_states(fed.personalized(0), fed.personalized(1))
    result = fed.result([], None)
    assert same_states(result.global_state, global_before), "unseen sites get the global model"


def test_fedbabu_never_trains_the_head_during_federated_training():
    data = toy_data()
    fed = toy_training(data, data.sites, FedBABU, toy_config(2, finetune_epochs=0), 0, CPU)
    head = output_layer_keys(fed.model)
    initial = clone_state(fed.global_state)
    for _ in range(2):
        fed.run_round()
    assert head and all(torch.equal(fed.global_state[k], initial[k]) for k in head)
    body = [k for k in head ^ set(initial) if initial[k].is_floating_point()]
    assert any(not torch.equal(fed.global_state[k], initial[k]) for k in body)


def test_fedbabu_finetunes_the_whole_network_once():
    data = toy_data()
    result = toy_train(data, data.sites, FedBABU, toy_config(2, finetune_epochs=1), 0, CPU)
    head = output_layer_keys(result.model(result.global_state))
    for personal in result.personalized:
        assert all(not torch.equal(personal[k], result.global_state[k]) for k in head)


@pytest.mark.parametrize("cls", [FedAvgFT, FedBABU])
@pytest.mark.parametrize("bad", [-1, 1.5, True, "two"])
def test_bad_finetune_epochs_are_refused_by_name(cls, bad):
    with pytest.raises(FedbenchError, match="method.finetune_epochs"):
        cls.check_settings({"method": {"finetune_epochs": bad}})
