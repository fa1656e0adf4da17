"""The command line end to end on the embedded dataset (quick preset), and its bad-input contract:
one line naming the problem, a non-zero exit, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.engine import federations

QUICK = ["--preset", "quick", "--set", "train.rounds=1"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def run_json(results: Path, *args: str) -> dict:
    result = invoke("run", *QUICK, "--results-dir", str(results), "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_run_json_prints_exactly_the_written_record(tmp_path):
    record = run_json(tmp_path, "--method", "fedbn", "--holdout", "RUNMC,HK")
    written = json.loads((tmp_path / "runs" / f"{record['run_id']}.json").read_text())
    assert written == record
    assert record["status"] == "ok" and record["schema_version"] == 1
    assert record["adapter"] == "bn-adapt" and record["holdouts"] == ["RUNMC", "HK"]
    inside = {r["site"] for r in record["metrics"] if r["regime"] == "inside"}
    assert inside == {"RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK"}
    outside = [r for r in record["metrics"] if r["regime"] == "outside" and r["metric"] == "dice"]
    assert {(r["site"], r["holdout"]) for r in outside} == {("RUNMC", "RUNMC"), ("HK", "HK")}
    assert all(0.0 <= r["value"] <= 1.0 for r in outside)
    assert record["cost"]["bytes_up"] > 0 and record["cost"]["client_steps"] > 0
    assert record["history"]["inside"][0]["round"] == 1


def test_same_seed_same_metrics_bit_for_bit(tmp_path):
    a = run_json(tmp_path / "a", "--method", "fedavg", "--holdout", "BMC")
    b = run_json(tmp_path / "b", "--method", "fedavg", "--holdout", "BMC")
    assert a["metrics"] == b["metrics"] and a["config_hash"] == b["config_hash"]
    c = run_json(tmp_path / "c", "--method", "fedavg", "--holdout", "BMC", "--seed", "1")
    assert c["metrics"] != a["metrics"]


def test_second_adapter_reuses_cached_federations(tmp_path, monkeypatch):
    first = run_json(tmp_path, "--method", "fedavg", "--holdout", "UCL")

    def no_training(*args, **kwargs):
        raise AssertionError("a cached federation was trained again")

    monkeypatch.setattr(federations, "train_federation", no_training)
    second = run_json(tmp_path, "--method", "fedavg", "--holdout", "UCL", "--adapter", "ensemble")
    assert second["adapter"] == "ensemble"
    inside = [r for r in first["metrics"] if r["regime"] == "inside"]
    assert inside == [r for r in second["metrics"] if r["regime"] == "inside"]
    assert second["cost"]["bytes_up"] == first["cost"]["bytes_up"]


def test_cached_federations_load_weights_only(tmp_path, monkeypatch):
    run_json(tmp_path, "--method", "local", "--holdout", "none")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    run_json(tmp_path, "--method", "local", "--holdout", "none")
    assert calls == [True]


def test_holdout_none_runs_inside_only(tmp_path):
    record = run_json(tmp_path, "--method", "central", "--holdout", "none")
    assert record["adapter"] is None
    assert {r["regime"] for r in record["metrics"]} == {"inside"}
    assert record["cost"]["bytes_up"] == 0


def test_plugin_file_method_runs(tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        "from fedbench.hookspecs import hookimpl\n"
        "from fedbench_plugins.fedavg import FedAvg\n"
        "class Mine(FedAvg):\n    name = 'mine'\n    description = 'mine'\n"
        "@hookimpl\ndef fedbench_methods():\n    return [Mine]\n"
    )
    result = invoke(
        "--plugin",
        str(plugin),
        "run",
        *QUICK,
        "--method",
        "mine",
        "--holdout",
        "none",
        "--results-dir",
        str(tmp_path / "r"),
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["method"] == "mine"


def test_list_methods_json():
    result = invoke("list", "methods", "--json")
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["iopfl"]["default_adapter"] == "iopfl-routing"
    assert rows["local"]["default_adapter"] == "ensemble"


def test_run_table_on_terminal_output(tmp_path):
    result = invoke(
        "run", *QUICK, "--method", "fedavg", "--holdout", "HK", "--results-dir", str(tmp_path)
    )
    assert result.exit_code == 0, result.output
    assert "inside dice" in result.stdout and "HK" in result.stdout and "status ok" in result.stdout


BAD_INPUT = [
    (["--method", "nope"], "unknown method 'nope'; known: apfl, central, "),
    (["--method", "fedavg", "--adapter", "nope"], "unknown adapter 'nope'; known:"),
    (["--method", "fedavg", "--dataset", "nope"], "unknown dataset 'nope'; known:"),
    (["--method", "fedavg", "--holdout", "MARS"], "unknown site 'MARS'; known: BIDMC, BMC"),
    (["--method", "fedavg", "--set", "train.rounds"], "malformed --set 'train.rounds'"),
    (["--method", "fedavg", "--set", "train.nope=3"], "unknown setting 'train.nope'"),
    (["--method", "fedavg", "--set", "train.lr=fast"], "setting train.lr expects a number"),
    (
        ["--method", "fedavg", "--rounds", "0"],
        "setting train.rounds must be a positive finite number",
    ),
    (
        ["--method", "fedavg", "--rounds", "-3"],
        "setting train.rounds must be a positive finite number",
    ),
    (
        ["--method", "fedavg", "--set", "train.batch_size=0"],
        "setting train.batch_size must be a positive finite number",
    ),
    (
        ["--method", "fedavg", "--set", "train.lr=-0.1"],
        "setting train.lr must be a positive finite number",
    ),
    (["--method", "fedavg", "--set", "train.rounds=2.5"], "setting train.rounds expects"),
    (["--method", "fedavg", "--preset", "huge"], "unknown preset 'huge'"),
    (["--method", "local", "--adapter", "none"], "adapter 'none' needs a global model"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    result = invoke("run", "--preset", "quick", "--results-dir", str(tmp_path), *args)
    assert result.exit_code != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not list((tmp_path / "runs").glob("*.json")) if (tmp_path / "runs").exists() else True


def test_results_folder_that_is_a_file(tmp_path):
    target = tmp_path / "results"
    target.write_text("keep me")
    result = invoke("run", *QUICK, "--method", "fedavg", "--results-dir", str(target))
    assert result.exit_code != 0 and "is a file, not a folder" in result.stderr
    assert target.read_text() == "keep me"


def test_results_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = invoke("run", *QUICK, "--method", "fedavg", "--results-dir", str(blocker / "sub"))
    assert result.exit_code != 0 and "not writable" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tmp_path):
    result = invoke(
        "run", *QUICK, "--method", "fedavg", "--device", "cuda", "--results-dir", str(tmp_path)
    )
    assert result.exit_code != 0 and "CUDA is not available" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = invoke("--debug", "run", "--method", "nope", "--results-dir", str(tmp_path))
    assert result.exit_code != 0 and result.exception is not None


def test_show_draws_the_runs_predictions(tmp_path):
    from PIL import Image

    record = run_json(tmp_path, "--method", "fedavg", "--holdout", "HK")
    out = tmp_path / "show.png"
    result = invoke("show", record["run_id"], "--out", str(out), "--results-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        width, height = image.size
    assert height > width > 200, "six site rows, inside and outside columns"
    missing = invoke("show", "no-such-run", "--out", str(out), "--results-dir", str(tmp_path))
    assert missing.exit_code != 0 and "not found" in missing.stderr


def test_observer_hooks_see_every_round_and_the_written_record(tmp_path, monkeypatch):
    plugin = tmp_path / "observer.py"
    plugin.write_text(
        "import json, os, pathlib\n"
        "from fedbench.hookspecs import hookimpl\n"
        "LOG = pathlib.Path(os.environ['OBSERVER_LOG'])\n"
        "def log(*row):\n"
        "    with LOG.open('a') as f:\n"
        "        f.write(json.dumps(row) + '\\n')\n"
        "@hookimpl\n"
        "def fedbench_round_end(run_id, holdout, round, metrics):\n"
        "    log('round', holdout, round)\n"
        "@hookimpl\n"
        "def fedbench_run_end(record):\n"
        "    runs = pathlib.Path(os.environ['OBSERVER_RESULTS']) / 'runs'\n"
        "    log('end', record['status'], (runs / (record['run_id'] + '.json')).is_file())\n"
    )
    log, results = tmp_path / "observer.log", tmp_path / "results"
    monkeypatch.setenv("OBSERVER_LOG", str(log))
    monkeypatch.setenv("OBSERVER_RESULTS", str(results))
    args = ["run", "--preset", "quick", "--set", "train.rounds=2", "--method", "fedavg"]
    result = invoke(
        "--plugin", str(plugin), *args, "--holdout", "HK", "--results-dir", str(results)
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert rows == [
        ["round", None, 1],
        ["round", None, 2],
        ["round", "HK", 1],
        ["round", "HK", 2],
        ["end", "ok", True],
    ]
