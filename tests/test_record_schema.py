"""Run records are checked by type (fedbench/results/schema.py): a record with a wrongly typed
field is named in one warning line and skipped, and the board of the others stays right; every
record the suite itself writes (ok, failed, diverged) passes. Unreadable results files met on
the way (kept predictions, a board's --out) are one line too."""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from test_faults import BROKEN_PLUGIN
from test_leaderboard import INSIDE, make_record, write
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.errors import FedbenchError
from fedbench.results import predictions
from fedbench.results.record import find_record, read_records, validate_record

runner = CliRunner()
TINY = [
    *("--preset", "quick", "--set", "train.rounds=1", "--set", "data.size=16"),
    *("--set", "data.cases_per_site=3", "--set", "data.slices_per_case=1"),
    *("--set", "data.num_sites=3"),
]


def fill(results: Path) -> Path:
    """A results folder with the hand-made records of tests/test_leaderboard.py."""
    for method, seeds in INSIDE.items():
        for seed, inside in seeds.items():
            write(results, make_record(f"{method}-s{seed}", method, seed, inside))
    return results


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return fill(tmp_path)


@pytest.fixture(scope="module")
def clean_board(tmp_path_factory) -> str:
    """The CSV board of those records alone."""
    before = board_csv(fill(tmp_path_factory.mktemp("clean")))
    assert before.exit_code == 0 and before.stderr == "", before.output
    return before.stdout


def valid() -> dict:
    return make_record("extra", "alpha", 9, {"x": 0.1, "y": 0.2})


def warnings_of(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning:")]


def board_csv(results: Path):
    return runner.invoke(app, ["leaderboard", "--results-dir", str(results), "--format", "csv"])


# the cases of issue 16, item 3: a traceback (the first three) or a silently wrong board
FOUND = [
    ("adapter", lambda r: r.update(adapter=["none"]), "bad field adapter"),
    ("seed", lambda r: r.update(seed=[0]), "bad field seed"),
    ("metrics[0].site", lambda r: r["metrics"][0].update(site=None), "bad field metrics[0].site"),
    ("seed", lambda r: r.update(seed="zero"), "bad field seed: input should be a valid integer"),
    ("method", lambda r: r.update(method=None), "bad field method"),
]


@pytest.mark.parametrize(("field", "mutate", "message"), FOUND, ids=[f[2] for f in FOUND])
def test_a_wrongly_typed_record_is_named_and_skipped_and_the_board_stays_right(
    results, clean_board, field, mutate, message
):
    record = valid()
    mutate(record)
    (results / "runs" / "typo.json").write_text(json.dumps(record))
    after = board_csv(results)
    assert after.exception is None or isinstance(after.exception, SystemExit), after.exception
    assert after.exit_code == 0, after.output
    (warning,) = warnings_of(after)
    assert "typo.json" in warning and message in warning and field in warning
    assert after.stdout == clean_board, "the board of the valid records is unchanged"


# more wrong types, each named by its field: (field path, mutation)
WRONG = [
    ("schema_version", lambda r: r.update(schema_version=True)),
    ("schema_version", lambda r: r.update(schema_version=2)),
    ("run_id", lambda r: r.update(run_id="")),
    ("status", lambda r: r.update(status="OK")),
    ("dataset", lambda r: r.update(dataset=3)),
    ("seed", lambda r: r.update(seed=True)),
    ("seed", lambda r: r.update(seed=1.0)),
    ("seed", lambda r: r.update(seed=-1)),
    ("seed", lambda r: r.update(seed=2**32)),
    ("config", lambda r: r.update(config=[1])),
    ("environment", lambda r: r.update(environment=None)),
    ("finished_at", lambda r: r.update(finished_at="yesterday")),
    ("wall_s", lambda r: r.update(wall_s="1.0")),
    ("wall_s", lambda r: r.update(wall_s=-1.0)),
    ("cost.bytes_up", lambda r: r["cost"].update(bytes_up="many")),
    ("cost.client_steps", lambda r: r["cost"].pop("client_steps")),
    ("cost.federations.inside", lambda r: r["cost"]["federations"].update(inside=5)),
    ("metrics", lambda r: r.update(metrics={"dice": 1})),
    ("metrics[1]", lambda r: r["metrics"].__setitem__(1, "dice")),
    ("metrics[0].regime", lambda r: r["metrics"][0].update(regime="both")),
    ("metrics[0].selection", lambda r: r["metrics"][0].update(selection="best")),
    ("metrics[0].value", lambda r: r["metrics"][0].update(value="0.5")),
    ("metrics[0].value", lambda r: r["metrics"][0].update(value=None)),
    ("metrics[0].metric", lambda r: r["metrics"][0].pop("metric")),
    ("holdouts", lambda r: r.update(holdouts="HK")),
    ("history.inside[0].val.x", lambda r: r["history"]["inside"][0]["val"].update(x="high")),
    ("error", lambda r: r.update(error=["boom"])),
    ("cost.federations.a\\nb", lambda r: r["cost"]["federations"].update({"a\nb": 5})),
    ("adapter is null", lambda r: r.update(adapter=None)),
    ("metrics[2]: an outside row's holdout", lambda r: r["metrics"][2].update(holdout="y")),
    ("metrics[0]: an inside row's holdout", lambda r: r["metrics"][0].update(holdout="x")),
]


@pytest.mark.parametrize(
    ("field", "mutate"), WRONG, ids=[f"{w[0]}-{i}" for i, w in enumerate(WRONG)]
)
def test_each_wrong_type_is_one_line_naming_its_field(field, mutate):
    record = valid()
    mutate(record)
    problem = validate_record(record)
    assert problem is not None and "\n" not in problem
    assert field in problem, problem


def test_a_long_offending_value_is_quoted_short():
    record = valid()
    record["adapter"] = ["x" * 10_000]
    problem = validate_record(record)
    assert problem.startswith("bad field adapter: input should be a valid string (got [")
    assert len(problem) < 120


# what the suite writes and the contract allows: each passes
ALLOWED = [
    lambda r: None,
    lambda r: r.update(adapter=None, metrics=[m for m in r["metrics"] if m["regime"] == "inside"]),
    lambda r: r.update(status="failed", metrics=[], error="method 'x' failed"),
    lambda r: r.update(status="diverged", metrics=[], error="loss became nan"),
    lambda r: r["metrics"][0].update(value=math.nan),
    lambda r: r["metrics"][0].update(value=1),
    lambda r: r.update(wall_s=0, added_later={"anything": [1, "two"]}),
    lambda r: r["cost"].pop("federations"),
    lambda r: r.update(study="study.toml", variant="lr=0.01"),
]


@pytest.mark.parametrize("mutate", ALLOWED)
def test_records_the_contract_allows_pass(mutate):
    record = valid()
    mutate(record)
    assert validate_record(record) is None


@pytest.fixture(scope="module")
def suite_records(tmp_path_factory) -> Path:
    """One results folder holding what real runs write: ok (outside and val-best rows too),
    diverged and failed, the last two with no adapter."""
    results = tmp_path_factory.mktemp("suite")
    plugin = results / "broken_plugin.py"
    plugin.write_text(BROKEN_PLUGIN)
    base = ["--plugin", str(plugin), "run", *TINY, "--results-dir", str(results)]
    runs = [
        (["--method", "fedavg", "--holdout", "BMC", "--set", "eval.val_best=true"], 0),
        (["--method", "nan-loss", "--holdout", "none"], 1),
        (["--method", "agg-raises", "--holdout", "none"], 1),
    ]
    for args, code in runs:
        result = runner.invoke(app, [*base, *args])
        assert result.exit_code == code, result.output
    return results


def test_every_record_a_real_run_writes_validates(suite_records):
    paths = sorted((suite_records / "runs").glob("*.json"))
    payloads = [json.loads(path.read_text()) for path in paths]
    assert sorted(p["status"] for p in payloads) == ["diverged", "failed", "ok"]
    assert [validate_record(p) for p in payloads] == [None, None, None]
    ok = next(p for p in payloads if p["status"] == "ok")
    assert {m["selection"] for m in ok["metrics"]} == {"final", "val-best"}
    assert {m["regime"] for m in ok["metrics"]} == {"inside", "outside"}
    records, warnings = read_records(suite_records)
    assert warnings == [] and records == payloads


def test_the_grid_drivers_failed_record_validates(tmp_path):
    from fedbench.backends.grid import Cell, failed_record
    from fedbench.engine.registry import load_registry
    from fedbench.engine.resolve import RunSpec

    spec = RunSpec(method="fedavg", holdout="HK", preset="quick", results_dir=tmp_path)
    cell = Cell(spec, "0123456789abcdef", ("HK",))
    record = failed_record(cell, "MemoryError: ", load_registry(()), "2024-01-01T00:00:00", 0.5)
    assert validate_record(json.loads(json.dumps(record))) is None


def test_deeply_nested_or_huge_json_is_one_warning(results):
    (results / "runs" / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (results / "runs" / "huge.json").write_text('{"seed": ' + "9" * 10_000 + "}")
    records, warnings = read_records(results)
    assert len(records) == 6 and len(warnings) == 2
    assert "deep.json: not valid JSON" in warnings[0] and "huge.json: not valid JSON" in warnings[1]
    with pytest.raises(FedbenchError, match=r"deep\.json is not a valid record"):
        find_record(results, "deep")


def test_a_record_that_round_trips_through_read_records_is_unchanged(results):
    record = valid()
    write(results, record)
    records, warnings = read_records(results)
    assert warnings == [] and record in records


# issue 16, item 10: corrupt kept predictions and an unwritable --out


def kept_examples() -> predictions.Kept:
    rng = np.random.default_rng(0)
    return {
        ("inside", "x"): {
            "image": rng.random((2, 8, 8)),
            "truth": (rng.random((2, 8, 8)) > 0.5).astype(np.uint8),
            "pred": (rng.random((2, 8, 8)) > 0.5).astype(np.uint8),
        }
    }


def corrupt_truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage" * 50)


def corrupt_names(path: Path) -> None:
    np.savez(path, image=np.zeros((2, 8, 8)))


def corrupt_lone_array(path: Path) -> None:
    with path.open("wb") as handle:
        np.save(handle, np.zeros((2, 8, 8)))


def corrupt_shapes(path: Path) -> None:
    np.savez(path, **{"inside|x|image": np.zeros(3), "inside|x|truth": np.zeros(3)})


@pytest.mark.parametrize(
    "corrupt",
    [corrupt_truncated, corrupt_garbage, corrupt_lone_array, corrupt_names, corrupt_shapes],
)
def test_show_with_corrupt_kept_predictions_is_one_line(results, corrupt):
    run_id = "alpha-s0"
    predictions.save(results, run_id, kept_examples())
    out = results / "show.png"
    shown = runner.invoke(app, ["show", run_id, "--out", str(out), "--results-dir", str(results)])
    assert shown.exit_code == 0, shown.output
    out.unlink()
    path = predictions.examples_path(results, run_id)
    corrupt(path)
    result = runner.invoke(app, ["show", run_id, "--out", str(out), "--results-dir", str(results)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert str(path) in result.stderr and "unreadable" in result.stderr
    assert not out.exists()


def readonly_by_kernel(folder: Path, monkeypatch) -> None:
    """Make file creation in `folder` fail as a read-only file system does (root ignores
    chmod), leaving every other folder writable."""
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir") or "") == folder:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_board_out_on_a_read_only_file_system_is_one_line(results, tmp_path, monkeypatch):
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    old = shelf / "board.md"
    old.write_text("an older board")
    readonly_by_kernel(shelf, monkeypatch)
    plot = tmp_path / "board.png"
    args = ["leaderboard", "--results-dir", str(results), "--out", str(old), "--plot", str(plot)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.stderr == f"error: cannot write {old}: Read-only file system\n"
    assert old.read_text() == "an older board" and sorted(shelf.iterdir()) == [old]
    assert not plot.exists(), "nothing else is written after the failure"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 folder anyway")
def test_board_out_in_a_read_only_folder_is_one_line(results, tmp_path):
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    shelf.chmod(0o555)
    try:
        out = shelf / "board.md"
        result = runner.invoke(
            app, ["leaderboard", "--results-dir", str(results), "--out", str(out)]
        )
        assert result.exit_code == 2, result.output
        assert result.stderr == f"error: cannot write {out}: Permission denied\n"
        assert list(shelf.iterdir()) == []
    finally:
        shelf.chmod(0o755)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_board_out_to_a_full_device_is_one_line(results):
    result = runner.invoke(
        app, ["leaderboard", "--results-dir", str(results), "--out", "/dev/full"]
    )
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.stderr == "error: cannot write /dev/full: No space left on device\n"


def test_board_out_under_a_file_is_one_line(results, tmp_path):
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("keep me")
    out = blocker / "x.md"
    result = runner.invoke(app, ["leaderboard", "--results-dir", str(results), "--out", str(out)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: cannot write {out}")
    assert blocker.read_text() == "keep me"


def test_find_record_names_the_bad_field(results):
    record = valid()
    record["seed"] = "zero"
    write(results, record)
    with pytest.raises(FedbenchError, match=r"extra\.json is not a valid record: bad field seed"):
        find_record(results, "extra")


# issue 31, item 7: scores no metric can take put an inf row first on the board
OUT_OF_RANGE = [
    ("dice", math.inf),
    ("dice", 1e308),
    ("dice", -0.5),
    ("dice_release", 1.5),
    ("hd95", -1.0),
    ("hd95", math.inf),
    ("c_index", 2.0),
    ("some_loss", -math.inf),
]


@pytest.mark.parametrize(("metric", "value"), OUT_OF_RANGE)
def test_a_score_outside_its_metrics_range_is_named_and_skipped(
    results, clean_board, metric, value
):
    record = valid()
    record["metrics"][0].update(metric=metric, value=value)
    (results / "runs" / "wild.json").write_text(json.dumps(record))
    after = board_csv(results)
    assert after.exit_code == 0, after.output
    (warning,) = warnings_of(after)
    assert "wild.json" in warning and "metrics[0]" in warning and "outside" in warning
    assert after.stdout == clean_board


@pytest.mark.parametrize(("metric", "value"), [("dice", 1.0), ("dice", 0.0), ("hd95", 0.0)])
def test_scores_at_the_ends_of_the_range_pass(metric, value):
    record = valid()
    record["metrics"][0].update(metric=metric, value=value)
    assert validate_record(record) is None
