"""fedbench runs whose federations Flower trains: with its simulation engine (`fedbench flower
run`) or over a deployed grid (the server app of `fedbench.flower.apps`). Everything else is a
normal fedbench run (scoring, adapters, the record), its config marked `backend: flower` with
the engine, so a board holds it as a row of its own and no cache entry is shared with the
in-process engine."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fedbench.engine.registry import load_registry
from fedbench.engine.reporter import Reporter
from fedbench.engine.resolve import Run, RunSpec, resolve
from fedbench.engine.run import Outcome, execute
from fedbench.errors import FedbenchError
from fedbench.flower import FLOWER_VERSION, require_flower
from fedbench.flower.federation import supported, train_over_grid
from fedbench.flower.plan import Plan

if TYPE_CHECKING:
    from flwr.serverapp import Grid

ROUND_TIMEOUT_S = 600.0
Trainer = Callable[..., Any]


@contextmanager
def quiet_flower() -> Iterator[None]:
    """Flower's INFO lines (each round, each strategy step) kept off the run's output."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)  # and the notice that run_simulation is deprecated
    try:
        yield
    finally:
        logger.setLevel(level)


def simulation_trainer(spec: RunSpec, timeout: float = ROUND_TIMEOUT_S) -> Trainer:
    """A trainer (`train_federation`'s signature) that runs each federation of `spec`'s run on
    Flower's simulation engine: one virtual node per site, each loading its own site."""

    def train(data, sites, method_cls, build_model, config, seed, device, on_round=None, **kw):
        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation

        from fedbench.flower.node import client_app

        names = [s.name for s in sites]
        holdout = next((s.name for s in data.sites if s.name not in names), None)
        outcome: dict[str, Any] = {}
        server = ServerApp()

        @server.main()
        def main(grid: Grid, context: Any) -> None:
            try:
                outcome["federation"] = grid_trainer(grid, timeout)(
                    data, sites, method_cls, build_model, config, seed, device, on_round, **kw
                )
            except BaseException as exc:  # handed back to the run, which records it
                outcome["error"] = exc

        resources = {"num_cpus": max(1, (os.cpu_count() or 1) // len(sites)), "num_gpus": 0.0}
        with quiet_flower():
            run_simulation(
                server,
                client_app(replace(Plan.of(spec), holdout=holdout)),
                num_supernodes=len(sites),
                backend_config={
                    "client_resources": resources,
                    "init_args": {"log_to_driver": False},
                },
            )
        if "error" in outcome:
            raise outcome["error"]
        if "federation" not in outcome:
            raise FedbenchError("Flower's simulation ended without running the federation")
        return outcome["federation"]

    return train


def grid_trainer(grid: Grid, timeout: float = ROUND_TIMEOUT_S) -> Trainer:
    """A trainer over a deployed grid: the federation of every site, on the nodes connected."""

    def train(data, sites, method_cls, build_model, config, seed, device, on_round=None, **kw):
        names = [s.name for s in sites]
        return train_over_grid(
            grid, names, method_cls, build_model, config, seed, device, on_round,
            kw.get("history", True), kw.get("for_unseen_site", True), timeout,
        )  # fmt: skip

    return train


def flower_run(spec: RunSpec, engine: str, trainer: Trainer) -> Outcome:
    """A fedbench run (record written) whose federations `trainer` trains through Flower."""
    require_flower()
    registry = load_registry()
    run = marked(resolve(replace(spec, workers=1), registry), engine)
    run.trainer = trainer
    return execute(run, registry, Reporter())


def marked(run: Run, engine: str) -> Run:
    """The run's config says Flower trained it, and with which engine; checked first."""
    supported(run.method, run.config)
    run.config["backend"] = {"name": "flower", "engine": engine, "flwr": FLOWER_VERSION}
    return run
