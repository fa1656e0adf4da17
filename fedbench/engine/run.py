"""One run, end to end: train (or reuse) the federations, score the inside regime, adapt and
score the outside regime, and write the run record with its kept predictions."""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbench.data import FederatedData
from fedbench.engine.federations import data_fingerprint, side_by_side
from fedbench.engine.profiling import PROFILE
from fedbench.engine.registry import Registry
from fedbench.engine.reporter import Reporter
from fedbench.engine.resolve import Run, holdout_sites
from fedbench.engine.scoring import Scoring
from fedbench.errors import Diverged, PluginFailure
from fedbench.results import predictions
from fedbench.results.record import build_record, new_run_id, now_iso, runs_dir, write_record
from fedbench.storage import check_writable

#: the folders of RESULTS a run writes in (data, federation and checkpoint caches)
CACHE_FOLDERS = ("cache", "cache/federations", "cache/checkpoints")


@dataclass
class Outcome:
    """A finished run: its record and the predictions it kept for `fedbench show`."""

    record: dict[str, Any]
    kept: predictions.Kept
    #: the failing plugin's traceback, for `--debug` (None unless the run failed)
    trace: str | None = None


def run_identity(run: Run) -> dict[str, Any]:
    """The names a record is filed under."""
    spec = run.spec
    return {
        "method": run.method.name,
        "adapter": run.adapter_name,
        "dataset": run.dataset.name,
        "seed": spec.seed,
        "preset": spec.preset,
        "code": run.code,
        **({"study": spec.study} if spec.study else {}),
        **({"variant": spec.variant} if spec.variant else {}),
        **({"tuning": spec.tuning} if spec.tuning else {}),
        **({"shares_data": dict(run.method.shares_data)} if run.method.shares_data else {}),
        **({"adapter_mode": run.adapter.mode} if run.adapter else {}),
    }


def run_id_for(run: Run) -> str:
    return new_run_id(
        run.dataset.name, run.method.name, run.adapter_name, run.spec.seed, run.config_hash
    )


def check_folders(results_dir: Path, folders: tuple[str, ...]) -> None:
    """Each folder of the results folder that the run will write, checked before any work: a
    read-only or misplaced one is one line naming it, never a failed record blaming the method."""
    for folder in folders:
        check_writable(Path(results_dir) / folder)


def scored(
    scoring: Scoring, data: FederatedData, holdouts: list[str]
) -> tuple[str, str | None, str | None]:
    """Both regimes into `scoring`; the run's status, error line and (for a plugin's failure)
    the plugin's traceback: a divergence or a plugin's failure ends the run there."""
    try:
        scoring.inside(data)
        for holdout in holdouts:
            scoring.outside(data, holdout)
    except Diverged as exc:
        return "diverged", str(exc), None
    except PluginFailure as exc:
        cause = exc.__cause__ or exc
        return "failed", str(exc), "".join(traceback.format_exception(cause))
    return "ok", None, None


def compute(run: Run, registry: Registry, reporter: Reporter) -> Outcome:
    """Run everything and return the outcome, writing nothing to the records (a Ray worker
    sends it back to the driver, which writes it)."""
    started, clock = now_iso(), time.perf_counter()
    check_folders(run.spec.results_dir, CACHE_FOLDERS)
    PROFILE.reset()
    with PROFILE.phase("data loading"):
        data = run.dataset.load(
            run.config["data"], run.spec.seed, Path(run.spec.results_dir) / "cache"
        )
    holdouts = holdout_sites(run.spec.holdout, [s.name for s in data.sites]) or []
    probe = run.build_model(data.task)
    if run.adapter is not None:
        run.adapter(run.config["adapter"]).check(run.method, probe, data.task)
    fingerprint = data_fingerprint(data)
    scoring = Scoring(run, registry, reporter, run_id_for(run), fingerprint)
    with side_by_side(run, registry, holdouts):  # torch's threads: this process's share
        status, error, trace = scored(scoring, data, holdouts)
        record = build_record(
            run_id=scoring.run_id,
            status=status,
            identity={
                **run_identity(run),
                "data_fingerprint": fingerprint,
                "hd95_unit": getattr(data.task, "hd95_unit", None),
            },
            holdouts=holdouts,
            config=run.config,
            config_hash=run.config_hash,
            device=str(run.device),
            started_at=started,
            wall_s=time.perf_counter() - clock,
            cost=scoring.cost(),
            metrics=scoring.rows,
            history=scoring.history,
            val_best_rounds=scoring.val_best_rounds,
            profile=PROFILE.summary(),
            error=error,
        )
    return Outcome(record, scoring.kept, trace)


def save_outcome(results_dir: Path, outcome: Outcome, registry: Registry) -> None:
    """The predictions first, then the record that points to them; then the run-end observers,
    for every record written (ok, failed or diverged, local or from a Ray worker)."""
    if outcome.kept and outcome.record["status"] == "ok":
        predictions.save(results_dir, outcome.record["run_id"], outcome.kept)
    write_record(results_dir, outcome.record)
    registry.notify_run_end(record=outcome.record)


def execute(run: Run, registry: Registry, reporter: Reporter) -> Outcome:
    """Run everything, then write the kept predictions and the record (status ok, failed or
    diverged); the outcome."""
    runs_dir(run.spec.results_dir)
    check_folders(run.spec.results_dir, ("predictions",))
    outcome = compute(run, registry, reporter)
    save_outcome(run.spec.results_dir, outcome, registry)
    return outcome
