"""`--track NAME` (repeatable) on `fedbench run` and `fedbench grid`: the experiment trackers that
observe the runs. The choice reaches the observer plugins (plugins/track_*.py) through environment
variables, so Ray workers started by the command inherit it:

- FEDBENCH_TRACK_MLFLOW: the MLflow tracking URI (MLFLOW_TRACKING_URI when set, else the file
  store RESULTS/mlruns);
- FEDBENCH_TRACK_TENSORBOARD: the folder in which each run writes <run_id>/
  (RESULTS/tensorboard).

The command sets exactly the variables of the trackers it was given and removes the others."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from fedbench.errors import FedbenchError, unknown_name


@dataclass(frozen=True)
class Tracker:
    """A tracker the CLI can enable: the variable its plugin reads, the library it imports and
    the extra that installs it, and where it writes for a results folder."""

    name: str
    env: str
    module: str
    label: str
    destination: Callable[[Path], str]

    @property
    def install_hint(self) -> str:
        return f'pip install "fedbench-med[{self.name}]"'


def local_uri(uri: str) -> str:
    """A tracking URI that names a plain local path, made absolute (file:///...), so Ray workers
    with another working folder write to the same store; other URIs unchanged."""
    scheme = urlparse(uri).scheme
    if scheme and len(scheme) > 1:  # one letter: a Windows drive, still a path
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def mlflow_destination(results_dir: Path) -> str:
    """MLflow's usual place (MLFLOW_TRACKING_URI) when the user set one, else RESULTS/mlruns."""
    return local_uri(os.environ.get("MLFLOW_TRACKING_URI") or str(results_dir / "mlruns"))


def tensorboard_destination(results_dir: Path) -> str:
    """RESULTS/tensorboard, absolute; each run writes its own <run_id>/ folder in it."""
    return str((results_dir / "tensorboard").resolve())


TRACKERS = {
    t.name: t
    for t in (
        Tracker("mlflow", "FEDBENCH_TRACK_MLFLOW", "mlflow", "MLflow", mlflow_destination),
        Tracker(
            "tensorboard",
            "FEDBENCH_TRACK_TENSORBOARD",
            "torch.utils.tensorboard",
            "TensorBoard",
            tensorboard_destination,
        ),
    )
}


def tracker_named(name: str) -> Tracker:
    """The tracker called `name`, or one line listing the known ones."""
    try:
        return TRACKERS[name]
    except KeyError:
        raise unknown_name("tracker", name, list(TRACKERS)) from None


def require_library(tracker: Tracker) -> None:
    """Import the tracker's library now, so a missing one stops the command before training
    with one line naming the extra to install."""
    try:
        importlib.import_module(tracker.module)
    except ImportError:
        raise FedbenchError(
            f"--track {tracker.name} needs {tracker.label}, which cannot be imported here: "
            f"{tracker.install_hint}"
        ) from None


def enable_trackers(names: Sequence[str], results_dir: Path) -> list[str]:
    """Check each named tracker and its library, then set the environment to exactly these
    trackers; returns one line per tracker saying where it writes."""
    chosen = [tracker_named(name) for name in dict.fromkeys(names)]
    for tracker in chosen:
        require_library(tracker)
    for tracker in TRACKERS.values():
        os.environ.pop(tracker.env, None)
    lines = []
    for tracker in chosen:
        os.environ[tracker.env] = tracker.destination(results_dir)
        lines.append(f"tracking with {tracker.name}: {os.environ[tracker.env]}")
    return lines
