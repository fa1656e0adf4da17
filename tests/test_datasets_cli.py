"""`fedbench datasets list|prepare|verify|show`, and the real prostate samples run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_real_data import PROSTATE, make_slice_source, samples  # noqa: F401 (fixture)
from typer.testing import CliRunner

from fedbench.cli import app

SITES3 = ["--set", "data.sites=RUNMC,BMC,HK", "--set", "data.size=32"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_list_names_the_datasets_and_what_can_be_prepared():
    result = invoke("datasets", "list", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert {"prostate", "fundus", "fed-tcga-brca", "synth-prostate"} <= set(rows)
    assert rows["prostate"]["prepare"] and rows["fundus"]["prepare"]
    assert not rows["fed-tcga-brca"]["prepare"] and "path" in rows["prostate"]["settings"]


def test_prepare_then_verify_round_trip(tmp_path):
    source = make_slice_source(tmp_path / "raw", sites=("RUNMC", "BMC", "HK"))
    out = tmp_path / ("prepared-" + "x" * 80)  # a path wider than the console stays on one line
    result = invoke(
        "datasets", "prepare", "prostate", "--source", str(source), "--out", str(out), *SITES3
    )
    assert result.exit_code == 0, result.output
    assert "RUNMC 9, BMC 9, HK 9" in result.stdout and (out / "manifest.json").is_file()
    result = invoke("datasets", "verify", "prostate", "--dir", str(out))
    assert result.exit_code == 0 and f"ok: {out}" in result.stdout


def test_verify_reports_a_tampered_file_by_its_path(tmp_path):
    source = make_slice_source(tmp_path / "raw", sites=("RUNMC", "BMC", "HK"))
    out = tmp_path / "prepared"
    invoke("datasets", "prepare", "prostate", "--source", str(source), "--out", str(out), *SITES3)
    with np.load(out / "BMC.npz") as npz:
        arrays = dict(npz)
    arrays["mask"][0, 0, 0] = 1 - arrays["mask"][0, 0, 0]
    np.savez(out / "BMC.npz", **arrays)
    result = invoke("datasets", "verify", "prostate", "--dir", str(out))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out / 'BMC.npz'}: sha256")


def test_prepare_reports_bad_raw_files_by_path_and_writes_nothing(tmp_path):
    source = make_slice_source(tmp_path / "raw", sites=("RUNMC", "BMC", "HK"))
    bad = source / "HK" / "test" / "mask" / "00_01.png"
    Image.fromarray(np.full((32, 32), 100, dtype=np.uint8)).save(bad)
    out = tmp_path / "prepared"
    result = invoke(
        "datasets", "prepare", "prostate", "--source", str(source), "--out", str(out), *SITES3
    )
    assert result.exit_code == 1 and result.stderr.startswith(f"error: {bad}: mask is not binary")
    assert not out.exists()


def test_prepare_default_location_is_where_runs_look(tmp_path):
    source = make_slice_source(tmp_path / "raw", sites=("RUNMC", "BMC", "HK"))
    results = tmp_path / "results"
    result = invoke(
        "datasets",
        "prepare",
        "prostate",
        "--source",
        str(source),
        "--results-dir",
        str(results),
        *SITES3,
    )
    assert result.exit_code == 0, result.output
    (folder,) = (results / "cache" / "datasets").glob("prostate-*")
    assert invoke("datasets", "verify", "prostate", "--results-dir", str(results)).exit_code == 0
    from fedbench_datasets.prostate import Prostate

    cfg = {**Prostate.defaults, "path": str(source), "size": 32, "sites": ["RUNMC", "BMC", "HK"]}
    assert Prostate().prepared_dir(cfg, results / "cache") == folder


def test_bad_input_is_one_line(tmp_path):
    cases = [
        (("datasets", "prepare", "nope", "--source", str(tmp_path)), "unknown dataset 'nope'"),
        (("datasets", "prepare", "prostate", "--source", str(tmp_path / "x")), "not a folder"),
        (("datasets", "prepare", "synth-prostate", "--source", str(tmp_path)), "no prepared form"),
        (("datasets", "verify", "prostate", "--results-dir", str(tmp_path)), "no prepared folder"),
        (("datasets", "show", "prostate", "--out", str(tmp_path / "a.png")), "needs data.path"),
    ]
    for args, words in cases:
        result = invoke(*args)
        assert result.exit_code != 0, args
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, args


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_show_draws_the_embedded_dataset(tmp_path):
    out = tmp_path / "synth.png"
    result = invoke(
        "datasets",
        "show",
        "synth-prostate",
        "--out",
        str(out),
        "--preset",
        "quick",
        "--per-site",
        "2",
        "--results-dir",
        str(tmp_path),
    )
    assert result.exit_code == 0, result.output
    width, height = png_size(out)
    assert height > width  # six rows of two


def test_show_draws_real_slices(samples, tmp_path):  # noqa: F811
    out = tmp_path / "prostate.png"
    result = invoke(
        "datasets",
        "show",
        "prostate",
        "--out",
        str(out),
        "--set",
        f"data.path={PROSTATE}",
        "--set",
        "data.size=64",
        "--results-dir",
        str(tmp_path),
    )
    assert result.exit_code == 0, result.output
    assert png_size(out)[0] > 200


@pytest.mark.parametrize("method", ["fedavg", "iopfl"])
def test_real_prostate_samples_run_end_to_end(samples, tmp_path, method):  # noqa: F811
    from fedbench.engine.registry import load_registry

    if method == "iopfl" and "iopfl-routing" not in load_registry().names("adapters"):
        pytest.skip("the iopfl-routing adapter is not installed")
    fast = "--set adapter.epochs=1" if method == "iopfl" else ""
    args = f"run --method {method} --dataset prostate --preset quick --rounds 1 --holdout BIDMC"
    args += f" --set eval.history=false {fast} --results-dir {tmp_path} --json"
    result = invoke(*args.split(), "--set", f"data.path={PROSTATE}")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["status"] == "ok" and record["config"]["data"]["size"] == 64
    dice = {
        (r["regime"], r["site"]): r["value"] for r in record["metrics"] if r["metric"] == "dice"
    }
    assert len(dice) == 7 and ("outside", "BIDMC") in dice
    assert all(0.0 <= v <= 1.0 for v in dice.values())
    assert "I2CVB/train/image/00_03.png" in result.stderr


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_prepare_out_never_deletes_what_fedbench_did_not_create(tmp_path):
    source = make_slice_source(tmp_path / "raw", sites=("RUNMC", "BMC", "HK"))
    raw = tree(source)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my thesis")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    cases = [(source, "is the --source folder"), (foreign, "did not prepare"), (a_file, "a file")]
    for out, message in cases:
        args = ("datasets", "prepare", "prostate", "--source", str(source), "--out", str(out))
        result = invoke(*args, *SITES3)
        assert result.exit_code != 0 and message in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1
    assert tree(source) == raw
    assert (foreign / "notes.txt").read_text() == "my thesis" and len(tree(foreign)) == 1
    assert a_file.read_text() == "keep me"
    prepared = tmp_path / "prepared"  # a folder fedbench prepared may be prepared again
    for _ in range(2):
        args = ("datasets", "prepare", "prostate", "--source", str(source), "--out", str(prepared))
        assert invoke(*args, *SITES3).exit_code == 0
