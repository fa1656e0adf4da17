"""Experiment trackers (plugins/track_mlflow.py, plugins/track_tensorboard.py) against the real
libraries writing to a local folder: a quick `fedbench run --track mlflow --track tensorboard`
read back with MLflow's own client and TensorBoard's event reader. Without --track nothing is
written and no tracker library is imported; a missing library or an unknown tracker name is one
line before any training. Tests that read a tracker skip when its extra is not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

import pytest
from typer.testing import CliRunner

from fedbench.cli import app

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = {name: ROOT / "plugins" / f"track_{name}.py" for name in ("mlflow", "tensorboard")}
#: tracker -> (library the test reads it back with, module the plugin writes with, label)
LIBRARIES = {
    "mlflow": ("mlflow", "mlflow", "MLflow"),
    "tensorboard": ("tensorboard", "torch.utils.tensorboard", "TensorBoard"),
}
ENVIRONMENT = (
    "FEDBENCH_TRACK_MLFLOW",
    "FEDBENCH_TRACK_TENSORBOARD",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_ALLOW_FILE_STORE",
)
QUICK_RUN = ["run", "--method", "fedavg", "--preset", "quick", "--holdout", "none", "--json"]


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def plugin_args() -> list[str]:
    """--plugin for each tracker plugin the package does not declare as an entry point (once it
    does, loading the file as well would register each observer twice)."""
    declared = {ep.value for ep in entry_points(group="fedbench")}
    args: list[str] = []
    for name, path in PLUGINS.items():
        if f"fedbench_plugins.track_{name}" not in declared:
            args += ["--plugin", str(path)]
    return args


@contextmanager
def own_environment() -> Iterator[None]:
    """The tracking variables unset inside, restored after (the CLI sets them in-process)."""
    saved = {key: os.environ.pop(key, None) for key in ENVIRONMENT}
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


@pytest.fixture(autouse=True)
def clean_environment() -> Iterator[None]:
    with own_environment():
        yield


def invoke(*args: str):
    return CliRunner().invoke(app, [*plugin_args(), *args])


def load_plugin(name: str) -> ModuleType:
    """A fresh copy of a tracker plugin, as another process (a Ray worker, the driver) has it."""
    spec = importlib.util.spec_from_file_location(f"tracker_copy_{name}", PLUGINS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> tuple[Path, dict]:
    """One quick run with every tracker whose library is installed: its results folder and
    record. `--holdout none`: the federation of all sites validates every round."""
    names = [name for name, (library, _, _) in LIBRARIES.items() if installed(library)]
    if not names:
        pytest.skip('no tracker installed: pip install "fedbench-med[mlflow,tensorboard]"')
    results = tmp_path_factory.mktemp("tracked")
    track = [arg for name in names for arg in ("--track", name)]
    with own_environment():
        result = invoke(*QUICK_RUN, "--rounds", "2", "--results-dir", str(results), *track)
    assert result.exit_code == 0, result.output
    return results, json.loads(result.stdout)


def rounds_of(record: dict) -> dict[str, list[tuple[int, float]]]:
    """The record's validation history per site: [(round, score), ...]."""
    per_site: dict[str, list[tuple[int, float]]] = {}
    for entry in record["history"]["inside"]:
        for site, value in entry["val"].items():
            per_site.setdefault(site, []).append((entry["round"], value))
    return per_site


def mlflow_client(uri: str, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def mlflow_runs(client, run_id: str) -> list:
    experiment = client.get_experiment_by_name("fedbench")
    query = f"tags.`fedbench.run_id` = '{run_id}'"
    return client.search_runs([experiment.experiment_id], filter_string=query)


def metric_points(client, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def test_mlflow_has_one_run_with_settings_rounds_scores_and_record(tracked, tmp_path, monkeypatch):
    results, record = tracked
    client = mlflow_client((results / "mlruns").as_uri(), monkeypatch)
    [run] = mlflow_runs(client, record["run_id"])
    assert run.info.run_name == record["run_id"] and run.info.status == "FINISHED"
    params = run.data.params
    assert params["method"] == "fedavg" and params["train.rounds"] == "2"
    assert params["preset"] == "quick" and params["seed"] == "0"
    assert params["model.channels"] == json.dumps(record["config"]["model"]["channels"])
    history = rounds_of(record)
    assert len(history) == 6
    for site, points in history.items():
        assert metric_points(client, run, f"inside/val/{site}") == points
    for row in record["metrics"]:
        assert run.data.metrics[f"inside/{row['metric']}/{row['site']}"] == row["value"]
    path = client.download_artifacts(run.info.run_id, "record.json", str(tmp_path))
    assert json.loads(Path(path).read_text()) == record


def test_tensorboard_has_a_scalar_per_site_and_round(tracked):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results, record = tracked
    events = EventAccumulator(str(results / "tensorboard" / record["run_id"]))
    events.Reload()
    history = rounds_of(record)
    assert sorted(events.Tags()["scalars"]) == sorted(f"inside/val/{s}" for s in history)
    for site, points in history.items():
        scalars = [(e.step, e.value) for e in events.Scalars(f"inside/val/{site}")]
        assert [step for step, _ in scalars] == [1, 2]
        assert [value for _, value in scalars] == pytest.approx([v for _, v in points], rel=1e-6)


def test_without_track_nothing_is_written_nor_imported(tmp_path, monkeypatch):
    """Stale variables from an earlier shell do not turn tracking on; with the libraries made
    unimportable the run still works, so the plugins import them only when enabled."""
    monkeypatch.setenv("FEDBENCH_TRACK_MLFLOW", (tmp_path / "stale-mlruns").as_uri())
    monkeypatch.setenv("FEDBENCH_TRACK_TENSORBOARD", str(tmp_path / "stale-tensorboard"))
    for _, module, _ in LIBRARIES.values():
        monkeypatch.setitem(sys.modules, module, None)
    results = tmp_path / "results"
    result = invoke(*QUICK_RUN, "--rounds", "1", "--results-dir", str(results))
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert not (results / "mlruns").exists() and not (results / "tensorboard").exists()


@pytest.mark.parametrize("name", list(LIBRARIES))
def test_a_missing_library_is_one_line_naming_the_extra_before_training(
    name, tmp_path, monkeypatch
):
    _, module, label = LIBRARIES[name]
    monkeypatch.setitem(sys.modules, module, None)
    result = invoke(*QUICK_RUN, "--results-dir", str(tmp_path / "results"), "--track", name)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --track {name} needs {label}, which cannot be imported here: "
        f'pip install "fedbench-med[{name}]"'
    ]
    assert not (tmp_path / "results" / "runs").exists()
    assert not (tmp_path / "results" / "cache").exists()


def test_an_unknown_tracker_is_one_line_listing_the_known_ones(tmp_path):
    result = invoke(*QUICK_RUN, "--results-dir", str(tmp_path / "r"), "--track", "wandb")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown tracker 'wandb'; known: mlflow, tensorboard"
    ]
    assert not (tmp_path / "r").exists()


def test_the_plugins_import_no_tracker_library_until_enabled():
    """Loading both plugins (as `fedbench list` does) and calling their hooks with tracking off
    imports neither MLflow nor TensorBoard (nor torch). MONAI itself imports both when they are
    installed, so this is checked on the plugins alone, in a fresh interpreter."""
    code = (
        "import sys; from pathlib import Path\n"
        "from fedbench.engine.registry import load_module_from_path\n"
        "for path in sys.argv[1:]:\n"
        "    plugin = load_module_from_path(Path(path))\n"
        "    plugin.fedbench_round_end(run_id='r', holdout=None, round=1, metrics={'A': 0.5})\n"
        "    plugin.fedbench_run_end(record={'run_id': 'r', 'status': 'ok'})\n"
        "heavy = ('mlflow', 'tensorboard', 'tensorboardX', 'torch')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    args = [sys.executable, "-c", code, *map(str, PLUGINS.values())]
    done = subprocess.run(args, capture_output=True, text=True, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def small_record(run_id: str) -> dict:
    """A record of two validated rounds, as a Ray driver receives it from its worker."""
    return {
        "run_id": run_id,
        "status": "ok",
        "method": "fedavg",
        "seed": 0,
        "config": {"train": {"rounds": 2}},
        "metrics": [],
        "history": {"inside": [{"round": 1, "val": {"A": 0.5}}, {"round": 2, "val": {"A": 0.6}}]},
    }


def test_mlflow_rounds_from_a_worker_and_the_end_from_the_driver_make_one_run(
    tmp_path, monkeypatch
):
    """The worker resumed at round 2 (round 1 came from a checkpoint): the driver finds the
    worker's run by its tag and adds round 1 from the record, without doubling round 2."""
    uri = (tmp_path / "mlruns").as_uri()
    client = mlflow_client(uri, monkeypatch)
    monkeypatch.setenv("FEDBENCH_TRACK_MLFLOW", uri)
    load_plugin("mlflow").fedbench_round_end(run_id="r1", holdout=None, round=2, metrics={"A": 0.6})
    load_plugin("mlflow").fedbench_run_end(record=small_record("r1"))
    [run] = mlflow_runs(client, "r1")
    assert metric_points(client, run, "inside/val/A") == [(1, 0.5), (2, 0.6)]
    assert run.data.params["train.rounds"] == "2" and run.info.status == "FINISHED"


def test_tensorboard_gets_the_curves_of_a_cached_federation_from_the_record(tmp_path, monkeypatch):
    """No round was observed (the federation came from the cache): the run's end writes the
    record's history, once."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("FEDBENCH_TRACK_TENSORBOARD", str(tmp_path))
    load_plugin("tensorboard").fedbench_run_end(record=small_record("r2"))
    events = EventAccumulator(str(tmp_path / "r2"))
    events.Reload()
    points = [(e.step, e.value) for e in events.Scalars("inside/val/A")]
    assert points == [(1, pytest.approx(0.5)), (2, pytest.approx(0.6))]


def test_tensorboard_scalars_are_on_disk_after_each_round(tmp_path, monkeypatch):
    """A Ray worker's writer is never closed by the driver: each round must reach the disk."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("FEDBENCH_TRACK_TENSORBOARD", str(tmp_path))
    worker = load_plugin("tensorboard")
    worker.fedbench_round_end(run_id="r3", holdout="HK", round=1, metrics={"A": 0.25})
    events = EventAccumulator(str(tmp_path / "r3"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("without-HK/val/A")] == [(1, 0.25)]
    worker.fedbench_run_end(record={"run_id": "r3"})


def test_mlflow_goes_where_mlflow_tracking_uri_says_else_to_the_results_folder(
    tmp_path, monkeypatch
):
    from fedbench.cli import tracking
    from fedbench.cli.tracking import enable_trackers, mlflow_destination

    monkeypatch.setattr("fedbench.cli.tracking.require_library", lambda tracker: None)
    # no server listens here: the wiring is tested, the probe in tests/test_tracker_probes.py
    monkeypatch.setitem(tracking.PROBES, "mlflow", lambda uri: None)
    assert mlflow_destination(tmp_path) == (tmp_path / "mlruns").as_uri()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "elsewhere/mlruns")
    assert mlflow_destination(Path("r")) == (tmp_path / "elsewhere" / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    lines = enable_trackers(["mlflow", "tensorboard", "mlflow"], Path("r"))
    assert os.environ["FEDBENCH_TRACK_MLFLOW"] == "http://127.0.0.1:5000"
    assert os.environ["FEDBENCH_TRACK_TENSORBOARD"] == str(tmp_path / "r" / "tensorboard")
    assert lines == [
        "tracking with mlflow: http://127.0.0.1:5000",
        f"tracking with tensorboard: {tmp_path / 'r' / 'tensorboard'}",
    ]
