"""Without the `flower` extra, the Flower commands say what to install in one line (issue 27)."""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from fedbench.cli import app

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("flwr") is not None, reason="flwr is installed here"
)


@pytest.mark.parametrize(
    "args",
    [
        ["flower", "run", "--method", "fedavg"],
        ["flower", "new", "somewhere", "--method", "fedavg"],
    ],
)
def test_each_flower_command_names_the_extra(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert result.stderr.strip() == (
        "error: the Flower bridge needs flwr: pip install fedbench[flower]"
    )
    assert not (tmp_path / "somewhere").exists()
