"""The leaderboard as rich tables: on the terminal, and as plain text for
`--format table --out FILE`."""

from __future__ import annotations

from typing import Any

from fedbench.cli.app import literal
from fedbench.results.formats import display_frame, legend_lines
from fedbench.results.leaderboard import TITLES, Leaderboard


def to_rich_tables(lb: Leaderboard) -> list[Any]:
    """rich Tables for the terminal, one per board; every title, header and cell is literal
    text (a method, site or dataset name from a record is never read as rich markup)."""
    from rich.table import Table

    tables = []
    for board in lb.boards:
        shown = display_frame(board, lb.metric)
        title = f"{TITLES[board.regime]}: {lb.metric} ({lb.selection}), {lb.dataset}"
        table = Table(title=literal(title, "table.title"))
        for column in shown.columns:
            table.add_column(literal(column), justify="left" if column in board.keys else "right")
        for row in shown.to_numpy():
            table.add_row(*(literal(c) for c in row))
        tables.append(table)
    return tables


def to_text_table(lb: Leaderboard, width: int = 1000) -> str:
    """The rich tables and the legend as plain text (for --format table --out FILE)."""
    from io import StringIO

    from rich.console import Console

    buffer = StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
    for table in to_rich_tables(lb):
        console.print(table)
    for line in legend_lines(lb):
        console.print(literal(line), soft_wrap=True)
    return buffer.getvalue()
