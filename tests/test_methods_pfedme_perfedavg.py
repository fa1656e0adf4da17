"""pFedMe and Per-FedAvg (FO) against their papers' definitions: each update recomputed
by hand, the limiting cases against FedAvg, and resuming from a checkpoint."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from conftest import (
    LR,
    same_states,
    sgd_config,
    toy_builder,
    toy_config,
    toy_rounds,
    toy_train,
)
from method_checks import (
    BATCH,
    CPU,
    SquaredError,
    linear_grads,
    partial,
    random_linear,
    refuses_by_name,
    resumes_exactly,
    start_spy,
    stream,
)

from fedbench.errors import FedbenchError
from fedbench.method import ClientUpdate, clone_state
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.perfedavg import PerFedAvg, meta_step, step_pairs
from fedbench_plugins.pfedme import PFedMe, moreau_steps, pull_anchor

# pFedMe


def test_pfedme_one_local_step_by_hand():
    """K inner steps on one batch from a carried-over theta, then w's step towards theta."""
    gen = torch.Generator().manual_seed(2)
    theta_model = random_linear(gen)
    theta = clone_state(theta_model.state_dict())
    w = {k: torch.randn(v.shape, generator=gen) for k, v in theta.items()}
    x, y = torch.randn(6, 3, generator=gen), torch.randn(6, 2, generator=gen)
    lam, personal_lr, lr, inner = 2.0, 0.05, 0.1, 3
    anchor = clone_state(w)
    moreau_steps(theta_model, anchor, (x, y), SquaredError(), lam, personal_lr, inner)
    pull_anchor(anchor, theta_model, lam, lr)
    for _ in range(inner):
        grad = linear_grads(theta, x, y)
        theta = {k: theta[k] - personal_lr * (grad[k] + lam * (theta[k] - w[k])) for k in theta}
    w_new = {k: w[k] - lr * lam * (w[k] - theta[k]) for k in w}
    for key in theta:
        torch.testing.assert_close(theta_model.state_dict()[key], theta[key])
        torch.testing.assert_close(anchor[key], w_new[key])


def test_pfedme_server_mixes_beta_on_parameters_and_averages_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    server = PFedMe({"beta": 0.25}, 2)
    server.shared_keys(model)
    gen = torch.Generator().manual_seed(3)

    def state() -> dict:
        out = {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
        out["1.num_batches_tracked"] = torch.tensor(int(torch.randint(9, (1,), generator=gen)))
        return out

    previous, a, b = state(), state(), state()
    new = server.server_update(previous, [ClientUpdate(a, 1), ClientUpdate(b, 3)])
    for key, value in new.items():
        mean = (a[key].double() + 3 * b[key].double()) / 4
        if key in ("0.weight", "0.bias", "1.weight", "1.bias"):
            expected = (0.75 * previous[key].double() + 0.25 * mean).float()
        elif key == "1.num_batches_tracked":
            expected = mean.round().long()
        else:
            expected = mean.float()
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=key)
    fedavg = PFedMe({"beta": 1.0}, 2)
    fedavg.shared_keys(model)
    ups = [ClientUpdate(a, 1), ClientUpdate(b, 3)]
    assert same_states(
        fedavg.server_update(previous, ups), FedAvg({}, 2).server_update(previous, ups)
    )


def test_pfedme_local_update_replayed_by_hand(data):
    """Round 2 of every client: per batch, K steps of theta (from w at the round's start, then
    carried over), w's step; the client sends w_i and keeps theta_i."""
    lam, personal_lr, inner = 5.0, 0.02, 2
    spy = start_spy(PFedMe)
    cfg = sgd_config(2, lam=lam, personal_lr=personal_lr, inner_steps=inner)
    fed = toy_rounds(spy, cfg, data, 2)
    for start in [s for s in spy.starts if s["round"] == 2]:
        i = start["client"]
        model = fed.build_model()
        model.load_state_dict(start["state"])
        model.train()
        names = [n for n, _ in model.named_parameters()]
        w = {n: start["state"][n].clone() for n in names}
        for x, y in fed.clients[i].train.batches(BATCH, stream(start["generator"])):
            for _ in range(inner):
                grads = torch.autograd.grad(fed.task.loss(model(x), y), list(model.parameters()))
                with torch.no_grad():
                    for (n, p), g in zip(model.named_parameters(), grads, strict=True):
                        p.copy_(p - personal_lr * (g + lam * (p - w[n])))
            theta = dict(model.named_parameters())
            w = {n: w[n] - LR * lam * (w[n] - theta[n].detach()) for n in names}
        kept = clone_state(model.state_dict())
        sent = {**kept, **w}
        for key in kept:
            torch.testing.assert_close(fed.personalized(i)[key], kept[key], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(fed.clients[i].state[key], sent[key], rtol=1e-5, atol=1e-6)
        assert not same_states(fed.personalized(i), fed.clients[i].state)


def test_pfedme_limit_is_fedavg_with_sgd(data):
    """K = 1, lambda = 1 / eta, personal_lr = eta: w_i follows theta_i, which takes SGD's steps;
    equal to FedAvg with SGD up to rounding (w - (w - theta) is theta only to rounding)."""
    cfg = sgd_config(2, lam=1 / LR, personal_lr=LR, inner_steps=1, beta=1.0)
    pfedme = toy_rounds(PFedMe, cfg, data, 2)
    fedavg = toy_rounds(FedAvg, sgd_config(2), data, 2)
    for key, value in fedavg.global_state.items():
        torch.testing.assert_close(pfedme.global_state[key], value, rtol=1e-4, atol=1e-5)
    for i in range(len(data.sites)):
        for key, value in fedavg.clients[i].state.items():
            torch.testing.assert_close(pfedme.personalized(i)[key], value, rtol=1e-4, atol=1e-5)


def test_pfedme_resumes_exactly_and_checks_settings(data, tmp_path):
    config = partial(sgd_config(3, inner_steps=2, beta=1.5))
    assert resumes_exactly(PFedMe, config, data, tmp_path)
    with pytest.raises(FedbenchError, match="train.optimizer=sgd"):
        PFedMe.check_settings(toy_config(1))
    bad = {"inner_steps": [0, 1.0], "lam": [-1.0], "personal_lr": ["a"], "beta": [0.0, True]}
    refuses_by_name(PFedMe, sgd_config, bad)


# Per-FedAvg (FO)


def test_perfedavg_one_local_step_by_hand():
    """temp = w - alpha grad f(w; D); w <- w - beta grad f(temp; D')."""
    gen = torch.Generator().manual_seed(4)
    model = random_linear(gen)
    w = clone_state(model.state_dict())
    d = (torch.randn(5, 3, generator=gen), torch.randn(5, 2, generator=gen))
    d_prime = (torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen))
    alpha, beta = 0.2, 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=beta)
    meta_step(model, optimizer, SquaredError(), d, d_prime, alpha, nullcontext)
    first = linear_grads(w, *d)
    temp = {k: w[k] - alpha * first[k] for k in w}
    second = linear_grads(temp, *d_prime)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, w[key] - beta * second[key])


def test_perfedavg_pairs_each_batch_with_the_next():
    assert list(step_pairs(iter([]))) == []
    assert list(step_pairs(iter("a"))) == [("a", "a")]
    assert list(step_pairs(iter("abc"))) == [("b", "a"), ("c", "b"), ("a", "c")]


def test_perfedavg_local_update_replayed_by_hand(data):
    alpha = 0.03
    spy = start_spy(PerFedAvg)
    fed = toy_rounds(spy, sgd_config(2, alpha=alpha, personal_steps=0), data, 2)
    for start in [s for s in spy.starts if s["round"] == 2]:
        i = start["client"]
        model = fed.build_model()
        model.load_state_dict(start["state"])
        model.train()
        batches = list(fed.clients[i].train.batches(BATCH, stream(start["generator"])))
        for k, meta in enumerate(batches):
            adapt = batches[(k + 1) % len(batches)]
            w = clone_state(model.state_dict())
            grads = torch.autograd.grad(
                fed.task.loss(model(adapt[0]), adapt[1]), list(model.parameters())
            )
            model.load_state_dict(w)  # the adaptation forward leaves the statistics as they were
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads, strict=True):
                    p -= alpha * g
            grads = torch.autograd.grad(
                fed.task.loss(model(meta[0]), meta[1]), list(model.parameters())
            )
            with torch.no_grad():
                for (n, p), g in zip(model.named_parameters(), grads, strict=True):
                    p.copy_(w[n] - LR * g)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(fed.clients[i].state[key], value, rtol=1e-5, atol=1e-6)
    assert fed.cost["client_steps"] == 2 * sum(
        2 * len(list(c.train.batches(BATCH, torch.Generator()))) for c in fed.clients
    )


def test_perfedavg_with_alpha_zero_is_fedavg_with_sgd_bit_for_bit(data):
    mine = toy_train(
        data, data.sites, PerFedAvg, sgd_config(2, alpha=0.0, personal_steps=0), 0, CPU
    )
    fedavg = toy_train(data, data.sites, FedAvg, sgd_config(2), 0, CPU)
    assert same_states(mine.global_state, fedavg.global_state)
    for a, b in zip(mine.personalized, fedavg.personalized, strict=True):
        assert same_states(a, b)
    assert mine.cost["client_steps"] == 2 * fedavg.cost["client_steps"]


def test_perfedavg_final_update_is_one_sgd_step_of_alpha(data):
    alpha = 0.2

    class Spy(PerFedAvg):
        finals: list[dict] = []

        def final_update(self, model, ctx):
            Spy.finals.append(
                {
                    "client": ctx.client,
                    "state": clone_state(model.state_dict()),
                    "generator": ctx.generator.get_state(),
                }
            )
            super().final_update(model, ctx)

    result = toy_train(data, data.sites, Spy, sgd_config(1, alpha=alpha), 0, CPU)
    assert len(Spy.finals) == len(data.sites)
    for final in Spy.finals:
        i = final["client"]
        assert same_states(final["state"], result.global_state), "from the global model"
        model = toy_builder(data)()
        model.load_state_dict(final["state"])
        model.train()
        x, y = next(data.sites[i].train.batches(BATCH, stream(final["generator"])))
        grads = torch.autograd.grad(data.task.loss(model(x), y), list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads, strict=True):
                p -= alpha * g
        for key, value in model.state_dict().items():
            torch.testing.assert_close(result.personalized[i][key], value, rtol=1e-6, atol=1e-7)
    assert result.cost["client_steps"] == 2 * 7 + len(data.sites)


def test_perfedavg_resumes_exactly_and_checks_settings(data, tmp_path):
    config = partial(sgd_config(3, alpha=0.01, personal_steps=2))
    assert resumes_exactly(PerFedAvg, config, data, tmp_path)
    with pytest.raises(FedbenchError, match="train.optimizer=sgd"):
        PerFedAvg.check_settings(toy_config(1))
    with pytest.raises(FedbenchError, match="train.momentum=0"):
        PerFedAvg.check_settings(sgd_config(1, momentum=0.9))
    bad = {"alpha": [-1.0, "fast", True], "personal_steps": [-1, 1.0]}
    refuses_by_name(PerFedAvg, sgd_config, bad)
    PerFedAvg.check_settings(sgd_config(1, alpha="0.05"))
