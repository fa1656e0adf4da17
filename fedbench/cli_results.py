"""`fedbench grid`, `fedbench leaderboard` and `fedbench plot curves`: many runs, the tables that
compare them and the figures. Heavy libraries load inside the commands, never at import."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from fedbench.grid import CellResult, GridPlan

FORMAT_BY_SUFFIX = {".md": "md", ".csv": "csv", ".html": "html", ".htm": "html", ".json": "json"}


def _cli() -> Any:
    """fedbench.cli, imported late: it imports this module while it loads."""
    from fedbench import cli

    return cli


def _say(message: str) -> None:
    typer.echo(message, err=True)


def grid_command(
    method: Annotated[
        list[str], typer.Option("--method", help="Method to run (repeat; 'all' for every one).")
    ],
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
) -> None:
    """Run the cross product methods x adapters x seeds; finished cells are skipped, failed ones
    too unless --retry-failed."""
    from fedbench import grid
    from fedbench.ray_backend import RayOptions
    from fedbench.record import runs_dir
    from fedbench.runner import RunSpec

    cli = _cli()
    reg = cli.registry()
    ray_options = RayOptions(ray_address, cpus_per_run, gpus_per_run, tuple(cli.STATE["plugins"]))
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
    methods = grid.expand_names(method, "methods", reg)
    adapters = grid.expand_names(adapter or [], "adapters", reg)
    if adapters and holdout == "none":
        _say("note: --holdout none runs no adapter, so --adapter is ignored")
    runs_dir(results_dir)
    specs = grid.cell_specs(base, methods, adapters, grid.parse_seeds(seeds))
    plan = grid.plan_grid(specs, reg, retry_failed=retry_failed)
    _announce(plan)
    if dry_run:
        _print_cells(plan)
        return
    results: list[CellResult] = [*plan.done, *plan.failed, *plan.earlier]
    ran: list[CellResult] = []

    def on_result(result: CellResult) -> None:
        ran.append(result)
        detail = f" ({result.error})" if result.error else ""
        _say(
            f"[{len(ran)}/{len(plan.pending)}] {result.cell.label}: {result.status} in "
            f"{result.wall_s:.1f} s{detail}"
        )

    run_cells(plan.pending, on_result)
    _summary(results + ran, results_dir)


def _backend(name: str, reg: Any, ray_options: Any) -> Any:
    """The backend running the cells; Ray's options only matter to the ray backend."""
    from fedbench import grid
    from fedbench.progress import make_reporter
    from fedbench.ray_backend import RayOptions

    cli = _cli()
    defaults = RayOptions(plugins=ray_options.plugins)
    if name != "ray" and ray_options != defaults:
        _say("note: --ray-address, --cpus-per-run and --gpus-per-run apply to --backend ray only")
    reporter = lambda: make_reporter(cli.err, quiet=False)  # noqa: E731
    return grid.make_backend(name, reg, reporter, cli.STATE["debug"], ray_options)


def _announce(plan: GridPlan) -> None:
    """Notes about the plan, then how many cells run, are already done or failed earlier."""
    for note in plan.notes:
        _say(f"note: {note}")
    for result in plan.failed:
        _say(f"cannot run {result.cell.label}: {result.error}")
    if not (plan.pending or plan.done or plan.failed or plan.earlier):
        _cli().fail("the grid has no cell that can run")
    cells = len(plan.pending) + len(plan.done) + len(plan.failed) + len(plan.earlier)
    earlier = (
        f", {len(plan.earlier)} failed earlier (not run again without --retry-failed)"
        if plan.earlier
        else ""
    )
    _say(
        f"grid: {cells} cell(s): {len(plan.pending)} to run, "
        f"{len(plan.done)} already done (skipped){earlier}"
    )


def _print_cells(plan: GridPlan) -> None:
    """The --dry-run listing: one line per cell with its state."""
    for result in plan.done:
        typer.echo(f"done     {result.cell.label} ({result.run_id})")
    for cell in plan.pending:
        typer.echo(f"to run   {cell.label} ({cell.config_hash})")
    for result in plan.earlier:
        typer.echo(f"{result.status:<8} {result.cell.label} earlier ({result.run_id})")
    for result in plan.failed:
        typer.echo(f"failed   {result.cell.label}: {result.error}")


def _summary(results: list[CellResult], results_dir: Path) -> None:
    """Counts per status, the failures one per line, and a non-zero exit if any cell failed."""
    from collections import Counter

    from fedbench.grid import failures

    counts = Counter(r.status for r in results)
    line = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    typer.echo(f"grid finished: {line}; records in {results_dir / 'runs'}")
    bad = failures(results)
    for result in bad:
        typer.echo(f"  {result.status}: {result.cell.label}: {result.error or 'no message'}")
    if bad:
        _cli().fail(f"{len(bad)} of {len(results)} cell(s) did not finish ok", code=1)


def leaderboard_command(
    results_dir: Annotated[Path, typer.Option(help="Folder holding runs/.")] = Path("results"),
    dataset: Annotated[
        str | None, typer.Option(help="Dataset (default: the one with the most records).")
    ] = None,
    format_: Annotated[
        str | None,
        typer.Option(
            "--format", help="table, md, csv, html or json (default: from --out, else table)."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Also draw the boards to FILE.png.")] = None,
    metric: Annotated[str, typer.Option(help="Metric to rank by (hd* ranks ascending).")] = "dice",
    selection: Annotated[str, typer.Option(help="final or val-best.")] = "final",
) -> None:
    """Rank methods inside and outside the federation from the run records."""
    from fedbench import leaderboard as lbm
    from fedbench import leaderboard_formats as formats

    fmt = format_ or (FORMAT_BY_SUFFIX.get(out.suffix.lower(), "table") if out else "table")
    if fmt not in formats.FORMATS:
        _cli().fail(f"unknown format '{fmt}'; known: {', '.join(formats.FORMATS)}")
    if plot is not None:
        from fedbench.plots import check_figure_path

        check_figure_path(plot)
    records, warnings = lbm.load_records(results_dir)
    for line in warnings:
        _say(f"warning: {line}")
    board = lbm.build_leaderboard(records, dataset, metric, selection)
    if out is not None:
        formats.write_text_atomic(out, formats.render(board, fmt))
        _say(f"wrote {out}")
    elif fmt == "table":
        _print_tables(board)
    else:
        sys.stdout.write(formats.render(board, fmt))
    if plot is not None:
        from fedbench.plots import leaderboard_figure

        leaderboard_figure(board, plot)
        _say(f"wrote {plot}")


def _print_tables(board: Any) -> None:
    """The rich tables on stdout, never squeezed: a table wider than the terminal keeps its
    width (and says so) rather than losing digits to ellipses."""
    from rich.console import Console

    from fedbench.leaderboard_formats import legend_lines, to_rich_tables

    screen = _cli().out
    tables = to_rich_tables(board)
    needed = max(
        screen.measure(t, options=screen.options.update(width=10_000)).maximum for t in tables
    )
    console = Console(file=sys.stdout, width=max(screen.width, needed), highlight=False)
    if needed > screen.width and screen.is_terminal:
        _say(f"note: the table is {needed} columns wide; widen the terminal or use --format md")
    for table in tables:
        console.print(table)
    for line in legend_lines(board):
        console.print(line, soft_wrap=True)


def curves_command(
    run_ids: Annotated[
        list[str], typer.Argument(help="Run ids (or a unique prefix, or a record's path).")
    ],
    out: Annotated[Path, typer.Option(help="Figure file (.png, .svg or .pdf).")],
    results_dir: Annotated[Path, typer.Option(help="Folder holding runs/.")] = Path("results"),
) -> None:
    """Learning curves: validation Dice per round for each site, one panel per run."""
    from fedbench.plots import check_figure_path, curves_figure

    check_figure_path(out)
    records = [find_record(results_dir, run_id) for run_id in run_ids]
    curves_figure(records, out)
    _say(f"wrote {out}")


def show_command(
    run_id: Annotated[str, typer.Argument(help="Run id (or a unique prefix, or a record's path).")],
    out: Annotated[Path, typer.Option(help="Figure file (.png, .svg or .pdf).")],
    results_dir: Annotated[Path, typer.Option(help="Folder holding runs/.")] = Path("results"),
) -> None:
    """For each site: an image, its ground truth and the run's prediction overlaid."""
    from fedbench import examples
    from fedbench.errors import FedbenchError
    from fedbench.plots import check_figure_path, examples_figure

    check_figure_path(out)
    record = find_record(results_dir, run_id)
    kept = examples.load(results_dir, record["run_id"])
    if not kept:
        raise FedbenchError(f"run '{record['run_id']}' kept no predictions to show")
    examples_figure(record, kept, out)
    _say(f"wrote {out}")


def find_record(results_dir: Path, run_id: str) -> dict[str, Any]:
    """The valid record for a run id, a unique prefix of one, or a record file's path."""
    import json

    from fedbench.errors import FedbenchError
    from fedbench.record import safe_token, validate_record

    runs = Path(results_dir) / "runs"
    path = Path(run_id)
    if not (path.suffix == ".json" and path.is_file()):
        path = runs / f"{safe_token(run_id)}.json"
    if not path.is_file():
        matches = sorted(runs.glob(f"{safe_token(run_id)}*.json")) if runs.is_dir() else []
        if len(matches) != 1:
            found = "several match" if matches else f"no record in {runs}"
            raise FedbenchError(f"run '{run_id}' not found: {found}")
        path = matches[0]
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FedbenchError(f"{path} is not a valid record: {type(exc).__name__}") from None
    problem = validate_record(payload)
    if problem:
        raise FedbenchError(f"{path} is not a valid record: {problem}")
    return payload


def register(app: typer.Typer) -> None:
    """Add `grid`, `leaderboard`, `plot curves` and `show` to the fedbench app."""
    cli = _cli()
    plot_app = typer.Typer(help="Figures from run records.", no_args_is_help=True)
    app.command("grid")(cli.user_errors(grid_command))
    app.command("leaderboard")(cli.user_errors(leaderboard_command))
    plot_app.command("curves")(cli.user_errors(curves_command))
    app.command("show")(cli.user_errors(show_command))
    app.add_typer(plot_app, name="plot")
