"""The plugin door: each mistake a plugin author makes is one warning naming the plugin (or one
clear refusal), and the other plugins still load. Each case reproduces a finding of issue 12."""

from __future__ import annotations

import textwrap
from pathlib import Path

from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.engine.registry import load_registry

cli = CliRunner()


def plugin(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def test_a_class_without_its_own_name_is_one_warning_and_not_registered(tmp_path):
    path = plugin(
        tmp_path,
        "nameless",
        """
        from fedbench.hookspecs import hookimpl
        from fedbench_plugins.fedavg import FedAvg

        class MyTwist(FedAvg):
            description = "forgot the name"

        @hookimpl
        def fedbench_methods():
            return [MyTwist]
        """,
    )
    reg = load_registry((path,))
    assert reg.get("methods", "fedavg").__name__ == "FedAvg"  # the built-in, untouched
    lines = [line for line in reg.failures if "MyTwist" in line]
    assert len(lines) == 1 and str(path) in lines[0] and "no name of its own" in lines[0]


def test_a_duplicate_name_is_refused_naming_both_plugins(tmp_path):
    path = plugin(
        tmp_path,
        "dup",
        """
        from fedbench.hookspecs import hookimpl
        from fedbench.method import Method

        class Impostor(Method):
            name = "fedprox"

        @hookimpl
        def fedbench_methods():
            return [Impostor]
        """,
    )
    reg = load_registry((path,))
    assert reg.get("methods", "fedprox").__name__ == "FedProx"
    (line,) = [line for line in reg.failures if "Impostor" in line]
    assert str(path) in line and "taken by the built-in plugin 'fedprox'" in line


def test_a_misspelled_hook_is_reported(tmp_path):
    path = plugin(
        tmp_path,
        "typo",
        """
        from fedbench.hookspecs import hookimpl

        @hookimpl
        def fedbench_method():
            return []
        """,
    )
    reg = load_registry((path,))
    (line,) = [line for line in reg.failures if "fedbench_method " in line]
    assert str(path) in line and "not a fedbench hook" in line


def test_a_hook_without_hookimpl_is_reported(tmp_path):
    path = plugin(
        tmp_path,
        "unmarked",
        """
        def fedbench_methods():
            return []
        """,
    )
    reg = load_registry((path,))
    assert any("fedbench_methods is not marked @hookimpl" in line for line in reg.failures)


BAD_ARGUMENT = """
from fedbench.hookspecs import hookimpl

@hookimpl
def fedbench_run_end(recrod):
    pass
"""


def test_a_hook_with_a_misnamed_argument_is_one_warning_and_list_still_works(tmp_path):
    path = plugin(tmp_path, "badarg", BAD_ARGUMENT)
    reg = load_registry((path,))
    assert "fedavg" in reg.names("methods")
    (line,) = [line for line in reg.failures if str(path) in line]
    assert "PluginValidationError" in line and "\n" not in line
    result = cli.invoke(app, ["--plugin", str(path), "list", "methods"])
    assert result.exit_code == 0 and "fedavg" in result.stdout
    assert "Traceback" not in result.output


def test_an_adapter_without_predict_is_refused_at_load(tmp_path):
    path = plugin(
        tmp_path,
        "lazy_adapter",
        """
        from fedbench.adapter import Adapter
        from fedbench.hookspecs import hookimpl

        class Lazy(Adapter):
            name = "lazy"

        @hookimpl
        def fedbench_adapters():
            return [Lazy]
        """,
    )
    reg = load_registry((path,))
    assert "lazy" not in reg.names("adapters")
    assert any("Lazy ('lazy') does not implement predict" in line for line in reg.failures)


def test_a_dataset_without_load_is_refused_at_load(tmp_path):
    path = plugin(
        tmp_path,
        "lazy_dataset",
        """
        from fedbench.data import Dataset
        from fedbench.hookspecs import hookimpl

        class Empty(Dataset):
            name = "empty"

        @hookimpl
        def fedbench_datasets():
            return [Empty]
        """,
    )
    reg = load_registry((path,))
    assert "empty" not in reg.names("datasets")
    assert any("does not implement load" in line for line in reg.failures)


RAISING_OBSERVERS = """
from fedbench.hookspecs import hookimpl

@hookimpl
def fedbench_round_end(run_id, holdout, round, metrics):
    raise RuntimeError("round observer broke")

@hookimpl
def fedbench_run_end(record):
    raise RuntimeError("run observer broke")
"""


def test_observer_errors_are_warnings_and_leave_the_run_ok(tmp_path):
    path = plugin(tmp_path, "observer", RAISING_OBSERVERS)
    args = ["--plugin", str(path), "run", "--method", "fedavg", "--preset", "quick"]
    args += ["--holdout", "none", "--rounds", "1", "--results-dir", str(tmp_path / "r"), "--json"]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert '"status": "ok"' in result.stdout
    assert "round observer broke" in result.stderr and "run observer broke" in result.stderr
    assert "Traceback" not in result.output
    assert "method 'fedavg'" not in result.stderr


EDITABLE = """
from fedbench.hookspecs import hookimpl
from fedbench_plugins.fedavg import FedAvg


class Mine(FedAvg):
    name = "mine"


@hookimpl
def fedbench_methods():
    return [Mine]
"""


def test_editing_a_plugin_changes_the_config_hash_and_the_cache_key(tmp_path):
    from fedbench import __version__
    from fedbench.engine.resolve import RunSpec, resolve

    path = plugin(tmp_path, "mine", EDITABLE)
    spec = RunSpec("mine", preset="quick")
    before = resolve(spec, load_registry((path,)))
    path.write_text(EDITABLE + "\n# a changed line\n")
    after = resolve(spec, load_registry((path,)))
    assert before.code["fedbench"] == __version__
    assert before.code["method"] != after.code["method"]
    assert before.code["dataset"] == after.code["dataset"]
    assert before.config_hash != after.config_hash
    assert before.federation_identity(None, "d") != after.federation_identity(None, "d")
    unchanged = resolve(spec, load_registry((path,)))
    assert unchanged.config_hash == after.config_hash


def test_plugin_is_accepted_after_the_subcommand_too(tmp_path):
    from fedbench.cli import hoist_global_options

    path = plugin(tmp_path, "mine", EDITABLE)
    assert hoist_global_options(["run", "--method", "m", "--plugin", "p.py", "--debug"]) == [
        "--plugin",
        "p.py",
        "--debug",
        "run",
        "--method",
        "m",
    ]
    assert hoist_global_options(["show", "--plugin=p.py", "--", "--debug"]) == [
        "--plugin=p.py",
        "show",
        "--",
        "--debug",
    ]
    result = cli.invoke(app, hoist_global_options(["list", "methods", "--plugin", str(path)]))
    assert result.exit_code == 0 and "mine" in result.stdout
