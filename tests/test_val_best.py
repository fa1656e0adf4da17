"""Validation-best selection (`eval.val_best`), inside and for the unseen sites' experts: each
client's model from its best validation round, the global model from the round with the best
mean validation score, chosen from validation scores only and recorded."""

from __future__ import annotations

import json

import torch
from conftest import same_states, toy_config, toy_data, toy_train, toy_training
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.engine.training import _update_best
from fedbench.method import clone_state
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.fedbn import FedBN

CPU = torch.device("cpu")

# constructed validation scores per round (1, 2, 3) for sites 0, 1, 2
SCORES = [[0.1, 0.8, 0.3], [0.9, 0.2, 0.35], [0.5, 0.3, 0.6]]  # means 0.4, 0.483, 0.467


def test_the_best_round_of_each_site_and_of_the_mean_on_a_constructed_history():
    data = toy_data()
    fed = toy_training(data, data.sites, FedBN, toy_config(3), 0, CPU)
    best: dict = {}
    personal, unseen = [], []
    for round_index, row in enumerate(SCORES, start=1):
        fed.run_round()
        personal.append([clone_state(fed.personalized(i)) for i in range(3)])
        unseen.append(fed.unseen_site_model()[0])
        scores = {site.name: value for site, value in zip(data.sites, row, strict=True)}
        _update_best(best, fed, scores, round_index)
    assert best["rounds"] == {"site0": 2, "site1": 1, "site2": 3, "global": 2}
    for i, chosen in enumerate((2, 1, 3)):
        assert same_states(best["states"][i], personal[chosen - 1][i]), i
    assert same_states(best["global"], unseen[1]), "FedBN's completed global model of round 2"
    result = fed.result([], best)
    picked = result.selected("val-best")
    assert same_states(picked.global_state, unseen[1])
    assert all(
        same_states(p, personal[c - 1][i])
        for i, (p, c) in enumerate(zip(picked.personalized, (2, 1, 3)))
    )
    assert result.selected("final") is result


def test_selection_reads_validation_splits_only(monkeypatch):
    data = toy_data()
    seen = []
    original = type(data.task).validation_score

    def spy(task, outputs, targets, cases):
        seen.append(targets)
        return original(task, outputs, targets, cases)

    monkeypatch.setattr(type(data.task), "validation_score", spy)
    config = toy_config(2)
    config["eval"]["val_best"] = True
    result = toy_train(data, data.sites, FedAvg, config, 0, CPU, history=False)
    assert len(seen) == 2 * len(data.sites)
    vals = [s.val.targets for s in data.sites]
    assert all(any(t is v for v in vals) for t in seen), "only validation targets are read"
    assert result.val_best is not None and set(result.val_best_rounds) == {
        *(s.name for s in data.sites),
        "global",
    }


def test_unseen_sites_are_scored_with_the_validation_best_experts(tmp_path):
    args = ["run", "--method", "fedavg", "--preset", "quick", "--rounds", "2", "--json"]
    args += ["--holdout", "BIDMC", "--results-dir", str(tmp_path), "--set", "eval.val_best=true"]
    args += ["--set", "model.channels=[4,8]", "--set", "data.size=16"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    outside = {(m["selection"], m["metric"]) for m in record["metrics"] if m["regime"] == "outside"}
    assert ("val-best", "dice") in outside and ("final", "dice") in outside
    chosen = record["val_best_rounds"]
    assert set(chosen) == {"inside", "BIDMC"}
    assert "BIDMC" not in chosen["BIDMC"] and "global" in chosen["BIDMC"]
    assert all(1 <= r <= 2 for r in chosen["BIDMC"].values())


def test_fine_tuning_methods_fine_tune_their_validation_best_models_too():
    from fedbench.models import output_layer_keys
    from fedbench_plugins.fedbabu import FedBABU

    data = toy_data()
    config = toy_config(2, finetune_epochs=1)
    config["eval"]["val_best"] = True
    result = toy_train(data, data.sites, FedBABU, config, 0, CPU)
    head = output_layer_keys(result.model(result.global_state))
    for state in result.val_best:  # the head trains only in the fine-tuning
        assert all(not torch.equal(state[k], result.global_state[k]) for k in head)


def test_a_site_whose_validation_never_scores_keeps_its_last_model(monkeypatch):
    data = toy_data()
    monkeypatch.setattr(type(data.task), "validation_score", lambda *a: float("nan"))
    config = toy_config(2)
    config["eval"]["val_best"] = True
    result = toy_train(data, data.sites, FedAvg, config, 0, CPU, history=False)
    for best, last in zip(result.val_best, result.personalized, strict=True):
        assert same_states(best, last)
    assert "global" not in result.val_best_rounds and result.val_best_global is None


def test_the_inside_federation_sends_no_unseen_site_model():
    data = toy_data()
    inside = toy_train(data, data.sites, FedBN, toy_config(1), 0, CPU, for_unseen_site=False)
    outside = toy_train(data, data.sites, FedBN, toy_config(1), 0, CPU)
    assert "bytes_up_final" not in inside.cost and outside.cost["bytes_up_final"] > 0
    assert inside.cost["bytes_up"] + outside.cost["bytes_up_final"] == outside.cost["bytes_up"]
