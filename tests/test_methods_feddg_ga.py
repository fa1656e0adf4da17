"""FedDG-GA against its definition: the FedAvg limit, the server's re-weighting by hand, the gaps
the clients send recomputed, and resume."""

from __future__ import annotations

import pytest
import torch
from conftest import same_states, toy_config, toy_rounds
from method_checks import partial, refuses_by_name, resumes_exactly

from fedbench.method import ClientUpdate, clone_state
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.feddg_ga import FedDGGA, adjusted, step_at

GAP_BYTES = 8  # one float64 scalar


def test_feddg_ga_with_step_zero_is_fedavg_bit_for_bit(data):
    mine = toy_rounds(FedDGGA, toy_config(3, step_size=0.0), data, 3)
    fedavg = toy_rounds(FedAvg, toy_config(3), data, 3)
    assert same_states(mine.global_state, fedavg.global_state)
    for ours, theirs in zip(mine.clients, fedavg.clients, strict=True):
        assert same_states(ours.state, theirs.state)
    clients = len(data.sites)
    sizes = {i: float(len(site.train)) for i, site in enumerate(data.sites)}
    assert mine.server.weights == sizes, "FedAvg's weights, untouched"
    extra = mine.cost["bytes_up"] - fedavg.cost["bytes_up"]
    assert extra == 2 * clients * GAP_BYTES, "a gap from each client in rounds 2 and 3"
    assert {**mine.cost, "bytes_up": 0} == {**fedavg.cost, "bytes_up": 0}
    moved = toy_rounds(FedDGGA, toy_config(2, step_size=0.2), data, 2)
    assert not same_states(
        moved.global_state, toy_rounds(FedAvg, toy_config(2), data, 2).global_state
    )
    assert moved.server.weights != sizes


def test_feddg_ga_adjustment_by_hand():
    # a = (0.5, 0.3, 0.2), G = (0.3, 0.1, -0.1): mu = 0.1, G - mu = (0.2, 0, -0.2), largest 0.2;
    # a + 0.05 * (1, 0, -1) = (0.55, 0.3, 0.15), already in [0, 1] and summing to 1
    assert adjusted([0.5, 0.3, 0.2], [0.3, 0.1, -0.1], 0.05) == pytest.approx([0.55, 0.3, 0.15])
    # a = (0.02, 0.49, 0.49), G - mu = (-1, 0.5, 0.5): (-0.03, 0.515, 0.515) -> clip (0, .515,
    # .515) -> normalized (0, 0.5, 0.5)
    assert adjusted([0.02, 0.49, 0.49], [-1.0, 0.5, 0.5], 0.05) == pytest.approx([0.0, 0.5, 0.5])
    # weights in sample counts (8, 12, 6): a = (8, 12, 6) / 26, G - mu = (-1, 0, 1), so
    # a + 0.05 * (-1, 0, 1), times 26 = (8 - 1.3, 12, 6 + 1.3)
    assert adjusted([8.0, 12.0, 6.0], [1.0, 2.0, 3.0], 0.05) == pytest.approx([6.7, 12.0, 7.3])
    assert adjusted([8.0, 12.0, 6.0], [0.4, 0.4, 0.4], 0.05) == [8.0, 12.0, 6.0], "equal gaps"
    assert adjusted([8.0, 12.0, 6.0], [1.0, 2.0, 3.0], 0.0) == [8.0, 12.0, 6.0]
    # d_r = d * max(0, 1 - r / R)
    assert step_at(0.05, 24, 0) == 0.05
    assert step_at(0.05, 24, 12) == pytest.approx(0.025)
    assert step_at(0.05, 24, 24) == 0.0 and step_at(0.05, 24, 30) == 0.0


def update(client: int, samples: int, value: float, gap: float | None = None) -> ClientUpdate:
    extras = {} if gap is None else {"gap": torch.tensor(gap, dtype=torch.float64)}
    state = {"w": torch.tensor([value], dtype=torch.float64)}
    return ClientUpdate(state, samples, extras, client=client)


def test_feddg_ga_server_reweights_from_the_gaps_it_receives():
    server = FedDGGA({"step_size": 0.1, "decay_rounds": 4}, 3)
    previous = {"w": torch.zeros(1, dtype=torch.float64)}
    first = server.server_update(
        previous, [update(0, 2, 1.0), update(1, 3, 2.0), update(2, 5, 4.0)]
    )
    # round 1: no gap yet, FedAvg's weights (2, 3, 5): (2 + 6 + 20) / 10
    torch.testing.assert_close(first["w"], torch.tensor([2.8], dtype=torch.float64))
    # round 2, gaps of round 1 (0.4, 0.1, 0.1): mu 0.2, (G - mu) / 0.2 = (1, -0.5, -0.5);
    # d_1 = 0.1 * (1 - 1/4) = 0.075; a = (0.2, 0.3, 0.5) + 0.075 * (1, -0.5, -0.5)
    # = (0.275, 0.2625, 0.4625), times 10 = (2.75, 2.625, 4.625)
    gaps = [update(0, 2, 1.0, 0.4), update(1, 3, 2.0, 0.1), update(2, 5, 4.0, 0.1)]
    second = server.server_update(first, gaps)
    assert [server.weights[i] for i in range(3)] == pytest.approx([2.75, 2.625, 4.625])
    expected = (2.75 * 1.0 + 2.625 * 2.0 + 4.625 * 4.0) / 10
    torch.testing.assert_close(second["w"], torch.tensor([expected], dtype=torch.float64))
    # only the clients that sent a gap move, keeping their total (2.625 + 4.625 = 7.25): gaps
    # (0, 1) -> (-1, 1), d_2 = 0.05; a = (2.625, 4.625) / 7.25 + 0.05 * (-1, 1)
    server.server_update(second, [update(1, 3, 2.0, 0.0), update(2, 5, 4.0, 1.0)])
    moved = [7.25 * (2.625 / 7.25 - 0.05), 7.25 * (4.625 / 7.25 + 0.05)]
    assert [server.weights[i] for i in (1, 2)] == pytest.approx(moved)
    assert server.weights[0] == pytest.approx(2.75), "a client that sent no gap keeps its weight"


def task_loss(fed, state: dict, split) -> float:
    """The task loss of `state` on all of `split` in one batch, in eval mode."""
    model = fed.build_model()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return float(fed.task.loss(model(split.inputs), split.targets))


def test_feddg_ga_clients_send_the_generalization_gap(data):
    received: list[list[ClientUpdate]] = []

    class Spy(FedDGGA):
        def server_update(self, previous, updates):
            received.append(list(updates))
            return super().server_update(previous, updates)

    fed = toy_rounds(Spy, toy_config(1, step_size=0.2), data, 1)
    global_1 = clone_state(fed.global_state)
    local_1 = [clone_state(c.state) for c in fed.clients]
    assert all(not u.extras for u in received[0]), "no gap in round 1"
    fed.run_round()
    for update, client, local in zip(received[1], fed.clients, local_1, strict=True):
        # the toy validation splits hold 4 images, one batch of the toy config's batch_size 4
        gap = task_loss(fed, global_1, client.val) - task_loss(fed, local, client.val)
        assert update.extras["gap"].dtype == torch.float64
        assert update.extras["gap"].item() == pytest.approx(gap, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("clients", ["all", 2])
def test_feddg_ga_resumes_bit_for_bit(data, tmp_path, clients):
    config = toy_config(3, step_size=0.2, decay_rounds=3)
    if clients != "all":
        config = partial(config)
    assert resumes_exactly(FedDGGA, config, data, tmp_path)
    fed = toy_rounds(FedDGGA, config, data, 3)
    restored = FedDGGA({}, len(data.sites))
    restored.load_state_dict(fed.server.state_dict())
    assert restored.weights == fed.server.weights and restored.rounds == 3


def test_feddg_ga_refuses_bad_settings_by_name():
    refuses_by_name(
        FedDGGA,
        toy_config,
        {"step_size": [-0.1, "x", True], "decay_rounds": [0, 2.5, True, None]},
    )


def test_feddg_ga_only_clients_of_the_previous_round_send_a_gap(data):
    received: list[list[ClientUpdate]] = []

    class Spy(FedDGGA):
        def server_update(self, previous, updates):
            received.append(list(updates))
            return super().server_update(previous, updates)

    fed = toy_rounds(Spy, partial(toy_config(4)), data, 4)
    for before, now, updates in zip(fed.participation, fed.participation[1:], received[1:]):
        assert [u.client for u in updates] == now
        assert [u.client for u in updates if "gap" in u.extras] == [c for c in now if c in before]
