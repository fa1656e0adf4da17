"""APFL against its definition: the alpha limits, what reaches the server, a mixed step by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import LR, same_states, sgd_config, toy_config, toy_rounds, toy_train

from fedbench.errors import FedbenchError
from fedbench.method import ClientUpdate, Method, clone_state
from fedbench_plugins.apfl import APFL, mix_states, mixed_step
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.local import Local

CPU = torch.device("cpu")
F64 = torch.float64


def differs(a: dict, b: dict, keys) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in keys)


def recording(method_cls: type[Method]) -> type[Method]:
    """A subclass recording each local update's start and what the server receives."""

    class Recorder(method_cls):
        name = method_cls.name
        starts: list[dict] = []
        received: list[tuple[dict, list[ClientUpdate]]] = []

        def local_update(self, model, ctx):
            Recorder.starts.append(
                {
                    "client": ctx.client,
                    "state": clone_state(model.state_dict()),
                    "global": clone_state(ctx.global_state),
                    "generator": ctx.generator.get_state(),
                    "round": ctx.round,
                }
            )
            return super().local_update(model, ctx)

        def server_update(self, previous, updates):
            Recorder.received.append((clone_state(previous), list(updates)))
            return super().server_update(previous, updates)

    Recorder.starts, Recorder.received = [], []
    return Recorder


def param_names(fed) -> set[str]:
    return {name for name, _ in fed.model.named_parameters()}


# APFL


def test_apfl_sends_exactly_the_fedavg_update_from_the_same_start(data):
    cfg = toy_config(2, alpha=0.5, adaptive=True, alpha_lr=0.1)
    method = recording(APFL)
    fed = toy_rounds(method, cfg, data, 2)
    sent = [u for _, updates in method.received for u in updates]
    assert len(sent) == len(method.starts) == 2 * len(data.sites)
    for start, update in zip(method.starts, sent, strict=True):
        model = fed.build_model()
        model.load_state_dict(start["state"])
        client = fed.clients[start["client"]]
        client.generator.set_state(start["generator"])
        ctx = client.context(fed.setup, start["global"], {}, start["round"])
        assert FedAvg({}, 3).local_update(model, ctx) == update.extras == {}
        assert set(update.state) == set(model.state_dict()), "w only: v_i is not sent"
        for key, value in model.state_dict().items():
            assert torch.equal(value, update.state[key]), key
        assert update.steps == 2 * ctx.steps, "the steps of w_i and of v_i both count"
    fedavg = toy_rounds(FedAvg, toy_config(2), data, 2)
    assert same_states(fed.global_state, fedavg.global_state)
    assert fed.cost["bytes_up"] == fedavg.cost["bytes_up"]
    assert fed.cost["bytes_down"] == fedavg.cost["bytes_down"]
    for i in range(len(data.sites)):
        assert differs(fed.personalized(i), fed.global_state, param_names(fed))


def test_apfl_with_alpha_zero_scores_the_global_model_exactly(data):
    result = toy_train(data, data.sites, APFL, toy_config(2, alpha=0.0, adaptive=False), 0, CPU)
    fedavg = toy_train(data, data.sites, FedAvg, toy_config(2), 0, CPU)
    assert same_states(result.global_state, fedavg.global_state)
    for personal, theirs in zip(result.personalized, fedavg.personalized, strict=True):
        assert same_states(personal, result.global_state) and same_states(personal, theirs)


def test_apfl_with_alpha_one_scores_local_training_exactly(data):
    """alpha = 1 (fixed): the mixture is v_i alone, trained on its own loss from the same start
    and on the same batches as the `local` method's model; w is still FedAvg's."""
    apfl = toy_rounds(APFL, toy_config(2, alpha=1.0, adaptive=False), data, 2)
    local = toy_rounds(Local, toy_config(2), data, 2)
    fedavg = toy_rounds(FedAvg, toy_config(2), data, 2)
    assert same_states(apfl.global_state, fedavg.global_state)
    for i in range(len(data.sites)):
        assert same_states(apfl.personalized(i), local.personalized(i)), i
        assert differs(apfl.personalized(i), apfl.global_state, param_names(apfl))


class SquaredError:
    """A task whose loss is the mean squared error (all `mixed_step` asks of a task)."""

    def loss(self, outputs, targets):
        return (outputs - targets).pow(2).mean()


def test_apfl_mixed_step_by_hand():
    gen = torch.Generator().manual_seed(0)
    w, v = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    for layer in (w, v):
        for p in layer.parameters():
            p.data = torch.randn(p.shape, generator=gen)
    x, y = torch.randn(5, 3, generator=gen), torch.randn(5, 2, generator=gen)
    alpha, lr = 0.3, 0.1
    v0, w0 = clone_state(v.state_dict()), clone_state(w.state_dict())
    # the mixed model's gradient, by hand: out = x A^T + b, loss = mean((out - y)^2)
    a_mix = alpha * v0["weight"] + (1 - alpha) * w0["weight"]
    b_mix = alpha * v0["bias"] + (1 - alpha) * w0["bias"]
    residual = 2 * (x @ a_mix.T + b_mix - y) / y.numel()
    grad = {"weight": residual.T @ x, "bias": residual.sum(0)}
    optimizer = torch.optim.SGD(v.parameters(), lr=lr)
    alpha_grad = mixed_step(w, v, optimizer, SquaredError(), (x, y), alpha)
    for key in ("weight", "bias"):
        expected = v0[key] - lr * alpha * grad[key]
        torch.testing.assert_close(v.state_dict()[key], expected)
        assert torch.equal(w.state_dict()[key], w0[key]) and w.weight.grad is None
    by_hand = sum(((v0[k] - w0[k]) * grad[k]).sum() for k in grad)
    torch.testing.assert_close(torch.tensor(alpha_grad), by_hand)


def test_apfl_scores_the_mixture_of_every_key():
    personal = {"w": torch.tensor([2.0, -4.0]), "n": torch.tensor(10)}
    shared = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(4)}
    mixed = mix_states(personal, shared, 0.25)
    torch.testing.assert_close(mixed["w"], torch.tensor([0.5, 2.0]))
    assert mixed["n"].dtype == torch.int64 and mixed["n"].item() == 6  # 2.5 + 3 = 5.5 -> 6
    assert same_states(mix_states(personal, shared, 0.0), shared)
    assert same_states(mix_states(personal, shared, 1.0), personal)


def test_apfl_adaptive_alpha_follows_its_gradient_and_resumes(data, tmp_path):
    class Spy(APFL):
        log: list[tuple[int, float, float, float]] = []

        def move_alpha(self, grad, rate):
            before = self.alpha
            super().move_alpha(grad, rate)
            assert rate == 0.5, "method.alpha_lr given"
            Spy.log.append((self.client, before, grad, self.alpha))

    cfg = toy_config(2, alpha=0.5, adaptive=True, alpha_lr=0.5)
    fed = toy_rounds(Spy, cfg, data, 2)
    for _, before, grad, after in Spy.log:
        assert after == min(1.0, max(0.0, before - 0.5 * grad))
    assert len({a for _, _, _, a in Spy.log}) > len(data.sites), "alpha moves every step"
    alphas = [c.method.alpha for c in fed.clients]
    assert len(set(alphas)) == len(data.sites), "one alpha per client"
    for i, alpha in enumerate(alphas):
        assert alpha == [a for c, _, _, a in Spy.log if c == i][-1]
        client = fed.clients[i]
        stored = client.method.personal
        view = client.view({k: fed.global_state[k] for k in fed.shared})
        assert same_states(fed.personalized(i), mix_states(stored, view, alpha))
    whole = toy_train(data, data.sites, APFL, toy_config(3, **cfg["method"]), 0, CPU)
    path = tmp_path / "apfl.pt"
    toy_train(data, data.sites, APFL, cfg, 0, CPU, checkpoint_path=path)
    kept = torch.load(path, weights_only=True)["training"]["method_state"]["clients"]
    assert [c["alpha"] for c in kept] != [0.5] * 3
    resumed = toy_train(
        data, data.sites, APFL, toy_config(3, **cfg["method"]), 0, CPU, checkpoint_path=path
    )
    for a, b in zip(whole.personalized, resumed.personalized, strict=True):
        assert same_states(a, b)


def test_apfl_local_update_replayed_by_hand(data):
    """Round two of every client with SGD and adaptive alpha, replayed: per batch, v_i's step on
    the mixture with w_i as it was before the batch and alpha's step, then w_i's step."""
    alpha_lr = 0.5

    class Spy(APFL):
        starts: list[dict] = []

        def local_update(self, model, ctx):
            Spy.starts.append(
                {
                    "w": clone_state(model.state_dict()),
                    "v": clone_state(self.personal or model.state_dict()),
                    "alpha": self.alpha,
                    "generator": ctx.generator.get_state(),
                }
            )
            return super().local_update(model, ctx)

    fed = toy_rounds(Spy, sgd_config(2, alpha=0.4, adaptive=True, alpha_lr=alpha_lr), data, 2)
    for i, start in enumerate(Spy.starts[len(data.sites) :]):
        v, alpha = replay_apfl(fed, i, start, alpha_lr)
        assert alpha != start["alpha"]
        assert abs(fed.clients[i].method.alpha - alpha) < 1e-5
        for key, value in fed.clients[i].method.personal.items():
            torch.testing.assert_close(value, v[key], rtol=1e-4, atol=1e-5, msg=key)


def replay_apfl(fed, client: int, start: dict, alpha_lr: float) -> tuple[dict, float]:
    """One epoch of APFL's local steps by hand (plain SGD): the personal state and alpha."""
    w, v, mix = fed.build_model(), fed.build_model(), fed.build_model()
    w.load_state_dict(start["w"])
    v.load_state_dict(start["v"])
    w.train()
    mix.train()
    alpha = start["alpha"]
    generator = torch.Generator().manual_seed(0)
    generator.set_state(start["generator"])
    names = [n for n, _ in w.named_parameters()]
    for inputs, targets in fed.clients[client].train.batches(4, generator):
        ws, vs = w.state_dict(), v.state_dict()
        mix.load_state_dict({**vs, **{k: alpha * vs[k] + (1 - alpha) * ws[k] for k in names}})
        grads = torch.autograd.grad(fed.task.loss(mix(inputs), targets), list(mix.parameters()))
        slope = sum(((vs[k] - ws[k]) * g).sum().item() for k, g in zip(names, grads))
        new_v = {k: vs[k] - LR * alpha * g for k, g in zip(names, grads)}
        v.load_state_dict({**mix.state_dict(), **new_v})  # running statistics: the mixture's
        alpha = min(1.0, max(0.0, alpha - alpha_lr * slope))
        w_grads = torch.autograd.grad(fed.task.loss(w(inputs), targets), list(w.parameters()))
        with torch.no_grad():
            for p, g in zip(w.parameters(), w_grads):
                p -= LR * g
    return clone_state(v.state_dict()), alpha


def test_apfl_refuses_bad_settings_by_name():
    bad = (
        ("alpha", 1.5),
        ("alpha", -0.1),
        ("adaptive", 1),
        ("alpha_lr", -1.0),
        ("alpha_lr", "fast"),
        ("alpha_lr", True),
        ("alpha_lr", float("nan")),
    )
    for key, value in bad:
        with pytest.raises(FedbenchError, match=f"method.{key}"):
            APFL.check_settings(toy_config(1, **{key: value}))
    APFL.check_settings(toy_config(1, **APFL.defaults))
    APFL.check_settings(toy_config(1, alpha_lr="0.05"))  # as `--set method.alpha_lr=0.05` gives it
