"""A plugin that calls sys.exit (at import, in a registration hook, in an observer or in its own
code during a run) is that plugin's failure: one line naming it and what it did, a non-zero
exit, and every record already written kept. Each case reproduces item 6 of issue 31."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_grid import TOY_PLUGIN, FakeExecute
from typer.testing import CliRunner

from fedbench.backends import local as local_backend
from fedbench.cli import app
from fedbench.engine import registry as registry_module
from fedbench.engine.registry import load_registry

cli = CliRunner()
QUICK = ["--preset", "quick", "--set", "train.rounds=1", "--holdout", "none"]


def plugin(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def observer(tmp_path: Path, hook: str, code: object = 3) -> Path:
    """A plugin file whose observer `hook` calls sys.exit(code)."""
    argument = "record" if hook == "fedbench_run_end" else "run_id, round"
    return plugin(
        tmp_path,
        "exiting_observer",
        f"""
        import sys
        from fedbench.hookspecs import hookimpl

        @hookimpl
        def {hook}({argument}):
            sys.exit({code!r})
        """,
    )


def error_line(result) -> str:
    """The command's stderr, which must be one line."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]


def test_an_observer_exiting_at_round_end_is_one_line_and_the_record_is_kept(tmp_path):
    path = observer(tmp_path, "fedbench_round_end")
    results = tmp_path / "results"
    args = ["--plugin", str(path), "run", "--method", "fedavg", *QUICK]
    result = cli.invoke(app, [*args, "--results-dir", str(results)])
    assert result.exit_code == 1
    line = error_line(result)
    assert line.startswith(f"error: observer plugin '{path}' called sys.exit(3)")
    assert "fedbench_round_end" in line
    assert [r["status"] for r in records(results)] == ["ok"]
    assert "record " in result.stdout  # the run's summary was printed


def test_an_observer_exiting_at_run_end_keeps_the_record_and_the_json(tmp_path):
    path = observer(tmp_path, "fedbench_run_end", code=0)
    results = tmp_path / "results"
    args = ["--plugin", str(path), "run", "--method", "fedavg", *QUICK, "--json"]
    result = cli.invoke(app, [*args, "--results-dir", str(results)])
    assert result.exit_code == 1
    assert "called sys.exit(0) in fedbench_run_end" in error_line(result)
    assert records(results) == [json.loads(result.stdout)]


def test_a_plugin_file_exiting_at_import_is_one_line(tmp_path):
    path = plugin(tmp_path, "exits", "import sys\nsys.exit(0)\n")
    result = cli.invoke(app, ["--plugin", str(path), "list", "methods"])
    assert result.exit_code == 2
    assert error_line(result) == f"error: plugin {path} failed to import: it called sys.exit(0)"
    assert result.stdout == ""


def test_an_installed_plugin_exiting_at_import_is_one_warning(monkeypatch):
    def load() -> None:
        raise SystemExit("bye\nnow")

    point = SimpleNamespace(name="quitter", load=load)
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [point])
    reg = load_registry()
    assert reg.failures == ["plugin 'quitter' failed to import: it called sys.exit('bye\\nnow')"]


def test_a_registration_hook_exiting_is_one_warning_and_the_others_load(tmp_path):
    path = plugin(
        tmp_path,
        "quits",
        """
        import sys
        from fedbench.hookspecs import hookimpl

        @hookimpl
        def fedbench_methods():
            sys.exit()
        """,
    )
    result = cli.invoke(app, ["--plugin", str(path), "list", "methods"])
    assert result.exit_code == 0, result.output
    assert error_line(result) == (
        f"warning: plugin '{path}' failed in fedbench_methods: it called sys.exit()"
    )
    assert "fedavg" in result.stdout


def test_a_dataset_exiting_while_loading_is_one_line(tmp_path):
    source = TOY_PLUGIN.replace(
        'raise RuntimeError("the grid tests fake execute; nothing loads data")', "sys.exit(0)"
    )
    path = plugin(tmp_path, "toy", "import sys\n" + source)
    args = ["--plugin", str(path), "run", "--method", "fedavg", "--dataset", "grid-toy"]
    result = cli.invoke(app, [*args, "--results-dir", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "called sys.exit(0)" in error_line(result)


class ObservedExecute(FakeExecute):
    """The fake grid run, with the observer calls a real run makes."""

    def __call__(self, run, registry, reporter) -> dict:
        registry.notify_round_end(run_id="x", holdout=None, round=1, metrics={})
        record = super().__call__(run, registry, reporter)
        registry.notify_run_end(record=record)
        return record


@pytest.mark.parametrize("hook", ["fedbench_round_end", "fedbench_run_end"])
def test_an_observer_exiting_in_a_grid_runs_every_cell_then_fails(tmp_path, monkeypatch, hook):
    monkeypatch.setattr(local_backend, "execute", ObservedExecute())
    toy = plugin(tmp_path, "grid_toy_plugin", TOY_PLUGIN)
    path = observer(tmp_path, hook)
    results = tmp_path / "r"
    command = ["--plugin", str(toy), "--plugin", str(path), "grid", "--dataset", "grid-toy"]
    result = cli.invoke(
        app, [*command, "--method", "fedavg", "--seeds", "0,1", "--results-dir", str(results)]
    )
    assert result.exit_code == 1
    assert len(records(results)) == 2 and "2 ok" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1  # called once: an observer that exited is not called again
    assert f"observer plugin '{path}' called sys.exit(3) in {hook}" in errors[0]


QUITTING_METHOD = """
import sys
from fedbench.hookspecs import hookimpl
from fedbench.method import Method

class Quitter(Method):
    name = "quitter"

    def local_update(self, model, ctx):
        sys.exit(3)

@hookimpl
def fedbench_methods():
    return [Quitter]
"""


def test_a_method_exiting_in_training_is_a_failed_record_naming_it(tmp_path):
    path = plugin(tmp_path, "quitter", QUITTING_METHOD)
    args = ["--plugin", str(path), "run", "--method", "quitter", *QUICK, "--json"]
    result = cli.invoke(app, [*args, "--results-dir", str(tmp_path / "r")])
    assert result.exit_code != 0
    record = json.loads(result.stdout)
    assert record["status"] == "failed"
    assert (
        record["error"]
        == "method 'quitter' failed in local_update (client 0): it called sys.exit(3)"
    )


ODD_DATASET = """
from fedbench.hookspecs import hookimpl
from fedbench_datasets.synth_prostate import SynthProstate

class Odd(SynthProstate):
    name = "odd-data"
    description = "closes [/] and [bold]x"

@hookimpl
def fedbench_datasets():
    return [Odd]
"""


def test_datasets_list_prints_a_description_with_markup_as_it_is(tmp_path):
    path = plugin(tmp_path, "odd", ODD_DATASET)
    result = cli.invoke(app, ["--plugin", str(path), "datasets", "list"])
    assert result.exit_code == 0, result.output
    unwrapped = " ".join(  # the narrow test terminal wraps the description inside its cell
        line.split("│")[2].strip() for line in result.stdout.splitlines() if line.count("│") > 2
    )
    assert "closes [/] and [bold]x" in unwrapped
