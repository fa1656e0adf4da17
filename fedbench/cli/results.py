"""`fedbench leaderboard`, `fedbench plot curves` and `fedbench show`: the tables that compare
runs and the figures. Heavy libraries load inside the commands, never at import."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fedbench.cli.app import app, fail, out, say, user_errors

FORMAT_BY_SUFFIX = {".md": "md", ".csv": "csv", ".html": "html", ".htm": "html", ".json": "json"}


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
    plot: Annotated[
        Path | None, typer.Option(help="Also draw the boards as a heatmap to FILE.png.")
    ] = None,
    cd: Annotated[
        Path | None,
        typer.Option(help="Also draw critical-difference diagrams (Friedman, Nemenyi) to FILE."),
    ] = None,
    metric: Annotated[str, typer.Option(help="Metric to rank by (hd* ranks ascending).")] = "dice",
    selection: Annotated[str, typer.Option(help="final or val-best.")] = "final",
) -> None:
    """Rank methods inside and outside the federation from the run records."""
    from fedbench.cli.tables import to_text_table
    from fedbench.results import formats
    from fedbench.results import leaderboard as lbm

    fmt = format_ or (FORMAT_BY_SUFFIX.get(out.suffix.lower(), "table") if out else "table")
    known = ("table", *formats.FORMATS)
    if fmt not in known:
        fail(f"unknown format '{fmt}'; known: {', '.join(known)}")
    figures = [path for path in (plot, cd) if path is not None]
    if figures:
        from fedbench.results.plots import check_figure_path

        for path in figures:
            check_figure_path(path)
    records, warnings = lbm.load_records(results_dir)
    for line in warnings:
        say(f"warning: {line}")
    board = lbm.build_leaderboard(records, dataset, metric, selection)
    if out is not None:
        text = to_text_table(board) if fmt == "table" else formats.render(board, fmt)
        formats.write_board(out, text)
        say(f"wrote {out}")
    elif fmt == "table":
        _print_tables(board)
    else:
        sys.stdout.write(formats.render(board, fmt))
    if plot is not None:
        from fedbench.results.heatmap import heatmap_figure

        heatmap_figure(board, plot)
        say(f"wrote {plot}")
    if cd is not None:
        from fedbench.results.ranking import cd_figure

        cd_figure(board, cd)
        say(f"wrote {cd}")


def _print_tables(board: Any) -> None:
    """The rich tables on stdout, never squeezed: a table wider than the terminal keeps its
    width (and says so) rather than losing digits to ellipses."""
    from rich.console import Console

    from fedbench.cli.tables import to_rich_tables
    from fedbench.results.formats import legend_lines

    screen = out
    tables = to_rich_tables(board)
    needed = max(
        screen.measure(t, options=screen.options.update(width=10_000)).maximum for t in tables
    )
    console = Console(file=sys.stdout, width=max(screen.width, needed), highlight=False)
    if needed > screen.width and screen.is_terminal:
        say(f"note: the table is {needed} columns wide; widen the terminal or use --format md")
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
    from fedbench.results.plots import check_figure_path, curves_figure
    from fedbench.results.record import find_record

    check_figure_path(out)
    records = [find_record(results_dir, run_id) for run_id in run_ids]
    curves_figure(records, out)
    say(f"wrote {out}")


def show_command(
    run_id: Annotated[str, typer.Argument(help="Run id (or a unique prefix, or a record's path).")],
    out: Annotated[Path, typer.Option(help="Figure file (.png, .svg or .pdf).")],
    results_dir: Annotated[Path, typer.Option(help="Folder holding runs/.")] = Path("results"),
) -> None:
    """For each site: an image, its ground truth and the run's prediction overlaid."""
    from fedbench.errors import FedbenchError
    from fedbench.results import predictions
    from fedbench.results.plots import check_figure_path, examples_figure
    from fedbench.results.record import find_record

    check_figure_path(out)
    record = find_record(results_dir, run_id)
    kept = predictions.load(results_dir, record["run_id"])
    if not kept:
        raise FedbenchError(f"run '{record['run_id']}' kept no predictions to show")
    examples_figure(record, kept, out)
    say(f"wrote {out}")


plot_app = typer.Typer(help="Figures from run records.", no_args_is_help=True)
app.command("leaderboard")(user_errors(leaderboard_command))
plot_app.command("curves")(user_errors(curves_command))
app.command("show")(user_errors(show_command))
app.add_typer(plot_app, name="plot")
