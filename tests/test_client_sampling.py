"""Client sampling (`train.clients_per_round`): seeded, recorded, resumable, and with all clients
bit-identical to full participation."""

from __future__ import annotations

import pytest
import torch
from conftest import same_states, toy_config, toy_data, toy_train, toy_training
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.conformance import counted
from fedbench.engine.config import clients_per_round
from fedbench.errors import FedbenchError
from fedbench.method import clone_state
from fedbench_plugins.fedavg import FedAvg

CPU = torch.device("cpu")


def sampled(count: object, rounds: int = 3, seed: int = 0):
    data = toy_data((8, 12, 6, 10))
    config = toy_config(rounds)
    config["train"]["clients_per_round"] = count
    return data, toy_train(data, data.sites, FedAvg, config, seed, CPU)


@pytest.mark.parametrize("everyone", ["all", 4, "4", 1.0, "1.0", 9])
def test_all_clients_is_bit_identical_to_full_participation(everyone):
    _, full = sampled("all")
    _, also = sampled(everyone)
    assert same_states(also.global_state, full.global_state)
    assert all(same_states(a, b) for a, b in zip(also.personalized, full.personalized, strict=True))
    assert counted(also.cost) == counted(full.cost)  # clock readings aside
    assert also.cost["participation"] == [[0, 1, 2, 3]] * 3


def test_sampling_is_seeded_recorded_and_varies_with_the_seed():
    _, first = sampled(2, rounds=6)
    _, again = sampled(2, rounds=6)
    _, other = sampled(2, rounds=6, seed=1)
    chosen = first.cost["participation"]
    assert len(chosen) == 6 and all(len(c) == 2 and c == sorted(set(c)) for c in chosen)
    assert chosen == again.cost["participation"] and same_states(
        first.global_state, again.global_state
    )
    assert chosen != other.cost["participation"]
    assert len({tuple(c) for c in chosen}) > 1, "different clients in different rounds"


def test_a_fraction_is_rounded_and_never_below_one():
    assert clients_per_round(0.5, 4) == 2
    assert clients_per_round(0.1, 4) == 1
    assert clients_per_round("0.75", 4) == 3
    with pytest.raises(FedbenchError, match="train.clients_per_round"):
        clients_per_round(0, 4)


def test_only_the_chosen_clients_train_and_reach_the_server():
    data = toy_data((8, 12, 6, 10))
    config = toy_config(1)
    config["train"]["clients_per_round"] = 2
    received = []

    class Spy(FedAvg):
        name = "fedavg"

        def server_update(self, previous, updates):
            received.append([u.client for u in updates])
            return super().server_update(previous, updates)

    fed = toy_training(data, data.sites, Spy, config, 0, CPU)
    before = [clone_state(c.state) for c in fed.clients]
    fed.run_round()
    (chosen,) = fed.participation
    assert received == [chosen]
    for i in range(4):
        assert same_states(fed.clients[i].state, before[i]) == (i not in chosen), i
    sizes = [len(fed.clients[i].train) for i in chosen]
    steps = sum(-(-n // config["train"]["batch_size"]) for n in sizes)
    assert fed.cost["client_steps"] == steps
    shared_bytes = sum(t.numel() * t.element_size() for t in fed.global_state.values())
    assert fed.cost["bytes_up"] == 2 * shared_bytes


def test_a_sampled_run_resumes_bit_for_bit(tmp_path):
    data = toy_data((8, 12, 6, 10))
    config = toy_config(4)
    config["train"]["clients_per_round"] = 2
    whole = toy_train(data, data.sites, FedAvg, config, 0, CPU)
    half = dict(config, train=dict(config["train"], rounds=2))
    path = tmp_path / "fed.pt"
    toy_train(data, data.sites, FedAvg, half, 0, CPU, checkpoint_path=path)
    resumed = toy_train(data, data.sites, FedAvg, config, 0, CPU, checkpoint_path=path)
    assert counted(resumed.cost) == counted(whole.cost)
    assert same_states(resumed.global_state, whole.global_state)


def test_a_bad_count_is_one_line(tmp_path):
    runner = CliRunner()
    args = ["run", "--method", "fedavg", "--preset", "quick", "--results-dir", str(tmp_path)]
    result = runner.invoke(app, [*args, "--set", "train.clients_per_round=0"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        "error: setting train.clients_per_round must be 'all', a count >= 1 or a fraction in "
        "(0, 1], got '0'"
    ]
