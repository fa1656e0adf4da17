"""The board's statistics and pictures: Holm's correction, the site sd column, average ranks,
Friedman and Nemenyi for the critical-difference diagram, and both pictures as PNGs of the
planned size."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy.stats import friedmanchisquare
from test_leaderboard import board_row, make_record, png_size, write
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.results.heatmap import colour_range, figure_size, row_labels
from fedbench.results.leaderboard import build_leaderboard, load_records
from fedbench.results.plots import DPI
from fedbench.results.ranking import CD_WIDTH, critical_difference, panel_heights, rank_rows
from fedbench.results.statistics import holm

runner = CliRunner()

# three methods, three seeds, sites x and y: best > middle > worst on every (site, seed) block
# but (y, seed 2), where worst beats middle
SCORES = {
    "best": [{"x": 0.9, "y": 0.8}, {"x": 0.85, "y": 0.85}, {"x": 0.95, "y": 0.9}],
    "middle": [{"x": 0.8, "y": 0.5}, {"x": 0.6, "y": 0.5}, {"x": 0.7, "y": 0.86}],
    "worst": [{"x": 0.7, "y": 0.4}, {"x": 0.5, "y": 0.45}, {"x": 0.6, "y": 0.88}],
}


@pytest.fixture
def three(tmp_path):
    for method, seeds in SCORES.items():
        for seed, inside in enumerate(seeds):
            write(tmp_path, make_record(f"{method}-{seed}", method, seed, inside))
    return tmp_path


def test_holm_matches_a_hand_computed_example():
    # m = 4 finite p, sorted 0.01, 0.03, 0.04, 0.5: 4 * 0.01 = 0.04, 3 * 0.03 = 0.09,
    # max(0.09, 2 * 0.04) = 0.09, max(0.09, 1 * 0.5) = 0.5, back in the original order
    adjusted = holm(pd.Series([0.01, 0.04, 0.03, math.nan, 0.5], index=list("abcde")))
    expected = [0.04, 0.09, 0.09, math.nan, 0.5]
    assert adjusted.to_numpy() == pytest.approx(expected, nan_ok=True)


def test_significance_is_holm_corrected(three):
    lb = build_leaderboard(load_records(three)[0])
    for name in ("middle", "worst"):
        row = board_row(lb, "inside", name)
        assert row["p"] == pytest.approx(2 / 2**6)  # six pairs, all below the best: exact p
        assert row["p holm"] == pytest.approx(2 * 2 / 2**6)  # two comparisons with the best
        assert row["significant"] is False, "0.031 < 0.05 uncorrected, 0.0625 after Holm"


def test_site_sd_is_the_spread_across_sites_of_each_run(three):
    row = board_row(build_leaderboard(load_records(three)[0]), "inside", "middle")
    per_seed = [pd.Series(s).std() for s in SCORES["middle"]]
    assert row["site sd"] == pytest.approx(sum(per_seed) / 3)
    assert row["site sd std"] == pytest.approx(pd.Series(per_seed).std())


def test_average_ranks_friedman_and_critical_difference(three):
    lb = build_leaderboard(load_records(three)[0])
    inside = lb.boards[0]
    ranking = rank_rows(inside, lower_is_better=False)
    assert ranking.blocks == 6
    # best is first on every block; middle second on 5 of 6 blocks, third on (y, seed 2)
    assert ranking.ranks["best"] == pytest.approx(1.0)
    assert ranking.ranks["middle"] == pytest.approx((2 * 5 + 3) / 6)
    assert ranking.ranks["worst"] == pytest.approx((3 * 5 + 2) / 6)
    columns = [[s[site] for s in SCORES[m] for site in ("x", "y")] for m in SCORES]
    assert ranking.friedman_p == pytest.approx(friedmanchisquare(*columns).pvalue)
    assert set(ranking.pairwise.index) == set(SCORES)
    assert ranking.pairwise.loc["best", "worst"] < ranking.pairwise.loc["best", "middle"]
    # Demšar (2006), table 5(a): q_0.05 = 2.343 for k = 3
    assert ranking.critical_difference == pytest.approx(2.343 * math.sqrt(3 * 4 / 36), abs=1e-3)
    assert critical_difference(2, 10) == pytest.approx(1.960 * math.sqrt(2 * 3 / 60), abs=1e-3)


def test_distances_rank_ascending(three):
    lb = build_leaderboard(load_records(three)[0], metric="hd95")
    ranking = rank_rows(lb.boards[0], lower_is_better=True)
    assert list(ranking.ranks.index) == ["best", "middle", "worst"]
    assert ranking.ranks["best"] == pytest.approx(1.0)


def test_cd_diagram_and_heatmap_are_pngs_of_the_planned_size(three, tmp_path):
    heat, cd = tmp_path / "board.png", tmp_path / "cd.png"
    args = ["leaderboard", "--results-dir", str(three), "--format", "md", "--out"]
    result = runner.invoke(
        app, [*args, str(tmp_path / "b.md"), "--plot", str(heat), "--cd", str(cd)]
    )
    assert result.exit_code == 0, result.output
    lb = build_leaderboard(load_records(three)[0])
    width, height = figure_size(lb)
    assert png_size(heat) == pytest.approx((width * DPI, height * DPI), abs=1)
    heights = panel_heights([rank_rows(b, False) for b in lb.boards])
    assert png_size(cd) == pytest.approx((CD_WIDTH * DPI, (sum(heights) + 0.6) * DPI), abs=1)


def test_a_cd_diagram_of_two_rows_is_one_clear_line(tmp_path):
    for method, x in (("a", 0.5), ("b", 0.4)):
        for seed in (0, 1):
            write(tmp_path, make_record(f"{method}{seed}", method, seed, {"x": x, "y": 0.6}))
    result = runner.invoke(
        app, ["leaderboard", "--results-dir", str(tmp_path), "--cd", str(tmp_path / "cd.png")]
    )
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines() == [
        "error: a critical-difference diagram of the inside board needs at least 3 rows and 2 "
        "(site, seed) blocks that every row ran; it has 2 rows, 4 blocks"
    ]
    assert not (tmp_path / "cd.png").exists()


def test_heatmap_scale_is_shared_and_labels_mark_significance(three):
    lb = build_leaderboard(load_records(three)[0])
    hd = build_leaderboard(load_records(three)[0], metric="hd95")
    inside, outside = (b.frame[[*b.sites, "mean", "worst"]].to_numpy() for b in hd.boards)
    assert colour_range(hd) == pytest.approx((inside.min(), outside.max()))
    assert outside.max() > inside.max(), "one scale for both panels, not each its own"
    assert row_labels(lb.boards[0])[0] == "1. best"


def test_a_cd_diagram_counts_a_repeated_result_once(tmp_path):
    """Rows that are one result under two names take one place in the ranking."""
    for method, x in (("a", 0.5), ("b", 0.4), ("c", 0.5)):
        for seed in (0, 1):
            write(tmp_path, make_record(f"{method}{seed}", method, seed, {"x": x, "y": 0.6}))
    result = runner.invoke(
        app, ["leaderboard", "--results-dir", str(tmp_path), "--cd", str(tmp_path / "cd.png")]
    )
    assert result.exit_code != 0 and "it has 2 rows" in result.stderr


def test_names_with_dollar_signs_are_drawn_as_text_not_formulas(tmp_path):
    """A record's method `a$\\frac$` is a name; read as mathtext it failed to draw (issue 31)."""
    for method, x in (("a$\\frac$", 0.5), ("b$x$", 0.4), ("c", 0.3)):
        for seed in (0, 1):
            write(tmp_path, make_record(f"{x}{seed}", method, seed, {"x": x, "y": 0.6}))
    plot, cd = tmp_path / "board.png", tmp_path / "cd.png"
    result = runner.invoke(
        app, ["leaderboard", "--results-dir", str(tmp_path), "--plot", str(plot), "--cd", str(cd)]
    )
    assert result.exit_code == 0, result.output
    assert png_size(plot)[0] > 0 and png_size(cd)[0] > 0
