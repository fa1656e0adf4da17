"""The pooled-test rows (site "pooled": every site's test set scored at once) on the boards: a
column of their own, never a site, and a ranking key (`--rank-by pooled`)."""

from __future__ import annotations

import json
import random
import statistics

import pandas as pd
import pytest
from conftest import SHARED
from scipy.stats import wilcoxon
from test_leaderboard import make_record, write
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.results.formats import display_frame, render
from fedbench.results.heatmap import coloured_columns
from fedbench.results.leaderboard import POOLED, build_leaderboard, load_records, setting_variants
from fedbench.results.ranking import rank_rows

runner = CliRunner()
TCGA = SHARED / "data" / "flamby" / "fed_tcga_brca"
SEEDS = range(5)


def jitter(*parts: object) -> float:
    """A fixed small offset per value (a string seed is the same in every process), so that
    no two differences tie and the Wilcoxon tests stay exact and fast."""
    return random.Random("-".join(map(str, parts))).uniform(-0.02, 0.02)


def sites_of(method: str, seed: int) -> tuple[dict[str, float], float]:
    """Inside dice per site and the pooled dice: the mean ranks beta > gamma > alpha, the
    pooled value alpha > gamma > beta (beta's pooled 0.70 is below both of its sites)."""
    base = {"alpha": (0.60, 0.50, 0.82), "beta": (0.90, 0.80, 0.70), "gamma": (0.70, 0.70, 0.75)}
    x, y, pooled = base[method]
    sites = {"x": x + jitter(method, seed, "x"), "y": y + jitter(method, seed, "y")}
    return sites, pooled + (jitter(method, seed) if method == "alpha" else 0.0)


def over_seeds(method: str, what) -> list[float]:
    """`what(sites, pooled)` of each seed's values of one method."""
    return [what(*sites_of(method, seed)) for seed in SEEDS]


def pooled_record(method: str, seed: int, with_pooled: bool = True) -> dict:
    """A record as the engine writes it for a pooled-test dataset: inside rows per site plus
    one "pooled" row per metric (inside only)."""
    sites, pooled = sites_of(method, seed)
    record = make_record(f"{method}-s{seed}", method, seed, sites)
    if with_pooled:
        for metric, value in (("dice", pooled), ("hd95", 10 * (1 - pooled))):
            row = {"regime": "inside", "site": POOLED, "holdout": None, "metric": metric}
            record["metrics"].append({**row, "value": value, "selection": "final"})
    return record


@pytest.fixture
def records() -> list[dict]:
    return [pooled_record(m, s) for m in ("alpha", "beta", "gamma") for s in SEEDS]


@pytest.fixture
def results(tmp_path, records):
    for record in records:
        write(tmp_path, record)
    return tmp_path


def error_line(args: list[str]) -> str:
    """The one `error: ...` line a refused leaderboard command prints (exit code 2)."""
    result = runner.invoke(app, ["leaderboard", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def board(lb, regime: str = "inside"):
    return next(b for b in lb.boards if b.regime == regime)


def rows(lb, regime: str = "inside") -> pd.DataFrame:
    return board(lb, regime).frame.set_index("method")


def test_the_pooled_site_name_is_the_engines():
    from fedbench.engine.scoring import POOLED as ENGINE_POOLED

    assert POOLED == ENGINE_POOLED


def test_pooled_is_a_column_of_its_own_and_no_site(records):
    lb = build_leaderboard(records)
    inside = board(lb)
    assert inside.sites == ["x", "y"]
    beta = rows(lb).loc["beta"]
    means = over_seeds("beta", lambda sites, _: statistics.mean(sites.values()))
    assert beta["mean"] == pytest.approx(statistics.mean(means))
    worst = over_seeds("beta", lambda sites, _: min(sites.values()))
    assert beta["worst"] == pytest.approx(statistics.mean(worst))  # pooled 0.70 is no site
    sds = over_seeds("beta", lambda sites, _: statistics.stdev(sites.values()))
    assert beta["site sd"] == pytest.approx(statistics.mean(sds))
    xs, ys = (over_seeds("beta", lambda sites, _, s=s: sites[s]) for s in ("x", "y"))
    assert beta["spread"] == pytest.approx(statistics.mean(xs) - statistics.mean(ys))
    assert beta[POOLED] == pytest.approx(0.70) and beta[f"{POOLED} std"] == pytest.approx(0.0)
    alpha = rows(lb).loc["alpha"]
    pooled = over_seeds("alpha", lambda _, value: value)
    assert alpha[POOLED] == pytest.approx(statistics.mean(pooled))
    assert alpha[f"{POOLED} std"] == pytest.approx(statistics.stdev(pooled))
    assert POOLED not in board(lb, "outside").frame.columns


def test_pooled_rows_change_nothing_else_on_the_board(records):
    plain = [
        pooled_record(m, s, with_pooled=False) for m in ("alpha", "beta", "gamma") for s in SEEDS
    ]
    with_pooled, without = build_leaderboard(records), build_leaderboard(plain)
    for regime in ("inside", "outside"):
        frame = board(with_pooled, regime).frame.drop(
            columns=[POOLED, f"{POOLED} std"], errors="ignore"
        )
        pd.testing.assert_frame_equal(frame, board(without, regime).frame)
    assert list(rows(with_pooled).index) == ["beta", "gamma", "alpha"]  # by mean, the default


def test_the_heatmap_and_the_cd_diagram_leave_pooled_out(records):
    lb = build_leaderboard(records)
    inside = board(lb)
    assert POOLED not in coloured_columns(inside)
    assert set(inside.blocks.columns.get_level_values("site")) == {"x", "y"}
    assert rank_rows(inside, lower_is_better=False).blocks == 2 * len(SEEDS)


def test_rank_by_pooled_ranks_rows_and_compares_the_seeds_pooled_values(records):
    lb = build_leaderboard(records, rank_by=POOLED)
    inside = rows(lb)
    assert list(inside.index) == ["alpha", "gamma", "beta"]
    assert list(inside["rank"]) == [1, 2, 3]
    best = over_seeds("alpha", lambda _, value: value)
    for method in ("beta", "gamma"):
        values = over_seeds(method, lambda _, value: value)
        expected = wilcoxon([v - b for v, b in zip(values, best, strict=True)]).pvalue
        assert inside.loc[method, "p"] == pytest.approx(expected)
    # the outside board has no pooled test: it stays ranked by mean, and a note says so
    assert list(rows(lb, "outside").index) == ["beta", "gamma", "alpha"]
    assert any("outside" in note and "mean" in note for note in lb.notes)


def test_rank_by_pooled_keeps_the_variants_rows(records):
    for record in records:
        record["config"]["method"]["mu"] = 0.1 if record["method"] == "beta" else 0.0
    lb = build_leaderboard(records, rank_by=POOLED, variants=setting_variants("method.mu", records))
    inside = board(lb).frame
    assert list(zip(inside["method"], inside["variant"], strict=True))[0] == (
        "alpha",
        "method.mu=0.0",
    )
    assert inside[POOLED].notna().all()


def test_every_format_shows_the_pooled_column(records):
    lb = build_leaderboard(records)
    shown = display_frame(board(lb), lb.metric).set_index("method")
    assert shown.loc["beta", POOLED] == "0.700 ± 0.000"
    assert POOLED not in display_frame(board(lb, "outside"), lb.metric).columns
    assert "| pooled |" in render(lb, "md") and "0.700 ± 0.000" in render(lb, "html")
    payload = json.loads(render(lb, "json"))
    beta = next(r for r in payload["boards"]["inside"]["rows"] if r["method"] == "beta")
    assert beta["pooled"] == {"mean": pytest.approx(0.7), "std": pytest.approx(0.0)}
    assert set(beta["sites"]) == {"x", "y"} and payload["rank_by"] == "mean"
    assert "pooled" in render(lb, "csv").splitlines()[0].split(",")


def test_cli_rank_by_pooled(results):
    result = runner.invoke(
        app,
        ["leaderboard", "--results-dir", str(results), "--rank-by", "pooled", "--format", "json"],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["rank_by"] == "pooled"
    assert [r["method"] for r in payload["boards"]["inside"]["rows"]] == ["alpha", "gamma", "beta"]


def test_cli_rank_by_unknown_or_without_pooled_values_is_one_line(results, tmp_path):
    line = error_line(["--results-dir", str(results), "--rank-by", "median"])
    assert line == "error: unknown --rank-by 'median'; known: mean, pooled"
    plain = tmp_path / "plain"
    for method in ("alpha", "beta"):
        write(plain, pooled_record(method, 0, with_pooled=False))
    line = error_line(["--results-dir", str(plain), "--rank-by", "pooled"])
    assert line == (
        "error: --rank-by pooled: no pooled-test values on the inside board of toy (only "
        "datasets whose task scores the pooled test, such as fed-tcga-brca, have them)"
    )


def test_a_real_fed_tcga_brca_run_has_a_pooled_column(tmp_path):
    if not TCGA.is_dir():
        pytest.skip("../shared/data/flamby/fed_tcga_brca is not present")
    run = runner.invoke(
        app,
        [
            *("run", "--method", "fedavg", "--dataset", "fed-tcga-brca", "--preset", "quick"),
            *("--holdout", "none", "--rounds", "1", "--set", f"data.path={TCGA}"),
            *("--set", "train.local_epochs=1", "--results-dir", str(tmp_path), "--json"),
        ],
    )
    assert run.exit_code == 0, run.output
    record = json.loads(run.stdout)
    (pooled,) = [m["value"] for m in record["metrics"] if m["site"] == POOLED]
    lb = build_leaderboard(load_records(tmp_path)[0], metric="c_index", rank_by=POOLED)
    inside = board(lb)
    assert POOLED not in inside.sites and len(inside.sites) == 6
    assert inside.frame[POOLED].iloc[0] == pytest.approx(pooled)
