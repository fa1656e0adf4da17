"""FedPer and the server-optimizer methods (FedAvgM, FedAdam, FedYogi, FedAdagrad), each tested
against its definition: hand-made server steps with numbers worked out here, not stored runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import toy_config, toy_data, toy_train, toy_training
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.errors import FedbenchError
from fedbench.method import ClientUpdate, Method
from fedbench.models import output_layer_keys
from fedbench_plugins.fedadagrad import FedAdagrad
from fedbench_plugins.fedadam import FedAdam
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.fedavgm import FedAvgM
from fedbench_plugins.fedper import FedPer
from fedbench_plugins.fedyogi import FedYogi

CPU = torch.device("cpu")
F64 = torch.float64


def updates(*states: dict[str, list[float] | int], samples=(1, 3)) -> list[ClientUpdate]:
    """Client updates of a float64 tensor `w` and an int64 buffer `n`, weighted 1 : 3."""
    return [
        ClientUpdate(
            {"w": torch.as_tensor(s["w"], dtype=F64), "n": torch.tensor(s["n"])}, count, client=i
        )
        for i, (s, count) in enumerate(zip(states, samples, strict=True))
    ]


def state(w: list[float] | torch.Tensor, n: int = 0) -> dict[str, torch.Tensor]:
    return {"w": torch.as_tensor(w, dtype=F64), "n": torch.tensor(n)}


class Toy(torch.nn.Module):
    """A parameter `w` and an integer buffer `n`: the keys of `state`."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, dtype=F64))
        self.register_buffer("n", torch.tensor(0))


def server(cls: type[Method], params: dict) -> Method:
    """A server-optimizer method that has seen the toy model (so `w` is its parameter)."""
    method = cls(params, num_clients=2)
    assert method.shared_keys(Toy()) == ["w", "n"]
    return method


# FedPer


def fedper_spy() -> type[Method]:
    """FedPer recording each client's head before and after its local update, and the uploads."""

    class Spy(FedPer):
        heads_in: list[tuple[int, dict]] = []
        heads_out: list[tuple[int, dict]] = []
        received: list[list[ClientUpdate]] = []

        def local_update(self, model, ctx):
            head = output_layer_keys(model)
            Spy.heads_in.append((ctx.client, {k: model.state_dict()[k].clone() for k in head}))
            extras = super().local_update(model, ctx)
            Spy.heads_out.append((ctx.client, {k: model.state_dict()[k].clone() for k in head}))
            return extras

        def aggregate(self, ups):
            Spy.received.append(ups)
            return super().aggregate(ups)

    return Spy


def test_fedper_shares_exactly_the_base_and_each_client_keeps_its_head():
    data = toy_data()
    spy = fedper_spy()
    fed = toy_training(data, data.sites, spy, toy_config(2), seed=0, device=CPU)
    fed.run_round()
    fed.run_round()
    head = output_layer_keys(fed.model)
    assert head == {"model.2.conv.weight", "model.2.conv.bias"}
    assert fed.shared == [k for k in fed.model.state_dict() if k not in head]
    for ups in spy.received:
        assert all(set(u.state) == set(fed.shared) for u in ups), (
            "the head never reaches the server"
        )
    clients = len(data.sites)
    first_out, second_in = spy.heads_out[:clients], spy.heads_in[clients:]
    for (i, trained), (j, start) in zip(first_out, second_in, strict=True):
        assert i == j
        assert all(torch.equal(start[k], trained[k]) for k in head), "round 2 starts from own head"
    for i, last in spy.heads_out[clients:]:
        personal = fed.personalized(i)
        assert all(torch.equal(personal[k], last[k]) for k in head)
        assert all(torch.equal(personal[k], fed.global_state[k]) for k in fed.shared)


def test_fedper_personalized_models_differ_only_in_the_head():
    data = toy_data()
    result = toy_train(data, data.sites, FedPer, toy_config(2), 0, CPU)
    head = set(result.personalized[0]) - set(result.shared_keys)
    assert head == {"model.2.conv.weight", "model.2.conv.bias"}
    assert set(result.global_state) == set(result.personalized[0]), "unseen sites get a model"
    first, *others = result.personalized
    for other in others:
        for key, value in first.items():
            same = torch.equal(value, other[key])
            assert same == (key not in head), key


# FedAvgM


def test_fedavgm_without_momentum_and_unit_rate_is_fedavg_bit_for_bit():
    data = toy_data()
    plain = toy_train(data, data.sites, FedAvg, toy_config(2), 0, CPU)
    server = toy_train(data, data.sites, FedAvgM, toy_config(2, server_lr=1.0, beta=0.0), 0, CPU)
    assert set(plain.global_state) == set(server.global_state)
    for key, value in plain.global_state.items():
        assert server.global_state[key].dtype == value.dtype, key
        assert torch.equal(server.global_state[key], value), key


def test_fedavgm_without_momentum_is_fedavg_exactly_where_rounding_bites():
    """previous - (previous - mean) loses the mean when |previous| >> |mean|: 2^30 - 2^-30 is
    2^30 in float64. The state must still be FedAvg's, over two steps (so v_old is used)."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([2.0**30, 1.0, 1e-3, 1e-30]).repeat_interleave(4)
    prev = {"w": (torch.randn(16, generator=gen) * scales).float()}
    method, fedavg = server(FedAvgM, {"server_lr": 1.0, "beta": 0.0}), FedAvg({}, 2)
    for _ in range(2):
        small = torch.randn(2, 16, generator=gen) * 2.0**-30
        ups = [ClientUpdate({"w": small[i].float()}, n, client=i) for i, n in enumerate((5, 7))]
        new = method.server_update(prev, ups)
        assert new["w"].dtype == torch.float32
        assert torch.equal(new["w"], fedavg.aggregate(ups)["w"])
        prev = {"w": prev["w"] * 3.0}


def test_fedavgm_momentum_by_hand():
    method = server(FedAvgM, {"server_lr": 0.5, "beta": 0.5})
    # step 1: mean = (1*[4,-4] + 3*[0,4]) / 4 = [1, 2]; delta = [0,0] - mean = [-1, -2]
    #         v = 0.5*0 + delta = [-1, -2]; w = [0,0] - 0.5*v = [0.5, 1]; n = (1 + 3*2)/4 -> 2
    w1 = method.server_update(
        state([0.0, 0.0]), updates({"w": [4, -4], "n": 1}, {"w": [0, 4], "n": 2})
    )
    torch.testing.assert_close(w1["w"], torch.tensor([0.5, 1.0], dtype=F64))
    assert w1["n"].dtype == torch.int64 and w1["n"].item() == 2
    # step 2: mean = (1*[2.5,1] + 3*[0.5,1]) / 4 = [1, 1]; delta = [0.5,1] - mean = [-0.5, 0]
    #         v = 0.5*[-1,-2] + [-0.5,0] = [-1, -1]; w = [0.5,1] - 0.5*v = [1, 1.5]
    ups = updates({"w": [2.5, 1], "n": 2}, {"w": [0.5, 1], "n": 2})
    w2 = method.server_update(w1, ups)
    torch.testing.assert_close(w2["w"], torch.tensor([1.0, 1.5], dtype=F64))
    torch.testing.assert_close(
        method.state_dict()["velocity"]["w"], torch.tensor([-1.0, -1.0], dtype=F64)
    )


# FedAdam, FedYogi, FedAdagrad: server_lr 0.5, beta1 0.5, beta2 0.75, tau 0.5, so v_0 = 0.25.
# Both steps share the mean change: delta_1 = [1, -2], delta_2 = [-0.25, 2], hence
# m_1 = 0.5*delta_1 = [0.5, -1] and m_2 = 0.5*m_1 + 0.5*delta_2 = [0.125, 0.5].
ADAPTIVE = {"server_lr": 0.5, "beta1": 0.5, "beta2": 0.75, "tau": 0.5}
M1, M2 = [0.5, -1.0], [0.125, 0.5]
SECOND_MOMENTS = {
    # Adam: v_1 = 0.75*0.25 + 0.25*[1, 4];  v_2 = 0.75*v_1 + 0.25*[0.0625, 4]
    FedAdam: ([0.4375, 1.1875], [0.34375, 1.890625]),
    # Yogi: delta_1^2 > v_0 so v_1 = 0.25 + 0.25*[1, 4]; then 0.0625 < 0.5 but 4 > 1.25:
    #       v_2 = [0.5 - 0.25*0.0625, 1.25 + 0.25*4]
    FedYogi: ([0.5, 1.25], [0.484375, 2.25]),
    # Adagrad: v_1 = 0.25 + [1, 4];  v_2 = v_1 + [0.0625, 4]
    FedAdagrad: ([1.25, 4.25], [1.3125, 8.25]),
}


def adaptive_two_steps(cls: type[FedAdam]) -> tuple[FedAdam, dict, dict]:
    """Two server steps of `cls` with the mean changes delta_1 and delta_2 above."""
    method = server(cls, {k: v for k, v in ADAPTIVE.items() if k in cls.defaults})
    # mean_1 = (1*[4,-2] + 3*[0,-2]) / 4 = [1, -2] from w_0 = [0, 0]
    w1 = method.server_update(
        state([0.0, 0.0]), updates({"w": [4, -2], "n": 1}, {"w": [0, -2], "n": 2})
    )
    # mean_2 - w_1 = (1*[-1, 2] + 3*[0, 2]) / 4 = [-0.25, 2]
    a, b = (
        w1["w"] + torch.tensor([-1.0, 2.0], dtype=F64),
        w1["w"] + torch.tensor([0.0, 2.0], dtype=F64),
    )
    w2 = method.server_update(w1, updates({"w": a, "n": 2}, {"w": b, "n": 2}))
    return method, w1, w2


def expected_step(w: list[float], m: list[float], v: list[float]) -> torch.Tensor:
    """w + server_lr * m / (sqrt(v) + tau), element by element."""
    lr, tau = ADAPTIVE["server_lr"], ADAPTIVE["tau"]
    return torch.tensor(
        [wi + lr * mi / (math.sqrt(vi) + tau) for wi, mi, vi in zip(w, m, v)], dtype=F64
    )


@pytest.mark.parametrize("cls", list(SECOND_MOMENTS), ids=lambda c: c.name)
def test_adaptive_server_step_by_hand_over_two_steps(cls):
    v1, v2 = SECOND_MOMENTS[cls]
    method, w1, w2 = adaptive_two_steps(cls)
    expected_w1 = expected_step([0.0, 0.0], M1, v1)
    torch.testing.assert_close(w1["w"], expected_w1)
    torch.testing.assert_close(w2["w"], expected_step(expected_w1.tolist(), M2, v2))
    saved = method.state_dict()
    torch.testing.assert_close(saved["m"]["w"], torch.tensor(M2, dtype=F64))
    torch.testing.assert_close(saved["v"]["w"], torch.tensor(v2, dtype=F64))
    assert saved["step"] == 2
    assert w1["n"].item() == 2 and w2["n"].item() == 2 and w2["n"].dtype == torch.int64


def test_yogi_and_adam_differ_only_in_the_second_moment():
    adam, _, adam_w = adaptive_two_steps(FedAdam)
    yogi, _, yogi_w = adaptive_two_steps(FedYogi)
    assert torch.equal(adam.m["w"], yogi.m["w"])
    # step 1 (delta^2 > v_0 everywhere): Yogi's v_1 - Adam's v_1 = (1 - beta2) * v_0 = 0.0625
    v1_adam, v1_yogi = (torch.tensor(SECOND_MOMENTS[c][0]) for c in (FedAdam, FedYogi))
    torch.testing.assert_close(v1_yogi - v1_adam, torch.full((2,), 0.0625))
    assert not torch.equal(adam.v["w"], yogi.v["w"]) and not torch.equal(adam_w["w"], yogi_w["w"])


# resume and settings

SERVER_METHODS = [
    pytest.param(cls, params, id=cls.name)
    for cls, params in [
        (FedAvgM, {"server_lr": 0.7, "beta": 0.9}),
        (FedAdam, {"server_lr": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
        (FedYogi, {"server_lr": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
        (FedAdagrad, {"server_lr": 0.05, "beta1": 0.9, "tau": 1e-3}),
    ]
]


@pytest.mark.parametrize("cls,params", SERVER_METHODS)
def test_resumed_from_a_checkpoint_continues_bit_for_bit(cls, params, tmp_path):
    data = toy_data()
    config = toy_config(3, **params)
    whole = toy_train(data, data.sites, cls, config, 0, CPU)
    first = dict(config, train=dict(config["train"], rounds=1))
    path = tmp_path / "fed.pt"
    toy_train(data, data.sites, cls, first, 0, CPU, checkpoint_path=path)
    assert torch.load(path, weights_only=True)["round"] == 1
    resumed = toy_train(data, data.sites, cls, config, 0, CPU, checkpoint_path=path)
    for key, value in whole.global_state.items():
        assert torch.equal(resumed.global_state[key], value), key


@pytest.mark.parametrize("cls,params", SERVER_METHODS)
def test_server_state_round_trip_continues_identically(cls, params):
    method, copy = server(cls, params), server(cls, params)
    ups = updates({"w": [4, -2], "n": 1}, {"w": [0, -1], "n": 2})
    w1 = method.server_update(state([0.0, 0.0]), ups)
    copy.load_state_dict(method.state_dict())
    again = updates({"w": [1, 3], "n": 2}, {"w": [2, -5], "n": 2})
    fresh = server(cls, params).server_update(w1, again)
    continued = method.server_update(w1, again)
    assert torch.equal(copy.server_update(w1, again)["w"], continued["w"])
    assert not torch.equal(fresh["w"], continued["w"]), "the server state matters"


@pytest.mark.parametrize(
    "cls,setting",
    [
        (FedAvgM, {"beta": 1.0}),
        (FedAvgM, {"server_lr": 0}),
        (FedAdam, {"tau": -1e-3}),
        (FedYogi, {"beta2": 1.5}),
        (FedAdagrad, {"beta1": -0.1}),
    ],
)
def test_bad_settings_are_refused_by_name(cls, setting):
    config = {"method": {**cls.defaults, **setting}}
    with pytest.raises(FedbenchError, match=f"method.{next(iter(setting))}"):
        cls.check_settings(config)
    cls.check_settings({"method": dict(cls.defaults)})


# end to end


@pytest.mark.parametrize("name", ["fedper", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_cli_run_ends_ok(name, tmp_path):
    args = ["run", "--method", name, "--preset", "quick", "--holdout", "none", "--rounds", "1"]
    result = CliRunner().invoke(app, [*args, "--results-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["status"] == "ok" and record["method"] == name
    assert record["cost"]["bytes_up"] > 0 and record["cost"]["client_steps"] > 0
