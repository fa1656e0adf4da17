"""FLamby's volumetric datasets through the bridge (issue 26), on the real FLamby's classes and
small files written in their on-disk layouts (tests/flamby_layouts.py): Fed-IXI imports although
MONAI removed AddChannel, Fed-KiTS19's cases are read whole (FLamby's item is a random patch),
both train on patches and are scored on whole volumes."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from flamby_layouts import (
    IXI_CENTRES,
    KITS_PATCH,
    KITS_SPACING,
    ellipsoid,
    flamby_dataset_dir,
    kits_cases,
    write_ixi,
    write_kits,
)
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.engine.registry import load_registry
from fedbench.errors import FedbenchError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("flamby") is None, reason="flamby is not installed"
)
needs_nnunet = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("nnunet", "batchgenerators", "skimage")),
    reason="Fed-KiTS19's extras (nnunet, batchgenerators, scikit-image) are not installed",
)


def dataset(name: str):
    return load_registry().get("datasets", name)()


@pytest.fixture(scope="module")
def ixi(tmp_path_factory):
    root = tmp_path_factory.mktemp("ixi")
    return root, write_ixi(root)


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    """Fed-KiTS19's files, and the config FLamby reads their location from (FedKits19 takes no
    path), written where FLamby looks and removed afterwards; an existing one is put back."""
    base = tmp_path_factory.mktemp("kits")
    write_kits(base)
    config = flamby_dataset_dir("fed_kits19") / "dataset_creation_scripts" / "dataset_location.yaml"
    aside = config.with_name(config.name + ".fedbench-test")
    if aside.exists():  # a run that stopped before putting the user's config back
        aside.replace(config)
    if config.exists():
        config.rename(aside)
    config.write_text(
        f"dataset_path: {base}\ndownload_complete: true\npreprocessing_complete: true\n"
    )
    yield base
    config.unlink(missing_ok=True)
    if aside.exists():
        aside.rename(config)


def test_fed_ixi_imports_with_the_bridges_addchannel_and_monai_is_left_as_it_was():
    import monai.transforms

    from fedbench_datasets.flamby_bridge import import_flamby_module
    from fedbench_datasets.flamby_support import AddChannel

    had = hasattr(monai.transforms, "AddChannel")
    module = import_flamby_module("flamby-ixi", "fed_ixi")
    assert module.FedClass.__name__ == "FedIXITiny"
    assert hasattr(monai.transforms, "AddChannel") == had
    assert AddChannel()(torch.zeros(4, 5, 6)).shape == (1, 4, 5, 6)


def test_ixi_centres_are_flambys_splits_as_whole_volumes(ixi, tmp_path):
    root, patients = ixi
    data = dataset("flamby-ixi").load(
        {**dataset("flamby-ixi").defaults, "path": str(root)}, 0, tmp_path
    )
    assert [s.name for s in data.sites] == list(IXI_CENTRES)
    expected = torch.from_numpy(ellipsoid((48, 60, 48), (14 * 1.2, 18 * 1.2, 14 * 1.2)))
    for site in data.sites:
        assert len(site.train) + len(site.val) == 3 and len(site.val) == 1 and len(site.test) == 2
        assert site.test.inputs.shape[1:] == (1, 48, 60, 48)  # FLamby's resize, whole
        assert abs(float(site.test.inputs.mean())) < 1e-4  # FLamby's NormalizeIntensity
        for label in site.test.targets:  # the ellipsoid, through FLamby's resize
            overlap = (label.bool() & expected.bool()).sum()
            assert 2 * overlap / (label.bool().sum() + expected.sum()) > 0.9
    task = data.task
    assert task.patch == (32, 32, 32) and task.class_names == ["brain"]
    assert task.hd95_unit == "voxel"  # FLamby resizes each head: no one voxel size


def test_ixi_baseline_as_log_probabilities_predicts_what_flambys_softmax_does(ixi, tmp_path):
    root, _ = ixi
    data = dataset("flamby-ixi").load(
        {**dataset("flamby-ixi").defaults, "path": str(root)}, 0, tmp_path
    )
    torch.manual_seed(0)
    wrapped = data.task.build_model({}).eval()
    x = data.sites[0].test.inputs[:1, :, :32, :32, :32]
    with torch.no_grad():
        probabilities = wrapped.net(x)
        logits = wrapped(x)
    torch.testing.assert_close(logits.softmax(1), probabilities, atol=1e-6, rtol=1e-5)


@needs_nnunet
def test_kits_cases_are_read_whole_padded_to_the_largest_on_nnunets_spacing(kits, tmp_path):
    data = dataset("flamby-kits19").load(dict(dataset("flamby-kits19").defaults), 0, tmp_path)
    table = kits_cases()
    assert [s.name for s in data.sites] == [f"center{i}" for i in range(6)]
    for i, site in enumerate(data.sites):
        n_train = (table["train_test_split_silo"] == f"train_{i}").sum()
        n_test = (table["train_test_split_silo"] == f"test_{i}").sum()
        assert (len(site.train) + len(site.val), len(site.test)) == (n_train, n_test)
        assert site.test.inputs.shape[2:] == (20, 44, 40)  # the largest extent on each axis
        assert set(site.test.targets.unique().tolist()) == {0, 1, 2}  # -1 is background
    task = data.task
    assert task.spacing == KITS_SPACING and task.hd95_unit == "mm"
    assert task.patch == KITS_PATCH and task.class_names == ["kidney", "tumour"]


@needs_nnunet
def test_kits_refuses_a_data_path_in_one_line(kits, tmp_path):
    with pytest.raises(FedbenchError, match="takes no data path"):
        dataset("flamby-kits19").load(
            {**dataset("flamby-kits19").defaults, "path": str(kits)}, 0, tmp_path
        )


def run(tmp_path, *args: str):
    result = CliRunner().invoke(
        app, ["run", "--json", "--preset", "quick", "--results-dir", str(tmp_path), *args]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def final_scores(record: dict, regime: str, metric: str) -> dict[str, float]:
    return {
        r["site"]: r["value"]
        for r in record["metrics"]
        if r["regime"] == regime and r["selection"] == "final" and r["metric"] == metric
    }


def test_ixi_runs_inside_and_outside_on_whole_volumes(ixi, tmp_path):
    root, _ = ixi
    args = ["--method", "iopfl", "--dataset", "flamby-ixi", "--set", f"data.path={root}"]
    record = run(tmp_path, *args, "--holdout", "HH")
    assert record["status"] == "ok" and record["config"]["model"]["name"] == "unet3d"
    inside, outside = (
        final_scores(record, "inside", "dice"),
        final_scores(record, "outside", "dice"),
    )
    assert {"Guys", "IOP"} <= set(inside) and "HH" in outside
    assert all(math.isfinite(v) for v in [*inside.values(), *outside.values()])


@needs_nnunet
def test_kits_runs_with_hd95_in_mm(kits, tmp_path):
    record = run(tmp_path, "--method", "fedavg", "--dataset", "flamby-kits19", "--holdout", "none")
    assert record["status"] == "ok"
    hd95 = final_scores(record, "inside", "hd95")
    assert set(hd95) >= {f"center{i}" for i in range(6)}
    assert np.isfinite(list(hd95.values())).any()
