"""A run's federations: each one loaded from the federation cache or trained, checked and cached,
under a lock on its cache entry so that no two processes train the same one. A run's
leave-one-site-out federations are independent of each other, and one small federation keeps
few cores busy, so `side_by_side` starts worker processes that train them into the cache while
this process trains the others; scoring then takes each from the cache, in order, as before."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import replace
from pathlib import Path

import torch

from fedbench.adapter import TrainedFederation
from fedbench.data import FederatedData
from fedbench.engine import cache
from fedbench.engine.precision import deterministic_mode
from fedbench.engine.profiling import PROFILE
from fedbench.engine.registry import Registry, load_registry
from fedbench.engine.resolve import Run, RunSpec, resolve
from fedbench.engine.training import RoundCallback, replay, train_federation
from fedbench.errors import Diverged, blamed_on
from fedbench.storage import StorageError

try:
    import fcntl
except ImportError:  # not POSIX: no locks, and no worker processes (see `process_count`)
    fcntl = None  # type: ignore[assignment]


def data_fingerprint(data: FederatedData) -> str:
    """A hash of every site's name and samples (inputs, targets, cases, with shapes and
    dtypes): federations trained on other data are never reused from the cache."""
    digest = hashlib.sha256()
    for site in data.sites:
        digest.update(site.name.encode())
        for split in (site.train, site.val, site.test):
            for tensor in (split.inputs, split.targets, split.cases):
                digest.update(f"{tuple(tensor.shape)} {tensor.dtype}".encode())
                flat = tensor.detach().cpu().contiguous().reshape(-1)
                digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def check_finite(federation: TrainedFederation, method: str) -> None:
    """A federation whose global or personalized weights hold NaN or inf has diverged."""
    states = [federation.global_state or {}, *federation.personalized]
    for state in states:
        for key, tensor in state.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise Diverged(f"method '{method}' left non-finite values in {key}")


@contextmanager
def claimed(entry: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the lock of a federation's cache entry; with `wait=False`, yield False at once
    when another process holds it. The system drops the lock when its holder dies."""
    if fcntl is None:
        yield True
        return
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(entry.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise StorageError(f"cannot lock {entry.with_suffix('.lock')}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError:  # a file system without flock: no claim, at worst trained twice
            pass
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def load_or_train(
    run: Run,
    data: FederatedData,
    holdout: str | None,
    on_round: RoundCallback,
    fingerprint: str | None = None,
) -> TrainedFederation:
    """The federation trained without `holdout` (None: on all sites): from the cache (after
    waiting for a worker process that is training it), or trained (resuming from the
    checkpoint a killed run left), checked for non-finite weights and then cached."""
    identity = run.federation_identity(holdout, fingerprint or data_fingerprint(data))
    with ExitStack() as lock:
        with PROFILE.phase("waiting for workers"):
            lock.enter_context(claimed(cache.cache_path(Path(run.spec.results_dir), identity)))
        return cached_or_trained(run, data, holdout, on_round, identity)


def cached_or_trained(
    run: Run, data: FederatedData, holdout: str | None, on_round: RoundCallback, identity: dict
) -> TrainedFederation:
    """`load_or_train` once the entry's lock is held."""
    results_dir = Path(run.spec.results_dir)
    path = cache.cache_path(results_dir, identity)
    sites = [s for s in data.sites if s.name != holdout]

    def build_model() -> torch.nn.Module:
        return run.build_model(data.task)

    cached = cache.load(path, run.device, build_model, [s.name for s in sites])
    if cached is not None:
        replay(cached.history, on_round)
        return cached
    checkpoint = cache.cache_path(results_dir, identity, "checkpoints")
    with (
        blamed_on(f"method '{run.method.name}' failed in training"),
        deterministic_mode(run.config["train"]),
    ):
        federation = (run.trainer or train_federation)(
            data,
            sites,
            run.method,
            build_model,
            run.config,
            run.spec.seed,
            run.device,
            on_round,
            checkpoint_path=checkpoint,
            checkpoint_every=run.spec.checkpoint_every,
            history=holdout is None,  # nobody reads a leave-one-site-out federation's curve
            for_unseen_site=holdout is not None,
        )
    check_finite(federation, run.method.name)
    cache.save(path, federation)
    if not run.spec.keep_checkpoints:
        checkpoint.unlink(missing_ok=True)
    return federation


def cpu_count() -> int:
    """The CPUs this process may use (its affinity mask where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def process_count(run: Run, holdouts: list[str]) -> int:
    """How many processes train this run's federations: `spec.workers`, or by default one per
    CPU (at most one per federation) on the CPU. Round observers hear the rounds of the
    federations this process trains; one a worker trained comes from the cache, as a
    federation cached by an earlier run does."""
    if fcntl is None or not holdouts:
        return 1
    if run.spec.workers is not None:
        return max(1, min(run.spec.workers, len(holdouts) + 1))
    if run.device.type != "cpu":
        return 1
    return max(1, min(cpu_count(), len(holdouts) + 1))


@contextmanager
def side_by_side(run: Run, registry: Registry, holdouts: list[str]) -> Iterator[None]:
    """Start worker processes that train the leave-one-site-out federations, last site first,
    while this process goes through them first site first (see `load_or_train`). Each process
    gets an equal share of the CPUs as torch threads, this one included, for the whole run.
    Workers ignore Ctrl-C (this process stops them); if they cannot start, one process runs."""
    processes = process_count(run, holdouts)
    threads = torch.get_num_threads()
    share = max(1, threads // processes)
    workers = started_workers(run, registry, holdouts, processes, share)
    if workers:
        torch.set_num_threads(share)
    try:
        yield
    finally:
        for worker in workers:
            worker.terminate()
            worker.join()
        torch.set_num_threads(threads)


def started_workers(
    run: Run, registry: Registry, holdouts: list[str], processes: int, threads: int
) -> list[multiprocessing.process.BaseProcess]:
    """`processes` - 1 running workers, or none (with one warning) when one cannot start."""
    if processes == 1 or threading.current_thread() is not threading.main_thread():
        return []  # signals can be set from the main thread only
    context = multiprocessing.get_context("spawn")
    args = (replace(run.spec, workers=1), registry.plugin_files, holdouts[::-1], threads)
    workers = [
        context.Process(target=worker_main, args=args, daemon=True) for _ in range(processes - 1)
    ]
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the workers
    try:
        for worker in workers:
            worker.start()
    except Exception as exc:  # a process limit, or a script without a __main__ guard
        registry.warn(f"training in one process: a worker could not start ({exc})")
        for worker in workers:
            if worker.pid is not None:
                worker.terminate()
                worker.join()
        return []
    finally:
        signal.signal(signal.SIGINT, interrupt)
    return workers


def worker_main(
    spec: RunSpec, plugin_files: tuple[str, ...], holdouts: list[str], threads: int
) -> None:
    """A worker process of `side_by_side`. It says nothing, and stops when its run dies; a
    failure here is met again, and reported, by the run itself."""
    quiet = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with suppress(AttributeError, OSError, ValueError):  # no such stream
            stream.flush()
            os.dup2(quiet, stream.fileno())  # torch's own warnings too
    torch.set_num_threads(threads)
    parent = os.getppid()

    def orphaned(*_: object) -> None:
        """Before each federation and each round: a worker whose run was killed stops (the
        checkpoint of its federation stays)."""
        if os.getppid() != parent:
            os._exit(0)

    try:
        registry = load_registry(tuple(Path(p) for p in plugin_files))
        train_held_out(resolve(spec, registry), holdouts, orphaned)
    except Exception:  # the run meets the failure again in its own process, and reports it
        return


def train_held_out(run: Run, holdouts: list[str], on_round: RoundCallback) -> None:
    """Train into the cache each held-out site's federation that nobody else holds or cached."""
    results_dir = Path(run.spec.results_dir)
    data = run.dataset.load(run.config["data"], run.spec.seed, results_dir / "cache")
    fingerprint = data_fingerprint(data)
    for holdout in holdouts:
        on_round(0, {}, False)  # round 0: before anything of this federation
        identity = run.federation_identity(holdout, fingerprint)
        with claimed(cache.cache_path(results_dir, identity), wait=False) as mine:
            if mine:
                cached_or_trained(run, data, holdout, on_round, identity)
