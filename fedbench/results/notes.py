"""The notes under a board that come from its records rather than its numbers: runs not counted,
settings that differ, rows that `fedbench tune` chose, methods that share image statistics."""

from __future__ import annotations

from typing import Any

import pandas as pd

from fedbench.storage import stable_hash


def status_notes(records: list[dict[str, Any]]) -> list[str]:
    """One line counting the runs that did not end ok (they are never scored) and naming their
    cells: a row that lost a seed averages the seeds that survived."""
    bad = [r for r in records if r["status"] != "ok"]
    if not bad:
        return []
    counts = pd.Series([r["status"] for r in bad], dtype=object).value_counts()
    counted = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    seeds: dict[tuple[str, str], set[int]] = {}
    for r in bad:
        variant = f" [{r['variant']}]" if r.get("variant") else ""
        cell = f"{r['method']} + {r.get('adapter') or 'none'}{variant}"
        seeds.setdefault((cell, r["status"]), set()).add(int(r["seed"]))
    cells = "; ".join(
        f"{cell} seed{'s' if len(s) > 1 else ''} {', '.join(map(str, sorted(s)))} ({status})"
        for (cell, status), s in sorted(seeds.items())
    )
    return [f"not counted: {counted} run(s): {cells}"]


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


def tuning_notes(records: list[dict[str, Any]]) -> list[str]:
    """Which rows ran settings `fedbench tune` chose (on validation data), and how many trials;
    the others ran their defaults or the study's settings."""
    tuned: dict[str, set[str]] = {}
    for record in records:
        if record.get("tuning"):
            how = f"{record['tuning'].get('trials', '?')} trials"
            what = record["tuning"].get("tuned", record["method"])  # a method, or "A on M"
            tuned.setdefault(what, set()).add(how)
    if not tuned:
        return []
    rows = ", ".join(f"{m} ({'; '.join(sorted(h))})" for m, h in sorted(tuned.items()))
    return [
        f"tuned on validation data by fedbench tune: {rows}; every other row runs its "
        "defaults or the study's settings"
    ]


def sharing_notes(records: list[dict[str, Any]]) -> list[str]:
    """The rows whose method sends statistics of client data besides models (declared)."""
    shared = {r["method"]: r["shares_data"] for r in records if r.get("shares_data")}
    if not shared:
        return []
    rows = "; ".join(f"{m} ({', '.join(sorted(s.values()))})" for m, s in sorted(shared.items()))
    return [f"shares image statistics, not only models: {rows}"]
