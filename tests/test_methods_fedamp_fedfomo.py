"""FedAMP and FedFomo against their papers' definitions (recomputed here, not stored numbers)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from conftest import same_states, toy_config, toy_rounds, toy_train, toy_training

from fedbench.data import Split
from fedbench.errors import FedbenchError
from fedbench.method import ClientUpdate, Method, clone_state, state_nbytes
from fedbench_plugins.fedamp import FedAMP, attention_weights
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.fedfomo import FedFomo, fomo_weights
from fedbench_plugins.local import Local

CPU = torch.device("cpu")
F64 = torch.float64


def recording(method_cls: type[Method]) -> type[Method]:
    """A subclass recording each local update's start (state, payload, stream) and what the
    server receives."""

    class Recorder(method_cls):
        name = method_cls.name
        starts: list[dict] = []
        received: list[list[ClientUpdate]] = []

        def local_update(self, model, ctx):
            Recorder.starts.append(
                {
                    "client": ctx.client,
                    "round": ctx.round,
                    "state": clone_state(model.state_dict()),
                    "payload": clone_state(ctx.received),
                    "generator": ctx.generator.get_state(),
                }
            )
            return super().local_update(model, ctx)

        def server_update(self, previous, updates):
            Recorder.received.append(list(updates))
            return super().server_update(previous, updates)

    Recorder.starts, Recorder.received = [], []
    return Recorder


def parameter_names(fed) -> list[str]:
    return [name for name, _ in fed.model.named_parameters()]


def context(fed, start: dict):
    """Client `start["client"]`'s context as it began that local update (its stream restored)."""
    client = fed.clients[start["client"]]
    client.generator.set_state(start["generator"])
    return client.context(fed.setup, {}, start["payload"], start["round"])


# FedAMP


def expected_xi(models: list[dict], i: int, alpha: float, sigma: float) -> list[float]:
    """The paper's xi_ij, recomputed: alpha * exp(-d/sigma) / sigma off the diagonal."""
    xi = []
    for j, other in enumerate(models):
        d = sum(float(((models[i][k].double() - other[k].double()) ** 2).sum()) for k in other)
        xi.append(0.0 if j == i else alpha * math.exp(-d / sigma) / sigma)
    xi[i] = 1.0 - sum(xi)
    return xi


def test_fedamp_cloud_models_follow_the_attention_weights():
    """Three clients by hand (client 1 has not trained: the initial model stands for it)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    alpha, sigma = 0.4, 0.5
    server = FedAMP({"alpha": alpha, "sigma": sigma}, 3)
    assert server.shared_keys(model) == []
    params = [name for name, _ in model.named_parameters()]
    initial = {k: v.clone() for k, v in model.state_dict().items() if k in params}
    for i in range(3):  # before anyone trained, u_i is the initial model
        for key, value in server.server_payload(i).items():
            torch.testing.assert_close(value, initial[key], rtol=0, atol=1e-7)
    gen = torch.Generator().manual_seed(1)
    hand = {j: {k: v + 0.15 * torch.randn(v.shape, generator=gen) for k, v in initial.items()}
            for j in (0, 2)}  # fmt: skip
    updates = [ClientUpdate({}, 5, hand[j], 0, j) for j in (0, 2)]
    assert server.server_update({}, updates) == {}
    models = [hand[0], initial, hand[2]]
    for i in range(3):
        xi = expected_xi(models, i, alpha, sigma)
        assert all(0.01 < x < 0.9 for j, x in enumerate(xi) if j != i), xi
        assert attention_weights(models, i, alpha, sigma) == pytest.approx(xi, rel=1e-12)
        payload = server.server_payload(i)
        assert sorted(payload) == sorted(params), "trainable parameters only, no buffers"
        for key in params:
            u = sum(x * m[key].double() for x, m in zip(xi, models, strict=True))
            assert payload[key].dtype == torch.float32
            torch.testing.assert_close(payload[key].double(), u, rtol=0, atol=1e-6)


def test_fedamp_with_lam_zero_trains_exactly_like_local(data):
    amp = toy_rounds(FedAMP, toy_config(2, lam=0.0, alpha=0.5, sigma=2.0), data, 2)
    local = toy_rounds(Local, toy_config(2), data, 2)
    pulled = toy_rounds(FedAMP, toy_config(2, lam=1.0, alpha=0.5, sigma=2.0), data, 2)
    for i in range(len(data.sites)):
        assert same_states(amp.personalized(i), local.personalized(i)), i
        assert not same_states(pulled.personalized(i), local.personalized(i)), i
    assert amp.cost["client_steps"] == local.cost["client_steps"]


def attraction_by_hand(cloud: dict, coefficient: float):
    """The penalty coefficient * ||w - u||^2 over the parameters, written out."""
    return lambda m: coefficient * sum(((p - cloud[k]) ** 2).sum() for k, p in m.named_parameters())


def test_fedamp_client_trains_on_loss_plus_attraction_to_its_cloud_model(data):
    """Every local update replayed: train_steps on loss + lam/(2 alpha) ||w - u_i||^2 from the
    client's own previous state; u_i is the server's mix of the previous round's models."""
    lam, alpha, sigma = 0.6, 0.3, 50.0
    method = recording(FedAMP)
    fed = toy_rounds(method, toy_config(2, lam=lam, alpha=alpha, sigma=sigma), data, 2)
    names = parameter_names(fed)
    sites = len(data.sites)
    sent = [u for updates in method.received for u in updates]
    initial = method.starts[0]["state"]  # every client's state before its first round
    for n, (start, update) in enumerate(zip(method.starts, sent, strict=True)):
        i, payload = start["client"], start["payload"]
        mine = [u.extras for u in method.received[0]] if start["round"] == 2 else None
        models = mine or [{k: initial[k] for k in names}] * sites
        xi = expected_xi(models, i, alpha, sigma)
        for key in names:
            u = sum(x * m[key].double() for x, m in zip(xi, models, strict=True))
            torch.testing.assert_close(payload[key].double(), u, rtol=0, atol=1e-6)
        own = initial if start["round"] == 1 else method.received[0][i].extras
        assert all(torch.equal(start["state"][k], own[k]) for k in names), "its own model"
        if start["round"] == 2:
            assert all(1e-3 < x < 0.5 for j, x in enumerate(xi) if j != i), xi
        model = fed.build_model()
        model.load_state_dict(start["state"])
        ctx = context(fed, start)
        pull = attraction_by_hand(payload, lam / (2 * alpha))
        Method({}, sites).train_steps(model, ctx, int(ctx.train["local_epochs"]), penalty=pull)
        assert sorted(update.extras) == sorted(names) and update.state == {}
        for key in names:
            assert torch.equal(model.state_dict()[key], update.extras[key]), (n, key)
    rounds = [s["round"] for s in method.starts]
    assert rounds == [1] * sites + [2] * sites


def test_fedamp_bytes_are_each_clients_cloud_model_and_own_model(data):
    method = recording(FedAMP)
    result = toy_train(data, data.sites, method, toy_config(2), 0, CPU)
    model = toy_training(data, data.sites, FedAMP, toy_config(2), 0, CPU).model
    full = state_nbytes(model.state_dict())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    sites = len(data.sites)
    assert sum(state_nbytes(s["payload"]) for s in method.starts) == result.cost["bytes_down"]
    assert result.cost["bytes_down"] == 2 * sites * params
    assert result.cost["bytes_up"] == 2 * sites * params + sites * full  # + the unseen site's
    assert result.global_state is not None and result.shared_keys == []


@pytest.mark.parametrize(
    "method", [{"alpha": 0}, {"sigma": -1.0}, {"lam": "x"}, {"lam": float("nan")}]
)
def test_fedamp_rejects_bad_settings(method):
    with pytest.raises(FedbenchError, match=f"method.{next(iter(method))}"):
        FedAMP.check_settings({"method": method})


# FedFomo


def test_fedfomo_weights_follow_the_definition():
    own, losses, distances = 1.0, [0.5, 0.8, 1.2, 0.7, 0.9], [2.0, 0.5, 1.0, 0.0, 4.0]
    raw = [max(0.0, (own - loss) / d) if d else 0.0 for loss, d in zip(losses, distances)]
    assert raw[2] == 0 and raw[3] == 0 and all(r > 0 for k, r in enumerate(raw) if k not in (2, 3))
    expected = [r / sum(raw) for r in raw]
    assert fomo_weights(own, losses, distances) == pytest.approx(expected, rel=1e-12)
    assert fomo_weights(own, [1.5, 1.0], [1.0, 2.0]) == [0.0, 0.0], "no better model"


BATCH = 4  # toy_config's train.batch_size


def own_loss(model, split, task) -> float:
    """The task loss over consecutive batches of BATCH, weighted by their sizes (eval mode, no
    gradients)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for first in range(0, len(split), BATCH):
            inputs, targets = (
                split.inputs[first : first + BATCH],
                split.targets[first : first + BATCH],
            )
            total += float(task.loss(model(inputs), targets)) * len(targets)
    return total / len(split)


def moved(state: dict, others: list[dict], model, split, task) -> tuple[dict, list[float]]:
    """FedFomo's first-order move, recomputed: theta_i + sum_j w_ij (theta_j - theta_i)."""
    names = [n for n, _ in model.named_parameters()]
    model.load_state_dict(state)
    mine = own_loss(model, split, task)
    weights = []
    for other in others:
        model.load_state_dict(other)
        gap = mine - own_loss(model, split, task)
        norm = math.sqrt(
            sum(float(((other[k].double() - state[k].double()) ** 2).sum()) for k in names)
        )
        weights.append(max(0.0, gap / norm))
    total = sum(weights)
    weights = [w / total for w in weights] if total > 0 else weights
    out = {}
    for key, value in state.items():
        if value.is_floating_point():
            step = sum(w * (o[key].double() - value.double()) for w, o in zip(weights, others))
            out[key] = (value.double() + step).to(value.dtype)
        else:
            out[key] = value
    return out, weights


def grouped(payload: dict) -> list[dict]:
    """The payload's models, by client index."""
    clients = sorted({int(k.split("/", 1)[0]) for k in payload})
    return [
        {k.split("/", 1)[1]: v for k, v in payload.items() if k.startswith(f"{j}/")}
        for j in clients
    ]


def test_fedfomo_local_update_recomputed(data):
    """Rounds 1-3 replayed: the move to better models on the validation split, then FedAvg's
    training; what is sent is the client's full state."""
    method = recording(FedFomo)
    cfg = toy_config(3)
    assert cfg["train"]["batch_size"] == BATCH
    fed = toy_rounds(method, cfg, data, 3)
    sent = [u for updates in method.received for u in updates]
    moves = 0
    for start, update in zip(method.starts, sent, strict=True):
        i, others = start["client"], grouped(start["payload"])
        assert len(others) == (0 if start["round"] == 1 else len(data.sites) - 1)
        model = fed.build_model()
        target, weights = moved(start["state"], others, model, fed.clients[i].val, fed.task)
        moves += any(w > 0 for w in weights)
        model.load_state_dict(target)
        assert FedAvg({}, 3).local_update(model, context(fed, start)) == {}
        assert update.state == {} and same_states(model.state_dict(), update.extras)
    assert moves > 0, "some client moved towards another's model"


def worse_models(state: dict, names: list[str], count: int) -> list[dict]:
    """`count` copies of `state` with large noise on the parameters `names`."""
    gen = torch.Generator().manual_seed(7)
    return [
        {k: v + 3.0 * torch.randn(v.shape, generator=gen) if k in names else v
         for k, v in state.items()}
        for _ in range(count)
    ]  # fmt: skip


def test_fedfomo_keeps_its_model_when_every_other_model_is_worse(data):
    fed = toy_rounds(FedFomo, toy_config(1), data, 1)
    client = fed.clients[0]
    own = clone_state(client.state)
    others = worse_models(own, parameter_names(fed), 2)
    model = fed.build_model()
    for other in others:
        model.load_state_dict(other)
        worse = own_loss(model, client.val, fed.task)
        model.load_state_dict(own)
        assert worse > own_loss(model, client.val, fed.task)
    payload = {f"{j + 1}/{k}": v for j, other in enumerate(others) for k, v in other.items()}
    model.load_state_dict(own)
    ctx = client.context(fed.setup, {}, payload, 2)
    assert client.method.move_towards_better(model, ctx, others) == [0.0, 0.0]
    assert same_states(model.state_dict(), own), "unchanged before training"
    start = client.generator.get_state()
    sent = client.method.local_update(model, ctx)
    reference = fed.build_model()
    reference.load_state_dict(own)
    client.generator.set_state(start)
    FedAvg({}, 3).local_update(reference, client.context(fed.setup, {}, {}, 2))
    assert same_states(sent, reference.state_dict())


def test_fedfomo_falls_back_to_the_train_split_without_validation(data):
    fed = toy_rounds(FedFomo, toy_config(1), data, 1)
    client = fed.clients[1]
    own = clone_state(client.state)
    model = fed.build_model()
    model.load_state_dict(own)
    ctx = client.context(fed.setup, {}, {}, 2)
    Method({}, 3).train_steps(model, ctx, 2)  # better on its train split, most likely
    noisy = worse_models(own, parameter_names(fed), 1)
    others = [clone_state(fed.clients[0].state), clone_state(model.state_dict()), *noisy]
    empty = Split(client.val.inputs[:0], client.val.targets[:0], client.val.cases[:0])
    model.load_state_dict(own)
    ctx = dataclasses.replace(ctx, val=empty)
    weights = client.method.move_towards_better(model, ctx, others)
    probe = copy.deepcopy(model)
    expected, by_hand = moved(own, others, probe, client.train, fed.task)
    assert weights == pytest.approx(by_hand, rel=1e-9, abs=1e-12)
    assert by_hand[1] > 0 and by_hand[2] == 0, by_hand
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)


def test_fedfomo_bytes_down_are_the_models_sent(data):
    method = recording(FedFomo)
    result = toy_train(data, data.sites, method, toy_config(2), 0, CPU)
    full = state_nbytes(
        toy_training(data, data.sites, FedFomo, toy_config(2), 0, CPU).model.state_dict()
    )
    sites = len(data.sites)
    assert sum(state_nbytes(s["payload"]) for s in method.starts) == result.cost["bytes_down"]
    assert result.cost["bytes_down"] == sites * (sites - 1) * full  # round 2 only
    assert result.cost["bytes_up"] == 2 * sites * full + sites * full  # + the unseen site's
    for start in method.starts[sites:]:
        senders = {int(key.split("/", 1)[0]) for key in start["payload"]}
        assert senders == set(range(sites)) - {start["client"]}, "every other client, not itself"


# both


@pytest.mark.parametrize("method_cls", [FedAMP, FedFomo])
def test_resume_is_bit_identical(data, tmp_path, method_cls):
    whole = toy_train(data, data.sites, method_cls, toy_config(2), 0, CPU)
    path = tmp_path / "resume.pt"
    toy_train(data, data.sites, method_cls, toy_config(1), 0, CPU, checkpoint_path=path)
    kept = torch.load(path, weights_only=True)["training"]["method_state"]["server"]
    assert sorted(kept["models"]) == list(range(len(data.sites)))
    resumed = toy_train(data, data.sites, method_cls, toy_config(2), 0, CPU, checkpoint_path=path)
    assert same_states(whole.global_state, resumed.global_state)
    for a, b in zip(whole.personalized, resumed.personalized, strict=True):
        assert same_states(a, b)
    assert whole.cost["bytes_down"] == resumed.cost["bytes_down"]
