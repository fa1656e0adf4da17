"""Plugins: entry points (built-ins included), --plugin files, and broken plugins reported."""

import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest

from fedbench.engine import registry as registry_module
from fedbench.engine.registry import load_registry
from fedbench.errors import FedbenchError

PLUGIN = """
from fedbench.hookspecs import hookimpl
from fedbench_plugins.fedavg import FedAvg

class MyMethod(FedAvg):
    name = "my-method"
    description = "a third-party method"

@hookimpl
def fedbench_methods():
    return [MyMethod]
"""


def test_builtins_come_through_the_entry_point_group():
    reg = load_registry()
    assert {"fedavg", "fedprox", "fedbn", "local", "central", "iopfl"} <= set(reg.names("methods"))
    assert {"none", "bn-adapt", "tent", "ensemble"} <= set(reg.names("adapters"))
    plugin_names = {name for name, _ in reg.manager.list_name_plugin()}
    assert "fedavg" in plugin_names


def test_plugin_file_adds_a_method(tmp_path):
    path = tmp_path / "my_plugin.py"
    path.write_text(PLUGIN)
    reg = load_registry((path,))
    assert reg.get("methods", "my-method").description == "a third-party method"


def test_plugin_file_that_does_not_import_is_one_error(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import does_not_exist_anywhere\n")
    with pytest.raises(FedbenchError, match="broken.py failed to import: ModuleNotFoundError"):
        load_registry((path,))


def test_plugin_class_missing_required_method_is_reported(tmp_path):
    path = tmp_path / "bad_class.py"
    path.write_text(
        "from fedbench.hookspecs import hookimpl\n"
        "class NotAMethod:\n    name = 'not-a-method'\n"
        "@hookimpl\ndef fedbench_methods():\n    return [NotAMethod]\n"
    )
    reg = load_registry((path,))
    assert "not-a-method" not in reg.names("methods")
    assert any("must subclass fedbench.method.Method" in line for line in reg.failures)


def test_broken_entry_point_is_reported_by_name_and_others_load(monkeypatch):
    real = registry_module.entry_points

    def with_broken(group):
        broken = EntryPoint("broken-plugin", "no_such_module_xyz", "fedbench")
        return [*real(group=group), broken]

    monkeypatch.setattr(registry_module, "entry_points", with_broken)
    reg = load_registry()
    assert any(line.startswith("plugin 'broken-plugin' failed to import") for line in reg.failures)
    assert "fedavg" in reg.names("methods")


def test_unknown_name_lists_known_ones():
    with pytest.raises(FedbenchError, match=r"unknown method 'nope'; known: .*fedavg"):
        load_registry().get("methods", "nope")


def test_listing_plugins_imports_no_heavy_library():
    """`fedbench list` and `--help` must answer at once: torch, MONAI, SciPy and pandas load only
    when a run needs them (importing torch and MONAI alone takes about 2 s)."""
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from fedbench.cli import app\n"
        "for kind in ('methods', 'adapters', 'datasets'):\n"
        "    assert CliRunner().invoke(app, ['list', kind]).exit_code == 0\n"
        "print(sorted(m for m in ('torch', 'monai', 'scipy', 'pandas', 'matplotlib') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
