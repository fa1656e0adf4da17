"""Fault isolation and the remaining bad-input cases of a real `fedbench run`: a plugin that raises
ends its run as failed (named, with its error), a NaN loss as diverged, Ctrl-C stops cleanly with a
usable checkpoint, and nothing already in the results folder is damaged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from test_resume import fedbench, wait_for_round
from typer.testing import CliRunner

from fedbench.cli import app

QUICK = ["--preset", "quick", "--set", "train.rounds=2"]

BROKEN_PLUGIN = """
import torch
from fedbench.adapter import Adapter
from fedbench.hookspecs import hookimpl
from fedbench_plugins.fedavg import FedAvg


class AggregateRaises(FedAvg):
    name = "agg-raises"
    description = "raises in aggregation"

    def aggregate(self, updates):
        raise RuntimeError("server exploded")


class TrainingRaises(FedAvg):
    name = "train-raises"
    description = "raises in local training"

    def local_penalty(self, model, global_state):
        raise ValueError("client exploded")


class NaNLoss(FedAvg):
    name = "nan-loss"
    description = "a local objective that becomes NaN"

    def local_penalty(self, model, global_state):
        return torch.tensor(float("nan"))


class AdaptRaises(Adapter):
    name = "adapt-raises"
    description = "raises in adaptation"

    def predict(self, federation, images, ctx):
        raise KeyError("no such layer")


@hookimpl
def fedbench_methods():
    return [AggregateRaises, TrainingRaises, NaNLoss]


@hookimpl
def fedbench_adapters():
    return [AdaptRaises]
"""


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    path = tmp_path / "broken_plugin.py"
    path.write_text(BROKEN_PLUGIN)
    return path


def run(plugin: Path, results: Path, *args: str):
    cli = ["--plugin", str(plugin), "run", *QUICK, "--results-dir", str(results), "--json", *args]
    return CliRunner().invoke(app, cli)


def only_record(results: Path) -> dict:
    (path,) = (results / "runs").glob("*.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    ("args", "status", "error"),
    [
        (
            ["--method", "agg-raises", "--holdout", "none"],
            "failed",
            "method 'agg-raises' failed in server_update (server): RuntimeError: server exploded",
        ),
        (
            ["--method", "train-raises", "--holdout", "none"],
            "failed",
            "method 'train-raises' failed in local_update (client 0): ValueError: client exploded",
        ),
        (
            ["--method", "fedavg", "--adapter", "adapt-raises", "--holdout", "HK"],
            "failed",
            "adapter 'adapt-raises' failed: KeyError: 'no such layer'",
        ),
        (
            ["--method", "nan-loss", "--holdout", "none"],
            "diverged",
            "loss became nan in local training (client 0, round 1); federation, all sites",
        ),
    ],
)
def test_a_raising_plugin_ends_its_run_with_a_named_error(plugin, tmp_path, args, status, error):
    result = run(plugin, tmp_path, *args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    record = only_record(tmp_path)
    assert record["status"] == status
    assert error in record["error"]
    assert record["metrics"] == [], "a run that did not finish is never scored"
    assert json.loads(result.stdout) == record


def test_corrupted_records_in_the_results_folder_are_left_as_they_are(plugin, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    garbage = {"half.json": '{"run_id": "x", "metr', "binary.json": "\x00\x01\x02"}
    for name, text in garbage.items():
        (runs / name).write_text(text)
    result = run(plugin, tmp_path, "--method", "fedavg", "--holdout", "none")
    assert result.exit_code == 0, result.output
    for name, text in garbage.items():
        assert (runs / name).read_text() == text
    assert len(list(runs.glob("*.json"))) == 3
    board = CliRunner().invoke(app, ["leaderboard", "--results-dir", str(tmp_path)])
    assert board.exit_code == 0
    warnings = [line for line in board.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and all(any(n in w for w in warnings) for n in garbage)


def test_a_holdout_that_leaves_one_training_site_is_one_line(plugin, tmp_path):
    result = run(plugin, tmp_path, "--method", "fedavg", "--set", "data.num_sites=2")
    assert result.exit_code != 0
    assert result.stderr.strip() == (
        "error: holding out a site leaves 1 training site(s); at least two needed"
    )
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_checkpoint_resumes(tmp_path):
    stopped_dir, clean_dir = tmp_path / "stopped", tmp_path / "clean"
    process = subprocess.Popen(
        fedbench(stopped_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell without job control starts background jobs with SIGINT ignored, and Python
        # keeps an ignored SIGINT ignored: give the run the terminal's default, as Ctrl-C meets it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for_round(stopped_dir / "cache" / "checkpoints", 2, process)  # 6 rounds still to go
    os.kill(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1] == (
        "error: interrupted; records already written are intact"
    )
    assert "Traceback" not in stderr and stdout == ""
    assert not list((stopped_dir / "runs").glob("*.json")), "no record from a stopped run"
    resumed = subprocess.run(fedbench(stopped_dir), capture_output=True, check=True, text=True)
    clean = subprocess.run(fedbench(clean_dir), capture_output=True, check=True, text=True)
    resumed_record, clean_record = json.loads(resumed.stdout), json.loads(clean.stdout)
    assert resumed_record["metrics"] == clean_record["metrics"]
    assert resumed_record["history"] == clean_record["history"]
