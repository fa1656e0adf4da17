"""Leaderboards from run records (DESIGN.md section 5): one board inside the federation (a row per
method) and one outside it (a row per method + adapter), mean ± std over seeds per site, ranked,
each row compared with the best one by a paired Wilcoxon test over (site, seed) pairs, the p
values corrected for the multiple comparisons with Holm's method. Rendering them as text is
fedbench/results/formats.py; as pictures, fedbench/results/heatmap.py (the board) and
fedbench/results/ranking.py (the critical-difference diagram)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fedbench.errors import FedbenchError
from fedbench.results.compute import compute_notes, regime_cost
from fedbench.results.notes import settings_notes, sharing_notes, status_notes, tuning_notes
from fedbench.results.record import read_records
from fedbench.results.statistics import (
    bootstrap_ci,
    compare_with_best,
    same_results,
    shared_ranks,
)
from fedbench.task import POOLED

REGIMES = {"inside": ["method"], "outside": ["method", "adapter"]}
TITLES = {"inside": "Inside the federation", "outside": "Outside the federation (unseen sites)"}
#: what a board can be ranked by: the mean over sites, or the pooled-test value
RANK_BY = ("mean", POOLED)
#: the rows a record stands for on a board of variants (a study's parts, a swept setting), per
#: regime: a variant that changes only the adapter has no row of its own inside
Variants = Callable[[dict[str, Any], str], list[str]]


@dataclass
class Board:
    """One regime's ranked table: numeric columns, one row per method (or method + adapter),
    and `blocks`, each row's value per (site, seed) block (rows labelled as `label` does)."""

    regime: str
    keys: list[str]
    sites: list[str]
    frame: pd.DataFrame
    blocks: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: the column the rows are ranked (and compared with the best) by: "mean" or "pooled"
    rank_by: str = "mean"
    #: the smallest Holm-corrected p this board's design can reach (nan: no test)
    smallest_p: float = math.nan
    #: the row every other is compared with, when not the best (`--versus`)
    versus: str | None = None

    @property
    def p_column(self) -> str:
        """'p vs best (Holm)', or 'p vs ROW (Holm)' on a board compared with a chosen row."""
        return f"p vs {self.versus or 'best'} (Holm)"

    def label(self, row: Any) -> str:
        """'fedavg' or 'fedavg + tent': how a row is named in pictures."""
        return " + ".join(str(row[k]) for k in self.keys)


@dataclass
class Leaderboard:
    """Both boards for one dataset, metric and selection, with notes for the reader."""

    dataset: str
    metric: str
    selection: str
    boards: list[Board]
    notes: list[str] = field(default_factory=list)
    rank_by: str = "mean"

    @property
    def lower_is_better(self) -> bool:
        return lower_is_better(self.metric)


def lower_is_better(metric: str) -> bool:
    """Distances (hd95, hd, ...) rank ascending; overlap scores (dice, ...) descending."""
    return metric.lower().startswith("hd")


def load_records(results_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Valid records under RESULTS/runs and one warning per invalid file; no folder is an error."""
    runs = Path(results_dir) / "runs"
    if not runs.is_dir():
        raise FedbenchError(f"no run records: {runs} does not exist; run `fedbench grid` first")
    return read_records(results_dir)


def pick_dataset(records: list[dict[str, Any]], dataset: str | None) -> str:
    """The asked-for dataset, else the one with the most records."""
    counts = pd.Series([r["dataset"] for r in records], dtype=object).value_counts()
    if counts.empty:
        raise FedbenchError("no valid run records found; run `fedbench grid` first")
    if dataset is None:
        return str(sorted(counts.index, key=lambda d: (-counts[d], d))[0])
    if dataset not in counts.index:
        raise FedbenchError(f"no records for dataset '{dataset}'; found: {', '.join(counts.index)}")
    return dataset


FRAME_COLUMNS = (
    "run_id finished_at config_hash holdouts method adapter variant seed bytes client_steps "
    "seconds regime site metric selection value"
)


def metric_frame(records: list[dict[str, Any]], variants: Variants | None = None) -> pd.DataFrame:
    """One row per metric row of every record, with the record's identity next to it; with
    `variants`, once per variant label of the record in that regime (none: left out)."""
    rows = [
        {
            "run_id": rec["run_id"],
            "finished_at": str(rec.get("finished_at") or ""),
            "config_hash": str(rec.get("config_hash") or ""),
            "holdouts": ",".join(map(str, rec.get("holdouts") or [])),
            "method": rec["method"],
            "adapter": rec.get("adapter"),
            "variant": label,
            "seed": rec["seed"],
            **{
                key: regime_cost(rec, str(m.get("regime", "")), key)
                for key in ("bytes", "client_steps", "seconds")
            },
            **{k: m.get(k) for k in ("regime", "site", "metric", "selection")},
            "value": m.get("value"),
        }
        for rec in records
        for m in rec["metrics"]
        if isinstance(m, dict)
        for label in (variants(rec, str(m.get("regime"))) if variants else [None])
    ]
    frame = pd.DataFrame(rows, columns=FRAME_COLUMNS.split())
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
    return frame


def latest_runs(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The rows of one run per (keys, seed): the latest finished."""
    runs = frame[[*keys, "seed", "run_id", "finished_at"]].drop_duplicates([*keys, "run_id"])
    latest = runs.sort_values("finished_at").groupby([*keys, "seed"], dropna=False).tail(1)
    return frame[row_keys(frame, [*keys, "run_id"]).isin(set(row_keys(latest, [*keys, "run_id"])))]


def row_keys(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    """One string per row naming its values in `columns` (None and NaN included)."""
    return frame[columns].apply(lambda row: "|".join(map(str, row)), axis=1)


def repeated_runs(records: list[dict[str, Any]]) -> int:
    """How many ok records have a later record of the same (method, adapter, seed)."""
    cells = [(r["method"], r.get("adapter"), r["seed"]) for r in records]
    return len(cells) - len(set(cells))


def build_board(
    frame: pd.DataFrame,
    regime: str,
    metric: str,
    keys: list[str] | None = None,
    rank_by: str = "mean",
    versus: list[str] | None = None,
) -> Board:
    """The ranked board of one regime from the metric rows of that regime (one metric); a row
    per `keys` (the regime's own, with "variant" added on a board of variants), ranked by
    `rank_by`, each compared with the best or with the row `versus` names (`reference_row`).
    The pooled-test rows make a column of their own and are no site."""
    keys = keys or REGIMES[regime]
    frame = frame.assign(adapter=frame["adapter"].fillna("-"))
    # only the (row, seed) pairs that ran; a site a run lacks stays NaN
    values = frame.groupby([*keys, "seed", "site"])["value"].mean().unstack("site")
    sites = [site for site in dict.fromkeys(frame["site"]) if site != POOLED]
    pooled = values[POOLED] if POOLED in values.columns else None
    values = values[sites]
    worst = values.max(axis=1) if lower_is_better(metric) else values.min(axis=1)
    per_seed = pd.DataFrame(
        {"mean": values.mean(axis=1), "worst": worst, "site sd": values.std(axis=1)}
    )
    grouped, seed_stats = values.groupby(level=keys), per_seed.groupby(level=keys)
    site_mean, site_std = grouped.mean(), grouped.std()
    out = pd.DataFrame(index=site_mean.index)
    for site in sites:
        out[site], out[f"{site} std"] = site_mean[site], site_std[site]
    for column in ("mean", "worst", "site sd"):
        out[column] = seed_stats[column].mean()
        out[f"{column} std"] = seed_stats[column].std()
    out["spread"] = site_mean.max(axis=1) - site_mean.min(axis=1)
    if pooled is not None:
        per_row = pooled.groupby(level=keys)
        out[POOLED], out[f"{POOLED} std"] = per_row.mean(), per_row.std()
    out["seeds"] = frame.groupby(keys)["seed"].nunique()
    for column, cost in row_costs(frame, keys, regime).items():
        out[column] = cost
    out = out.sort_values(rank_by, ascending=lower_is_better(metric), na_position="last")
    long = values.stack().rename("value")
    blocks = long.unstack(["site", "seed"]).reindex(out.index)
    twins = same_results(blocks)
    out["same as"] = [
        _label(keys, out.index[twins[i]]) if i in twins else "" for i in range(len(out))
    ]
    out.insert(0, "rank", shared_ranks(len(out), twins))
    for column, bound in zip(
        ("ci low", "ci high"), zip(*_intervals(values, out.index), strict=True), strict=True
    ):
        out[column] = bound
    # the best row is compared over (site, seed) pairs, or over seeds for the pooled value
    compared = pooled.dropna() if rank_by == POOLED and pooled is not None else long
    reference = reference_row(out.index, keys, versus) if versus else None
    smallest = compare_with_best(out, compared, twins, reference or 0)
    board = Board(regime, keys, sites, out.reset_index(), rank_by=rank_by, smallest_p=smallest)
    if reference is not None:
        board.versus = _label(keys, out.index[reference])
    blocks.index = [board.label(row) for row in board.frame.to_dict("records")]
    board.blocks = blocks
    return board


def row_costs(frame: pd.DataFrame, keys: list[str], regime: str) -> pd.DataFrame:
    """Each row's cost per seed, then its mean over seeds. Runs of a seed that hold out the same
    sites share their federations (one per adapter, say): their mean. Outside, runs that hold
    out other sites (a tuned adapter's parts, one per site) add up."""
    runs = frame.drop_duplicates([*keys, "run_id"])
    columns = ["bytes", "client_steps", "seconds"]
    per_set = runs.groupby([*keys, "seed", "holdouts"], dropna=False)[columns].mean()
    if regime == "outside":
        per_seed = per_set.groupby(level=[*keys, "seed"]).sum(min_count=1)
    else:
        per_seed = per_set.groupby(level=[*keys, "seed"]).mean()
    return per_seed.groupby(level=keys).mean()


def reference_row(index: pd.Index, keys: list[str], versus: list[str]) -> int | None:
    """The position of the best-ranked row named by `versus` (its method, then any of its
    adapter and variant; the parts that are no value of this board's keys, such as an adapter on
    the inside board, are left out), or None."""
    rows = [dict(zip(keys, key if isinstance(key, tuple) else (key,))) for key in index]
    known = {str(row[k]) for row in rows for k in keys[1:]}
    wanted = [part for part in versus[1:] if part in known]
    for position, row in enumerate(rows):
        others = [str(row[k]) for k in keys[1:]]
        if str(row["method"]) == versus[0] and all(part in others for part in wanted):
            return position
    return None


def _label(keys: list[str], key: Any) -> str:
    """'fedavg + none': a row's name from its index key."""
    return " + ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))


def _intervals(values: pd.DataFrame, index: pd.Index) -> list[tuple[float, float]]:
    """Each row's 95% bootstrap interval of its mean over sites, from its (site x seed) table."""
    return [bootstrap_ci(values.loc[key].T) for key in index]


def build_leaderboard(
    records: list[dict[str, Any]],
    dataset: str | None = None,
    metric: str = "dice",
    selection: str = "final",
    variants: Variants | None = None,
    rank_by: str = "mean",
    versus: str | None = None,
) -> Leaderboard:
    """Both boards for a dataset from valid records (only status ok counts); with `variants`,
    a row per method (+ adapter) and variant, and only the records that have a variant; the
    rows ranked by `rank_by` (RANK_BY), each compared with the best or with the row `versus`
    names ("METHOD[ + ADAPTER][ + VARIANT]")."""
    if rank_by not in RANK_BY:
        raise FedbenchError(f"unknown --rank-by '{rank_by}'; known: {', '.join(RANK_BY)}")
    name = pick_dataset(records, dataset)
    mine = [r for r in records if r["dataset"] == name]
    if variants:  # a study's or a sweep's board: only the records it has a row for
        mine = [r for r in mine if variants(r, "inside") or variants(r, "outside")]
    ok = [r for r in mine if r["status"] == "ok"]
    notes = other_datasets(records, name) if dataset is None else []
    notes += status_notes(mine)
    frame = metric_frame(ok, variants)
    if frame.empty:
        raise FedbenchError(f"no successful runs with metrics for dataset '{name}'")
    chosen = frame[(frame["metric"] == metric) & (frame["selection"] == selection)]
    if chosen.empty:
        known = sorted(set(zip(frame["metric"], frame["selection"], strict=True)))
        raise FedbenchError(
            f"no '{metric}' values with selection '{selection}' for dataset '{name}'; found: "
            + ", ".join(f"{m} ({s})" for m, s in known)
        )
    boards, kept = [], set()
    for regime, keys in REGIMES.items():
        keys = [*keys, "variant"] if variants else keys
        part = chosen[chosen["regime"] == regime]
        if part.empty:
            notes.append(f"no {regime} results for {name}")
            continue
        # a row of variants may hold several settings per seed (other swept keys): the latest
        # run of each is kept, and the row averages them
        part = latest_runs(part, [*keys, "config_hash", "holdouts"] if variants else keys)
        if variants and part.groupby([*keys, "seed"])["config_hash"].nunique().max() > 1:
            notes.append(
                f"{regime}: a row averages the runs that differ in settings it is not named by"
            )
        kept |= set(part["run_id"])
        order = board_rank_by(part, regime, rank_by, name, notes)
        wanted = [p.strip() for p in versus.split("+")] if versus else None
        boards.append(build_board(part, regime, metric, keys, order, wanted))
    if versus:
        notes += versus_notes(boards, versus)
    if not variants and repeated_runs(ok):
        notes.append(
            f"{repeated_runs(ok)} older run(s) of a repeated cell set aside (latest counts)"
        )
    if not variants:  # variants differ in their settings by design
        notes += settings_notes([r for r in ok if r["run_id"] in kept])
    notes += tuning_notes([r for r in ok if r["run_id"] in kept])
    notes += sharing_notes([r for r in ok if r["run_id"] in kept])
    notes += [line for board in boards for line in compute_notes(board)]
    return Leaderboard(name, metric, selection, boards, notes, rank_by)


def versus_notes(boards: list[Board], versus: str) -> list[str]:
    """A note per board without the `versus` row (compared with its best); an error when no
    board has it."""
    if all(board.versus is None for board in boards):
        rows = "; ".join(
            f"{', '.join(sorted(board.label(r) for r in board.frame.to_dict('records')))} "
            f"({board.regime})"
            for board in boards
        )
        raise FedbenchError(f"--versus '{versus}': no such row; rows: {rows}")
    return [
        f"{board.regime}: no row '{versus}', so its rows are compared with the best"
        for board in boards
        if board.versus is None
    ]


def board_rank_by(
    part: pd.DataFrame, regime: str, rank_by: str, dataset: str, notes: list[str]
) -> str:
    """What one board is ranked by: `rank_by`, unless it asks for pooled values the board has
    none of; then the outside board (each unseen site is scored alone) ranks by mean, with a
    note, and the inside board is an error."""
    if rank_by != POOLED or (part["site"] == POOLED).any():
        return rank_by
    if regime == "inside":
        raise FedbenchError(
            f"--rank-by pooled: no pooled-test values on the inside board of {dataset} (only "
            "datasets whose task scores the pooled test, such as fed-tcga-brca, have them)"
        )
    notes.append(f"the {regime} board has no pooled test (each unseen site alone): by mean")
    return "mean"


def other_datasets(records: list[dict[str, Any]], chosen: str) -> list[str]:
    """When the board picked a dataset itself: which others have records (--dataset NAME)."""
    counts = pd.Series([r["dataset"] for r in records], dtype=object).value_counts()
    others = [f"{d} ({counts[d]} records)" for d in sorted(counts.index) if d != chosen]
    if not others:
        return []
    return [f"board of {chosen} (most records); also present: {', '.join(others)}; --dataset"]


def setting_of(record: dict[str, Any], key: str) -> Any:
    """The value of a dotted setting in a record's config (None where it has none)."""
    node: Any = record.get("config") or {}
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def setting_variants(key: str, records: list[dict[str, Any]]) -> Variants:
    """Rows by the value of one setting (`--group-by method.mu`): an ablation table. Inside,
    an adapter setting does not change the federation, so it makes no rows there. A key no
    record sets is refused (it would label every row KEY=-)."""
    if all(setting_of(r, key) is None for r in records):
        raise FedbenchError(f"--group-by {key}: no record has that setting (e.g. method.mu)")

    def variants(record: dict[str, Any], regime: str) -> list[str]:
        if regime == "inside" and key.startswith("adapter."):
            return ["-"]
        value = setting_of(record, key)
        return [f"{key}={'-' if value is None else value}"]

    return variants
