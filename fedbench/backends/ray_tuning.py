"""Parallel trials of `fedbench tune` on Ray: the driver holds the study and queues what a killed
tuning left running; each Ray task opens the same study (its SQLite file, so on a cluster the
results folder must be shared) and runs its share of the trials with a sampler of its own seed.
Optuna's database is what keeps the tasks from drawing blind: each sees the others' trials."""

from __future__ import annotations

from pathlib import Path

from fedbench.backends.ray_backend import (
    RayOptions,
    connect,
    import_ray,
    task_death,
    worker_registry,
    worker_spec,
)
from fedbench.engine.registry import Registry
from fedbench.engine.resolve import RunSpec
from fedbench.engine.tuning import Tuned, finished, held, open_tuning, summary
from fedbench.errors import FedbenchError


def shares(left: int, tasks: int) -> list[int]:
    """`left` trials split over at most `tasks` tasks, as evenly as they go (none empty)."""
    tasks = max(1, min(tasks, left))
    return [left // tasks + (i < left % tasks) for i in range(tasks)] if left > 0 else []


def trials_in_worker(
    spec: RunSpec, plugins: tuple[str, ...], count: int, seed: int, threads: int
) -> None:
    """The body of a Ray task: `count` trials of the study, drawn with `seed`, on as many torch
    threads as the task reserved CPUs."""
    import torch

    torch.set_num_threads(threads)
    tuning = open_tuning(spec, worker_registry(plugins))
    tuning.run_trials(count, lambda _: None, seed)


def tune_on_ray(
    spec: RunSpec, registry: Registry, trials: int, options: RayOptions, tasks: int
) -> Tuned:
    """The tuning of `spec.method` up to `trials` trials in all, `tasks` trials at a time."""
    ray = import_ray()
    spec = worker_spec(spec, options.gpus_per_run)  # an absolute results folder, the device
    started = connect(ray, options)
    try:
        tuning = open_tuning(spec, registry)
        with held(tuning):
            left = trials - len(finished(tuning.study))
            base = spec.seed + len(tuning.study.trials)
            task = ray.remote(  # a task that dies is not retried behind the budget's back
                num_cpus=options.cpus_per_run, num_gpus=options.gpus_per_run, max_retries=0
            )(trials_in_worker)
            plugins = tuple(str(Path(p).resolve()) for p in options.plugins)
            threads = max(1, int(options.cpus_per_run))
            refs = [
                task.remote(spec, plugins, count, base + 1000 * i, threads)
                for i, count in enumerate(shares(left, tasks))
            ]
            try:
                ray.get(refs)
            except ray.exceptions.RayError as exc:
                why = task_death(exc)
                raise FedbenchError(f"a tuning task of {spec.method} failed: {why}") from None
            finally:  # no task may go on once the study is released
                for ref in refs:
                    ray.cancel(ref, force=True)
        return summary(tuning.study, spec, tuning.space, trials)
    finally:
        if started:
            ray.shutdown()
