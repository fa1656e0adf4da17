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
from urllib.request import url2pathname

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


#: seconds a tracking server has to answer the probe, and MLflow's retries of a request
PROBE_TIMEOUT_S = 5
MLFLOW_RETRIES = "2"


def probe_folder(folder: Path, tracker: str) -> None:
    """A local tracker's folder must be a folder fedbench can create and write in: found now,
    not as a warning per round with nothing tracked."""
    import tempfile

    if folder.exists() and not folder.is_dir():
        raise FedbenchError(f"--track {tracker}: {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise FedbenchError(
            f"--track {tracker}: cannot write in {folder}: {exc.strerror or exc}"
        ) from None


def probe_mlflow(uri: str) -> None:
    """The MLflow store answers now: a local file store is a writable folder; any other URI is
    asked for one experiment, once, with a short timeout (a dead server would otherwise make
    every round retry for minutes)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":  # the folder MLflow writes: the URI's path, decoded
        probe_folder(Path(url2pathname(parsed.path)), "mlflow")
        return
    from mlflow.tracking import MlflowClient

    probe_settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_S),
    }
    saved = {key: os.environ.get(key) for key in probe_settings}
    os.environ.update(probe_settings)
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # MLflow raises its own, requests' and ValueError alike
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedbenchError(f"--track mlflow: the store {uri} does not answer: {first}") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


PROBES: dict[str, Callable[[str], None]] = {
    "mlflow": probe_mlflow,
    "tensorboard": lambda destination: probe_folder(Path(destination), "tensorboard"),
}


def check_trackers(names: Sequence[str]) -> list[Tracker]:
    """The named trackers, each known and its library importable (nothing probed or written)."""
    chosen = [tracker_named(name) for name in dict.fromkeys(names)]
    for tracker in chosen:
        require_library(tracker)
    return chosen


def enable_trackers(names: Sequence[str], results_dir: Path) -> list[str]:
    """Check each named tracker, its library and (as the Ray address is) its store before any
    training, then set the environment to exactly these trackers; returns one line per tracker
    saying where it writes."""
    chosen = check_trackers(names)
    for tracker in chosen:
        PROBES[tracker.name](tracker.destination(results_dir))
    if any(t.name == "mlflow" for t in chosen):  # a server that dies later: minutes, not hours
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", MLFLOW_RETRIES)
    for tracker in TRACKERS.values():
        os.environ.pop(tracker.env, None)
    lines = []
    for tracker in chosen:
        os.environ[tracker.env] = tracker.destination(results_dir)
        lines.append(f"tracking with {tracker.name}: {os.environ[tracker.env]}")
    return lines
