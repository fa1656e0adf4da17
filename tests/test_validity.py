"""Numbers a reviewer can trust: a federation trained on other data is never reused, and a model
that went NaN or inf inside the federation is `diverged`, never scored."""

from __future__ import annotations

import dataclasses
import json

import torch
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.engine.federations import data_fingerprint, load_or_train
from fedbench.engine.registry import load_registry
from fedbench.engine.resolve import RunSpec, resolve

TINY = ["model.channels=[4,8]", "data.cases_per_site=3", "data.size=16"]


def tiny_run(tmp_path):
    spec = RunSpec("fedavg", preset="quick", rounds=1, overrides=TINY, results_dir=tmp_path)
    run = resolve(spec, load_registry())
    return run, run.dataset.load(run.config["data"], 0, tmp_path / "cache")


def cached(tmp_path) -> int:
    return len(list((tmp_path / "cache" / "federations").glob("*.pt")))


def nudged(data):
    """The same data with one training pixel of the first site changed."""
    site = data.sites[0]
    inputs = site.train.inputs.clone()
    inputs[0, 0, 0, 0] += 0.5
    first = dataclasses.replace(site, train=dataclasses.replace(site.train, inputs=inputs))
    return dataclasses.replace(data, sites=[first, *data.sites[1:]])


def test_changed_data_is_never_served_a_cached_federation(tmp_path):
    run, data = tiny_run(tmp_path)
    first = load_or_train(run, data, None, lambda *_: None)
    again = load_or_train(run, data, None, lambda *_: None)
    assert cached(tmp_path) == 1
    assert all(
        torch.equal(a, b) for a, b in zip(first.global_state.values(), again.global_state.values())
    )
    changed = nudged(data)
    assert data_fingerprint(changed) != data_fingerprint(data)
    load_or_train(run, changed, None, lambda *_: None)
    assert cached(tmp_path) == 2, "the changed data trained a federation of its own"


def test_the_fingerprint_sees_names_shapes_and_labels(tmp_path):
    _, data = tiny_run(tmp_path)
    base = data_fingerprint(data)
    assert data_fingerprint(data) == base
    site = data.sites[1]
    relabelled = site.test.targets.clone()
    relabelled[0, 0, 0] = 1 - relabelled[0, 0, 0]
    other_labels = dataclasses.replace(
        site, test=dataclasses.replace(site.test, targets=relabelled)
    )
    renamed = dataclasses.replace(site, name="elsewhere")
    for variant in (other_labels, renamed):
        sites = [data.sites[0], variant, *data.sites[2:]]
        assert data_fingerprint(dataclasses.replace(data, sites=sites)) != base


NAN_SERVER = """
import torch
from fedbench.hookspecs import hookimpl
from fedbench_plugins.fedavg import FedAvg


class Broken(FedAvg):
    name = "nan-server"

    def server_update(self, previous, updates):
        state = super().server_update(previous, updates)
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key] = torch.full_like(state[key], float("nan"))
        return state


@hookimpl
def fedbench_methods():
    return [Broken]
"""

HUGE_OUTPUTS = """
import torch
from fedbench.hookspecs import hookimpl
from fedbench_plugins.fedavg import FedAvg


class Huge(FedAvg):
    name = "huge-outputs"

    def personalized_state(self, client, state):
        out = dict(state)
        key = next(k for k in state if k.endswith("bias") and state[k].is_floating_point())
        out[key] = torch.full_like(state[key], 3e38)
        last = [k for k in state if k.endswith("bias")][-1]
        out[last] = torch.full_like(state[last], 3e38)
        return out


@hookimpl
def fedbench_methods():
    return [Huge]
"""


def run_plugin(tmp_path, source: str, name: str) -> dict:
    path = tmp_path / f"{name.replace('-', '_')}.py"
    path.write_text(source)
    args = ["--plugin", str(path), "run", "--method", name, "--preset", "quick", "--rounds", "1"]
    args += ["--holdout", "none", "--results-dir", str(tmp_path / "r"), "--json"]
    for setting in TINY:
        args += ["--set", setting]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output  # a run that did not end ok
    return json.loads(result.stdout)


def test_nan_weights_inside_are_diverged(tmp_path):
    record = run_plugin(tmp_path, NAN_SERVER, "nan-server")
    assert record["status"] == "diverged" and record["metrics"] == []
    assert "non-finite" in record["error"]
    assert not list((tmp_path / "r" / "cache" / "federations").glob("*.pt")), "never cached"


def test_non_finite_outputs_inside_are_diverged(tmp_path):
    record = run_plugin(tmp_path, HUGE_OUTPUTS, "huge-outputs")
    assert record["status"] == "diverged" and record["metrics"] == []
    assert "non-finite outputs" in record["error"]


def test_records_carry_the_data_fingerprint(tmp_path):
    run, data = tiny_run(tmp_path)
    args = ["run", "--method", "fedavg", "--preset", "quick", "--rounds", "1", "--holdout", "none"]
    args += ["--results-dir", str(tmp_path), "--json"]
    for setting in TINY:
        args += ["--set", setting]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["data_fingerprint"] == data_fingerprint(data)
    assert record["hd95_unit"] == "voxel", "the phantom has no physical size"
