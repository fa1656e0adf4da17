"""Resumable runs: a run killed mid-training resumes from its last checkpoint and ends with the
same record as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import toy_config, toy_data, toy_train

from fedbench.conformance import counted
from fedbench_plugins.iopfl import IOPFL

CPU = torch.device("cpu")


def test_training_resumed_from_a_checkpoint_equals_uninterrupted(tmp_path):
    data = toy_data()
    checkpoint = tmp_path / "fed.pt"
    config = toy_config(4, alpha=0.1)
    config["eval"]["history"] = True
    whole = toy_train(data, data.sites, IOPFL, config, 0, CPU)
    first_half = dict(config, train=dict(config["train"], rounds=2))
    toy_train(data, data.sites, IOPFL, first_half, 0, CPU, checkpoint_path=checkpoint)
    assert torch.load(checkpoint, weights_only=True)["round"] == 2
    resumed = toy_train(data, data.sites, IOPFL, config, 0, CPU, checkpoint_path=checkpoint)
    assert resumed.history == whole.history
    assert counted(resumed.cost) == counted(whole.cost)  # clock readings aside
    for mine, theirs in zip(resumed.personalized, whole.personalized):
        for key, value in theirs.items():
            assert torch.equal(mine[key], value), key


def fedbench(results: Path, *extra: str) -> list[str]:
    """The command line of a small IOP-FL run (inside regime only, 8 rounds)."""
    args = [
        "run",
        "--method",
        "iopfl",
        "--preset",
        "quick",
        "--holdout",
        "none",
        "--set",
        "train.rounds=8",
        "--json",
    ]
    cli = [sys.executable, "-c", "from fedbench.cli import main; main()"]
    return [*cli, *args, "--results-dir", str(results), *extra]


def wait_for_round(checkpoints: Path, round_index: int, process: subprocess.Popen) -> None:
    """Block until some checkpoint under `checkpoints` has reached `round_index`."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        for path in checkpoints.glob("*.pt"):
            try:
                if torch.load(path, weights_only=True)["round"] >= round_index:
                    return
            except Exception:
                pass
        time.sleep(0.05)
    raise AssertionError("the run never reached the round to kill it at")


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_record(tmp_path):
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    process = subprocess.Popen(
        fedbench(killed_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_round(killed_dir / "cache" / "checkpoints", 3, process)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not list((killed_dir / "runs").glob("*.json")), "no record from a killed run"

    resumed = json.loads(
        subprocess.run(fedbench(killed_dir), capture_output=True, check=True, text=True).stdout
    )
    clean = json.loads(
        subprocess.run(fedbench(clean_dir), capture_output=True, check=True, text=True).stdout
    )
    assert resumed["status"] == clean["status"] == "ok"
    assert resumed["metrics"] == clean["metrics"]
    assert resumed["history"] == clean["history"]
    assert resumed["config_hash"] == clean["config_hash"]
    assert not list((killed_dir / "cache" / "checkpoints").glob("*.pt")), "removed when done"


@pytest.mark.slow
def test_keep_checkpoints_flag(tmp_path):
    out = subprocess.run(
        fedbench(tmp_path, "--keep-checkpoints", "--holdout", "none"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["status"] == "ok"
    assert list((tmp_path / "cache" / "checkpoints").glob("*.pt"))
