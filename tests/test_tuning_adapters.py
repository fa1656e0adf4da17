"""Tuning an adapter per unseen site (issue 29): the stand-ins' federations are trained once
and shared by the trials, the real unseen site is never read, and the study file's parts (one
per unseen site) run as one row."""

from __future__ import annotations

import dataclasses

from typer.testing import CliRunner

import fedbench.engine.federations as federations
from fedbench.backends.study import load_study
from fedbench.cli import app
from fedbench.cli.studies import labelled_specs
from fedbench.engine.registry import load_registry
from fedbench.engine.resolve import RunSpec
from fedbench.engine.tuning_adapters import tune_adapter
from fedbench_datasets.synth_prostate import SynthProstate

QUICK = {"method": "fedavg", "adapter": "tent", "preset": "quick", "rounds": 1}


def blanked(load, site_name: str):
    """A loader whose site `site_name` holds other images and labels (zeros) in every split."""

    def loading(self, cfg, seed, cache_dir):
        data = load(self, cfg, seed, cache_dir)
        for i, site in enumerate(data.sites):
            if site.name == site_name:
                zero = {
                    k: dataclasses.replace(
                        getattr(site, k),
                        inputs=getattr(site, k).inputs.mul(0),
                        targets=getattr(site, k).targets.mul(0),
                    )
                    for k in ("train", "val", "test")
                }
                data.sites[i] = dataclasses.replace(site, **zero)
        return data

    return loading


def test_an_adapter_tuning_never_reads_its_unseen_site_and_trains_each_stand_in_once(
    tmp_path, monkeypatch
):
    registry = load_registry()
    trained = []
    original = federations.train_federation

    def counting(*args, **kwargs):
        trained.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(federations, "train_federation", counting)
    spec = RunSpec(**QUICK, results_dir=tmp_path / "a")
    plain = tune_adapter(spec, registry, 3, "HK", lambda *_: None)
    assert len(trained) == 5, "each of the five stand-ins' federations is trained once"
    assert plain.holdout == "HK" and set(plain.settings) == {"adapter.lr"}
    monkeypatch.setattr(SynthProstate, "load", blanked(SynthProstate.load, "HK"))
    other = dataclasses.replace(spec, results_dir=tmp_path / "b")
    blind = tune_adapter(other, registry, 3, "HK", lambda *_: None)
    assert (plain.settings, plain.value) == (blind.settings, blind.value)
    assert 0 < plain.value < 1


def test_a_blanked_stand_in_changes_the_value(tmp_path, monkeypatch):
    """The check above can fail: blanking a stand-in (whose labels the objective reads) does."""
    registry = load_registry()
    spec = RunSpec(**QUICK, results_dir=tmp_path / "a")
    plain = tune_adapter(spec, registry, 1, "HK", lambda *_: None)
    monkeypatch.setattr(SynthProstate, "load", blanked(SynthProstate.load, "BIDMC"))
    other = dataclasses.replace(spec, results_dir=tmp_path / "b")
    assert tune_adapter(other, registry, 1, "HK", lambda *_: None).value != plain.value


def test_tune_adapter_writes_one_part_per_unseen_site_that_the_grid_runs(tmp_path, monkeypatch):
    import fedbench.engine.tuning_adapters as tuning_adapters

    monkeypatch.setattr(tuning_adapters, "stand_in_score", lambda spec, reg, unseen, report: 0.5)
    out = tmp_path / "tuned.toml"
    args = ["tune", "--adapter", "tent", "--preset", "quick", "--rounds", "1", "--trials", "2"]
    args += ["--results-dir", str(tmp_path / "r"), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    study = load_study(out)
    sites = ["BIDMC", "HK", "I2CVB", "BMC", "RUNMC", "UCL"]
    assert sorted(p.holdout for p in study.parts) == sorted(sites)
    assert {p.name for p in study.parts} == {"tent tuned on fedavg"}
    specs = [s for s, _ in labelled_specs(out, RunSpec(method=""), load_registry())]
    assert sorted(s.holdout for s in specs if s.seed == 0) == sorted(sites)
    assert all(s.adapter == "tent" and s.tuning["trials"] == 2 for s in specs)
    refused = CliRunner().invoke(app, [*args[:2], "bn-adapt", *args[3:]])
    assert refused.exit_code == 2 and "declares no search space" in refused.output
