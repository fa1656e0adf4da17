"""The HTML leaderboard page: standalone (inline style and script, nothing fetched), every value
escaped, numbers right-aligned, and each table sortable by a click on a column header: numbers
as numbers, the best first on the first click (highest dice, lowest hd95), missing values last."""

from __future__ import annotations

import math
from html import escape

import pandas as pd

from fedbench.results.leaderboard import TITLES, Board, Leaderboard

# Display column -> the board frame's number it sorts by; the keys (method, adapter) sort as text.
SORT_SOURCE = {
    "worst site": "worst",
    "95% CI": "ci low",
    "MB sent": "bytes",
    "steps": "client_steps",
    "wall s": "seconds",
}
# Columns where a small number is good whatever the metric; "seeds" and "sig." put big first.
SMALL_FIRST = ("rank", "site sd", "spread", "MB sent", "steps", "wall s")

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;
margin:1.5em auto;padding:0 1.5em;max-width:96em}
h1{font-size:1.45em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.6em 0 .4em}
.lead{color:#57606a;margin:0 0 1em}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;white-space:nowrap;font-size:13px}
th,td{padding:4px 5px;border-bottom:1px solid #d8dee4;text-align:right}
th.text,td.text{text-align:left}
thead th{background:#f6f8fa;border-bottom:2px solid #afb8c1;vertical-align:bottom}
th button{background:none;border:0;padding:0;font:inherit;color:inherit;cursor:pointer}
th button:focus-visible{outline:2px solid #0969da}
th{white-space:normal;min-width:3em}td .sd{display:block;font-size:.85em;color:#57606a}
th button::after{content:"\\00a0\\2195";color:#8c959f;font-size:.85em}
th[aria-sort=ascending] button::after{content:"\\00a0\\25B2";color:#1f2328}
th[aria-sort=descending] button::after{content:"\\00a0\\25BC";color:#1f2328}
tbody tr:nth-child(even){background:#fafbfc}tbody tr:hover{background:#eef4fb}
tr.best td{font-weight:600}
ul.legend{color:#424a53;max-width:60em;padding-left:1.2em}ul.legend li{margin:.3em 0}
"""

SCRIPT = """
(function () {
  "use strict";
  function key(cell, type) {
    if (type === "text") return cell.textContent.toLowerCase();
    var value = cell.getAttribute("data-value");
    return value === "" ? null : Number(value);
  }
  function compare(a, b, sign) {
    if (a === b) return 0;
    if (a === null) return 1;
    if (b === null) return -1;
    return (a < b ? -1 : 1) * sign;
  }
  function sortBy(table, header) {
    var column = header.cellIndex, type = header.getAttribute("data-type");
    var first = header.getAttribute("data-first");
    var now = header.getAttribute("aria-sort");
    var order = now === first ? (first === "ascending" ? "descending" : "ascending") : first;
    var sign = order === "ascending" ? 1 : -1;
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (r, s) {
      return compare(key(r.cells[column], type), key(s.cells[column], type), sign);
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      th.setAttribute("aria-sort", th === header ? order : "none");
    });
  }
  document.querySelectorAll("table.board").forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (header) {
      header.addEventListener("click", function () { sortBy(table, header); });
    });
  });
})();
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head><body>
<h1>{heading}</h1>
<p class="lead">{lead}</p>
{boards}
<h2>Legend</h2>
<ul class="legend">{legend}</ul>
<script>{script}</script>
</body></html>
"""


def number_text(value: float) -> str:
    """A number as JavaScript's Number() reads it back; '' for a missing one."""
    if math.isnan(value):
        return ""
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def sort_keys(board: Board, shown: pd.DataFrame) -> dict[str, list[str] | None]:
    """Per display column the number each cell sorts by ('' when missing); None for text."""
    keys: dict[str, list[str] | None] = {}
    for label in shown.columns:
        source = "p holm" if label == board.p_column else SORT_SOURCE.get(label, label)
        if label in board.keys or label == "sig." or source not in board.frame:
            keys[label] = None
            continue
        numbers = pd.to_numeric(board.frame[source], errors="coerce")
        keys[label] = [number_text(float(v)) for v in numbers]
    return keys


def first_order(label: str, board: Board, lower_is_better: bool) -> str:
    """The order a first click gives: the best first, as the metric or the column has it."""
    if label in board.keys or label in SMALL_FIRST or label == board.p_column:
        return "ascending"
    if label in ("seeds", "sig."):
        return "descending"
    return "ascending" if lower_is_better else "descending"


def header_row(board: Board, shown: pd.DataFrame, keys: dict, lower_is_better: bool) -> str:
    """The header cells, each a button that sorts its column."""
    cells = []
    for label in shown.columns:
        kind = "text" if keys[label] is None else "num"
        order = first_order(label, board, lower_is_better)
        cells.append(
            f'<th scope="col" class="{kind}" data-type="{kind}" data-first="{order}" '
            f'aria-sort="none"><button type="button">{escape(str(label))}</button></th>'
        )
    return "<tr>" + "".join(cells) + "</tr>"


def number_cell(text: str) -> str:
    """'0.812 ± 0.013' as the mean with the std on a smaller line below, and an interval's upper
    bound below its lower one, so wide boards fit."""
    text = str(text)
    if text.startswith("[") and ", " in text:  # an interval: its bounds on two lines
        low, _, high = text.partition(", ")
        return f'{escape(low)},<span class="sd"> {escape(high)}</span>'
    mean, plus, std = text.partition(" ± ")
    if not plus:
        return escape(mean)
    return f'{escape(mean)}<span class="sd"> ± {escape(std)}</span>'


def body_rows(board: Board, shown: pd.DataFrame, keys: dict) -> list[str]:
    """One row per board row; numeric cells carry their sort number in data-value."""
    rows = []
    for i, (rank, values) in enumerate(zip(board.frame["rank"], shown.to_numpy())):
        cells = []
        for label, text in zip(shown.columns, values):
            numbers = keys[label]
            if numbers is None:
                cells.append(f'<td class="text">{escape(str(text))}</td>')
            else:
                tip = escape(f"{board.label(board.frame.iloc[i])}, {label}: {text}")
                cells.append(
                    f'<td data-value="{numbers[i]}" title="{tip}">{number_cell(text)}</td>'
                )
        best = ' class="best"' if rank == 1 else ""
        rows.append(f"<tr{best}>" + "".join(cells) + "</tr>")
    return rows


def board_section(board: Board, shown: pd.DataFrame, lower_is_better: bool) -> str:
    """A board's heading and its sortable table."""
    keys = sort_keys(board, shown)
    head = header_row(board, shown, keys, lower_is_better)
    body = "\n".join(body_rows(board, shown, keys))
    return (
        f"<h2>{escape(TITLES[board.regime])}</h2>\n"
        f'<div class="scroll"><table class="board" data-regime="{escape(board.regime)}">\n'
        f"<thead>{head}</thead>\n<tbody>\n{body}\n</tbody></table></div>"
    )


def page(lb: Leaderboard, shown: list[pd.DataFrame], legend: list[str]) -> str:
    """The whole page: title, both boards (`shown` holds each board's display frame), legend."""
    name = f"{lb.dataset}, {lb.metric} ({lb.selection})"
    order = "lower is better" if lb.lower_is_better else "higher is better"
    lead = (
        f"{lb.metric}: {order}. Click a column header to sort its table, best first; "
        "click it again to reverse."
    )
    boards = [board_section(b, s, lb.lower_is_better) for b, s in zip(lb.boards, shown)]
    return PAGE.format(
        title=escape(f"fedbench leaderboard: {name}"),
        style=STYLE,
        heading=escape(f"Leaderboard: {name}"),
        lead=escape(lead),
        boards="\n".join(boards),
        legend="".join(f"<li>{escape(line)}</li>" for line in legend),
        script=SCRIPT,
    )
