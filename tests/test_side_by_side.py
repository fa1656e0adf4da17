"""Federations trained side by side (fedbench.engine.federations): worker processes train the
held-out sites' federations into the cache, the run takes them from there, and the record is
the one a single process writes (same torch threads, so the same floating-point sums)."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.conformance import counted
from fedbench.engine import federations
from fedbench.engine.federations import process_count, train_held_out
from fedbench.engine.registry import load_registry
from fedbench.engine.reporter import Reporter
from fedbench.engine.resolve import RunSpec, resolve
from fedbench.engine.run import compute

TINY = ["data.size=16", "data.cases_per_site=4", "data.slices_per_case=4", "data.num_sites=4"]
SPEC = RunSpec(
    method="fedavg", preset="quick", rounds=2, holdout="all", device="cpu", overrides=TINY
)


@pytest.fixture
def one_thread():
    """Both ways of running use one torch thread, so their sums are the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def same_record(a: dict, b: dict) -> bool:
    return a["metrics"] == b["metrics"] and counted(a["cost"]) == counted(b["cost"])


def test_a_worker_trains_the_folds_and_the_run_takes_them_from_the_cache(
    tmp_path, monkeypatch, one_thread
):
    registry = load_registry()
    first = resolve(replace(SPEC, results_dir=tmp_path / "a"), registry)
    alone = compute(first, registry, Reporter()).record
    run = resolve(replace(SPEC, results_dir=tmp_path / "b"), registry)
    holdouts = alone["holdouts"]
    trained: list[str | None] = []
    original = federations.train_federation

    def counting(data, sites, *args, **kwargs):
        trained.append(next((s.name for s in data.sites if s not in sites), None))
        return original(data, sites, *args, **kwargs)

    monkeypatch.setattr(federations, "train_federation", counting)
    train_held_out(run, holdouts[::-1], lambda *_: None)  # as a worker does, last site first
    assert trained == holdouts[::-1]
    trained.clear()
    both = compute(run, registry, Reporter()).record
    assert trained == [None], "the run trained a federation the worker had cached"
    assert same_record(alone, both)


def test_a_federation_another_process_holds_is_left_to_it(tmp_path):
    entry = tmp_path / "cache" / "federations" / "x.pt"
    with federations.claimed(entry) as first:
        assert first
        with federations.claimed(entry, wait=False) as second:
            assert not second
    with federations.claimed(entry, wait=False) as again:
        assert again


def test_how_many_processes(monkeypatch):
    registry = load_registry()
    run = resolve(SPEC, registry)
    monkeypatch.setattr(federations, "cpu_count", lambda: 16)
    assert process_count(run, ["A", "B"]) == 3, "one per federation at most"
    assert process_count(run, []) == 1, "nothing held out: one federation"
    assert process_count(resolve(replace(SPEC, workers=2), registry), ["A", "B"]) == 2
    assert process_count(resolve(replace(SPEC, workers=1), registry), ["A", "B"]) == 1
    monkeypatch.setattr(federations, "cpu_count", lambda: 2)
    assert process_count(run, ["A", "B", "C"]) == 2


@pytest.mark.slow
def test_worker_processes_train_and_the_record_is_the_single_process_one(
    tmp_path, monkeypatch, one_thread
):
    """Through the CLI, the workers spawned for real. This process pauses before each
    federation it trains (the patch does not reach the workers), so that the workers, which
    take seconds to start, get held-out sites to train: it must train fewer than all."""
    trained_here: list[int] = []
    original = federations.train_federation

    def slow_here(data, sites, *args, **kwargs):
        trained_here.append(len(sites))
        time.sleep(4)
        return original(data, sites, *args, **kwargs)

    def run(folder: str, workers: str) -> dict:
        args = ["run", "--method", "fedavg", "--preset", "quick", "--rounds", "2", "--json"]
        args += ["--workers", workers, "--results-dir", str(tmp_path / folder)]
        args += [part for setting in TINY for part in ("--set", setting)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    alone = run("alone", "1")
    monkeypatch.setattr(federations, "train_federation", slow_here)
    side_by_side = run("both", "3")
    assert same_record(alone, side_by_side)
    assert side_by_side["environment"]["threads"] == 1
    federation_count = 1 + len(side_by_side["holdouts"])
    assert 0 < len(trained_here) < federation_count, "no worker trained a federation"
