"""`fedbench leaderboard --versus ROW`: every row compared with a chosen row (a baseline, the
method under study) instead of the best, with the same paired test and Holm's correction."""

from __future__ import annotations

import pandas as pd
import pytest
from test_leaderboard import make_record, write
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.errors import FedbenchError
from fedbench.results.leaderboard import build_leaderboard, load_records
from fedbench.results.statistics import holm, paired_p

# three methods over three seeds on sites x, y: gamma is the best, alpha the reference
SCORES = {
    "alpha": [{"x": 0.60, "y": 0.50}, {"x": 0.62, "y": 0.55}, {"x": 0.58, "y": 0.52}],
    "beta": [{"x": 0.70, "y": 0.66}, {"x": 0.71, "y": 0.64}, {"x": 0.69, "y": 0.65}],
    "gamma": [{"x": 0.90, "y": 0.80}, {"x": 0.85, "y": 0.82}, {"x": 0.88, "y": 0.81}],
}


@pytest.fixture
def results(tmp_path):
    for method, seeds in SCORES.items():
        for seed, inside in enumerate(seeds):
            write(tmp_path, make_record(f"{method}-{seed}", method, seed, inside))
    return tmp_path


def pairs(method: str, shift: float = 0.0) -> pd.Series:
    return pd.Series(
        {(site, seed): v - shift for seed, s in enumerate(SCORES[method]) for site, v in s.items()}
    )


def test_every_row_is_compared_with_the_chosen_row(results):
    lb = build_leaderboard(load_records(results)[0], versus="alpha")
    board = next(b for b in lb.boards if b.regime == "inside")
    frame = board.frame.set_index("method")
    assert board.versus == "alpha"
    raw = pd.Series({m: paired_p(pairs(m), pairs("alpha")) for m in ("beta", "gamma")})
    expected = holm(raw)
    assert frame.loc["gamma", "p holm"] == pytest.approx(expected["gamma"])
    assert frame.loc["beta", "p holm"] == pytest.approx(expected["beta"])
    assert frame.loc["alpha", "significant"] is None  # the reference is not compared
    assert frame.index[0] == "gamma", "the ranking itself does not change"


def test_outside_the_reference_names_its_adapter_and_inside_ignores_it(results):
    lb = build_leaderboard(load_records(results)[0], versus="beta + none")
    assert {b.regime: b.versus for b in lb.boards} == {
        "inside": "beta",
        "outside": "beta + none",
    }


def test_a_row_that_is_on_no_board_is_one_clear_error(results):
    with pytest.raises(FedbenchError, match="--versus 'delta': no such row; rows: alpha, beta"):
        build_leaderboard(load_records(results)[0], versus="delta")


def test_the_cli_names_the_reference_in_the_column_and_the_legend(results):
    out = CliRunner().invoke(
        app, ["leaderboard", "--results-dir", str(results), "--versus", "alpha", "--format", "md"]
    )
    assert out.exit_code == 0, out.output
    assert "p vs alpha (Holm)" in out.stdout and "p vs best" not in out.stdout
    assert "* = differs from the row its p column names (--versus)" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("| 3 | alpha"))
    assert "reference" in row


def test_a_reference_with_a_twin_keeps_its_own_name_and_the_twins_values(tmp_path):
    for method in ("alpha", "beta", "gamma"):  # gamma repeats beta's result under a new name
        source = "beta" if method == "gamma" else method
        for seed, inside in enumerate(SCORES[source]):
            write(tmp_path, make_record(f"{method}-{seed}", method, seed, inside))
    lb = build_leaderboard(load_records(tmp_path)[0], versus="gamma")
    board = next(b for b in lb.boards if b.regime == "inside")
    frame = board.frame.set_index("method")
    assert board.versus == "gamma"
    assert frame.loc["alpha", "p"] == pytest.approx(paired_p(pairs("alpha"), pairs("beta")))


def test_a_row_made_of_one_record_per_held_out_site_keeps_every_site_and_its_whole_cost(tmp_path):
    """A tuned adapter's row (fedbench tune: one part per unseen site): records with the same
    settings (config hash) and seed, each holding out another site, are one row of all sites,
    and the row's cost per seed is theirs together."""
    for seed in (0, 1):
        for site in ("x", "y"):
            record = make_record(f"t-{seed}-{site}", "alpha", seed, {site: 0.5 + 0.1 * seed})
            record["config_hash"] = "same-settings"
            record["holdouts"] = [site]
            record["metrics"] = [m for m in record["metrics"] if m["regime"] == "outside"]
            record["cost"]["federations"] = {site: {"bytes_up": 1000, "bytes_down": 1000}}
            write(tmp_path, record)
    lb = build_leaderboard(load_records(tmp_path)[0], variants=lambda r, regime: ["tuned"])
    board = next(b for b in lb.boards if b.regime == "outside")
    assert board.blocks.notna().sum(axis=1).iloc[0] == 4  # 2 sites x 2 seeds
    assert board.frame.iloc[0]["bytes"] == 4000  # both sites' federations, per seed
