"""The FLamby bridge on the real FLamby (installed from a copy of ../shared/vendor/FLamby, as CI
does): every dataset listed without importing FLamby, Fed-TCGA-BRCA named and scored as the
built-in fed-tcga-brca and run with the defaults on seeds 0-4, its licence question answered
without a terminal, and one line for each dataset that cannot load."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.engine.registry import load_registry
from fedbench_datasets.fed_tcga_brca import CENTRES
from fedbench_datasets.flamby_support import carve_val, label_strata

VENDOR = SHARED / "vendor" / "FLamby"
pytestmark = [
    pytest.mark.slow,  # behind the slow marker: CI runs it, the quick loop does not
    pytest.mark.skipif(
        not VENDOR.is_dir() or importlib.util.find_spec("flamby") is None,
        reason="../shared/vendor/FLamby is absent or flamby is not installed",
    ),
]
TCGA = "flamby-tcga-brca"


def flamby_datasets_dir() -> Path:
    """Where FLamby looks for its own files (its accept_license and configs use this)."""
    import flamby.datasets

    return Path(os.path.realpath(flamby.datasets.__file__)).parent


def licence_file() -> Path:
    """The marker FLamby's accept_license checks and writes for Fed-TCGA-BRCA."""
    scripts = flamby_datasets_dir() / "fed_tcga_brca" / "dataset_creation_scripts"
    return scripts / "license_agreement_fed_tcga_brca"


@pytest.fixture(scope="module")
def accepted():
    """Fed-TCGA-BRCA's terms accepted for this module's tests, as they were found afterwards."""
    marker = licence_file()
    found = marker.exists()
    if not found:
        result = CliRunner().invoke(app, ["datasets", "accept-licence", TCGA])
        assert result.exit_code == 0, result.output
    yield
    if not found:
        marker.unlink(missing_ok=True)


@pytest.fixture
def not_accepted():
    """Fed-TCGA-BRCA's terms not accepted for one test; an existing acceptance is put back."""
    marker = licence_file()
    aside = marker.with_name(marker.name + ".fedbench-test")
    if marker.exists():
        marker.rename(aside)
    yield marker
    marker.unlink(missing_ok=True)
    if aside.exists():
        aside.rename(marker)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def run(dataset: str, tmp_path: Path, *more: str):
    """fedbench run of fedavg on `dataset` with --json (FLamby's defaults unless `more`)."""
    args = ("run", "--method", "fedavg", "--dataset", dataset, "--json", *more)
    return invoke(*args, "--results-dir", str(tmp_path / "results"))


def one_error_line(result) -> str:
    """The command failed with a single `error:` line on stderr and nothing on stdout."""
    assert result.exit_code != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and "EOFError" not in result.stderr
    return lines[0]


def test_every_flamby_dataset_is_listed_and_none_of_them_imported():
    probe = (
        "import json, sys\n"
        "from fedbench.engine.registry import load_registry\n"
        "names = load_registry().names('datasets')\n"
        "loaded = [n for n in sys.modules if n.startswith('flamby.datasets.') or n == 'torch']\n"
        "print(json.dumps([names, loaded]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    names, loaded = json.loads(out.stdout)
    packages = [p.parent.name for p in flamby_datasets_dir().glob("fed_*/__init__.py")]
    wanted = {"flamby-" + p[4:].replace("_", "-") for p in packages} | {TCGA}
    assert wanted <= set(names) and "flamby-ixi" in names and "flamby-isic2019" in names
    assert "flamby-dummy-dataset" not in names  # fed_dummy_dataset.py is no dataset package
    assert loaded == []


def test_tcga_is_named_as_flamby_calls_it_and_shares_the_built_in_names(accepted, tmp_path):
    reg = load_registry()
    assert reg.get("datasets", "fed_tcga_brca") is reg.get("datasets", TCGA)
    dataset = reg.get("datasets", TCGA)()
    assert dataset.site_names({}) == list(CENTRES)
    data = dataset.load(dict(dataset.defaults), 0, tmp_path)
    assert [s.name for s in data.sites] == list(CENTRES)
    assert data.task.primary_metric == "c_index"


def test_validation_keeps_an_event_in_every_centre_on_each_seed(accepted, tmp_path):
    """Without an event among a centre's validation patients its C-index has no pair to rank."""
    dataset = load_registry().get("datasets", TCGA)()
    sites = dataset.load(dict(dataset.defaults), 0, tmp_path).sites
    for site in sites:
        assert site.val.targets[:, 0].sum() >= 1 and site.train.targets[:, 0].sum() >= 1
    for seed, (i, site) in itertools.product(range(1, 5), enumerate(sites)):  # no reload
        targets = torch.cat([site.train.targets, site.val.targets])
        rng = np.random.default_rng([seed, i])
        val = torch.from_numpy(carve_val(label_strata(targets), len(targets), 0.1, rng))
        assert targets[val, 0].sum() >= 1 and targets[~val, 0].sum() >= 1, (seed, site.name)


@pytest.mark.parametrize("seed", range(5))
def test_a_tcga_run_prints_one_json_record_on_each_seed(accepted, tmp_path, seed):
    """Quick and without held-out sites to stay fast (a full default run takes minutes here,
    FLamby's Cox loss being a Python loop); validation runs each round as by default."""
    result = run(TCGA, tmp_path, "--seed", str(seed), "--preset", "quick", "--holdout", "none")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["status"] == "ok" and record["dataset"] == TCGA
    final = [r for r in record["metrics"] if r["regime"] == "inside" and r["selection"] == "final"]
    scored = {r["site"]: r["value"] for r in final if r["metric"] == "c_index"}
    assert set(CENTRES) <= set(scored) and np.isfinite(scored["Northeast"])
    history = record["history"]["inside"]
    assert [sorted(h["val"]) for h in history] == [sorted(CENTRES)] * 2


def test_val_fraction_zero_runs_without_validation(accepted, tmp_path):
    result = run(
        TCGA, tmp_path, "--preset", "quick", "--holdout", "none", "--set", "data.val_fraction=0"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "ok"


def test_without_acceptance_nor_terminal_one_line_names_the_command(not_accepted, tmp_path):
    line = one_error_line(run(TCGA, tmp_path, "--preset", "quick"))
    assert f"fedbench datasets accept-licence {TCGA}" in line
    assert "https://gdc.cancer.gov/" in line
    assert not not_accepted.exists()


def test_accept_licence_records_it_where_flamby_looks(not_accepted, monkeypatch):
    result = invoke("datasets", "accept-licence", "fed_tcga_brca")
    assert result.exit_code == 0, result.output
    assert not_accepted.is_file() and str(not_accepted) in result.stdout
    from flamby.utils import accept_license

    def no_question(prompt=""):
        raise AssertionError(f"FLamby asked again: {prompt}")

    monkeypatch.setattr("builtins.input", no_question)
    accept_license("https://gdc.cancer.gov/", "fed_tcga_brca")  # returns without asking


@pytest.mark.parametrize(
    ("dataset", "package"), [("flamby-isic2019", "albumentations"), ("flamby-kits19", None)]
)
def test_a_dataset_whose_extras_are_missing_names_them(tmp_path, dataset, package):
    module = "flamby.datasets.fed_" + dataset.removeprefix("flamby-")
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name.partition(".")[0]
    else:
        pytest.skip(f"{module} imports here")
    if package is not None and package != missing:
        pytest.skip(f"{module} misses {missing} first")
    line = one_error_line(run(dataset, tmp_path, "--preset", "quick"))
    assert f"'{missing}'" in line and "pip install" in line


def test_fed_ixi_imports_despite_monai_and_without_its_data_says_where_to_look(tmp_path):
    """FLamby's fed_ixi imports AddChannel, which MONAI 1.3 removed: the bridge supplies it, so
    what remains without the data is FLamby's own word on downloading it."""
    config = flamby_datasets_dir() / "fed_ixi" / "dataset_creation_scripts"
    if (config / "dataset_location.yaml").exists():
        pytest.skip("fed_ixi's data has been downloaded here")
    line = one_error_line(run("flamby-ixi", tmp_path, "--preset", "quick"))
    assert "fed_ixi was not downloaded" in line and "incompatible" not in line


def test_fed_synthetic_without_its_data_says_how_to_generate_it(tmp_path):
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn (which fed_synthetic imports) is not installed")
    config = flamby_datasets_dir() / "fed_synthetic" / "dataset_creation_scripts"
    if (config / "dataset_location.yaml").exists():
        pytest.skip("fed_synthetic's data has been generated here")
    line = one_error_line(run("flamby-synthetic", tmp_path, "--preset", "quick"))
    assert "python -m flamby.datasets.fed_synthetic.dataset_creation_scripts.download" in line
