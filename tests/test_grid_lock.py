"""Two grids on one results folder never run the same cell twice (issue 16): a cell another
grid holds is left to it, a cell another grid finished after this one planned is skipped, and a
killed grid leaves no stale claim. Execution is faked as in test_grid.py."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_grid import TOY_PLUGIN, FakeExecute, grid

from fedbench.backends import local as local_backend
from fedbench.backends.grid import plan_grid
from fedbench.backends.local import claimed_run
from fedbench.backends.lock import CellLock
from fedbench.engine.registry import load_registry
from fedbench.engine.reporter import Reporter
from fedbench.engine.resolve import RunSpec, resolve

pytest.importorskip("fcntl")


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    path = tmp_path / "grid_toy_plugin.py"
    path.write_text(TOY_PLUGIN)
    return path


def cells(plugin: Path, results: Path, seeds: tuple[int, ...] = (0, 1)):
    reg = load_registry((plugin,))
    specs = [
        RunSpec(method="fedavg", dataset="grid-toy", seed=s, results_dir=results) for s in seeds
    ]
    return reg, plan_grid(specs, reg).pending


def test_a_cell_another_grid_holds_is_left_to_it(plugin, tmp_path, monkeypatch):
    fake = FakeExecute()
    monkeypatch.setattr(local_backend, "execute", fake)
    results = tmp_path / "r"
    _, (held, _) = cells(plugin, results)
    other = CellLock(results, held)  # the other grid, running seed 0
    assert other.acquire()
    try:
        result = grid(plugin, results, "--method", "fedavg", "--seeds", "0,1")
    finally:
        other.release()
    assert result.exit_code == 0, result.output
    assert fake.calls == [("fedavg", "none", 1)]  # seed 0 was never started here
    assert "busy" in result.output and "another grid" in result.output
    again = grid(plugin, results, "--method", "fedavg", "--seeds", "0,1")
    assert again.exit_code == 0 and fake.calls[-1] == ("fedavg", "none", 0)


def test_a_cell_finished_by_another_grid_after_planning_is_skipped(plugin, tmp_path, monkeypatch):
    fake = FakeExecute()
    monkeypatch.setattr(local_backend, "execute", fake)
    results = tmp_path / "r"
    reg, (cell, _) = cells(plugin, results)
    fake(resolve(cell.spec, reg), reg, None)  # the other grid's record, written after our plan
    result = claimed_run(cell, reg, Reporter, debug=False)
    assert result.status == "skipped" and result.run_id
    assert len(fake.calls) == 1  # only the other grid's run


def test_claims_are_released_after_a_run_and_when_the_holder_dies(plugin, tmp_path):
    results = tmp_path / "r"
    _, (cell, _) = cells(plugin, results)
    mine = CellLock(results, cell)
    assert mine.acquire()
    assert not CellLock(results, cell).acquire()
    mine.release()
    assert CellLock(results, cell).acquire()

    holder = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    other = tmp_path / "other.lock"
    process = subprocess.Popen(
        [sys.executable, "-c", holder, str(other)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "held"
        probe = CellLock(results, cell)
        probe.path = other
        assert not probe.acquire()
        process.kill()
        process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while not probe.acquire():  # the kernel drops a dead process's locks at once
            assert time.monotonic() < deadline
        probe.release()
    finally:
        process.kill()


def test_a_cell_another_grid_ran_and_failed_is_not_run_again(plugin, tmp_path, monkeypatch):
    from fedbench.backends.lock import known_records

    fake = FakeExecute(raise_for=("fedavg",))
    monkeypatch.setattr(local_backend, "execute", fake)
    results = tmp_path / "r"
    reg, (cell, _) = cells(plugin, results)
    planned = known_records(results)
    other = claimed_run(cell, reg, Reporter, debug=False)  # the other grid's failing run
    assert other.status == "failed" and len(fake.calls) == 1
    mine = claimed_run(cell, reg, Reporter, debug=False, known=planned)
    assert mine.status == "skipped" and len(fake.calls) == 1


def test_a_locks_folder_that_cannot_be_made_is_one_line(plugin, tmp_path, monkeypatch):
    monkeypatch.setattr(local_backend, "execute", FakeExecute())
    results = tmp_path / "r"
    results.mkdir()
    (results / "locks").write_text("not a folder")
    result = grid(plugin, results, "--method", "fedavg", "--seeds", "0")
    assert result.exit_code != 0
    assert "cannot claim a cell in" in result.output and "Traceback" not in result.output
