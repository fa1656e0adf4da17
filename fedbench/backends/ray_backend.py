"""The Ray backend of `fedbench grid` (DESIGN.md section 9): each cell is a Ray task that resolves
and executes its run in a worker and returns the record; the driver writes each record as it comes
back, and a task that dies becomes a failed record naming the cause. Ray is an optional extra,
imported here only, and only when this backend is asked for."""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

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
from fedbench.engine.registry import Registry, load_registry
from fedbench.engine.reporter import Reporter
from fedbench.engine.resolve import RunSpec, resolve
from fedbench.engine.run import CACHE_FOLDERS, Outcome, check_folders, compute, save_outcome
from fedbench.errors import FedbenchError
from fedbench.results.record import now_iso
from fedbench.storage import StorageError

MISSING_RAY = "the ray backend needs Ray: pip install 'fedbench-med[ray]'"

#: the plugin registry of a worker process, per set of plugin files (loaded once per worker)
_WORKER_REGISTRIES: dict[tuple[str, ...], Registry] = {}


@dataclass(frozen=True)
class RayOptions:
    """Where the cluster is, what each run asks of it, and the --plugin files workers load."""

    address: str | None = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    plugins: tuple[Path, ...] = ()


def import_ray() -> ModuleType:
    """The ray module, or one clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise FedbenchError(MISSING_RAY) from None
    return ray


def worker_registry(plugins: tuple[str, ...]) -> Registry:
    """The registry inside a worker: installed plugins plus the driver's --plugin files."""
    if plugins not in _WORKER_REGISTRIES:
        _WORKER_REGISTRIES[plugins] = load_registry(tuple(Path(p) for p in plugins))
    return _WORKER_REGISTRIES[plugins]


def run_in_worker(spec: RunSpec, plugins: tuple[str, ...], threads: int) -> dict[str, Any]:
    """The body of a Ray task: {"record", "kept"} (the record and its kept predictions) or
    {"error": one line}. Torch uses as many threads as the task reserved CPUs. Writes neither
    record nor predictions: the driver does, so they land in its results folder."""
    import torch

    torch.set_num_threads(threads)
    try:
        registry = worker_registry(plugins)
        outcome = compute(resolve(spec, registry), registry, Reporter())
        return {"record": outcome.record, "kept": outcome.kept, "exits": list(registry.exits)}
    except StorageError as exc:  # a full disk or unwritable folder: the driver stops the grid
        return {"storage_error": str(exc)}
    except Exception as exc:
        return {"error": error_message(exc)}


def local_cpus() -> int:
    """The CPUs this process may use (its affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def starts_local(options: RayOptions) -> bool:
    """Whether this backend would start a Ray of its own on this machine."""
    return not options.address and not os.environ.get("RAY_ADDRESS")


def unreachable(address: str) -> str | None:
    """Why HOST:PORT (or ray://HOST:PORT) takes no TCP connection within 5 s, or None; other
    forms (auto) are left to Ray. Ray itself would retry a dead address for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def connect(ray: ModuleType, options: RayOptions) -> bool:
    """Start a local Ray (or join the one at --ray-address); True when this call started it, so it
    is shut down at the end (a session the caller started is left running)."""
    if ray.is_initialized():
        return False
    address = options.address
    problem = unreachable(address) if address else None
    if problem:
        raise FedbenchError(f"cannot reach Ray at {address}: {problem}")
    kwargs: dict[str, Any] = {
        "address": address or None,
        "include_dashboard": False,
        "log_to_driver": False,
        "ignore_reinit_error": True,
        "logging_level": logging.WARNING,
    }
    if starts_local(options):
        kwargs["num_cpus"] = local_cpus()
    try:
        with warnings.catch_warnings():  # a tip about future GPU masking: see worker_spec
            warnings.filterwarnings("ignore", "Tip: In future versions of Ray", FutureWarning)
            ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f" at {address}" if address else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedbenchError(f"cannot start Ray{where}: {first}") from None
    return True


def check_fits(have: dict[str, float], options: RayOptions) -> None:
    """On a local Ray, a run asking for more CPUs or GPUs than there are would wait forever."""
    for name, want in (("CPU", options.cpus_per_run), ("GPU", options.gpus_per_run)):
        if want > have.get(name, 0):
            raise FedbenchError(
                f"each run asks for {want:g} {name}(s) but the local Ray has "
                f"{have.get(name, 0):g}; lower --{name.lower()}s-per-run"
            )


def task_death(exc: BaseException) -> str:
    """One line naming why a Ray task died (worker crashed, out of memory, node lost...)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"the Ray task failed: {error_message(cause)}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"the Ray task died: {type(exc).__name__}: {lines[0] if lines else 'no message'}"


def worker_spec(spec: RunSpec, gpus_per_run: float) -> RunSpec:
    """The spec sent to a worker: the results folder (its cache/) made absolute, --device auto
    pinned to cpu when a task reserves no GPU (whatever Ray masks or not), and one process
    per cell (the task's CPUs are its torch threads)."""
    device = "cpu" if spec.device == "auto" and gpus_per_run == 0 else spec.device
    results_dir = Path(spec.results_dir).resolve()
    overrides = [*spec.overrides]
    return replace(spec, device=device, results_dir=results_dir, overrides=overrides, workers=1)


def collect(
    ray: ModuleType, ref: Any, cell: Cell, registry: Registry, started: str, clock: float
) -> CellResult:
    """Fetch one finished task and write its record here, on the driver; a task that died or
    raised becomes a failed record naming the cause."""
    wall_s = time.perf_counter() - clock
    try:
        outcome = ray.get(ref)
    except ray.exceptions.RayError as exc:
        outcome = {"error": task_death(exc)}
    if "storage_error" in outcome:  # as the local backend: every next cell would fail too
        raise StorageError(outcome["storage_error"])
    for line in outcome.get("exits", []):  # a worker's observer that exited fails the grid too
        if line not in registry.exits:
            registry.exits.append(line)
    record = outcome.get("record")
    if record is None:
        record = failed_record(cell, outcome["error"], registry, started, wall_s)
    else:
        wall_s = float(record.get("wall_s", wall_s))
    save_outcome(cell.spec.results_dir, Outcome(record, outcome.get("kept", {})), registry)
    return result_of(cell, record, wall_s)


def submit_and_collect(
    ray: ModuleType,
    cells: Sequence[Cell],
    on_result: OnResult,
    registry: Registry,
    options: RayOptions,
) -> None:
    """One task per cell; results are handled in the order they finish. Tasks are not retried
    by Ray (max_retries=0): a task that dies is a failed record, re-run with --retry-failed."""
    task = ray.remote(num_cpus=options.cpus_per_run, num_gpus=options.gpus_per_run, max_retries=0)(
        run_in_worker
    )
    plugins = tuple(str(Path(p).resolve()) for p in options.plugins)
    threads = max(1, int(options.cpus_per_run))
    pending: dict[Any, tuple[Cell, str, float]] = {}
    claims: dict[int, CellLock] = {}
    known = (
        known_records(cells[0].spec.results_dir) if cells else frozenset()
    )  # by id(cell): a Cell holds lists, so it is unhashable
    try:
        for cell in cells:  # claimed by this driver until its result is in (fedbench.backends.lock)
            claim = CellLock(cell.spec.results_dir, cell)
            if not claim.acquire():
                on_result(busy_result(cell))
                continue
            claims[id(cell)] = claim
            done = finished_elsewhere(cell.spec.results_dir, cell, known)
            if done is not None:
                on_result(skipped_result(cell, done))
                continue
            ref = task.remote(worker_spec(cell.spec, options.gpus_per_run), plugins, threads)
            pending[ref] = (cell, now_iso(), time.perf_counter())
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                cell, started, clock = pending.pop(ref)
                on_result(collect(ray, ref, cell, registry, started, clock))
                claims.pop(id(cell)).release()
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        for claim in claims.values():
            claim.release()


def ray_backend(registry: Registry, options: RayOptions) -> Backend:
    """Runs cells as Ray tasks. Ray is imported now (missing: one clear error) and started on
    the first call with cells to run; a Ray this backend started is shut down at the end."""
    ray = import_ray()
    if not options.cpus_per_run > 0 or options.gpus_per_run < 0:
        raise FedbenchError("--cpus-per-run must be above 0 and --gpus-per-run at least 0")
    if starts_local(options):  # GPUs are counted by Ray once it starts (check_fits below)
        check_fits({"CPU": local_cpus(), "GPU": float("inf")}, options)

    def run(cells: Sequence[Cell], on_result: OnResult) -> None:
        if not cells:
            return
        if cells[0].spec.device == "cuda" and options.gpus_per_run == 0:
            raise FedbenchError("--device cuda on the ray backend needs --gpus-per-run above 0")
        for folder in {str(c.spec.results_dir) for c in cells}:  # workers' failures would be
            check_folders(Path(folder), (*CACHE_FOLDERS, "predictions"))  # records otherwise
        started_here = connect(ray, options)
        try:
            if started_here and starts_local(options):
                check_fits(ray.cluster_resources(), options)
            submit_and_collect(ray, cells, on_result, registry, options)
        finally:
            if started_here:
                ray.shutdown()

    return run
