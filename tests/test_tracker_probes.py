"""Trackers are probed before any training, as the Ray address is (issue 31, item 5): a dead
MLflow server, a URI MLflow cannot use, or a tracker folder that is a file is one line and a
non-zero exit within seconds, with no record written."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

RUN = ["fedbench", "run", "--method", "fedavg", "--preset", "quick", "--holdout", "none"]


def needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (the tracker extras)")


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def refused(results: Path, tracker: str, **env: str) -> str:
    """Run with `--track tracker`; it must fail fast, in one line, having trained nothing."""
    clock = time.perf_counter()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FEDBENCH_TRACK")}
    environment.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [*RUN, "--track", tracker, "--results-dir", str(results)],
        capture_output=True,
        text=True,
        env={**environment, **env},
        timeout=120,
    )
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --track {tracker}"), done.stderr
    assert time.perf_counter() - clock < 60
    assert not (results / "runs").exists() or not any((results / "runs").iterdir())
    return lines[0]


@pytest.mark.slow
def test_a_dead_mlflow_server_is_one_line_before_training(tmp_path):
    needs("mlflow")
    uri = f"http://127.0.0.1:{closed_port()}"
    line = refused(tmp_path, "mlflow", MLFLOW_TRACKING_URI=uri)
    assert f"the store {uri} does not answer" in line


@pytest.mark.slow
def test_a_uri_mlflow_cannot_use_is_one_line(tmp_path):
    needs("mlflow")
    line = refused(tmp_path, "mlflow", MLFLOW_TRACKING_URI="garbage://nowhere")
    assert "the store garbage://nowhere does not answer" in line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tracker", "folder"), [("mlflow", "mlruns"), ("tensorboard", "tensorboard")]
)
def test_a_tracker_folder_that_is_a_file_is_one_line(tmp_path, tracker, folder):
    needs("mlflow" if tracker == "mlflow" else "tensorboard")
    (tmp_path / folder).write_text("not a folder")
    line = refused(tmp_path, tracker)
    assert line.endswith(f"{tmp_path / folder} is a file, not a folder")
    assert (tmp_path / folder).read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_an_unwritable_tracker_folder_is_one_line(tmp_path):
    needs("tensorboard")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard").chmod(0o555)
    line = refused(tmp_path, "tensorboard")
    assert "cannot write in" in line


def test_the_probe_checks_the_folder_mlflow_writes_even_with_a_space(tmp_path):
    """The file URI quotes a space as %20; the probe must decode it, not make `my%20results`."""
    needs("mlflow")
    from fedbench.cli.tracking import mlflow_destination, probe_mlflow

    environment = dict(os.environ)
    try:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        probe_mlflow(mlflow_destination(tmp_path / "my results"))
    finally:
        os.environ.clear()
        os.environ.update(environment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my results"]
    assert (tmp_path / "my results" / "mlruns").is_dir()


def test_a_dry_run_still_refuses_an_unknown_tracker(tmp_path):
    from typer.testing import CliRunner

    from fedbench.cli import app

    args = ["grid", "--method", "fedavg", "--dry-run", "--track", "nope"]
    result = CliRunner().invoke(app, [*args, "--results-dir", str(tmp_path / "r")])
    assert result.exit_code != 0 and "unknown tracker 'nope'" in result.stderr
    assert not (tmp_path / "r").exists()
