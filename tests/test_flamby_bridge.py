"""The FLamby bridge on a stand-in `flamby` package (tests/fake_flamby): its datasets appear as
flamby-<name> with FLamby's constants as the preset, a broken one is left out, and it runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.engine.registry import load_registry
from fedbench_datasets import flamby_bridge

FAKE = Path(__file__).resolve().parent / "fake_flamby"


@pytest.fixture
def flamby(monkeypatch):
    """Put the stand-in package on sys.path for one test, and forget it afterwards."""
    monkeypatch.syspath_prepend(str(FAKE))
    yield
    for name in [n for n in sys.modules if n == "flamby" or n.startswith("flamby.")]:
        del sys.modules[name]


def test_no_flamby_no_datasets():
    if any(Path(p, "flamby").exists() for p in sys.path if p):
        pytest.skip("a flamby package is installed")
    assert flamby_bridge.fedbench_datasets() == []


def test_stand_in_datasets_appear_and_broken_ones_are_left_out(flamby):
    reg = load_registry()
    assert "flamby-toy" in reg.names("datasets")
    assert "flamby-broken" not in reg.names("datasets")
    assert not [line for line in reg.failures if "flamby" in line]


def test_preset_is_the_published_constants(flamby):
    dataset = load_registry().get("datasets", "flamby-toy")()
    train = dataset.preset("default")["train"]
    # get_nb_max_rounds(100) = (120 // 3 // 4) * 6 // 100 -> at least 1; 6 epochs in all
    assert train == {
        "rounds": 1,
        "local_epochs": 6,
        "batch_size": 4,
        "lr": 0.05,
        "optimizer": "sgd",
    }
    assert dataset.site_names({}) == ["center0", "center1", "center2"]


def test_load_uses_the_fed_class_model_loss_and_metric(flamby, tmp_path):
    dataset = load_registry().get("datasets", "flamby-toy")()
    data = dataset.load(dict(dataset.defaults), 0, tmp_path)
    assert [s.name for s in data.sites] == ["center0", "center1", "center2"]
    for site in data.sites:
        assert len(site.train) + len(site.val) == 40 and len(site.test) == 12
        assert len(site.val) == 4 and site.train.inputs.shape[1:] == (2,)
    model = data.task.build_model({})
    assert type(model).__name__ == "Baseline"
    outputs = model(data.sites[0].test.inputs)
    loss = data.task.loss(outputs, data.sites[0].test.targets)
    assert loss.ndim == 0 and torch.isfinite(loss)
    truth = data.sites[0].test.targets
    scores = data.task.score(truth * 2 - 1, truth, torch.arange(12))
    assert scores == {"flamby_metric": 1.0} and data.task.primary_metric == "flamby_metric"
    again = dataset.load(dict(dataset.defaults), 0, tmp_path)
    np.testing.assert_array_equal(again.sites[1].val.inputs, data.sites[1].val.inputs)


def test_a_stand_in_dataset_runs_end_to_end(flamby, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--method",
            "fedavg",
            "--dataset",
            "flamby-toy",
            "--preset",
            "quick",
            "--results-dir",
            str(tmp_path),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["status"] == "ok" and record["config"]["train"]["optimizer"] == "sgd"
    inside = {r["site"] for r in record["metrics"] if r["regime"] == "inside"}
    outside = {r["site"] for r in record["metrics"] if r["regime"] == "outside"}
    assert inside == outside == {"center0", "center1", "center2"}
    assert {r["metric"] for r in record["metrics"]} == {"flamby_metric"}
