"""`fedbench flower`: a fedbench run through Flower's simulation engine, and a Flower app
project for a deployment (the bridge, fedbench.flower, is imported only here and needs the
`flower` extra)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from fedbench.cli.app import app, fail_all, say, user_errors
from fedbench.cli.run import print_summary

flower_app = typer.Typer(
    help="Run a method through Flower (simulation), or write a Flower app to deploy it.",
    no_args_is_help=True,
    add_completion=False,
)


@flower_app.command("run")
@user_errors
def run_command(
    method: Annotated[str, typer.Option(help="Method name (fedbench list methods).")],
    dataset: Annotated[str, typer.Option(help="Dataset name.")] = "synth-prostate",
    adapter: Annotated[str | None, typer.Option(help="Adapter for unseen sites.")] = None,
    holdout: Annotated[str, typer.Option(help="all, none, or SITE,SITE: sites held out.")] = "all",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    preset: Annotated[str, typer.Option(help="quick, default or paper.")] = "default",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting: KEY=VALUE.")
    ] = None,
    results_dir: Annotated[Path, typer.Option(help="Where records go.")] = Path("results"),
    json_: Annotated[bool, typer.Option("--json", help="Print only the run record.")] = False,
) -> None:
    """`fedbench run` with every federation trained on Flower's simulation engine."""
    from fedbench.flower import require_flower

    require_flower()
    from fedbench.engine.resolve import RunSpec
    from fedbench.flower.run import flower_run, simulation_trainer

    spec = RunSpec(
        method=method,
        adapter=adapter,
        dataset=dataset,
        holdout=holdout,
        seed=seed,
        preset=preset,
        overrides=list(set_ or []),
        results_dir=results_dir,
    )
    record = flower_run(spec, "simulation", simulation_trainer(spec)).record
    if json_:
        sys.stdout.write(json.dumps(record, indent=2) + "\n")
    else:
        print_summary(record, results_dir)
    if record["status"] != "ok":
        fail_all([f"run {record['status']}: {record.get('error', '')}"])


@flower_app.command("new")
@user_errors
def new_command(
    folder: Annotated[Path, typer.Argument(help="The project's folder (new or empty).")],
    method: Annotated[str, typer.Option(help="Method name (fedbench list methods).")],
    dataset: Annotated[str, typer.Option(help="Dataset name.")] = "synth-prostate",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    preset: Annotated[str, typer.Option(help="quick, default or paper.")] = "default",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting: KEY=VALUE.")
    ] = None,
    results_dir: Annotated[
        Path | None, typer.Option(help="Where the run writes its record (default: FOLDER/results).")
    ] = None,
) -> None:
    """Write a Flower app project that runs METHOD on DATASET over SuperNodes, one per site."""
    from fedbench.flower import require_flower

    require_flower()
    from fedbench.engine.registry import load_registry
    from fedbench.engine.resolve import RunSpec, resolve
    from fedbench.flower.federation import supported
    from fedbench.flower.plan import Plan
    from fedbench.flower.project import write_project

    overrides = list(set_ or [])
    spec = RunSpec(method=method, dataset=dataset, seed=seed, preset=preset, overrides=overrides)
    run = resolve(spec, load_registry())  # every name and setting checked now, not at the site
    supported(run.method, run.config)
    sites = run.dataset.site_names(run.config["data"]) or []
    results = (results_dir or folder / "results").resolve()
    plan = Plan(method, dataset, seed, preset, tuple(overrides), str(results))
    for path in write_project(folder, plan, sites):
        say(f"wrote {path}")


app.add_typer(flower_app, name="flower")
