"""TensorBoard tracker, an observer plugin: each round's validation score per site as a scalar
(tag `inside/val/SITE`, or `without-HOLDOUT/val/SITE` for a leave-one-site-out federation; step =
round) in RESULTS/tensorboard/<run_id>/; `tensorboard --logdir RESULTS/tensorboard` shows them.

Enabled by `fedbench run|grid --track tensorboard`, which sets FEDBENCH_TRACK_TENSORBOARD=<folder>
(RESULTS/tensorboard, absolute) in its own process and so in the Ray workers it starts; set that
variable yourself to track from the Python API. Without it both hooks return at once and
TensorBoard is never imported. A run none of whose rounds were observed (its federation came
from the cache) gets its curves from the record's history at the end. Writes with
torch.utils.tensorboard. Install: pip install "fedbench-med[tensorboard]"."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedbench.hookspecs import hookimpl

ENV = "FEDBENCH_TRACK_TENSORBOARD"

#: the open writer of the run this process is observing (one at a time: runs are sequential)
_WRITERS: dict[Path, Any] = {}

Point = tuple[str, float, int]  # tag, value, step


def run_folder(run_id: str) -> Path | None:
    """The folder of the run's event files, or None when TensorBoard tracking is not enabled."""
    root = os.environ.get(ENV)
    return Path(root) / run_id if root else None


def close_writer(folder: Path) -> None:
    writer = _WRITERS.pop(folder, None)
    if writer is not None:
        writer.close()


def writer_for(folder: Path) -> Any:
    """The run's SummaryWriter; opening one closes the writers of earlier runs, whose end may
    be observed by another process (the Ray driver)."""
    if folder not in _WRITERS:
        for earlier in list(_WRITERS):
            close_writer(earlier)
        from torch.utils.tensorboard import SummaryWriter

        _WRITERS[folder] = SummaryWriter(log_dir=str(folder))
    return _WRITERS[folder]


def write_scalars(folder: Path, points: list[Point]) -> None:
    """Write and flush, so the scalars are on disk however the process ends."""
    writer = writer_for(folder)
    for tag, value, step in points:
        writer.add_scalar(tag, float(value), global_step=step)
    writer.flush()


def scalar_tag(holdout: str | None, site: str) -> str:
    federation = "inside" if holdout is None else f"without-{holdout}"
    return f"{federation}/val/{site}"


@hookimpl
def fedbench_round_end(
    run_id: str, holdout: str | None, round: int, metrics: dict[str, Any]
) -> None:
    """Each site's validation score of this round, as it is computed."""
    folder = run_folder(run_id)
    if folder is None or not metrics:
        return
    write_scalars(folder, [(scalar_tag(holdout, s), v, round) for s, v in metrics.items()])


def history_points(record: dict[str, Any]) -> list[Point]:
    """The record's per-round validation history as scalars."""
    points = []
    for federation, rounds in (record.get("history") or {}).items():
        holdout = None if federation == "inside" else federation
        for entry in rounds:
            for site, value in (entry.get("val") or {}).items():
                points.append((scalar_tag(holdout, site), value, entry["round"]))
    return points


@hookimpl
def fedbench_run_end(record: dict[str, Any]) -> None:
    """Backfill the curves of a run no round of which was observed, and close its writer."""
    folder = run_folder(record["run_id"])
    if folder is None:
        return
    points = history_points(record)
    if points and not folder.exists():
        write_scalars(folder, points)
    close_writer(folder)
