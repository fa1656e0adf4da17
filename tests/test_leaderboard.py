"""Leaderboards and figures from hand-made run records with known numbers."""

from __future__ import annotations

import json
import math
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.cli.tables import to_text_table
from fedbench.results.heatmap import figure_size
from fedbench.results.leaderboard import build_leaderboard, load_records
from fedbench.results.plots import DPI, curves_figsize
from fedbench.results.statistics import paired_p

runner = CliRunner()

# method -> seed -> site -> inside dice. alpha: x = 0.8, 0.6, 0.7; y = 0.5, 0.5, 0.8.
INSIDE = {
    "alpha": {0: {"x": 0.8, "y": 0.5}, 1: {"x": 0.6, "y": 0.5}, 2: {"x": 0.7, "y": 0.8}},
    "beta": {0: {"x": 0.9, "y": 0.8}, 1: {"x": 0.85, "y": 0.85}, 2: {"x": 0.95, "y": 0.9}},
}


def make_record(
    run_id: str,
    method: str,
    seed: int,
    inside: dict[str, float],
    adapter: str | None = "none",
    status: str = "ok",
    dataset: str = "toy",
    finished_at: str = "2024-01-01T00:00:00+00:00",
) -> dict:
    """A valid record: dice and hd95 (= 10 * (1 - dice)) inside, and outside at dice - 0.1 (not
    below 0)."""
    rows = []
    for site, dice in inside.items():
        for regime, value in (("inside", dice), ("outside", max(0.0, dice - 0.1))):
            if regime == "outside" and adapter is None:
                continue
            holdout = site if regime == "outside" else None
            for metric, v in (("dice", value), ("hd95", 10 * (1 - value))):
                rows.append(
                    {
                        "regime": regime,
                        "site": site,
                        "holdout": holdout,
                        "metric": metric,
                        "value": v,
                        "selection": "final",
                    }
                )
    federations = {"inside": {"bytes_up": 100, "bytes_down": 200}}
    if adapter is not None:
        federations.update({s: {"bytes_up": 1000, "bytes_down": 1000} for s in inside})
    return {
        "schema_version": 1,
        "run_id": run_id,
        "status": status,
        "method": method,
        "adapter": adapter,
        "dataset": dataset,
        "seed": seed,
        "config": {"train": {"rounds": 3}, "method": {}},
        "config_hash": f"hash-{run_id}",
        "environment": {},
        "started_at": "2024-01-01T00:00:00+00:00",
        "finished_at": finished_at,
        "wall_s": 1.0,
        "cost": {"bytes_up": 0, "bytes_down": 0, "client_steps": 0, "federations": federations},
        "metrics": rows if status == "ok" else [],
        "history": {
            "inside": [
                {"round": r, "val": {s: v * r / 3 for s, v in inside.items()}} for r in (1, 2, 3)
            ]
        },
    }


def write(results: Path, record: dict) -> None:
    runs = results / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    (runs / f"{record['run_id']}.json").write_text(json.dumps(record))


@pytest.fixture
def results(tmp_path: Path) -> Path:
    for method, seeds in INSIDE.items():
        for seed, inside in seeds.items():
            write(tmp_path, make_record(f"{method}-s{seed}", method, seed, inside))
    return tmp_path


def board_row(lb, regime: str, method: str) -> pd.Series:
    board = next(b for b in lb.boards if b.regime == regime)
    return board.frame.set_index("method").loc[method]


def test_mean_std_worst_spread_and_bytes(results):
    lb = build_leaderboard(load_records(results)[0])
    row = board_row(lb, "inside", "alpha")
    assert row["x"] == pytest.approx(0.7)
    assert row["x std"] == pytest.approx(0.1)
    assert row["y"] == pytest.approx(0.6)
    assert row["y std"] == pytest.approx(math.sqrt(0.03))
    assert row["mean"] == pytest.approx(0.65)  # per-seed means 0.65, 0.55, 0.75
    assert row["mean std"] == pytest.approx(0.1)
    assert row["worst"] == pytest.approx((0.5 + 0.5 + 0.7) / 3)  # per-seed worst sites
    assert row["worst std"] == pytest.approx(pd.Series([0.5, 0.5, 0.7]).std())
    assert row["spread"] == pytest.approx(0.1)
    assert row["bytes"] == 300
    assert row["seeds"] == 3
    assert list(lb.boards[0].frame["method"]) == ["beta", "alpha"]
    assert list(lb.boards[0].frame["rank"]) == [1, 2]


def test_outside_board_has_a_row_per_method_and_adapter(results):
    write(results, make_record("alpha-tent", "alpha", 0, INSIDE["alpha"][0], adapter="tent"))
    lb = build_leaderboard(load_records(results)[0])
    outside = next(b for b in lb.boards if b.regime == "outside")
    pairs = set(zip(outside.frame["method"], outside.frame["adapter"]))
    assert pairs == {("alpha", "none"), ("alpha", "tent"), ("beta", "none")}
    row = outside.frame.set_index(["method", "adapter"]).loc[("alpha", "none")]
    assert row["x"] == pytest.approx(0.6)
    assert row["bytes"] == 4000  # the two leave-one-out federations, not the inside one
    tent = outside.frame.set_index(["method", "adapter"]).loc[("alpha", "tent")]
    assert tent["seeds"] == 1 and math.isnan(tent["x std"])


def test_distance_metrics_rank_ascending_and_worst_is_largest(results):
    lb = build_leaderboard(load_records(results)[0], metric="hd95")
    assert list(lb.boards[0].frame["method"]) == ["beta", "alpha"]
    row = board_row(lb, "inside", "alpha")
    assert row["worst"] == pytest.approx(10 * (1 - (0.5 + 0.5 + 0.7) / 3))


def test_wilcoxon_against_best_row(results):
    lb = build_leaderboard(load_records(results)[0])
    best, alpha = board_row(lb, "inside", "beta"), board_row(lb, "inside", "alpha")
    assert math.isnan(best["p"]) and best["significant"] is None
    assert alpha["p"] == pytest.approx(2 / 2**6)  # six pairs, all worse: exact two-sided p
    assert alpha["significant"] is True


def test_wilcoxon_degenerate_cases():
    same = pd.Series([0.5, 0.6, 0.7])
    assert paired_p(same, same.copy()) == 1.0
    assert math.isnan(paired_p(pd.Series([], dtype=float), pd.Series([], dtype=float)))
    one = paired_p(pd.Series([0.5]), pd.Series([0.7]))
    assert math.isnan(one) or 0 <= one <= 1


def test_identical_rows_share_a_rank_and_name_their_twin(tmp_path):
    for method in ("a", "b"):
        for seed in (0, 1):
            write(tmp_path, make_record(f"{method}{seed}", method, seed, {"x": 0.5, "y": 0.6}))
    lb = build_leaderboard(load_records(tmp_path)[0])
    a, b = board_row(lb, "inside", "a"), board_row(lb, "inside", "b")
    assert a["same as"] == "" and b["same as"] == "a"
    assert a["rank"] == b["rank"] == 1
    assert all(s is not True for s in lb.boards[0].frame["significant"])


def test_only_ok_records_count_and_others_get_a_note(results):
    write(results, make_record("alpha-bad", "alpha", 7, {"x": 0.0}, status="failed"))
    write(results, make_record("beta-nan", "beta", 8, {"x": 0.0}, status="diverged"))
    lb = build_leaderboard(load_records(results)[0])
    assert board_row(lb, "inside", "alpha")["seeds"] == 3
    (note,) = [n for n in lb.notes if n.startswith("not counted")]
    assert note.startswith("not counted: 1 diverged, 1 failed run(s): ")
    # which cells, so a row with fewer seeds says why (its mean is of the survivors only)
    assert "alpha + none seed 7 (failed)" in note and "beta + none seed 8 (diverged)" in note


def test_the_note_on_runs_not_counted_groups_a_cells_seeds(results):
    for seed in (4, 5):
        bad = make_record(f"beta-nan{seed}", "beta", seed, {"x": 0.0}, status="diverged")
        bad["variant"] = "sgd"
        write(results, bad)
    lb = build_leaderboard(load_records(results)[0])
    assert any("beta + none [sgd] seeds 4, 5 (diverged)" in n for n in lb.notes)


def test_latest_record_of_a_repeated_cell_counts(results):
    newer = make_record("alpha-s0-again", "alpha", 0, {"x": 0.2, "y": 0.2})
    newer["finished_at"] = "2025-01-01T00:00:00+00:00"
    write(results, newer)
    lb = build_leaderboard(load_records(results)[0])
    assert board_row(lb, "inside", "alpha")["x"] == pytest.approx((0.2 + 0.6 + 0.7) / 3)
    assert any("older run" in note for note in lb.notes)


def test_default_dataset_is_the_one_with_most_records(results):
    write(results, make_record("other", "alpha", 0, {"z": 0.4}, dataset="other"))
    picked = build_leaderboard(load_records(results)[0])
    assert picked.dataset == "toy"
    assert any("also present: other (1 records)" in note for note in picked.notes)
    chosen = build_leaderboard(load_records(results)[0], dataset="other")
    assert chosen.dataset == "other" and not any("also present" in n for n in chosen.notes)


def test_corrupted_file_is_named_and_skipped(results):
    (results / "runs" / "broken.json").write_text("{not json")
    (results / "runs" / "wrong.json").write_text(json.dumps({"schema_version": 1}))
    result = runner.invoke(app, ["leaderboard", "--results-dir", str(results), "--format", "csv"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert "broken.json" in warnings[0] and "wrong.json" in warnings[1]
    assert "broken" not in result.stdout


@pytest.mark.parametrize("fmt", ["table", "md", "csv", "html", "json"])
def test_every_format_on_stdout(results, fmt):
    result = runner.invoke(app, ["leaderboard", "--results-dir", str(results), "--format", fmt])
    assert result.exit_code == 0, result.output
    text = result.stdout
    if fmt == "table":
        assert "Inside the federation" in text and "0.700 ± 0.100" in text
    elif fmt == "md":
        assert (
            "| rank | method | x | y | mean |" in text and "| 2 | alpha | 0.700 ± 0.100 |" in text
        )
    elif fmt == "csv":
        frame = pd.read_csv(StringIO(text))
        alpha = frame[(frame["regime"] == "inside") & (frame["method"] == "alpha")].iloc[0]
        assert alpha["x"] == pytest.approx(0.7) and alpha["mean std"] == pytest.approx(0.1)
        assert set(frame["regime"]) == {"inside", "outside"}
    elif fmt == "html":
        assert text.startswith("<!doctype html>") and text.count("<table") == 2
        assert "0.700 ± 0.100" in text
    else:
        payload = json.loads(text)
        rows = payload["boards"]["inside"]["rows"]
        assert rows[1]["method"] == "alpha"
        assert rows[1]["sites"]["x"] == {"mean": pytest.approx(0.7), "std": pytest.approx(0.1)}
        assert rows[0]["p"] is None  # NaN becomes null, never an invalid JSON token


def test_out_file_format_from_suffix_and_no_temp_left(results, tmp_path):
    out = tmp_path / "board.md"
    result = runner.invoke(app, ["leaderboard", "--results-dir", str(results), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("# Leaderboard: toy, dice (final)")
    assert result.stdout == ""
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".board")] == []


def test_render_table_to_text_keeps_every_digit(results):
    text = to_text_table(build_leaderboard(load_records(results)[0]))
    assert "0.850 ± 0.050" in text and "…" not in text


def test_bad_input_is_one_line(tmp_path, results):
    cases = [
        ["--results-dir", str(tmp_path / "missing")],
        ["--results-dir", str(results), "--format", "xml"],
        ["--results-dir", str(results), "--metric", "nope"],
        ["--results-dir", str(results), "--dataset", "nope"],
        ["--results-dir", str(results), "--plot", str(tmp_path / "x.gif")],
    ]
    for args in cases:
        result = runner.invoke(app, ["leaderboard", *args])
        assert result.exit_code == 2, args
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:"), args


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_leaderboard_heatmap_is_a_png_of_the_planned_size(results, tmp_path):
    out = tmp_path / "board.png"
    result = runner.invoke(
        app, ["leaderboard", "--results-dir", str(results), "--format", "md", "--plot", str(out)]
    )
    assert result.exit_code == 0, result.output
    width, height = figure_size(build_leaderboard(load_records(results)[0]))
    got = png_size(out)
    assert abs(got[0] - width * DPI) <= 1 and abs(got[1] - height * DPI) <= 1


def test_curves_plot(results, tmp_path):
    out = tmp_path / "curves.png"
    args = ["plot", "curves", "alpha-s0", "beta-s", "--results-dir", str(results)]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2 and "several match" in result.stderr  # beta-s is ambiguous
    args[3] = "beta-s1"
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    got, (width, height) = png_size(out), curves_figsize(2)
    assert abs(got[0] - width * DPI) <= 1 and abs(got[1] - height * DPI) <= 1


def test_curves_need_history(results, tmp_path):
    record = make_record("flat", "alpha", 5, {"x": 0.5})
    record["history"] = {}
    write(results, record)
    out = tmp_path / "c.png"
    result = runner.invoke(
        app, ["plot", "curves", "flat", "--results-dir", str(results), "--out", str(out)]
    )
    assert result.exit_code == 2 and "no learning curve" in result.stderr
    assert not out.exists()
