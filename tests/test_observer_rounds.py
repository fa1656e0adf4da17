"""API v3's observers (issue 25, finding 8): a round observer gets the run's context, and hears
every round of every federation once, those of a cached or resumed federation replayed."""

from __future__ import annotations

import torch
from conftest import toy_config, toy_train
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench_plugins.fedavg import FedAvg

# 8. observers get the run's context

OBSERVER = """
import json, os
from fedbench.hookspecs import hookimpl

@hookimpl
def fedbench_round_end(round, holdout, context):
    with open(os.environ["ROUND_LOG"], "a") as log:
        log.write(json.dumps({"round": round, "holdout": holdout, **context}) + "\\n")
"""


def test_observers_get_the_runs_context_for_every_federation(tmp_path, monkeypatch):
    import json

    path = tmp_path / "observer.py"
    path.write_text(OBSERVER)
    log = tmp_path / "rounds.jsonl"
    monkeypatch.setenv("ROUND_LOG", str(log))
    args = ["--plugin", str(path), "run", "--method", "fedavg", "--preset", "quick"]
    args += ["--set", "train.rounds=1", "--holdout", "BIDMC", "--results-dir", str(tmp_path / "r")]
    assert CliRunner().invoke(app, args).exit_code == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert {row["holdout"] for row in rows} == {None, "BIDMC"}
    (run_id,) = {row["run_id"] for row in rows}
    assert (tmp_path / "r" / "runs" / f"{run_id}.json").is_file()
    assert all(
        row["results_dir"] == str(tmp_path / "r")
        and (row["method"], row["dataset"], row["seed"]) == ("fedavg", "synth-prostate", 0)
        for row in rows
    )


REPLAY_OBSERVER = """
import json, os
from fedbench.hookspecs import hookimpl

@hookimpl
def fedbench_round_end(round, holdout, metrics, replayed, context):
    with open(os.environ["ROUND_LOG"], "a") as log:
        row = {"round": round, "holdout": holdout, "metrics": metrics, "replayed": replayed}
        log.write(json.dumps({**row, "run_id": context["run_id"]}) + "\\n")
"""


def test_observers_hear_every_round_of_every_federation_once_cached_ones_replayed(
    tmp_path, monkeypatch
):
    """A second run reuses both cached federations: its observers still get each round, with
    the validation figures the cache kept, marked as replayed."""
    import json

    path = tmp_path / "observer.py"
    path.write_text(REPLAY_OBSERVER)
    log = tmp_path / "rounds.jsonl"
    monkeypatch.setenv("ROUND_LOG", str(log))
    args = ["--plugin", str(path), "run", "--method", "fedavg", "--preset", "quick"]
    args += ["--set", "train.rounds=2", "--holdout", "BIDMC", "--results-dir", str(tmp_path / "r")]
    for _ in range(2):
        assert CliRunner().invoke(app, args).exit_code == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    first, second = (
        [r for r in rows if r["run_id"] == i] for i in dict.fromkeys(r["run_id"] for r in rows)
    )
    for run in (first, second):
        heard = sorted((str(r["holdout"]), r["round"]) for r in run)
        assert heard == [("BIDMC", 1), ("BIDMC", 2), ("None", 1), ("None", 2)]
    assert all(r["replayed"] for r in second)
    inside = [r["metrics"] for r in first if r["holdout"] is None]
    assert inside == [r["metrics"] for r in second if r["holdout"] is None] and all(inside)


def test_rounds_restored_from_a_checkpoint_are_heard_again_as_replayed(data, tmp_path):
    """A federation resumed after round 2 of 3 tells its first two rounds as replayed, each
    with the scores it had, then trains the third."""
    heard: list[tuple] = []
    config = toy_config(rounds=2)
    config["eval"]["history"] = True
    path = tmp_path / "fedavg.pt"
    cpu = torch.device("cpu")
    toy_train(
        data,
        data.sites,
        FedAvg,
        config,
        0,
        cpu,
        checkpoint_path=path,
        on_round=lambda *row: heard.append(row),
    )
    config["train"]["rounds"] = 3
    toy_train(
        data,
        data.sites,
        FedAvg,
        config,
        0,
        cpu,
        checkpoint_path=path,
        on_round=lambda *row: heard.append(row),
    )
    (first, second), resumed = heard[:2], heard[2:]
    assert [r[0] for r in heard[:2]] == [1, 2] and not first[2] and not second[2]
    assert resumed[:2] == [(1, first[1], True), (2, second[1], True)]
    assert (
        resumed[2][0] == 3
        and not resumed[2][2]
        and set(resumed[2][1]) == {s.name for s in data.sites}
    )
