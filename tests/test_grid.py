"""`fedbench grid`: the cross product, skipping finished cells, failing cells that do not stop the
grid (and run again only with --retry-failed), and the local backend (Ray: test_ray_backend.py).
Execution is faked (the local backend's execute), so these tests train nothing; one end-to-end test
trains a single round on synth-prostate when that dataset is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedbench.backends import local as local_backend
from fedbench.backends.grid import parse_seeds, same_holdouts
from fedbench.cli import app
from fedbench.engine.resolve import holdout_sites
from fedbench.engine.run import Outcome
from fedbench.errors import FedbenchError
from fedbench.results.record import SCHEMA_VERSION, new_run_id, now_iso, write_record

cli = CliRunner()

TOY_PLUGIN = """
import os

from fedbench.data import Dataset
from fedbench.hookspecs import hookimpl


class GridToy(Dataset):
    name = "grid-toy"
    defaults = {"size": 16}

    def site_names(self, cfg):
        return ["a", "b", "c"]

    def load(self, cfg, seed, cache_dir):
        raise RuntimeError("the grid tests fake execute; nothing loads data")


@hookimpl
def fedbench_datasets():
    return [GridToy]


@hookimpl
def fedbench_run_end(record):
    if "GRID_OBSERVER_LOG" in os.environ:
        with open(os.environ["GRID_OBSERVER_LOG"], "a") as log:
            log.write(record["status"] + "\\n")
"""


class FakeExecute:
    """Stands in for execute in the local backend: writes a plausible record, or fails."""

    def __init__(self, raise_for: tuple[str, ...] = (), diverge_for: tuple[str, ...] = ()):
        self.calls: list[tuple[str, str | None, int]] = []
        self.raise_for, self.diverge_for = raise_for, diverge_for

    def __call__(self, run, registry, reporter) -> Outcome:
        spec = run.spec
        self.calls.append((run.method.name, run.adapter_name, spec.seed))
        if run.method.name in self.raise_for:
            raise FedbenchError(f"{run.method.name} cannot run here")
        status = "diverged" if run.method.name in self.diverge_for else "ok"
        holdouts = holdout_sites(spec.holdout, ["a", "b", "c"])
        rows = [
            {"regime": "inside", "site": s, "holdout": None, "metric": "dice", "value": 0.5}
            for s in ("a", "b", "c")
        ] + [
            {"regime": "outside", "site": s, "holdout": s, "metric": "dice", "value": 0.4}
            for s in holdouts
        ]
        record = {
            "schema_version": SCHEMA_VERSION,
            "run_id": new_run_id(
                "grid-toy", run.method.name, run.adapter_name, spec.seed, run.config_hash
            ),
            "status": status,
            "method": run.method.name,
            "adapter": run.adapter_name if holdouts else None,
            "dataset": "grid-toy",
            "seed": spec.seed,
            "holdouts": holdouts,
            "config": run.config,
            "config_hash": run.config_hash,
            "environment": {},
            "started_at": now_iso(),
            "finished_at": now_iso(),
            "wall_s": 0.0,
            "cost": {"bytes_up": 1, "bytes_down": 1, "client_steps": 1},
            "metrics": [dict(r, selection="final") for r in rows] if status == "ok" else [],
        }
        if status != "ok":
            record["error"] = "loss became nan"
        write_record(spec.results_dir, record)
        return Outcome(record, {})


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    path = tmp_path / "grid_toy_plugin.py"
    path.write_text(TOY_PLUGIN)
    return path


def grid(plugin: Path, results: Path, *args: str):
    command = ["--plugin", str(plugin), "grid", "--dataset", "grid-toy"]
    return cli.invoke(app, [*command, "--results-dir", str(results), *args])


def test_cells_run_once_then_are_skipped(plugin, tmp_path, monkeypatch):
    fake = FakeExecute()
    monkeypatch.setattr(local_backend, "execute", fake)
    results = tmp_path / "results"
    first = grid(plugin, results, "--method", "fedavg", "--method", "fedbn", "--seeds", "0,1")
    assert first.exit_code == 0, first.output
    assert sorted(fake.calls) == [
        ("fedavg", "none", 0),
        ("fedavg", "none", 1),
        ("fedbn", "bn-adapt", 0),  # each method's default adapter
        ("fedbn", "bn-adapt", 1),
    ]
    assert "4 ok" in first.stdout
    again = grid(plugin, results, "--method", "fedavg", "--method", "fedbn", "--seeds", "0-2")
    assert again.exit_code == 0, again.output
    assert len(fake.calls) == 6  # only the two seed-2 cells were new
    assert "2 ok, 4 skipped" in again.stdout


def test_changed_settings_or_holdouts_rerun(plugin, tmp_path, monkeypatch):
    fake = FakeExecute()
    monkeypatch.setattr(local_backend, "execute", fake)
    results = tmp_path / "results"
    assert grid(plugin, results, "--method", "fedavg", "--seeds", "0").exit_code == 0
    assert (
        grid(plugin, results, "--method", "fedavg", "--seeds", "0", "--rounds", "3").exit_code == 0
    )
    assert len(fake.calls) == 2  # another config hash
    assert (
        grid(plugin, results, "--method", "fedavg", "--seeds", "0", "--holdout", "a").exit_code == 0
    )
    assert len(fake.calls) == 3  # same hash, other held-out sites


def test_failing_cells_do_not_stop_the_grid(plugin, tmp_path, monkeypatch):
    fake = FakeExecute(raise_for=("fedprox",), diverge_for=("fedbn",))
    monkeypatch.setattr(local_backend, "execute", fake)
    results = tmp_path / "results"
    args = ["--method", "fedprox", "--method", "fedbn", "--method", "fedavg", "--seeds", "0,1"]
    result = grid(plugin, results, *args)
    assert result.exit_code == 1
    assert len(fake.calls) == 6  # every cell was tried
    assert "2 diverged, 2 failed, 2 ok" in result.stdout
    assert "failed: fedprox + none, seed 0: fedprox cannot run here" in result.stdout
    assert "diverged: fedbn + bn-adapt, seed 1: loss became nan" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "error: 4 of 6 cell(s) did not finish ok"
    # a cell that raised has a failed record too, naming its cell and the cause
    records = [json.loads(f.read_text()) for f in (results / "runs").glob("*.json")]
    failed = [r for r in records if r["status"] == "failed"]
    assert sorted(r["seed"] for r in failed) == [0, 1]
    assert {r["method"] for r in failed} == {"fedprox"}
    assert {r["error"] for r in failed} == {"fedprox cannot run here"}
    assert all(r["config_hash"] and r["config"]["train"] for r in failed)
    # without --retry-failed, failed and diverged cells are not run again; still a non-zero exit
    rerun = grid(plugin, results, *args)
    assert len(fake.calls) == 6 and rerun.exit_code == 1, rerun.output
    assert "4 failed earlier (not run again without --retry-failed)" in rerun.stderr
    assert "2 diverged, 2 failed, 2 skipped" in rerun.stdout
    assert "fedprox cannot run here (earlier run; --retry-failed runs it again)" in rerun.stdout
    dry = grid(plugin, results, *args, "--dry-run")
    assert dry.stdout.count("failed   fedprox + none, seed") == 2 and len(fake.calls) == 6
    # --retry-failed runs exactly those again; ok ones are still skipped
    retry = grid(plugin, results, *args, "--retry-failed")
    assert len(fake.calls) == 10 and retry.exit_code == 1
    assert sorted(fake.calls[6:]) == [
        ("fedbn", "bn-adapt", 0),
        ("fedbn", "bn-adapt", 1),
        ("fedprox", "none", 0),
        ("fedprox", "none", 1),
    ]


def test_retry_failed_reruns_a_cell_that_now_succeeds(plugin, tmp_path, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setattr(local_backend, "execute", FakeExecute(raise_for=("fedavg",)))
    assert grid(plugin, results, "--method", "fedavg", "--seeds", "0").exit_code == 1
    fixed = FakeExecute()
    monkeypatch.setattr(local_backend, "execute", fixed)
    assert grid(plugin, results, "--method", "fedavg", "--seeds", "0").exit_code == 1
    assert fixed.calls == []
    retry = grid(plugin, results, "--method", "fedavg", "--seeds", "0", "--retry-failed")
    assert retry.exit_code == 0 and "1 ok" in retry.stdout and len(fixed.calls) == 1
    # the ok record now counts: later grids skip the cell, with or without --retry-failed
    again = grid(plugin, results, "--method", "fedavg", "--seeds", "0", "--retry-failed")
    assert again.exit_code == 0 and "1 skipped" in again.stdout and len(fixed.calls) == 1


def test_unexpected_exception_in_a_cell_is_a_failure(plugin, tmp_path, monkeypatch):
    def broken(run, registry, reporter):
        raise ValueError("bug in a plugin")

    monkeypatch.setattr(local_backend, "execute", broken)
    observed = tmp_path / "observed.log"
    monkeypatch.setenv("GRID_OBSERVER_LOG", str(observed))
    result = grid(plugin, tmp_path / "r", "--method", "fedavg", "--seeds", "0,1")
    assert result.exit_code == 1
    assert "failed: fedavg + none, seed 1: ValueError: bug in a plugin" in result.stdout
    records = [json.loads(f.read_text()) for f in (tmp_path / "r" / "runs").glob("*.json")]
    assert [r["error"] for r in records] == ["ValueError: bug in a plugin"] * 2
    assert observed.read_text().splitlines() == ["failed", "failed"], "observers see failures too"


def test_bad_input_is_one_line(plugin, tmp_path, monkeypatch):
    fake = FakeExecute()
    monkeypatch.setattr(local_backend, "execute", fake)
    for args in (
        ["--method", "nope"],
        ["--method", "fedavg", "--adapter", "nope"],
        ["--method", "fedavg", "--seeds", "a,b"],
        ["--method", "fedavg", "--backend", "spark"],
        ["--method", "fedavg", "--set", "train.nope=1"],
    ):
        result = grid(plugin, tmp_path / "r", *args)
        assert result.exit_code == 2, args
        assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, args
    assert "known:" in grid(plugin, tmp_path / "r", "--method", "nope").stderr
    assert fake.calls == []


def test_adapters_cross_product_leaves_out_impossible_pairs(plugin, tmp_path, monkeypatch):
    fake = FakeExecute()
    monkeypatch.setattr(local_backend, "execute", fake)
    args = ["--method", "fedavg", "--method", "local", "--adapter", "none"]
    result = grid(plugin, tmp_path / "r", *args, "--adapter", "ensemble", "--seeds", "0")
    assert result.exit_code == 0, result.output
    assert sorted(fake.calls) == [
        ("fedavg", "ensemble", 0),
        ("fedavg", "none", 0),
        ("local", "ensemble", 0),
    ]
    assert "note: left out local + none" in result.stderr


def test_dry_run_lists_cells_and_runs_nothing(plugin, tmp_path, monkeypatch):
    fake = FakeExecute()
    monkeypatch.setattr(local_backend, "execute", fake)
    result = grid(plugin, tmp_path / "r", "--method", "iopfl", "--seeds", "0,1", "--dry-run")
    assert result.exit_code == 0 and fake.calls == []
    assert result.stdout.count("to run   iopfl + iopfl-routing, seed") == 2


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("3, 0-1") == [0, 1, 3]
    for bad in ("", "x", "1-"):
        with pytest.raises(FedbenchError):
            parse_seeds(bad)


def test_same_holdouts():
    record = {
        "holdouts": ["a", "b"],
        "metrics": [{"regime": "inside", "site": s} for s in ("a", "b", "c")],
    }
    assert same_holdouts(record, holdout_sites("b,a", None))
    assert not same_holdouts(record, holdout_sites("all", None))
    assert same_holdouts(record, ["a", "b"])
    assert not same_holdouts(record, holdout_sites("none", None))


@pytest.mark.skipif(
    importlib.util.find_spec("fedbench_datasets.synth_prostate") is None,
    reason="the synth-prostate dataset is not installed yet",
)
def test_end_to_end_grid_then_leaderboard(tmp_path):
    results = tmp_path / "results"
    args = ["grid", "--method", "fedavg", "--seeds", "0", "--preset", "quick"]
    args += ["--holdout", "none", "--set", "train.rounds=1", "--results-dir", str(results)]
    first = cli.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "1 ok" in first.stdout
    second = cli.invoke(app, args)
    assert second.exit_code == 0 and "1 skipped" in second.stdout
    board = cli.invoke(app, ["leaderboard", "--results-dir", str(results), "--format", "json"])
    assert board.exit_code == 0, board.output
    rows = json.loads(board.stdout)["boards"]["inside"]["rows"]
    assert [r["method"] for r in rows] == ["fedavg"] and rows[0]["seeds"] == 1
