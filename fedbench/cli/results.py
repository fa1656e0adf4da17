"""`fedbench leaderboard`, `fedbench plot curves` and `fedbench show`: the tables that compare
runs and the figures. Heavy libraries load inside the commands, never at import."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from fedbench.cli.app import app, fail, literal, out, registry, say, user_errors
from fedbench.errors import FedbenchError

FORMAT_BY_SUFFIX = {".md": "md", ".csv": "csv", ".html": "html", ".htm": "html", ".json": "json"}


def _study_board(path: Path, dataset: str | None, records: list) -> tuple[str, Any, list[str]]:
    """The study's dataset, its row labels per record, and a note on cells without a record."""
    from fedbench.cli.studies import study_variants

    study_dataset, variants, cells = study_variants(path, registry())
    if dataset is not None and dataset != study_dataset:
        fail(f"--dataset {dataset} differs from the study's dataset {study_dataset}")
    found = {
        r["config_hash"]
        for r in records
        if r["status"] == "ok" and any(variants(r, regime) for regime in ("inside", "outside"))
    }
    notes = [f"study {path.name}: {len(found)} of {cells} cell(s) have an ok record"]
    return study_dataset, variants, notes


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
    study: Annotated[
        Path | None, typer.Option(help="The board of exactly this study file's cells.")
    ] = None,
    group_by: Annotated[
        str | None, typer.Option(help="A row per value of this setting, e.g. method.mu.")
    ] = None,
    rank_by: Annotated[
        str,
        typer.Option(help="mean (over sites) or pooled (all sites' test sets at once)."),
    ] = "mean",
    versus: Annotated[
        str | None,
        typer.Option(
            help="Compare every row with this one instead of the best: 'METHOD[ + ADAPTER]"
            "[ + VARIANT]', e.g. 'fedavg + none'."
        ),
    ] = None,
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
    variants, study_notes = None, []
    if study is not None and group_by is not None:
        fail("--study and --group-by both given; a study's board has a row per variant already")
    if study is not None:
        dataset, variants, study_notes = _study_board(study, dataset, records)
    elif group_by is not None:
        variants = lbm.setting_variants(group_by, records)
    board = lbm.build_leaderboard(records, dataset, metric, selection, variants, rank_by, versus)
    board.notes += study_notes
    if out is not None:
        text = to_text_table(board) if fmt == "table" else formats.render(board, fmt)
        with writing(out):
            formats.write_board(out, text)
        say(f"wrote {out}")
    elif fmt == "table":
        _print_tables(board)
    else:
        sys.stdout.write(formats.render(board, fmt))
    if plot is not None:
        from fedbench.results.heatmap import heatmap_figure

        with writing(plot):
            heatmap_figure(board, plot)
        say(f"wrote {plot}")
    if cd is not None:
        from fedbench.results.ranking import cd_figure

        with writing(cd):
            cd_figure(board, cd)
        say(f"wrote {cd}")


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """The system refusing to write `path` (read-only, full, not a folder) is one line naming
    it; the write itself is atomic, so whatever was at `path` is still there."""
    try:
        yield
    except FedbenchError:
        raise
    except OSError as exc:
        raise FedbenchError(f"cannot write {path}: {exc.strerror or type(exc).__name__}") from None


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
        console.print(literal(line), soft_wrap=True)


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
    with writing(out):
        curves_figure(records, out)
    say(f"wrote {out}")


def show_command(
    run_id: Annotated[str, typer.Argument(help="Run id (or a unique prefix, or a record's path).")],
    out: Annotated[Path, typer.Option(help="Figure file (.png, .svg or .pdf).")],
    results_dir: Annotated[Path, typer.Option(help="Folder holding runs/.")] = Path("results"),
) -> None:
    """For each site: an image, its ground truth and the run's prediction overlaid."""
    from fedbench.results import predictions
    from fedbench.results.plots import check_figure_path, examples_figure
    from fedbench.results.record import find_record

    check_figure_path(out)
    record = find_record(results_dir, run_id)
    kept = predictions.load(results_dir, record["run_id"])
    if not kept:
        raise FedbenchError(f"run '{record['run_id']}' kept no predictions to show")
    with writing(out):
        examples_figure(record, kept, out)
    say(f"wrote {out}")


plot_app = typer.Typer(help="Figures from run records.", no_args_is_help=True)
app.command("leaderboard")(user_errors(leaderboard_command))
plot_app.command("curves")(user_errors(curves_command))
app.command("show")(user_errors(show_command))
app.add_typer(plot_app, name="plot")
