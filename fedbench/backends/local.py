"""The local backend of `fedbench grid`: cells run one after another in this process; a cell
that raises becomes a failed record naming the cause, and the grid goes on."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

from fedbench.backends.grid import (
    Backend,
    Cell,
    CellResult,
    OnResult,
    error_message,
    failed_record,
    result_of,
)
from fedbench.backends.lock import (
    CellLock,
    busy_result,
    finished_elsewhere,
    known_records,
    skipped_result,
)
from fedbench.engine.registry import Registry
from fedbench.engine.reporter import Reporter
from fedbench.engine.resolve import resolve
from fedbench.engine.run import Outcome, execute, save_outcome
from fedbench.results.record import now_iso
from fedbench.storage import StorageError


def run_cell(cell: Cell, registry: Registry, reporter: Reporter, debug: bool = False) -> CellResult:
    """Resolve and execute one cell; an error in this cell becomes a failed record and result."""
    started, clock = now_iso(), time.perf_counter()
    try:
        outcome = execute(resolve(cell.spec, registry), registry, reporter)
        record = outcome.record
        if debug and outcome.trace:
            print(outcome.trace, file=sys.stderr, end="")
    except (KeyboardInterrupt, StorageError):
        raise  # a full disk or an unwritable folder stops the grid: every next cell would fail
    except Exception as exc:
        if debug:
            raise
        wall_s = time.perf_counter() - clock
        record = failed_record(cell, error_message(exc), registry, started, wall_s)
        save_outcome(cell.spec.results_dir, Outcome(record, {}), registry)
    return result_of(cell, record, time.perf_counter() - clock)


def claimed_run(
    cell: Cell,
    registry: Registry,
    make_reporter: Callable[[], Reporter],
    debug: bool,
    known: frozenset[str] | None = None,
) -> CellResult:
    """Run a cell unless another grid on the same results folder holds it or finished it (a
    record not among `known`, those there when this grid started)."""
    results_dir = cell.spec.results_dir
    claim = CellLock(results_dir, cell)
    if not claim.acquire():
        return busy_result(cell)
    try:
        done = finished_elsewhere(
            results_dir, cell, known_records(results_dir) if known is None else known
        )
        if done is not None:
            return skipped_result(cell, done)
        reporter = make_reporter()
        try:
            return run_cell(cell, registry, reporter, debug)
        finally:
            reporter.close()
    finally:
        claim.release()


def local_backend(
    registry: Registry, make_reporter: Callable[[], Reporter], debug: bool = False
) -> Backend:
    """Runs cells one after another in this process."""

    def run(cells: Sequence[Cell], on_result: OnResult) -> None:
        known = known_records(cells[0].spec.results_dir) if cells else frozenset()
        for cell in cells:
            on_result(claimed_run(cell, registry, make_reporter, debug, known))

    return run
