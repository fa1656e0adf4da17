"""`fedbench grid`: the cross product methods x adapters x seeds, run by a backend (local or
Ray); finished cells are skipped. Heavy libraries load inside the command, never at import."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedbench.cli.app import STATE, app, echo, err, fail, fail_all, registry, say, user_errors
from fedbench.errors import unknown_name

if TYPE_CHECKING:
    from fedbench.backends.grid import CellResult, GridPlan


def grid_command(
    method: Annotated[
        list[str] | None,
        typer.Option("--method", help="Method to run (repeat; 'all' for every one)."),
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", help="Adapter (repeat; 'all'); default: each method's own."),
    ] = None,
    seeds: Annotated[str, typer.Option(help="Seeds, e.g. 0,1,2 or 0-4.")] = "0,1,2",
    dataset: Annotated[str, typer.Option(help="Dataset name.")] = "synth-prostate",
    holdout: Annotated[str, typer.Option(help="all, none, or SITE,SITE: sites held out.")] = "all",
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    preset: Annotated[str, typer.Option(help="quick, default or paper.")] = "default",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting: KEY=VALUE.")
    ] = None,
    backend: Annotated[
        str, typer.Option(help="local (one run after another) or ray (runs as Ray tasks).")
    ] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster to join (e.g. auto); default: a local Ray.")
    ] = None,
    cpus_per_run: Annotated[float, typer.Option(help="CPUs each Ray task reserves.")] = 1.0,
    gpus_per_run: Annotated[float, typer.Option(help="GPUs each Ray task reserves.")] = 0.0,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed", help="Run again the cells whose earlier runs failed or diverged."
        ),
    ] = False,
    results_dir: Annotated[Path, typer.Option(help="Where records go.")] = Path("results"),
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the cells and what is done; run nothing.")
    ] = False,
    study: Annotated[
        Path | None,
        typer.Option(help="A study file (TOML): dataset, methods, adapters, seeds, sweeps."),
    ] = None,
    sweep: Annotated[
        list[str] | None,
        typer.Option(help="Sweep a setting: KEY=V1,V2,... (repeat for a product)."),
    ] = None,
    track: Annotated[
        list[str] | None,
        typer.Option("--track", help="Experiment tracker: mlflow or tensorboard (repeat)."),
    ] = None,
) -> None:
    """Run the cross product methods x adapters x seeds (x sweeps, or a --study file); finished
    cells are skipped, failed ones too unless --retry-failed."""
    from fedbench.backends import grid
    from fedbench.backends.ray_backend import RayOptions
    from fedbench.backends.study import parse_sweep, sweep_variants
    from fedbench.cli.studies import study_specs
    from fedbench.cli.tracking import check_trackers, enable_trackers
    from fedbench.engine.resolve import RunSpec
    from fedbench.results.record import runs_dir

    if study is not None:
        _refuse_beside_study(
            method=method,
            adapter=adapter,
            sweep=sweep,
            set_=set_,
            rounds=rounds,
            seeds=seeds != "0,1,2",  # the others are compared with their defaults
            dataset=dataset != "synth-prostate",
            holdout=holdout != "all",
            preset=preset != "default",
        )
    elif not method:
        fail("give --method NAME (repeat for more) or --study FILE (see: fedbench grid --help)")
    reg = registry()
    ray_options = RayOptions(ray_address, cpus_per_run, gpus_per_run, tuple(STATE["plugins"]))
    run_cells = _backend(backend, reg, ray_options)
    base = RunSpec(
        method="",
        dataset=dataset,
        holdout=holdout,
        preset=preset,
        device=device,
        rounds=rounds,
        overrides=list(set_ or []),
        results_dir=results_dir,
    )
    if study is not None:
        specs = study_specs(study, base, reg)
    else:
        methods = grid.expand_names(method or [], "methods", reg)
        adapters = grid.expand_names(adapter or [], "adapters", reg)
        if adapters and holdout == "none":
            say("note: --holdout none runs no adapter, so --adapter is ignored")
        variants = sweep_variants(parse_sweep(sweep or []))
        specs = grid.cell_specs(base, methods, adapters, grid.parse_seeds(seeds), variants)
    if dry_run:  # a dry run reads what is there and writes nothing, not even a folder
        check_trackers(track or [])
    else:
        for line in enable_trackers(track or [], results_dir):
            say(line)
        runs_dir(results_dir)
    plan = grid.plan_grid(specs, reg, retry_failed=retry_failed)
    _announce(plan)
    if dry_run:
        _print_cells(plan)
        if plan.failed:
            fail(f"{len(plan.failed)} cell(s) cannot run (listed above)")
        return
    results: list[CellResult] = [*plan.done, *plan.failed, *plan.earlier]
    ran: list[CellResult] = []

    def on_result(result: CellResult) -> None:
        ran.append(result)
        detail = f" ({result.error})" if result.error else ""
        say(
            f"[{len(ran)}/{len(plan.pending)}] {result.cell.label}: {result.status} in "
            f"{result.wall_s:.1f} s{detail}"
        )

    run_cells(plan.pending, on_result)
    _summary(results + ran, results_dir, reg.exits)


def _refuse_beside_study(**options: Any) -> None:
    """A study names its own cells: options that would change them make its board differ from
    its file, so they are refused."""
    given = [f"--{name.rstrip('_')}" for name, value in options.items() if value]
    if given:
        fail(f"--study names its own cells; drop {', '.join(given)} (or put it in the study)")


def _backend(name: str, reg: Any, ray_options: Any) -> Any:
    """The backend running the cells; Ray's options only matter to the ray backend."""
    from fedbench.backends import grid
    from fedbench.backends.ray_backend import RayOptions
    from fedbench.cli.progress import make_reporter

    defaults = RayOptions(plugins=ray_options.plugins)
    if name != "ray" and ray_options != defaults:
        say("note: --ray-address, --cpus-per-run and --gpus-per-run apply to --backend ray only")
    if name == "local":
        from fedbench.backends.local import local_backend

        return local_backend(reg, lambda: make_reporter(err, quiet=False), STATE["debug"])
    if name == "ray":
        from fedbench.backends.ray_backend import ray_backend

        return ray_backend(reg, ray_options)
    raise unknown_name("backend", name, list(grid.BACKENDS))


def _announce(plan: GridPlan) -> None:
    """Notes about the plan, then how many cells run, are already done or failed earlier."""
    for note in plan.notes:
        say(f"note: {note}")
    for result in plan.failed:
        say(f"cannot run {result.cell.label}: {result.error}")
    if not (plan.pending or plan.done or plan.failed or plan.earlier):
        fail("the grid has no cell that can run")
    cells = len(plan.pending) + len(plan.done) + len(plan.failed) + len(plan.earlier)
    earlier = (
        f", {len(plan.earlier)} failed earlier (not run again without --retry-failed)"
        if plan.earlier
        else ""
    )
    say(
        f"grid: {cells} cell(s): {len(plan.pending)} to run, "
        f"{len(plan.done)} already done (skipped){earlier}"
    )


def _print_cells(plan: GridPlan) -> None:
    """The --dry-run listing: one line per cell with its state."""
    for result in plan.done:
        echo(f"done     {result.cell.label} ({result.run_id})")
    for cell in plan.pending:
        echo(f"to run   {cell.label} ({cell.config_hash})")
    for result in plan.earlier:
        echo(f"{result.status:<8} {result.cell.label} earlier ({result.run_id})")
    for result in plan.failed:
        echo(f"failed   {result.cell.label}: {result.error}")


def _summary(results: list[CellResult], results_dir: Path, exits: list[str]) -> None:
    """Counts per status, the failures one per line, and a non-zero exit if any cell failed or
    an observer plugin called sys.exit (`exits`: one line each)."""
    from collections import Counter

    from fedbench.backends.grid import failures

    counts = Counter(r.status for r in results)
    line = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    echo(f"grid finished: {line}; records in {results_dir / 'runs'}")
    bad = failures(results)
    for result in bad:
        echo(f"  {result.status}: {result.cell.label}: {result.error or 'no message'}")
    if bad:
        exits = [*exits, f"{len(bad)} of {len(results)} cell(s) did not finish ok"]
    fail_all(exits)


app.command("grid")(user_errors(grid_command))
