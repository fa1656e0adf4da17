"""pluggy hook specifications: how methods, adapters, datasets, models and observers plug into
fedbench. A plugin is a module (an entry point in the `fedbench` group, or a file named with
`--plugin PATH`) holding functions marked `@hookimpl` with these names and argument names."""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "fedbench"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def fedbench_methods() -> list[type]:
    """Return the Method classes (subclasses of `fedbench.method.Method`) this plugin adds.

    Called once per process, when the registry loads, for `fedbench list`, `run`, `grid` and
    every other command that needs names. Each class needs its own string `name`; it is what
    `--method NAME` and the run records say.
    """


@hookspec
def fedbench_adapters() -> list[type]:
    """Return the Adapter classes (subclasses of `fedbench.adapter.Adapter`) this plugin adds.

    Called once per process, when the registry loads. An adapter is what an unseen site does
    at test time with the trained federation and its own unlabeled images (`--adapter NAME`).
    """


@hookspec
def fedbench_datasets() -> list[type]:
    """Return the Dataset classes (subclasses of `fedbench.data.Dataset`) this plugin adds.

    Called once per process, when the registry loads. Keep the module cheap to import (load
    numpy, torch and files inside `Dataset.load`): `fedbench list` imports every plugin.
    """


@hookspec
def fedbench_models() -> list[type]:
    """Return the Model classes (subclasses of `fedbench.models.Model`) this plugin adds.

    Called once per process, when the registry loads. A run builds the model that the
    `model.name` setting names (default: the dataset's `model`); the model's `defaults` are
    the other `model.*` settings.
    """


@hookspec
def fedbench_round_end(
    run_id: str,
    holdout: str | None,
    round: int,
    metrics: dict[str, Any],
    replayed: bool,
    context: dict[str, Any],
) -> None:
    """Observe the end of one federated round, after the server aggregated.

    :param run_id: the run the round belongs to (its record will carry the same id).
    :param holdout: the site left out of this federation, or None for the federation of all
        sites (the inside regime).
    :param round: the round just finished, counting from 1.
    :param metrics: validation score per site name of the sites' personalized models; empty
        when nothing was validated this round (leave-one-site-out federations, or
        `eval.history=false`, unless `eval.val_best` asks for validation).
    :param replayed: True for a round this process did not train itself: restored from a
        checkpoint, kept by a cached federation, or trained by a worker process beside it
        (`metrics` are the ones kept). Every round of every federation of a run is heard
        once, so an observer that skips replayed rounds misses those federations.
    :param context: the run's results folder (`results_dir`), `run_id`, `method`, `adapter`,
        `dataset` and `seed`. An observer may name only the arguments it needs.

    Called in the process that runs the run (a Ray worker on the ray backend). An observer
    that raises is reported as one warning and does not change the run.
    """


@hookspec
def fedbench_run_end(record: dict[str, Any]) -> None:
    """Observe a finished run, just after its record was written.

    :param record: the run record (DESIGN.md section 5) exactly as written to
        RESULTS/runs/<run_id>.json, whatever its status (ok, failed or diverged).

    Called on the process that writes the record: the CLI process for local runs and grids,
    the driver for the ray backend. An observer that raises is reported as one warning; the
    record and the exit status stay as they are.
    """
