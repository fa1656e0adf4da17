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
    """The board's plain FedAvg row: with the `none` adapter where the board has adapters, of
    the FedAvg rows (a study may hold several variants) those with the fewest steps, and among
    those the one in the board's main group (the variant most rows share)."""
    fedavg = frame[frame["method"] == "fedavg"]
    if "adapter" in frame and (fedavg["adapter"] == "none").any():
        fedavg = fedavg[fedavg["adapter"] == "none"]
    if fedavg.empty:
        return None
    fewest = fedavg[fedavg["client_steps"] == fedavg["client_steps"].min()]
    if fewest.empty:  # no steps recorded
        fewest = fedavg
    if "variant" in frame and frame["variant"].notna().any():
        main = frame["variant"].mode().iloc[0]
        if (fewest["variant"] == main).any():
            fewest = fewest[fewest["variant"] == main]
    return fewest.iloc[0]


def compute_notes(board: Board) -> list[str]:
    """One line naming the rows whose client optimizer steps are off FedAvg's by more than 20%,
    with the ratio of their steps and of their wall seconds. Seconds are shown, not used to
    flag: they depend on the machine's load, which no board controls."""
    reference = fedavg_reference(board.frame)
    if reference is None or not reference["client_steps"] > 0:
        return []
    unlike = []
    for row in board.frame.to_dict("records"):
        steps = row["client_steps"] / reference["client_steps"]
        if pd.isna(steps) or abs(steps - 1.0) <= COMPUTE_TOLERANCE:
            continue
        seconds = row["seconds"] / reference["seconds"] if reference["seconds"] > 0 else math.nan
        shown = f"{steps:.1f}x steps" + ("" if pd.isna(seconds) else f", {seconds:.1f}x wall s")
        unlike.append(f"{board.label(row)} ({shown})")
    if not unlike:
        return []
    return [
        f"{board.regime}: client steps unlike fedavg's ({board.label(reference)}; off by more "
        f"than 20%): {'; '.join(unlike)}"
    ]
