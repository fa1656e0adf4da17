"""`fedbench grid --backend ray`: records equal the local backend's, a task that dies becomes a
failed record (run again with --retry-failed), and a missing Ray is one clear line. The Ray tests
share one local 2-CPU Ray session and are skipped when Ray or synth-prostate is not installed."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from fedbench.backends.ray_backend import MISSING_RAY, run_in_worker, unreachable
from fedbench.cli import app
from fedbench.conformance import counted
from fedbench.engine.resolve import RunSpec

cli = CliRunner()

#: a tiny quick-preset grid: 2 methods x 2 seeds, one round on 3 small sites
SMALL = ["--preset", "quick", "--holdout", "none", "--set", "train.rounds=1"]
SMALL += ["--set", "data.num_sites=3", "--set", "data.cases_per_site=3"]
SMALL += ["--set", "data.slices_per_case=4", "--set", "data.size=16"]

DOOMED_PLUGIN = """
import os
from pathlib import Path

from fedbench.hookspecs import hookimpl
from fedbench.conformance import counted
from fedbench.method import Method

MARKER = Path({marker!r})


class Doomed(Method):
    name = "doomed"

    def after_local_update(self, client, state):
        if MARKER.exists():
            os._exit(1)  # the worker process dies in training, as an OOM kill would


@hookimpl
def fedbench_methods():
    return [Doomed]
"""

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("fedbench_datasets.synth_prostate") is None,
    reason="the synth-prostate dataset is not installed",
)


@pytest.fixture(scope="module")
def ray_session():
    """One local 2-CPU Ray for the whole module; the backend joins it and leaves it running."""
    ray = pytest.importorskip("ray")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def grid(results: Path, *args: str, plugin: Path | None = None) -> Any:
    """`fedbench [--plugin PLUGIN] grid ARGS --results-dir RESULTS`."""
    first = ["--plugin", str(plugin)] if plugin else []
    return cli.invoke(app, [*first, "grid", *args, "--results-dir", str(results)])


def records(results: Path) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """The records under RESULTS/runs by (method, seed)."""
    out: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for path in sorted((results / "runs").glob("*.json")):
        record = json.loads(path.read_text())
        out.setdefault((record["method"], record["seed"]), []).append(record)
    return out


@pytest.mark.slow
@needs_data
def test_ray_records_equal_local_records(ray_session, tmp_path):
    cells = ["--method", "fedavg", "--method", "fedbn", "--seeds", "0,1", *SMALL]
    on_ray = grid(tmp_path / "ray", *cells, "--backend", "ray")
    assert on_ray.exit_code == 0, on_ray.output
    assert "4 ok" in on_ray.stdout
    # a Ray task with 1 CPU runs torch on 1 thread; CPU results can differ in the last bits
    # between thread counts, so the local backend runs on 1 thread too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = grid(tmp_path / "local", *cells)
    finally:
        torch.set_num_threads(threads)
    assert local.exit_code == 0, local.output
    ray_records, local_records = records(tmp_path / "ray"), records(tmp_path / "local")
    assert (
        sorted(ray_records)
        == sorted(local_records)
        == [
            ("fedavg", 0),
            ("fedavg", 1),
            ("fedbn", 0),
            ("fedbn", 1),
        ]
    )
    for key, (ray_record,) in ray_records.items():
        (local_record,) = local_records[key]
        assert ray_record["environment"]["threads"] == local_record["environment"]["threads"] == 1
        for field in ("status", "config_hash", "config", "metrics", "history"):
            assert ray_record[field] == local_record[field], (key, field)
        assert counted(ray_record["cost"]) == counted(local_record["cost"]), key  # clock aside
    # the driver wrote each run's kept predictions beside its record, so `fedbench show` works
    for (ray_record,) in ray_records.values():
        assert (tmp_path / "ray" / "predictions" / f"{ray_record['run_id']}.npz").is_file()
    # finished cells are skipped on the ray backend too
    again = grid(tmp_path / "ray", *cells, "--backend", "ray")
    assert again.exit_code == 0 and "4 skipped" in again.stdout


@needs_data
def test_a_worker_sends_back_record_and_predictions_and_writes_neither(tmp_path):
    overrides = [arg for arg in SMALL[5:] if arg != "--set"]
    spec = RunSpec("fedavg", preset="quick", holdout="none", overrides=overrides)
    outcome = run_in_worker(replace(spec, results_dir=tmp_path), (), 1)
    assert outcome["record"]["status"] == "ok", outcome
    assert {site for _, site in outcome["kept"]} == {"RUNMC", "BMC", "I2CVB"}
    assert not (tmp_path / "runs").exists() and not (tmp_path / "predictions").exists()


@needs_data
def test_dying_task_is_a_failed_record_then_retried(ray_session, tmp_path):
    marker = tmp_path / "die"
    marker.touch()
    plugin = tmp_path / "doomed_plugin.py"
    plugin.write_text(DOOMED_PLUGIN.format(marker=str(marker)))
    results = tmp_path / "results"
    cells = ["--method", "doomed", "--method", "fedavg", "--seeds", "0", *SMALL]
    first = grid(results, *cells, "--backend", "ray", plugin=plugin)
    assert first.exit_code == 1, first.output
    assert "1 failed, 1 ok" in first.stdout
    (died,) = records(results)[("doomed", 0)]
    assert died["status"] == "failed" and "died" in died["error"]
    assert "WorkerCrashedError" in died["error"]
    assert died["config_hash"] and died["config"]["train"]["rounds"] == 1
    assert (died["adapter"], died["dataset"], died["metrics"]) == (None, "synth-prostate", [])
    # not run again by default; run again (and now ok) with --retry-failed
    marker.unlink()
    skipped = grid(results, *cells, "--backend", "ray", plugin=plugin)
    assert skipped.exit_code == 1 and len(records(results)[("doomed", 0)]) == 1
    assert "1 failed earlier" in skipped.stderr
    retry = grid(results, *cells, "--backend", "ray", "--retry-failed", plugin=plugin)
    assert retry.exit_code == 0, retry.output
    assert "1 ok, 1 skipped" in retry.stdout
    assert sorted(r["status"] for r in records(results)[("doomed", 0)]) == ["failed", "ok"]


def test_bad_resources_are_one_line(ray_session, tmp_path):
    for flag in ("--cpus-per-run=0", "--gpus-per-run=-1", "--cpus-per-run=4096"):
        result = grid(tmp_path, "--method", "fedavg", "--backend", "ray", flag)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert result.stderr.startswith("error: "), result.output


def test_dead_address_is_found_before_ray_retries_it():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert unreachable(f"127.0.0.1:{port}") is None
    assert unreachable(f"ray://127.0.0.1:{port}")  # closed now
    assert unreachable("auto") is None  # left to Ray


def test_missing_ray_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    result = grid(tmp_path, "--method", "fedavg", "--backend", "ray")
    assert result.exit_code == 2
    assert result.stderr == f"error: {MISSING_RAY}\n"


def test_a_full_disk_in_a_worker_stops_the_grid_instead_of_a_failed_record(monkeypatch, tmp_path):
    """As the local backend: a StorageError is no cell's failure, every next cell would hit it."""
    from types import SimpleNamespace

    from fedbench.backends import ray_backend
    from fedbench.backends.grid import Cell
    from fedbench.engine.resolve import RunSpec
    from fedbench.storage import StorageError

    def full(*args, **kwargs):
        raise StorageError(f"cannot write {tmp_path}/x.npz: No space left on device")

    monkeypatch.setattr(ray_backend, "compute", full)
    monkeypatch.setattr(ray_backend, "worker_registry", lambda plugins: None)
    monkeypatch.setattr(ray_backend, "resolve", lambda spec, registry: None)
    outcome = ray_backend.run_in_worker(RunSpec("fedavg", results_dir=tmp_path), (), 1)
    assert outcome == {"storage_error": f"cannot write {tmp_path}/x.npz: No space left on device"}
    fake_ray = SimpleNamespace(
        get=lambda ref: ref, exceptions=SimpleNamespace(RayError=RuntimeError)
    )
    cell = Cell(RunSpec("fedavg", results_dir=tmp_path), "hash")
    with pytest.raises(StorageError, match="No space left"):
        ray_backend.collect(fake_ray, outcome, cell, None, "2024-01-01T00:00:00+00:00", 0.0)
    assert not (tmp_path / "runs").exists(), "no failed record was written"


def test_an_observer_exiting_in_a_worker_fails_the_grid_on_the_driver(monkeypatch, tmp_path):
    """The worker's registry lists the observer that called sys.exit; the driver's must too,
    or the grid exits 0 (issue 31, item 6)."""
    from types import SimpleNamespace

    from fedbench.backends import ray_backend
    from fedbench.backends.grid import Cell
    from fedbench.engine.resolve import RunSpec

    line = "observer plugin 'x.py' called sys.exit(3) in fedbench_round_end; it is not called again"
    record = {"run_id": "r1", "status": "ok", "wall_s": 1.0}
    monkeypatch.setattr(ray_backend, "save_outcome", lambda *args: None)
    driver = SimpleNamespace(exits=[])
    fake_ray = SimpleNamespace(
        get=lambda ref: ref, exceptions=SimpleNamespace(RayError=RuntimeError)
    )
    cell = Cell(RunSpec("fedavg", results_dir=tmp_path), "hash")
    outcome = {"record": record, "kept": {}, "exits": [line]}
    for _ in range(2):  # two cells, one line
        ray_backend.collect(fake_ray, outcome, cell, driver, "2024-01-01T00:00:00+00:00", 0.0)
    assert driver.exits == [line]


def test_a_worker_sends_back_the_observers_that_exited(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from fedbench.backends import ray_backend
    from fedbench.engine.resolve import RunSpec
    from fedbench.engine.run import Outcome

    worker = SimpleNamespace(exits=["observer plugin 'x.py' called sys.exit(3)"])
    monkeypatch.setattr(ray_backend, "worker_registry", lambda plugins: worker)
    monkeypatch.setattr(ray_backend, "resolve", lambda spec, registry: None)
    monkeypatch.setattr(ray_backend, "compute", lambda run, reg, rep: Outcome({"run_id": "r"}, {}))
    outcome = ray_backend.run_in_worker(RunSpec("fedavg", results_dir=tmp_path), (), 1)
    assert outcome["exits"] == worker.exits
