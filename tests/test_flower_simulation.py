"""The Flower bridge on Flower's simulation engine (issue 27): a federation trained through it
equals fedbench's in-process training of the same method, data, seed and settings, round by
round, and a Flower run writes a normal record marked as such. Needs the `flower` extra (CI
installs it in an environment of its own); the in-process side runs on one thread, as each of
Flower's simulated nodes does, so both do the same arithmetic."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
from typer.testing import CliRunner

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("flwr") is None, reason="needs fedbench[flower]"),
]

#: method -> settings: the five of the issue (FedAMP sends each client its own payload), and
#: FedBN with half the clients per round, no validation history and a site held out (its
#: unshared normalization layers go to the unseen site's model)
METHODS = {
    "fedavg": [],
    "scaffold": ["train.optimizer=sgd", "train.momentum=0", "train.lr=0.05"],
    "ditto": [],
    "iopfl": [],
    "fedamp": [],
    "fedbn": ["train.clients_per_round=3", "eval.history=false"],
}
HOLDOUT = {"fedbn": "BIDMC"}
#: cost fields only one side has: wall time, and what Flower serialized
OWN_COST = ("train_s", "flower_bytes_train_down", "flower_bytes_train_up")


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a) if a else 0.0


@pytest.fixture(scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_both_ways(method: str, overrides: list[str], results_dir, holdout: str | None = None):
    from fedbench.engine.registry import load_registry
    from fedbench.engine.resolve import RunSpec, resolve
    from fedbench.engine.training import train_federation
    from fedbench.flower.run import simulation_trainer

    spec = RunSpec(
        method=method,
        dataset="synth-prostate",
        preset="quick",
        holdout="none",
        overrides=overrides,
        results_dir=results_dir,
    )
    run = resolve(spec, load_registry())
    data = run.dataset.load(run.config["data"], 0, results_dir / "cache")
    sites = [s for s in data.sites if s.name != holdout]
    args = (data, sites, run.method, lambda: run.build_model(data.task), run.config, 0)
    ours = train_federation(*args, torch.device("cpu"))
    theirs = simulation_trainer(spec)(*args, torch.device("cpu"))
    return ours, theirs


@pytest.mark.parametrize("method", METHODS)
def test_a_flower_simulation_equals_the_in_process_run(method, tmp_path, single_thread, capsys):
    ours, theirs = trained_both_ways(method, METHODS[method], tmp_path, HOLDOUT.get(method))
    differences = [largest_difference(ours.global_state or {}, theirs.global_state or {})]
    pairs = zip(ours.personalized, theirs.personalized, strict=True)
    differences += [largest_difference(a, b) for a, b in pairs]
    scores = [
        abs(a["val"][site] - b["val"][site])
        for a, b in zip(ours.history, theirs.history, strict=True)
        for site in a["val"]
    ]
    with capsys.disabled():
        print(f"\n{method}: largest difference {max(differences):.3g} (states), "
              f"{max(scores, default=0):.3g} (validation Dice per round)")  # fmt: skip
    assert [r["round"] for r in theirs.history] == [r["round"] for r in ours.history]
    assert max(differences) <= 1e-6 and max(scores, default=0) <= 1e-6
    shared = {k: v for k, v in theirs.cost.items() if k not in OWN_COST and "flower" not in k}
    assert shared == {k: v for k, v in ours.cost.items() if k not in OWN_COST}
    assert theirs.shared_keys == ours.shared_keys and theirs.site_names == ours.site_names
    assert theirs.cost["flower_bytes_train_down"] >= ours.cost["bytes_down"]


def invoke(*args: str):
    from fedbench.cli import app

    return CliRunner().invoke(app, list(args))


def test_a_flower_run_writes_a_normal_record_a_board_tells_apart(tmp_path):
    results = str(tmp_path / "results")
    common = ["--method", "fedavg", "--preset", "quick", "--results-dir", results, "--json"]
    flower = invoke("flower", "run", *common, "--holdout", "BIDMC")
    assert flower.exit_code == 0, flower.output
    record = json.loads(flower.stdout)
    assert record["status"] == "ok" and record["holdouts"] == ["BIDMC"]
    assert record["config"]["backend"]["engine"] == "simulation"
    assert {m["regime"] for m in record["metrics"]} == {"inside", "outside"}
    ours = invoke("run", *common, "--holdout", "BIDMC")
    assert ours.exit_code == 0, ours.output
    board = invoke("leaderboard", "--results-dir", results, "--group-by", "backend.engine")
    assert board.exit_code == 0, board.output
    assert "backend.engine=simulation" in board.stdout and "backend.engine=-" in board.stdout


def test_a_client_that_diverges_is_recorded_diverged_naming_its_site_and_round(tmp_path):
    args = ["--method", "fedavg", "--preset", "quick", "--holdout", "none", "--json"]
    result = invoke("flower", "run", *args, "--set", "train.lr=1e9", "--results-dir", str(tmp_path))
    assert result.exit_code != 0
    record = json.loads(result.stdout)
    assert record["status"] == "diverged"
    assert re.match(r"^site \w+: Diverged: .* \(round \d+, training\)", record["error"])
