"""What each row of a board cost: bytes, client optimizer steps and seconds per regime from the
records, and the note naming rows whose compute is unlike FedAvg's (in a budget that is not
converged, compute alone can decide a row)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from fedbench.results.leaderboard import Board

#: a row's compute is unlike FedAvg's when a ratio is off by more than this fraction
COMPUTE_TOLERANCE = 0.2


def regime_cost(record: dict[str, Any], regime: str, key: str) -> float:
    """One cost (bytes, steps, seconds) summed over the federations of one regime; the whole
    run's when the record does not split it; nan when the record lacks it."""
    cost = record.get("cost") or {}
    feds = cost.get("federations")
    if isinstance(feds, dict) and feds:
        parts = [c for k, c in feds.items() if (k == "inside") == (regime == "inside")]
    else:
        parts = [cost]
    if key == "bytes":
        return float(sum(c.get("bytes_up", 0) + c.get("bytes_down", 0) for c in parts))
    if key == "seconds":  # training of the regime's federations, then adaptation
        if not all("train_s" in c for c in parts):
            return math.nan
        return float(sum(c["train_s"] + c.get("adapt_s", 0.0) for c in parts))
    return float(sum(c.get(key, math.nan) for c in parts))


def fedavg_reference(frame: pd.DataFrame) -> pd.Series | None:
    """The board's plain FedAvg row: with the `none` adapter where the board has adapters, and
    of the FedAvg rows (a study may hold several variants) the one with the fewest steps."""
    fedavg = frame[frame["method"] == "fedavg"]
    if "adapter" in frame and (fedavg["adapter"] == "none").any():
        fedavg = fedavg[fedavg["adapter"] == "none"]
    if fedavg.empty:
        return None
    return fedavg.sort_values("client_steps", kind="stable", na_position="last").iloc[0]


def compute_notes(board: Board) -> list[str]:
    """One line naming the rows whose client steps or wall seconds are off FedAvg's by more
    than 20%, each with both ratios."""
    reference = fedavg_reference(board.frame)
    if reference is None:
        return []
    unlike = []
    for row in board.frame.to_dict("records"):
        ratios = {
            unit: row[column] / reference[column]
            for column, unit in (("client_steps", "steps"), ("seconds", "wall s"))
            if reference[column] > 0 and pd.notna(row[column])
        }
        if any(abs(r - 1.0) > COMPUTE_TOLERANCE for r in ratios.values()):
            shown = ", ".join(f"{r:.1f}x {unit}" for unit, r in ratios.items())
            unlike.append(f"{board.label(row)} ({shown})")
    if not unlike:
        return []
    return [
        f"{board.regime}: compute unlike fedavg's ({board.label(reference)}; client steps or wall "
        f"seconds off by more than 20%): {'; '.join(unlike)}"
    ]
