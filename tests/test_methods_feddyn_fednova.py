"""FedDyn and FedNova against their definitions: FedAvg limits and hand-made server steps."""

from __future__ import annotations

import pytest
import torch
from conftest import LR, same_states, sgd_config, toy_config, toy_data, toy_rounds, toy_train
from test_methods_apfl import CPU, F64, differs, param_names, recording

from fedbench.errors import FedbenchError
from fedbench.method import ClientUpdate, clone_state
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.feddyn import FedDyn, dynamic_term, server_step, updated_gradient
from fedbench_plugins.fednova import FedNova, gradient_weight, nova_step

# FedDyn


def test_feddyn_with_alpha_zero_is_fedavg_bit_for_bit():
    data = toy_data(sizes=(8, 8, 8))  # the paper's mean is uniform: FedAvg's with equal sites
    feddyn = toy_rounds(FedDyn, toy_config(2, alpha=0.0), data, 2)
    fedavg = toy_rounds(FedAvg, toy_config(2), data, 2)
    assert same_states(feddyn.global_state, fedavg.global_state)
    for mine, theirs in zip(feddyn.clients, fedavg.clients, strict=True):
        assert same_states(mine.state, theirs.state)
    assert all(not g.any() for c in feddyn.clients for g in c.method.grads.values())


def test_feddyn_server_step_by_hand():
    # m = 4 clients, 2 took part; alpha = 0.5; previous = [1, 2]; h = [0.5, -1]
    # drifts: [3, 2] - [1, 2] = [2, 0] and [-1, 6] - [1, 2] = [-2, 4]; their sum: [0, 4]
    # h <- [0.5, -1] - 0.5/4 * [0, 4] = [0.5, -1.5]
    # theta = mean [1, 4] - h / 0.5 = [1 - 1, 4 + 3] = [0, 7]
    h = {"w": torch.tensor([0.5, -1.0], dtype=F64)}
    previous = {"w": torch.tensor([1.0, 2.0], dtype=F64)}
    states = [{"w": torch.tensor([3.0, 2.0])}, {"w": torch.tensor([-1.0, 6.0])}]
    new_h, theta = server_step(h, previous, states, 0.5, 4)
    torch.testing.assert_close(new_h["w"], torch.tensor([0.5, -1.5], dtype=F64))
    torch.testing.assert_close(theta["w"], torch.tensor([0.0, 7.0], dtype=F64))
    new_h, theta = server_step({}, previous, states, 0.5, 4)  # h starts at zero
    torch.testing.assert_close(new_h["w"], torch.tensor([0.0, -0.5], dtype=F64))
    torch.testing.assert_close(theta["w"], torch.tensor([1.0, 5.0], dtype=F64))


def test_feddyn_client_state_and_penalty_by_hand():
    # g = [1, -2], theta_i = [3, 1], theta^{t-1} = [1, 1], alpha 0.5: g - 0.5*[2, 0] = [0, -2]
    g = {"weight": torch.tensor([1.0, -2.0])}
    new = updated_gradient(g, {"weight": torch.tensor([3.0, 1.0])}, {"weight": torch.ones(2)}, 0.5)
    torch.testing.assert_close(new["weight"], torch.tensor([0.0, -2.0]))
    layer = torch.nn.Linear(2, 1, bias=False)
    layer.weight.data = torch.tensor([[3.0, 1.0]])
    grads, anchor = {"weight": torch.tensor([[1.0, -2.0]])}, {"weight": torch.ones(1, 2)}
    term = dynamic_term(layer, grads, anchor, 0.5)
    # -<g, theta> + alpha/2 ||theta - anchor||^2 = -(3 - 2) + 0.25 * 4 = 0
    torch.testing.assert_close(term, torch.tensor(0.0))
    term.backward()  # gradient: -g + alpha (theta - anchor) = [-1 + 1, 2 + 0]
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[0.0, 2.0]]))


@pytest.mark.parametrize("clients", ["all", 2])
def test_feddyn_run_keeps_g_and_h_as_defined(data, clients):
    """Two rounds: h = -alpha/m * every drift so far (m: all clients, even when a round samples
    fewer), g_i = -alpha * client i's drifts, and the global parameters are the uniform mean of
    the round's clients minus h / alpha (buffers: FedAvg's mean)."""
    alpha = 0.1
    method = recording(FedDyn)
    cfg = sgd_config(2, alpha=alpha)
    cfg["train"]["clients_per_round"] = clients
    fed = toy_rounds(method, cfg, data, 2)
    assert {len(ups) for _, ups in method.received} == {3 if clients == "all" else clients}
    params, m = param_names(fed), len(data.sites)
    drift = [{k: torch.zeros_like(v, dtype=F64) for k, v in fed.server.h.items()} for _ in range(m)]
    for previous, updates in method.received:
        for u in updates:
            for k in params:
                drift[u.client][k] += u.state[k].double() - previous[k].double()
    h = {k: -alpha / m * sum(d[k] for d in drift) for k in params}
    fedavg_mean = FedAvg({}, m).aggregate(updates)
    for key, value in fed.global_state.items():
        if key in params:
            mean = torch.stack([u.state[key].double() for u in updates]).mean(0)
            expected = (mean - h[key] / alpha).float()
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(value, fedavg_mean[key]), key
    for key in params:
        torch.testing.assert_close(fed.server.h[key], h[key])
        for i in range(m):
            grads = fed.clients[i].method.grads
            g = torch.zeros_like(drift[i][key]) if grads is None else grads[key].double()
            torch.testing.assert_close(g, -alpha * drift[i][key], rtol=1e-4, atol=1e-7)
    assert any(not torch.equal(fed.server.h[k], torch.zeros_like(fed.server.h[k])) for k in params)
    weighted = FedAvg({}, m).aggregate(updates)
    assert differs(fed.global_state, weighted, params), "the uniform mean, not FedAvg's"


def test_feddyn_local_objective_is_the_regularized_loss(data):
    """Round two of client 0, replayed with the gradient -g + alpha (theta - theta^{t-1})
    added by hand to the task loss's."""
    alpha = 0.1
    method = recording(FedDyn)
    fed = toy_rounds(method, sgd_config(1, alpha=alpha), data, 1)
    grads = clone_state(fed.clients[0].method.grads)
    fed.run_round()
    start, (_, updates) = method.starts[len(data.sites)], method.received[-1]
    model = fed.build_model()
    model.load_state_dict(start["state"])
    model.train()
    generator = torch.Generator().manual_seed(0)
    generator.set_state(start["generator"])
    names, params = zip(*model.named_parameters(), strict=True)
    for inputs, targets in fed.clients[0].train.batches(4, generator):
        task_grads = torch.autograd.grad(fed.task.loss(model(inputs), targets), params)
        with torch.no_grad():
            for name, p, g in zip(names, params, task_grads, strict=True):
                p -= LR * (g - grads[name] + alpha * (p - start["global"][name]))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(updates[0].state[key], value, rtol=1e-5, atol=1e-6)


def test_feddyn_resumes_bit_for_bit_and_refuses_a_negative_alpha(data, tmp_path):
    whole = toy_train(data, data.sites, FedDyn, toy_config(3, alpha=0.1), 0, CPU)
    path = tmp_path / "feddyn.pt"
    toy_train(data, data.sites, FedDyn, toy_config(1, alpha=0.1), 0, CPU, checkpoint_path=path)
    resumed = toy_train(
        data, data.sites, FedDyn, toy_config(3, alpha=0.1), 0, CPU, checkpoint_path=path
    )
    assert same_states(whole.global_state, resumed.global_state)
    with pytest.raises(FedbenchError, match="method.alpha"):
        FedDyn.check_settings(toy_config(1, alpha=-0.01))
    FedDyn.check_settings(toy_config(1, **FedDyn.defaults))


# FedNova


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fednova_with_equal_steps_is_fedavg_bit_for_bit(momentum):
    data = toy_data(sizes=(8, 7, 6))  # batches of 4: two steps each, but unequal weights p_i
    method = recording(FedNova)
    fednova = toy_rounds(method, sgd_config(2, momentum), data, 2)
    fedavg = toy_rounds(FedAvg, sgd_config(2, momentum), data, 2)
    assert {u.steps for _, updates in method.received for u in updates} == {2}
    assert same_states(fednova.global_state, fedavg.global_state)
    sent = 2 * len(data.sites) * 8  # each client-round sends a_i, one float64, with its update
    assert fednova.cost["bytes_up"] == fedavg.cost["bytes_up"] + sent
    assert fednova.cost["bytes_down"] == fedavg.cost["bytes_down"]


def momentum_weight(steps: int, rho: float) -> float:
    """a_i written as the sum of SGD's weights on its gradients, (1 - rho^j) / (1 - rho)."""
    return float(sum((1 - rho**j) / (1 - rho) for j in range(1, steps + 1)))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fednova_with_unequal_steps_normalizes_the_parameters_only(data, momentum):
    method = recording(FedNova)
    fednova = toy_rounds(method, sgd_config(1, momentum), data, 1)
    fedavg = toy_rounds(FedAvg, sgd_config(1, momentum), data, 1)
    for mine, theirs in zip(fednova.clients, fedavg.clients, strict=True):
        assert same_states(mine.state, theirs.state), "clients train as in FedAvg"
    ((previous, updates),) = method.received
    assert [u.steps for u in updates] == [2, 3, 2]
    params, n = param_names(fednova), sum(u.num_samples for u in updates)
    a = [momentum_weight(u.steps, momentum) for u in updates]
    assert [float(u.extras["a"]) for u in updates] == pytest.approx(a, rel=1e-12), "a_i sent"
    tau_eff = sum(u.num_samples * a_i for u, a_i in zip(updates, a)) / n
    for key, value in fednova.global_state.items():
        if key in params:  # theta_prev - tau_eff * sum_i p_i (theta_prev - theta_i) / a_i
            start = previous[key].double()
            step = sum(
                u.num_samples / n * (start - u.state[key].double()) / a_i
                for u, a_i in zip(updates, a)
            )
            expected = (start - tau_eff * step).float()
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(value, fedavg.global_state[key]), key
    assert differs(fednova.global_state, fedavg.global_state, params)


class Tiny(torch.nn.Module):
    """One parameter `w` and one integer buffer `n`."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, dtype=F64))
        self.register_buffer("n", torch.tensor(0))


def test_fednova_two_client_server_step_by_hand():
    # p = [1/4, 3/4], tau = [1, 3]: tau_eff = 1/4 + 9/4 = 2.5
    # d_1 = ([0,0] - [2,-2]) / 1 = [-2, 2];  d_2 = ([0,0] - [3,6]) / 3 = [-1, -2]
    # sum p d = [-0.5 - 0.75, 0.5 - 1.5] = [-1.25, -1];  theta = 0 - 2.5 * that = [3.125, 2.5]
    # (FedAvg: [2.75, 4]);  n: (1*1 + 3*4) / 4 = 3.25 -> 3, FedAvg's
    method = FedNova({}, 2)
    assert method.shared_keys(Tiny()) == ["w", "n"]
    previous = {"w": torch.zeros(2, dtype=F64), "n": torch.tensor(0)}
    # each client sends its a_i (plain SGD: a_i = tau_i) with its update
    a_1, a_2 = ({"a": torch.tensor(tau, dtype=F64)} for tau in (1.0, 3.0))
    ups = [
        ClientUpdate({"w": torch.tensor([2.0, -2.0], dtype=F64), "n": torch.tensor(1)}, 1, a_1, 1),
        ClientUpdate({"w": torch.tensor([3.0, 6.0], dtype=F64), "n": torch.tensor(4)}, 3, a_2, 3),
    ]
    new = method.server_update(previous, ups)
    torch.testing.assert_close(new["w"], torch.tensor([3.125, 2.5], dtype=F64))
    assert new["n"].dtype == torch.int64 and new["n"].item() == 3
    # momentum 0.5: a_1 = 1, a_2 = [3 - 0.5 (1 - 0.125) / 0.5] / 0.5 = 4.25; tau_eff = 3.4375
    # sum p d = [-0.5, 0.5] + 0.75 * [-3, -6] / 4.25
    ws = [1.0, 4.25]
    assert [gradient_weight(1, 0.5), gradient_weight(3, 0.5)] == ws
    step = (
        torch.tensor([-0.5, 0.5], dtype=F64) + 0.75 * torch.tensor([-3.0, -6.0], dtype=F64) / 4.25
    )
    by_hand = nova_step({"w": previous["w"]}, [u.state for u in ups], [1, 3], ws)
    torch.testing.assert_close(by_hand["w"], -(0.25 * 1.0 + 0.75 * 4.25) * step)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_fednova_momentum_weight_is_what_torch_sgd_puts_on_a_constant_gradient(steps):
    """With loss <c, p>, tau steps of SGD with momentum rho move p by -lr * a * c."""
    rho, lr, c = 0.9, 0.1, torch.tensor([1.0, -2.0], dtype=F64)
    p = torch.zeros(2, dtype=F64, requires_grad=True)
    optimizer = torch.optim.SGD([p], lr=lr, momentum=rho)
    for _ in range(steps):
        optimizer.zero_grad()
        (c * p).sum().backward()
        optimizer.step()
    torch.testing.assert_close(p.detach(), -lr * gradient_weight(steps, rho) * c)
    assert gradient_weight(steps, 0.0) == steps


def test_fednova_refuses_adam_naming_the_setting():
    with pytest.raises(FedbenchError, match="train.optimizer=sgd"):
        FedNova.check_settings(toy_config(1))
    FedNova.check_settings(sgd_config(1, momentum=0.9))
