"""Fed-TCGA-BRCA: the Cox loss against hand-computed values, the C-index against a brute-force
pairwise count, FLamby's split and constants, and runs end to end on the CSV files in ../shared."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import SHARED
from typer.testing import CliRunner

from fedbench.adapter import AdaptContext, TrainedFederation
from fedbench.cli import app
from fedbench.data import UnlabeledImages
from fedbench.engine.registry import load_registry
from fedbench.errors import FedbenchError
from fedbench_datasets.fed_tcga_brca import (
    CENTRES,
    NUM_FEATURES,
    FedTcgaBrca,
    SurvivalTask,
    c_index,
    carve_val,
    cox_loss,
    nb_max_rounds,
)

TCGA = SHARED / "data" / "flamby" / "fed_tcga_brca"
# FLamby's train/test patients per centre (reference table)
FLAMBY_SIZES = [(248, 63), (156, 40), (164, 42), (129, 33), (129, 33), (40, 11)]


@pytest.fixture(scope="module")
def tcga():
    if not TCGA.is_dir():
        pytest.skip("../shared/data/flamby/fed_tcga_brca is not present")
    return TCGA


def brute_c_index(time, event, risk) -> float:
    """Harrell's C by counting every ordered pair."""
    concordant = comparable = 0.0
    for i, j in itertools.permutations(range(len(time)), 2):
        later = time[j] > time[i] or (time[j] == time[i] and event[j] == 0)
        if event[i] == 1 and later:
            comparable += 1
            concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / comparable if comparable else float("nan")


def test_cox_loss_matches_hand_computed_values():
    zero = torch.zeros(3)
    times, events = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 0.0])
    # risk sets {1,2,3} and {2,3}, all risks 0: -(1/2) * [(0 - ln 3) + (0 - ln 2)]
    assert float(cox_loss(zero, events, times)) == pytest.approx(math.log(6) / 2)
    # Breslow ties: both events at time 2 share the risk set {1, 2, 3}
    risk = torch.tensor([1.0, 0.0, 0.0])
    tied = torch.tensor([2.0, 2.0, 3.0])
    expected = math.log(math.e + 2) - 0.5
    assert float(cox_loss(risk, events, tied)) == pytest.approx(expected)
    # the order of the samples does not matter
    perm = torch.tensor([2, 0, 1])
    assert float(cox_loss(risk[perm], events[perm], tied[perm])) == pytest.approx(expected)


def test_cox_loss_is_stable_and_zero_without_events():
    risk = torch.tensor([800.0, -800.0, 5.0], requires_grad=True)
    loss = cox_loss(risk, torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.0, 2.0, 3.0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(risk.grad).all()
    none = cox_loss(risk, torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]))
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_c_index_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 30))
        time = rng.integers(1, 8, n).astype(float)  # many tied times
        event = rng.integers(0, 2, n)
        risk = rng.integers(0, 4, n).astype(float)  # many tied risks
        expected = brute_c_index(time, event, risk)
        got = c_index(time, event, risk)
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_c_index_extremes():
    time, event = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1, 1, 1, 0])
    assert c_index(time, event, -time) == 1.0  # higher risk, earlier event
    assert c_index(time, event, time) == 0.0
    assert math.isnan(c_index(time, np.zeros(4), time))  # no comparable pair


def test_survival_task_scores_c_index_from_risk_outputs():
    task = SurvivalTask(3)
    targets = torch.tensor([[1.0, 1.0], [1.0, 2.0], [0.0, 3.0]])
    assert task.score(torch.tensor([[3.0], [2.0], [1.0]]), targets, torch.arange(3)) == {
        "c_index": 1.0
    }
    assert task.primary_metric == "c_index" and not task.dense_prediction
    assert isinstance(task.build_model({}), torch.nn.Linear)


def test_preset_is_flambys_constants():
    assert nb_max_rounds(100) == 5  # (866 // 6 // 8) * 30 // 100
    train = FedTcgaBrca().preset("default")["train"]
    assert train == {
        "rounds": 5,
        "local_epochs": 6,
        "batch_size": 8,
        "lr": 0.1,
        "optimizer": "adam",
    }
    assert train["rounds"] * train["local_epochs"] == 30  # NUM_EPOCHS_POOLED


def test_val_carve_is_stratified_and_fixed_by_seed():
    events = np.array([1, 0] * 5 + [0] * 30)
    val = carve_val(events, 0.1, np.random.default_rng([0, 1]))
    assert val.sum() == 4 and events[val].sum() == 1
    np.testing.assert_array_equal(val, carve_val(events, 0.1, np.random.default_rng([0, 1])))
    assert carve_val(events, 0.0, np.random.default_rng(0)).sum() == 0


def test_flamby_split_with_val_carved_by_patient(tcga, tmp_path):
    data = FedTcgaBrca().load({"path": str(tcga), "val_fraction": 0.1}, 0, tmp_path)
    assert [s.name for s in data.sites] == list(CENTRES)
    for site, (n_train, n_test) in zip(data.sites, FLAMBY_SIZES, strict=True):
        assert len(site.train) + len(site.val) == n_train and len(site.test) == n_test
        assert site.train.inputs.shape[1] == 39 and site.val.targets[:, 0].sum() >= 1
    (split_file,) = tmp_path.rglob("seed0-val0.1.json")
    for centre, split in json.loads(split_file.read_text())["sites"].items():
        train, val, test = (set(split[k]) for k in ("train", "val", "test"))
        assert not train & val and not train & test and not val & test, centre
    assert len(split["val"]) == 4  # Canada: 10 % of 40 patients
    whole = FedTcgaBrca().load({"path": str(tcga), "val_fraction": 0.0}, 0, tmp_path)
    assert len(whole.sites[0].train) == 248 and len(whole.sites[0].val) == 248


def test_missing_csv_is_one_error(tmp_path):
    (tmp_path / "brca.csv").write_text("pid\n")
    with pytest.raises(FedbenchError, match="train_test_split.csv: missing"):
        FedTcgaBrca().load({"path": str(tmp_path), "val_fraction": 0.1}, 0, tmp_path)


def run_json(tmp_path, *args: str) -> dict:
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--dataset",
            "fed-tcga-brca",
            "--set",
            f"data.path={TCGA}",
            "--preset",
            "quick",
            "--results-dir",
            str(tmp_path),
            "--json",
            *args,
        ],
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_fedavg_reports_c_index_per_centre_inside_and_outside(tcga, tmp_path):
    record = run_json(tmp_path, "--method", "fedavg", "--holdout", "Canada,Europe")
    assert record["status"] == "ok" and record["adapter"] == "none"
    assert record["config"]["train"]["lr"] == 0.1 and record["config"]["train"]["batch_size"] == 8
    rows = {(r["regime"], r["site"]): r["value"] for r in record["metrics"]}
    assert {r["metric"] for r in record["metrics"]} == {"c_index"}
    # each centre, and FLamby's headline figure: all centres' test sets pooled
    assert {s for regime, s in rows if regime == "inside"} == {*CENTRES, "pooled"}
    assert {s for regime, s in rows if regime == "outside"} == {"Canada", "Europe"}
    assert all(0.0 <= v <= 1.0 for v in rows.values())


def test_dense_only_adapters_refuse_the_survival_task(tcga, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--method",
            "fedavg",
            "--adapter",
            "tent",
            "--dataset",
            "fed-tcga-brca",
            "--set",
            f"data.path={TCGA}",
            "--preset",
            "quick",
            "--results-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code != 0 and "segmentation tasks only" in result.stderr


def test_local_centres_predict_an_unseen_centre_as_an_ensemble(tcga, tmp_path):
    record = run_json(tmp_path, "--method", "local", "--holdout", "Canada")
    assert record["status"] == "ok" and record["adapter"] == "ensemble"
    (outside,) = [r for r in record["metrics"] if r["regime"] == "outside"]
    assert outside["site"] == "Canada" and 0.0 <= outside["value"] <= 1.0


def test_the_ensemble_of_survival_models_is_their_mean_risk():
    task = SurvivalTask(NUM_FEATURES)
    federation = TrainedFederation(
        build_model=lambda: task.build_model({}),
        global_state=None,
        personalized=[task.build_model({}).state_dict() for _ in range(3)],
        site_names=["a", "b", "c"],
        device=torch.device("cpu"),
    )
    x = torch.randn(10, NUM_FEATURES)
    risks = [federation.model(state)(x) for state in federation.personalized]
    ensemble = load_registry().get("adapters", "ensemble")({})
    mean = ensemble.predict(federation, UnlabeledImages(x), AdaptContext(4, 0, task))
    torch.testing.assert_close(mean, torch.stack(risks).mean(0).detach())
