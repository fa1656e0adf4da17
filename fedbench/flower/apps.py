"""The apps a deployment runs (the components of the project `fedbench flower new` writes): the
server app runs one fedbench run over the connected SuperNodes, each a site, and writes its
record; a run that does not end ok raises, so Flower records the run as failed."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from flwr.serverapp import ServerApp

from fedbench.flower.node import client_app as make_client_app
from fedbench.flower.plan import Plan
from fedbench.flower.run import ROUND_TIMEOUT_S, flower_run, grid_trainer

if TYPE_CHECKING:
    from flwr.app import Context
    from flwr.serverapp import Grid

server_app = ServerApp()
client_app = make_client_app()


class RunFailed(RuntimeError):
    """The fedbench run ended failed or diverged (its record says why)."""


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    config = dict(context.run_config)
    spec = replace(Plan.from_run_config(config).spec(), holdout="none")
    timeout = float(config.get("round-timeout", ROUND_TIMEOUT_S))
    record = flower_run(spec, "deployment", grid_trainer(grid, timeout)).record
    if record["status"] != "ok":
        raise RunFailed(f"run {record['status']}: {record.get('error', '')}")
