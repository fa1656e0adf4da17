"""Ditto, SCAFFOLD and FedRep against their definitions (recomputations, not stored numbers)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    LR,
    sgd_config,
    toy_config,
    toy_data,
    toy_rounds,
    toy_train,
    toy_training,
)
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.conformance import check_plugin
from fedbench.errors import FedbenchError
from fedbench.method import Method, clone_state
from fedbench.models import output_layer_keys
from fedbench_plugins.ditto import Ditto, proximal_term
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.fedrep import FedRep
from fedbench_plugins.scaffold import Scaffold

CPU = torch.device("cpu")


def floats(state: dict) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def differs(a: dict, b: dict, keys) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in keys)


def recording(method_cls: type[Method]) -> type[Method]:
    """A subclass that records each local update's start and what the server receives."""

    class Recorder(method_cls):
        name = method_cls.name
        starts: list[dict] = []
        received: list[list] = []

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
            Recorder.received.append(list(updates))
            return super().server_update(previous, updates)

    Recorder.starts, Recorder.received = [], []
    return Recorder


# Ditto


def test_ditto_sends_exactly_the_fedavg_update_from_the_same_start(data):
    cfg = sgd_config(2, lam=0.5)
    method = recording(Ditto)
    fed = toy_rounds(method, cfg, data, 2)
    sent = [u for updates in method.received for u in updates]
    assert len(sent) == len(method.starts) == 2 * len(data.sites)
    for start, update in zip(method.starts, sent, strict=True):
        model = fed.build_model()
        model.load_state_dict(start["state"])
        client = fed.clients[start["client"]]
        client.generator.set_state(start["generator"])
        ctx = client.context(fed.setup, start["global"], {}, start["round"])
        assert FedAvg(cfg["method"], 3).local_update(model, ctx) == update.extras == {}
        for key, value in model.state_dict().items():
            assert torch.equal(value, update.state[key]), key
        assert update.steps == 2 * ctx.steps, "global and personal steps both count"
    fedavg = toy_rounds(FedAvg, sgd_config(2), data, 2)
    assert fed.cost["bytes_up"] == fedavg.cost["bytes_up"]
    assert fed.cost["bytes_down"] == fedavg.cost["bytes_down"]
    assert fed.cost["client_steps"] == 2 * fedavg.cost["client_steps"]
    for i in range(len(data.sites)):
        personal, local = fed.personalized(i), fed.clients[i].state
        assert differs(personal, local, floats(local)), "v_i is not the FedAvg model w_i"
        assert differs(personal, fed.global_state, floats(local)), "nor the global model"


def test_ditto_personal_model_is_sgd_on_loss_plus_lam_times_the_gap(data):
    lam = 0.5
    cfg = sgd_config(2, lam=lam)

    class Spy(Ditto):
        personal_starts: list[dict] = []

        def train_personal(self, personal, ctx):
            Spy.personal_starts.append(
                {
                    "client": ctx.client,
                    "state": clone_state(personal.state_dict()),
                    "global": clone_state(ctx.global_state),
                    "generator": ctx.generator.get_state(),
                }
            )
            super().train_personal(personal, ctx)

    fed = toy_rounds(Spy, cfg, data, 2)
    last = Spy.personal_starts[-len(data.sites) :]
    assert Spy.personal_starts[0]["state"].keys() == last[0]["state"].keys()
    for start in last:
        gap = [k for k in floats(start["state"]) if k in dict(fed.model.named_parameters())]
        assert differs(start["state"], start["global"], gap), "round 2 starts from v_i != w"
        expected = replay_penalised_sgd(fed, start, lam, int(cfg["train"]["batch_size"]))
        for key, value in fed.personalized(start["client"]).items():
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)


def replay_penalised_sgd(fed, start: dict, lam: float, batch_size: int) -> dict:
    """One epoch of p <- p - lr * (grad of the task loss + lam * (p - w)), gradient by hand."""
    model = fed.build_model()
    model.load_state_dict(start["state"])
    model.train()
    generator = torch.Generator().manual_seed(0)
    generator.set_state(start["generator"])
    anchor = start["global"]
    names, params = zip(*model.named_parameters(), strict=True)
    for inputs, targets in fed.clients[start["client"]].train.batches(batch_size, generator):
        loss = fed.task.loss(model(inputs), targets)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for name, param, grad in zip(names, params, grads, strict=True):
                param -= LR * (grad + lam * (param - anchor[name]))
    return clone_state(model.state_dict())


def test_ditto_penalty_gradient_is_lam_times_the_gap():
    layer = torch.nn.Linear(3, 2)
    anchor = {k: torch.randn_like(v) for k, v in layer.state_dict().items()}
    proximal_term(layer, anchor, 0.3).backward()
    for name, param in layer.named_parameters():
        torch.testing.assert_close(param.grad, 0.3 * (param.detach() - anchor[name]))


def test_ditto_keeps_the_client_view_before_round_one_and_checks_settings(data):
    fed = toy_training(data, data.sites, Ditto, sgd_config(1), seed=0, device=CPU)
    view = fed.clients[1].view({k: fed.global_state[k] for k in fed.shared})
    for key, value in view.items():
        assert torch.equal(fed.personalized(1)[key], value)
    with pytest.raises(FedbenchError, match="method.lam"):
        Ditto.check_settings(toy_config(1, lam=-1.0))
    Ditto.check_settings(toy_config(1, lam=0.1, personal_epochs=2))


# SCAFFOLD


def param_names(fed) -> list[str]:
    return [name for name, _ in fed.model.named_parameters()]


def test_scaffold_round_one_takes_the_same_steps_as_fedavg_with_sgd(data):
    scaffold = toy_rounds(Scaffold, sgd_config(1), data, 1)
    fedavg = toy_rounds(FedAvg, sgd_config(1), data, 1)
    assert scaffold.cost["client_steps"] == fedavg.cost["client_steps"]
    for mine, theirs in zip(scaffold.clients, fedavg.clients, strict=True):
        for key, value in theirs.state.items():
            assert torch.equal(mine.state[key], value), key


class ControlSpy(Scaffold):
    """Records each local update's inputs, raw (uncorrected) gradients and outputs."""

    log: list[dict] = []

    def local_update(self, model, ctx):
        own = self.own_control
        entry = {
            "x": {k: ctx.global_state[k].clone() for k in self.control},
            "c": clone_state(ctx.received),
            "own": None if own is None else clone_state(own),
            "raw": {k: torch.zeros_like(v) for k, v in self.control.items()},
            "steps": ctx.steps,
        }
        ControlSpy.log.append(entry)
        entry["extras"] = clone_state(super().local_update(model, ctx))
        entry["steps"] = ctx.steps - entry["steps"]
        entry["y"] = clone_state(dict(model.named_parameters()))
        entry["new"] = clone_state(self.own_control)
        return entry["extras"]

    def adjust_gradients(self, model, ctx):
        raw = ControlSpy.log[-1]["raw"]
        for name, param in model.named_parameters():
            raw[name] += param.grad
        super().adjust_gradients(model, ctx)


def test_scaffold_control_variates_follow_option_two(data):
    ControlSpy.log = []
    fed = toy_rounds(ControlSpy, sgd_config(2), data, 2)
    assert len(ControlSpy.log) == 2 * len(data.sites)
    for entry in ControlSpy.log:
        own = entry["own"] or {k: torch.zeros_like(v) for k, v in entry["c"].items()}
        for key, new in entry["new"].items():
            formula = (
                own[key]
                - entry["c"][key]
                + (entry["x"][key] - entry["y"][key]) / (entry["steps"] * LR)
            )
            torch.testing.assert_close(new, formula, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(entry["extras"][key], new - own[key])
            mean_raw = entry["raw"][key] / entry["steps"]  # plain SGD: c_i+ is the mean gradient
            torch.testing.assert_close(new, mean_raw, rtol=1e-3, atol=2e-5)
    round_one, round_two = ControlSpy.log[: len(data.sites)], ControlSpy.log[len(data.sites) :]
    assert any(differs(e["c"], e["own"], e["c"]) for e in round_two), "corrections are nonzero"
    for key in fed.server.control:
        sent = torch.stack([e["new"][key] for e in round_one]).mean(0)
        for entry in round_two:  # the server sent round two c = mean of the round-one c_i
            torch.testing.assert_close(entry["c"][key], sent, rtol=1e-5, atol=1e-6)
    clients = [c.method.own_control for c in fed.clients]
    for key, value in fed.server.control.items():
        mean = torch.stack([c[key] for c in clients]).mean(0)
        torch.testing.assert_close(value, mean, rtol=1e-5, atol=1e-6)  # c = mean c_i, all join


def test_scaffold_server_averages_parameters_uniformly_and_buffers_as_fedavg(data):
    method = recording(Scaffold)
    fed = toy_rounds(method, sgd_config(1), data, 1)
    (updates,) = method.received
    params = set(param_names(fed))
    fedavg_mean = FedAvg({}, 3).aggregate(updates)
    for key, value in fed.global_state.items():
        if key in params:
            uniform = torch.stack([u.state[key].double() for u in updates]).mean(0)
            torch.testing.assert_close(value.double(), uniform, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(value, fedavg_mean[key]), key
    assert differs(fed.global_state, fedavg_mean, params), "sizes differ, so the means do"


def test_scaffold_bytes_count_the_controls_each_way(data):
    scaffold = toy_rounds(Scaffold, sgd_config(2), data, 2)
    fedavg = toy_rounds(FedAvg, sgd_config(2), data, 2)
    control = sum(p.numel() * p.element_size() for p in scaffold.model.parameters())
    transfers = 2 * len(data.sites)
    assert scaffold.cost["bytes_up"] - fedavg.cost["bytes_up"] == transfers * control
    assert scaffold.cost["bytes_down"] - fedavg.cost["bytes_down"] == transfers * control


def test_scaffold_refuses_anything_but_plain_sgd():
    for train in ({"optimizer": "adam"}, {"optimizer": "sgd", "momentum": 0.9}):
        cfg = sgd_config(1)
        cfg["train"].update(train)
        with pytest.raises(FedbenchError) as error:
            Scaffold.check_settings(cfg)
        message = str(error.value)
        assert "\n" not in message
        assert "train.optimizer=sgd" in message and "train.momentum=0" in message
    Scaffold.check_settings(sgd_config(1))


# FedRep


class PhaseSpy(FedRep):
    """Records the state at the start of each `train_steps` call and at the update's end."""

    log: list[dict] = []

    def local_update(self, model, ctx):
        PhaseSpy.log.append({"client": ctx.client, "states": [], "trained": []})
        extras = super().local_update(model, ctx)
        PhaseSpy.log[-1]["states"].append(clone_state(model.state_dict()))
        PhaseSpy.log[-1]["flags"] = [p.requires_grad for p in model.parameters()]
        return extras

    def train_steps(self, model, ctx, epochs, params=None, penalty=None):
        names = {id(p): n for n, p in model.named_parameters()}
        PhaseSpy.log[-1]["states"].append(clone_state(model.state_dict()))
        PhaseSpy.log[-1]["trained"].append({names[id(p)] for p in params})
        super().train_steps(model, ctx, epochs, params, penalty)


def test_fedrep_trains_the_head_then_the_body_never_both(data):
    PhaseSpy.log = []
    fed = toy_rounds(PhaseSpy, toy_config(1), data, 1)
    head = output_layer_keys(fed.model)
    params = set(param_names(fed))
    for entry in PhaseSpy.log:
        start, after_head, end = entry["states"]
        body = set(start) - head
        assert entry["trained"] == [head, params - head]
        assert differs(start, after_head, head) and not differs(start, after_head, body)
        assert differs(after_head, end, body) and not differs(after_head, end, head)
        statistics = [k for k in body if "running_mean" in k]
        assert statistics and differs(after_head, end, statistics)
        assert all(entry["flags"]), "requires_grad is put back"


def test_fedrep_shares_the_body_and_personalizes_only_the_head(data):
    method = recording(FedRep)
    fed = toy_rounds(method, toy_config(1), data, 1)
    head = output_layer_keys(fed.model)
    assert set(fed.shared) == set(fed.model.state_dict()) - head and head
    (updates,) = method.received
    assert all(set(u.state) == set(fed.shared) and u.extras == {} for u in updates)
    personal = [fed.personalized(i) for i in range(len(data.sites))]
    for i, state in enumerate(personal):
        assert not differs(state, fed.global_state, fed.shared)
        assert not differs(state, fed.clients[i].state, head)
    assert differs(personal[0], personal[1], head) and differs(personal[1], personal[2], head)


# all three


@pytest.mark.parametrize("method_cls", [Ditto, Scaffold, FedRep])
def test_resuming_from_a_checkpoint_is_bit_equal(method_cls, tmp_path):
    data = toy_data()
    whole = toy_train(data, data.sites, method_cls, sgd_config(2), 0, CPU)
    path = tmp_path / "resume.pt"
    toy_train(data, data.sites, method_cls, sgd_config(1), 0, CPU, checkpoint_path=path)
    resumed = toy_train(data, data.sites, method_cls, sgd_config(2), 0, CPU, checkpoint_path=path)
    pairs = list(zip(whole.personalized, resumed.personalized, strict=True))
    pairs.append((whole.global_state or {}, resumed.global_state or {}))
    for a, b in pairs:
        assert a.keys() == b.keys() and not differs(a, b, a)


@pytest.mark.parametrize("name", ["ditto", "scaffold", "fedrep"])
def test_a_quick_run_ends_ok(name, tmp_path):
    sgd = ["--set", "train.optimizer=sgd", "--set", "train.momentum=0"]
    args = ["run", "--method", name, "--preset", "quick", "--holdout", "none", "--rounds", "1"]
    args += ["--results-dir", str(tmp_path), "--json", *(sgd if name == "scaffold" else [])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "ok"


def test_scaffold_conforms_with_plain_sgd():
    assert check_plugin("scaffold", overrides=["train.optimizer=sgd", "train.momentum=0"]) == []


def test_scaffold_on_the_command_line_names_the_settings_to_use(tmp_path):
    args = ["run", "--method", "scaffold", "--preset", "quick", "--holdout", "none"]
    result = CliRunner().invoke(app, [*args, "--results-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert result.stderr.strip().count("\n") == 0 and "train.optimizer=sgd" in result.stderr
