"""A leaderboard as text: Markdown, CSV, HTML and JSON, each with the same columns and legend,
and the writer for board files. The terminal table is the command line's (fedbench.cli.tables)."""

from __future__ import annotations

import json
import math
import re
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedbench.errors import FedbenchError, one_line
from fedbench.results.leaderboard import (
    POOLED,
    TITLES,
    Board,
    Leaderboard,
    lower_is_better,
)
from fedbench.results.statistics import ALPHA
from fedbench.storage import write_text_atomic

FORMATS = ("md", "csv", "html", "json")  # the terminal table is the CLI's (rich)


def _fmt(mean: float, std: float | None, digits: int) -> str:
    """'0.812 ± 0.013', or just the mean when there is no std, or '-' when there is nothing."""
    if mean is None or pd.isna(mean):
        return "-"
    text = f"{mean:.{digits}f}"
    return text if std is None or pd.isna(std) else f"{text} ± {std:.{digits}f}"


def display_frame(board: Board, metric: str) -> pd.DataFrame:
    """The board as strings for people: mean ± std, MB sent, p and a significance mark."""
    digits = 2 if lower_is_better(metric) else 3
    f = board.frame
    out = pd.DataFrame({"rank": f["rank"].astype(str)})
    for key in board.keys:
        out[key] = f[key].astype(str)
    for column in [*board.sites, "mean", "worst", "site sd"]:
        label = "worst site" if column == "worst" else str(column)
        out[label] = [_fmt(m, s, digits) for m, s in zip(f[column], f[f"{column} std"])]
    out.insert(out.columns.get_loc("mean") + 1, "95% CI", _intervals(f, digits))
    out["spread"] = [_fmt(v, None, digits) for v in f["spread"]]
    if POOLED in f:
        out[POOLED] = [_fmt(m, s, digits) for m, s in zip(f[POOLED], f[f"{POOLED} std"])]
    out["MB sent"] = [_fmt(v / 1e6, None, 1) for v in f["bytes"]]
    out["steps"] = [_fmt(v, None, 0) for v in f["client_steps"]]
    out["wall s"] = [_fmt(v, None, 0) for v in f["seconds"]]
    out["seeds"] = f["seeds"].astype(str)
    top = "best" if board.versus is None else "reference"
    out[board.p_column] = [
        f"= {twin}" if twin else top if s is None else _fmt(p, None, 3)
        for p, s, twin in zip(f["p holm"], f["significant"], f["same as"])
    ]
    out["sig."] = ["*" if s else "" for s in f["significant"]]
    return out


def _intervals(frame: pd.DataFrame, digits: int) -> list[str]:
    """'[0.701, 0.745]' per row, '-' where there is none."""
    return [
        "-" if pd.isna(low) else f"[{low:.{digits}f}, {high:.{digits}f}]"
        for low, high in zip(frame["ci low"], frame["ci high"])
    ]


def legend_lines(lb: Leaderboard) -> list[str]:
    """What the columns mean, then the notes."""
    order = "lower is better" if lb.lower_is_better else "higher is better"
    chosen = any(board.versus for board in lb.boards)
    compared = "the row its p column names (--versus)" if chosen else "the best row"
    return [
        f"{lb.metric} ({order}), selection '{lb.selection}', dataset {lb.dataset}: mean ± std "
        "over seeds; worst site = worst site score of each run; site sd = standard deviation "
        "across sites of each run (fairness); spread = max - min of site means",
        f"* = differs from {compared}: two-sided Wilcoxon signed-rank test over (site, seed) "
        f"pairs, p corrected with Holm's method for the comparisons of every row with it, "
        f"p < {ALPHA}; p is '-' when there are no pairs to compare; '= ROW': the same value in "
        "every (site, seed) block as a higher row (one result under two names: its rank, no "
        "comparison of its own)",
        "the Wilcoxon test counts each (site, seed) pair as independent, but the seeds of one "
        "site are not, so its p is optimistic; the 95% CI resamples sites: read the two together",
        "95% CI = percentile interval of the mean from a two-stage bootstrap (sites with "
        "replacement, then seeds within each site; 2000 resamples); steps = client optimizer "
        "steps and wall s = seconds of training (with its per-round validation where it ran) "
        "and of adaptation (every selection scored) of the regime's federations, per run; "
        "seconds depend on the machine's load, steps do not",
        *smallest_p_lines(lb),
        *pooled_lines(lb),
        *lb.notes,
    ]


def smallest_p_lines(lb: Leaderboard) -> list[str]:
    """Per board, the smallest p its design can reach, and when that is above alpha, that no
    difference on it can be significant."""
    lines = []
    for board in lb.boards:
        if pd.isna(board.smallest_p):
            continue
        line = f"{board.regime}: the smallest p this design can reach is {board.smallest_p:.3g}"
        if board.smallest_p >= ALPHA:
            line += f", so no difference on this board can be significant at {ALPHA}"
        lines.append(line)
    return lines


def pooled_lines(lb: Leaderboard) -> list[str]:
    """What the pooled column means and, when the rows are ranked by it, how they compare."""
    if not any(POOLED in b.frame for b in lb.boards):
        return []
    lines = [
        "pooled = the metric on every site's test set pooled (each site's samples predicted by "
        "its own model), mean ± std over seeds; not a site, so not in mean, worst site, site "
        "sd or spread"
    ]
    if any(b.rank_by == POOLED for b in lb.boards):
        lines.append(
            "ranked by pooled: rank and p of a board that has it compare the rows' pooled values "
            "over seeds (the Wilcoxon test's pairs are seeds, not (site, seed) pairs)"
        )
    return lines


#: Markdown's inline marks (code, emphasis, links, strikethrough, table pipes) and its escape
MARKDOWN_MARKS = re.compile(r"[\\`*_\[\]|~]")
#: where raw HTML could begin (a tag, comment or declaration) and a character reference
HTML_START = re.compile(r"<(?=[A-Za-z/!?])")
ENTITY = re.compile(r"&(?=#?\w+;)")
#: the display columns whose cells carry names (the twin a row equals is one)
NAME_COLUMNS = ("method", "adapter", "variant")


def md_text(value: object) -> str:
    """A name from a record or study (method, site, dataset, variant) as Markdown that renders
    exactly as it is: one line, no raw HTML, no emphasis, link or table pipe."""
    text = escape(one_line(str(value)), quote=False)
    return MARKDOWN_MARKS.sub(lambda mark: "\\" + mark.group(), text)


def md_line(text: str) -> str:
    """fedbench's own sentence (numbers, or names in it) as one Markdown line without raw HTML;
    its own marks and a plain 'p < 0.05' stay as they read."""
    text = ENTITY.sub("&amp;", one_line(text))
    return HTML_START.sub("&lt;", text)


def to_markdown(lb: Leaderboard) -> str:
    """GitHub-flavoured Markdown: one heading and table per board, then the legend. Every name
    from a record is escaped (md_text), so a cell is one line that renders as it reads."""
    name = f"{md_text(lb.dataset)}, {md_text(lb.metric)} ({md_text(lb.selection)})"
    parts = [f"# Leaderboard: {name}", ""]
    for board in lb.boards:
        shown = display_frame(board, lb.metric)
        names = [c in board.keys or c in (*NAME_COLUMNS, board.p_column) for c in shown.columns]
        cells = [
            [
                md_text(c) if is_name else md_line(str(c)).replace("|", "\\|")
                for c, is_name in zip(row, names)
            ]
            for row in shown.to_numpy()
        ]
        header = [md_text(c) for c in shown.columns]
        align = [":---" if c in ("method", "adapter", "variant") else "---:" for c in shown.columns]
        lines = [header, align, *cells]
        parts += [f"## {TITLES[board.regime]}", ""]
        parts += ["| " + " | ".join(line) + " |" for line in lines]
        parts.append("")
    parts += [f"- {md_line(line)}" for line in legend_lines(lb)]
    return "\n".join(parts) + "\n"


#: what makes a spreadsheet read a cell as a formula (OWASP's CSV injection list)
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula, behind a single quote (OWASP):
    '=cmd' becomes "'=cmd"; numbers (a negative one included, as text too) and the '-'
    placeholder are left as they are."""
    if not isinstance(value, str) or not value.startswith(FORMULA_START) or value == "-":
        return value
    try:
        float(value)
    except ValueError:
        return "'" + value
    return value


def to_csv(lb: Leaderboard) -> str:
    """Both boards' numbers in one CSV, with regime, dataset, metric and selection columns."""
    frames = [
        b.frame.assign(
            regime=b.regime, dataset=lb.dataset, metric=lb.metric, selection=lb.selection
        )
        for b in lb.boards
    ]
    frame = pd.concat(frames, ignore_index=True)
    if "adapter" not in frame:
        frame["adapter"] = None
    first = ["regime", "dataset", "metric", "selection", "rank", "method", "adapter"]
    frame = frame[first + [c for c in frame.columns if c not in first]]
    texts = frame.select_dtypes(include=["object", "string"]).columns
    frame = frame.assign(**{str(c): frame[c].map(csv_text) for c in texts})
    return frame.rename(columns=csv_text).to_csv(index=False)


def _clean(value: Any) -> Any:
    """JSON-safe scalars: NaN and inf become null, numpy numbers plain Python."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


STAT_COLUMNS = (
    "mean|mean std|ci low|ci high|worst|worst std|site sd|site sd std|spread|bytes|client_steps|"
    "seconds|seeds|p|p holm|significant|same as"
)


def to_json(lb: Leaderboard) -> str:
    """Numbers for machines: per board the sites and one object per row."""
    boards = {}
    for b in lb.boards:
        rows = []
        for rec in b.frame.to_dict("records"):
            row = {k: _clean(rec[k]) for k in ("rank", *b.keys)}
            row["sites"] = {
                s: {"mean": _clean(rec[s]), "std": _clean(rec[f"{s} std"])} for s in b.sites
            }
            if POOLED in rec:
                row[POOLED] = {"mean": _clean(rec[POOLED]), "std": _clean(rec[f"{POOLED} std"])}
            row.update({k.replace(" ", "_"): _clean(rec[k]) for k in STAT_COLUMNS.split("|")})
            rows.append(row)
        boards[b.regime] = {
            "sites": [str(s) for s in b.sites],
            "smallest_p": _clean(b.smallest_p),
            "versus": b.versus,
            "rows": rows,
        }
    payload = {
        "dataset": lb.dataset,
        "metric": lb.metric,
        "selection": lb.selection,
        "lower_is_better": lb.lower_is_better,
        "rank_by": lb.rank_by,
        "alpha": ALPHA,
        "notes": lb.notes,
        "boards": boards,
    }
    return json.dumps(payload, indent=2, allow_nan=False) + "\n"


def to_html(lb: Leaderboard) -> str:
    """A standalone HTML page with both tables, sortable in the browser (values escaped)."""
    from fedbench.results.html import page

    return page(lb, [display_frame(b, lb.metric) for b in lb.boards], legend_lines(lb))


RENDERERS = dict(md=to_markdown, csv=to_csv, html=to_html, json=to_json)


def render(lb: Leaderboard, fmt: str) -> str:
    """The leaderboard as text in one of FORMATS."""
    if fmt not in RENDERERS:
        raise FedbenchError(f"unknown format '{fmt}'; known: {', '.join(FORMATS)}")
    return RENDERERS[fmt](lb)


def write_board(path: Path, text: str) -> None:
    """Write a rendered board to a regular file atomically, or straight into a device or pipe
    (/dev/stdout), which is never replaced."""
    path = Path(path)
    if path.is_dir():
        raise FedbenchError(f"cannot write {path}: it is a folder")
    if path.exists() and not path.is_file():
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return
    if not path.parent.is_dir():
        raise FedbenchError(f"cannot write {path}: folder {path.parent} does not exist")
    write_text_atomic(path, text)
