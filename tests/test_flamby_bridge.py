"""The FLamby bridge on a stand-in `flamby` package (tests/fake_flamby): its datasets appear as
flamby-<name> (FLamby's fed_<name> too) without being imported, FLamby's constants are the
preset, one that cannot load says why in one line, and it runs with --json output kept clean."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.engine.registry import load_registry
from fedbench_datasets import flamby_bridge

FAKE = Path(__file__).resolve().parent / "fake_flamby"
MARKER = "fed_licensed/dataset_creation_scripts/license_agreement_fed_licensed"


def forget_flamby() -> dict[str, object]:
    """Drop every loaded flamby module (the real one too, when an earlier test imported it)."""
    names = [n for n in sys.modules if n == "flamby" or n.startswith("flamby.")]
    return {name: sys.modules.pop(name) for name in names}


def use_flamby_at(monkeypatch, root: Path):
    """Put the package under `root` first on sys.path, and bring back what was loaded after."""
    saved = forget_flamby()
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield root / "flamby" / "datasets"
    forget_flamby()
    sys.modules.update(saved)


@pytest.fixture
def flamby(monkeypatch):
    """The stand-in package on sys.path for one test."""
    yield from use_flamby_at(monkeypatch, FAKE)


@pytest.fixture
def flamby_copy(monkeypatch, tmp_path):
    """A writable copy of the stand-in, for tests that record a licence acceptance."""
    shutil.copytree(FAKE, tmp_path / "fake", ignore=shutil.ignore_patterns("__pycache__"))
    yield from use_flamby_at(monkeypatch, tmp_path / "fake")


class HideFlamby:
    """A finder that makes `flamby` unimportable, however it is installed (editable or not)."""

    def find_spec(self, name, path=None, target=None):
        if name == "flamby" or name.startswith("flamby."):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return None


def run_cli(*args: str, tmp_path: Path):
    return CliRunner().invoke(app, ["run", *args, "--results-dir", str(tmp_path / "results")])


def quick(dataset: str, tmp_path: Path, *more: str):
    """A quick fedavg run of `dataset` with --json."""
    args = ("--method", "fedavg", "--dataset", dataset, "--preset", "quick", "--json", *more)
    return run_cli(*args, tmp_path=tmp_path)


def one_error_line(result) -> str:
    """The run failed with a single `error:` line on stderr, nothing on stdout, no traceback."""
    assert result.exit_code != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and "EOFError" not in result.stderr
    return lines[0]


def test_no_flamby_no_datasets(monkeypatch):
    saved = forget_flamby()
    monkeypatch.setattr(sys, "meta_path", [HideFlamby(), *sys.meta_path])
    try:
        assert flamby_bridge.fedbench_datasets() == []
    finally:
        sys.modules.update(saved)


def test_stand_in_datasets_are_listed_without_importing_them(flamby):
    reg = load_registry()
    expected = {"flamby-toy", "flamby-broken", "flamby-incompatible", "flamby-nodata"}
    assert expected <= set(reg.names("datasets"))
    assert "flamby-plain" not in reg.names("datasets")  # a plain module, not a dataset package
    assert not [line for line in reg.failures if "flamby" in line]
    assert not [n for n in sys.modules if n.startswith("flamby.datasets.fed_")]


def test_flambys_own_module_name_is_accepted_too(flamby, tmp_path):
    reg = load_registry()
    assert reg.get("datasets", "fed_toy") is reg.get("datasets", "flamby-toy")
    result = quick("fed_toy", tmp_path)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dataset"] == "flamby-toy"


def test_preset_is_the_published_constants(flamby):
    dataset = load_registry().get("datasets", "flamby-toy")()
    train = dataset.preset("default")["train"]
    # get_nb_max_rounds(100) = (120 // 3 // 4) * 6 // 100 -> at least 1; 6 epochs in all
    assert train == {
        "rounds": 1,
        "local_epochs": 6,
        "batch_size": 4,
        "lr": 0.05,
        "optimizer": "sgd",
    }
    assert dataset.site_names({}) == ["center0", "center1", "center2"]


def test_load_uses_the_fed_class_model_loss_and_metric(flamby, tmp_path):
    dataset = load_registry().get("datasets", "flamby-toy")()
    data = dataset.load(dict(dataset.defaults), 0, tmp_path)
    assert [s.name for s in data.sites] == ["center0", "center1", "center2"]
    for site in data.sites:
        assert len(site.train) + len(site.val) == 40 and len(site.test) == 12
        assert 3 <= len(site.val) <= 5 and site.train.inputs.shape[1:] == (2,)
    model = data.task.build_model({})
    assert type(model).__name__ == "Baseline"
    outputs = model(data.sites[0].test.inputs)
    loss = data.task.loss(outputs, data.sites[0].test.targets)
    assert loss.ndim == 0 and torch.isfinite(loss)
    truth = data.sites[0].test.targets
    scores = data.task.score(truth * 2 - 1, truth, torch.arange(12))
    assert scores == {"flamby_metric": 1.0} and data.task.primary_metric == "flamby_metric"
    again = dataset.load(dict(dataset.defaults), 0, tmp_path)
    np.testing.assert_array_equal(again.sites[1].val.inputs, data.sites[1].val.inputs)


@pytest.mark.parametrize("seed", range(5))
def test_validation_holds_every_label_of_each_centre(flamby, tmp_path, seed):
    """A validation draw without one class leaves a metric such as AUC unscorable."""
    dataset = load_registry().get("datasets", "flamby-toy")()
    for site in dataset.load(dict(dataset.defaults), seed, tmp_path).sites:
        assert set(site.val.targets.ravel().tolist()) == set(site.train.targets.ravel().tolist())


def test_val_fraction_zero_is_no_validation_and_still_runs(flamby, tmp_path):
    dataset = load_registry().get("datasets", "flamby-toy")()
    data = dataset.load({**dataset.defaults, "val_fraction": 0}, 0, tmp_path)
    assert [(len(s.train), len(s.val)) for s in data.sites] == [(40, 0)] * 3
    result = quick("flamby-toy", tmp_path, "--set", "data.val_fraction=0")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "ok"


def test_a_metric_that_fails_on_a_split_scores_nan_with_one_warning(capsys):
    def no_pairs(y_true, y_pred):
        raise ZeroDivisionError("No admissable pairs in the dataset.")

    task = flamby_bridge.WrappedTask(torch.nn.Identity, torch.nn.MSELoss(), no_pairs, "c_index")
    for _ in range(3):
        scores = task.score(torch.zeros(4, 1), torch.zeros(4, 2), torch.arange(4))
        assert np.isnan(scores["c_index"])
    empty = task.score(torch.zeros(0, 1), torch.zeros(0, 2), torch.arange(0))
    assert np.isnan(empty["c_index"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "No admissable pairs" in lines[0] and "nan" in lines[0]


def test_a_dataset_whose_extras_are_missing_names_them(flamby, tmp_path):
    line = one_error_line(quick("flamby-broken", tmp_path))
    assert "'a_package_that_is_not_installed'" in line and "pip install" in line


def test_a_dataset_written_for_another_library_version_says_so(flamby, tmp_path):
    line = one_error_line(quick("flamby-incompatible", tmp_path))
    assert f"incompatible with the installed torch {torch.__version__}" in line
    assert "LayerThatThisTorchDoesNotHave" in line


def test_a_dataset_without_its_data_says_how_to_create_it(flamby, tmp_path):
    line = one_error_line(quick("flamby-nodata", tmp_path))
    assert "python -m flamby.datasets.fed_nodata.dataset_creation_scripts.download" in line


def test_licence_question_without_a_terminal_is_one_line_naming_the_command(flamby_copy, tmp_path):
    line = one_error_line(quick("flamby-licensed", tmp_path))
    assert "fedbench datasets accept-licence flamby-licensed" in line
    assert "https://example.org/terms-of-the-toy-data" in line
    assert not (flamby_copy / MARKER).exists()


def test_accept_licence_records_it_as_flamby_does_and_stdout_stays_json(flamby_copy, tmp_path):
    accepted = CliRunner().invoke(app, ["datasets", "accept-licence", "fed_licensed"])
    assert accepted.exit_code == 0, accepted.output
    assert (flamby_copy / MARKER).is_file() and str(flamby_copy / MARKER) in accepted.stdout
    result = quick("flamby-licensed", tmp_path)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "ok"
    assert "reading the licensed toy data" in result.stderr


def test_accept_licence_refuses_a_dataset_that_asks_none(flamby, tmp_path):
    result = CliRunner().invoke(app, ["datasets", "accept-licence", "flamby-toy"])
    assert result.exit_code != 0 and "asks for no licence" in result.stderr


def test_a_stand_in_dataset_runs_end_to_end(flamby, tmp_path):
    result = quick("flamby-toy", tmp_path)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["status"] == "ok" and record["config"]["train"]["optimizer"] == "sgd"
    inside = {r["site"] for r in record["metrics"] if r["regime"] == "inside"}
    outside = {r["site"] for r in record["metrics"] if r["regime"] == "outside"}
    assert inside - {"pooled"} == outside == {"center0", "center1", "center2"}
    assert {r["metric"] for r in record["metrics"]} == {"flamby_metric"}


def test_a_row_of_numbers_held_as_objects_reaches_torch_as_numbers():
    """Under pandas 2, FLamby's TCGA item `data.iloc[i, 1:40]` is an object Series (the frame
    has a text column, `pid`), and torch.tensor refused it (issue 31, item 8). The row is built
    here as pandas 2 builds it, so the test holds whatever pandas is installed."""
    import pandas as pd

    from fedbench_datasets.flamby_support import pandas_values_for_torch

    row = pd.Series([90, 1, 0, 0.5], dtype=object)
    with pytest.raises(TypeError):
        torch.tensor(row.to_numpy(), dtype=torch.float32)
    with pandas_values_for_torch():
        x = torch.tensor(row, dtype=torch.float32)
    assert torch.equal(x, torch.tensor([90.0, 1.0, 0.0, 0.5]))
    text = pd.Series(["TCGA-01", 3], dtype=object)
    with pandas_values_for_torch(), pytest.raises((TypeError, ValueError)):
        torch.tensor(text, dtype=torch.float32)  # text stays an error, reported by the bridge
