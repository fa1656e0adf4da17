"""Leaderboards from run records (DESIGN.md section 5): one board inside the federation (a row per
method) and one outside it (a row per method + adapter), mean ± std over seeds per site, ranked,
each row compared with the best one by a paired Wilcoxon test over (site, seed) pairs, the p
values corrected for the multiple comparisons with Holm's method. Rendering them as text is
fedbench/results/formats.py; as pictures, fedbench/results/heatmap.py (the board) and
fedbench/results/ranking.py (the critical-difference diagram)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedbench.errors import FedbenchError
from fedbench.results.record import read_records
from fedbench.storage import stable_hash

ALPHA = 0.05
REGIMES = {"inside": ["method"], "outside": ["method", "adapter"]}
TITLES = {"inside": "Inside the federation", "outside": "Outside the federation (unseen sites)"}


@dataclass
class Board:
    """One regime's ranked table: numeric columns, one row per method (or method + adapter),
    and `blocks`, each row's value per (site, seed) block (rows labelled as `label` does)."""

    regime: str
    keys: list[str]
    sites: list[str]
    frame: pd.DataFrame
    blocks: pd.DataFrame = field(default_factory=pd.DataFrame)

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


def regime_bytes(record: dict[str, Any], regime: str) -> float:
    """Bytes sent up and down by the federations of one regime (the whole run if not split)."""
    cost = record.get("cost") or {}
    feds = cost.get("federations")
    if isinstance(feds, dict) and feds:
        parts = [c for k, c in feds.items() if (k == "inside") == (regime == "inside")]
        return float(sum(c.get("bytes_up", 0) + c.get("bytes_down", 0) for c in parts))
    return float(cost.get("bytes_up", 0) + cost.get("bytes_down", 0))


FRAME_COLUMNS = "run_id finished_at method adapter seed bytes regime site metric selection value"


def metric_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per metric row of every record, with the record's identity next to it."""
    rows = [
        {
            "run_id": rec["run_id"],
            "finished_at": str(rec.get("finished_at") or ""),
            "method": rec["method"],
            "adapter": rec.get("adapter"),
            "seed": rec["seed"],
            "bytes": regime_bytes(rec, m.get("regime", "")),
            **{k: m.get(k) for k in ("regime", "site", "metric", "selection")},
            "value": m.get("value"),
        }
        for rec in records
        for m in rec["metrics"]
        if isinstance(m, dict)
    ]
    frame = pd.DataFrame(rows, columns=FRAME_COLUMNS.split())
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
    return frame


def latest_runs(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The rows of one run per (keys, seed): the latest finished."""
    runs = frame[[*keys, "seed", "run_id", "finished_at"]].drop_duplicates("run_id")
    latest = runs.sort_values("finished_at").groupby([*keys, "seed"], dropna=False).tail(1)
    return frame[frame["run_id"].isin(latest["run_id"])]


def repeated_runs(records: list[dict[str, Any]]) -> int:
    """How many ok records have a later record of the same (method, adapter, seed)."""
    cells = [(r["method"], r.get("adapter"), r["seed"]) for r in records]
    return len(cells) - len(set(cells))


def paired_p(row: pd.Series, best: pd.Series) -> float:
    """Two-sided Wilcoxon signed-rank p over matching (site, seed) pairs; nan if it cannot say."""
    from scipy.stats import wilcoxon

    pairs = pd.concat([row, best], axis=1, join="inner").to_numpy(dtype=float)
    diff = pairs[:, 0] - pairs[:, 1] if len(pairs) else np.array([])
    diff = diff[np.isfinite(diff)]
    if diff.size == 0:
        return math.nan
    if np.all(diff == 0):
        return 1.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = float(wilcoxon(diff).pvalue)
    except ValueError:
        return math.nan
    return p


def holm(p_values: pd.Series) -> pd.Series:
    """Holm's step-down correction of the finite p values (nan stays nan): the k-th smallest
    of m is multiplied by m - k + 1, made monotone, capped at 1."""
    from statsmodels.stats.multitest import multipletests

    finite = p_values.dropna()
    adjusted = pd.Series(math.nan, index=p_values.index, dtype=float)
    if not finite.empty:
        adjusted[finite.index] = multipletests(finite.to_numpy(), method="holm")[1]
    return adjusted


def build_board(frame: pd.DataFrame, regime: str, metric: str) -> Board:
    """The ranked board of one regime from the metric rows of that regime (one metric)."""
    keys = REGIMES[regime]
    frame = frame.assign(adapter=frame["adapter"].fillna("-"))
    # only the (row, seed) pairs that ran; a site a run lacks stays NaN
    values = frame.groupby([*keys, "seed", "site"])["value"].mean().unstack("site")
    sites = list(dict.fromkeys(frame["site"]))
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
    runs = frame.drop_duplicates("run_id").groupby(keys)
    out["bytes"] = runs["bytes"].mean()
    out["seeds"] = runs["seed"].nunique()
    out = out.sort_values("mean", ascending=lower_is_better(metric), na_position="last")
    out.insert(0, "rank", range(1, len(out) + 1))
    long = values.stack().rename("value")
    best = out.index[0]
    out["p"] = [
        math.nan if key == best else paired_p(_pairs(long, key), _pairs(long, best))
        for key in out.index
    ]
    out["p holm"] = holm(out["p"])
    out["significant"] = [
        (bool(p < ALPHA) if key != best else None) for key, p in out["p holm"].items()
    ]
    board = Board(regime, keys, sites, out.reset_index())
    blocks = long.unstack(["site", "seed"]).reindex(out.index)
    blocks.index = [board.label(row) for row in board.frame.to_dict("records")]
    board.blocks = blocks
    return board


def _pairs(long: pd.Series, key: Any) -> pd.Series:
    """The (site, seed) -> value series of one row of a board."""
    key = key if isinstance(key, tuple) else (key,)
    part = long.loc[key]
    return part.reorder_levels(["site", "seed"]) if part.index.nlevels == 2 else part


def build_leaderboard(
    records: list[dict[str, Any]],
    dataset: str | None = None,
    metric: str = "dice",
    selection: str = "final",
) -> Leaderboard:
    """Both boards for a dataset from valid records (only status ok counts)."""
    name = pick_dataset(records, dataset)
    mine = [r for r in records if r["dataset"] == name]
    ok = [r for r in mine if r["status"] == "ok"]
    notes = other_datasets(records, name) if dataset is None else []
    notes += status_notes(mine)
    frame = metric_frame(ok)
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
        part = chosen[chosen["regime"] == regime]
        if part.empty:
            notes.append(f"no {regime} results for {name}")
            continue
        part = latest_runs(part, keys)
        kept |= set(part["run_id"])
        boards.append(build_board(part, regime, metric))
    if repeated_runs(ok):
        notes.append(
            f"{repeated_runs(ok)} older run(s) of a repeated cell set aside (latest counts)"
        )
    notes += settings_notes([r for r in ok if r["run_id"] in kept])
    return Leaderboard(name, metric, selection, boards, notes)


def other_datasets(records: list[dict[str, Any]], chosen: str) -> list[str]:
    """When the board picked a dataset itself: which others have records (--dataset NAME)."""
    counts = pd.Series([r["dataset"] for r in records], dtype=object).value_counts()
    others = [f"{d} ({counts[d]} records)" for d in sorted(counts.index) if d != chosen]
    if not others:
        return []
    return [f"board of {chosen} (most records); also present: {', '.join(others)}; --dataset"]


def status_notes(records: list[dict[str, Any]]) -> list[str]:
    """One line counting the runs that did not end ok (they are never scored)."""
    bad = pd.Series([r["status"] for r in records if r["status"] != "ok"], dtype=object)
    if bad.empty:
        return []
    counts = ", ".join(f"{n} {status}" for status, n in sorted(bad.value_counts().items()))
    return [f"not counted: {counts} run(s)"]


def settings_notes(records: list[dict[str, Any]]) -> list[str]:
    """A warning when the counted runs do not share one budget (train, model, data, eval)."""
    shared = {
        stable_hash(
            {k: v for k, v in (r.get("config") or {}).items() if k not in ("method", "adapter")}
        )
        for r in records
    }
    if len(shared) <= 1:
        return []
    return [
        f"the counted runs use {len(shared)} different settings (train/model/data/eval); "
        "use one --results-dir per preset to compare like with like"
    ]
