"""What a board can say: the smallest reachable p, bootstrap intervals, rows that are one result,
and the compute of each row (client steps, seconds) beside its bytes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon
from test_leaderboard import board_row, make_record, write

from fedbench.results.compute import fedavg_reference
from fedbench.results.formats import legend_lines, to_markdown
from fedbench.results.leaderboard import build_leaderboard, load_records
from fedbench.results.statistics import bootstrap_ci, same_results, shared_ranks, smallest_p


@pytest.mark.parametrize("pairs,comparisons", [(6, 20), (6, 1), (12, 3), (4, 2)])
def test_smallest_p_is_what_the_exact_test_and_holm_reach(pairs, comparisons):
    """Every difference of one sign: the exact two-sided Wilcoxon p is its floor; Holm
    multiplies the smallest of m p values by m."""
    floor = float(wilcoxon(np.arange(1.0, pairs + 1)).pvalue)
    assert smallest_p(pairs, comparisons) == pytest.approx(min(1.0, comparisons * floor))


def test_smallest_p_of_the_issue_design():
    assert smallest_p(6, 20) == pytest.approx(0.625)  # one seed, six sites, 20 comparisons
    assert math.isnan(smallest_p(0, 3)) and math.isnan(smallest_p(6, 0))


def four_rows(tmp_path, seeds=(0, 1, 2)):
    """Rows a > b > c > d by 0.1 at every (site, seed), so every test is as extreme as can be."""
    sites = ("x", "y", "z")
    for k, method in enumerate("abcd"):
        for seed in seeds:
            values = {s: 0.9 - 0.1 * k - 0.01 * i - 0.001 * seed for i, s in enumerate(sites)}
            write(tmp_path, make_record(f"{method}{seed}", method, seed, values))
    return build_leaderboard(load_records(tmp_path)[0])


def test_board_states_its_smallest_p_and_it_matches_its_best_case(tmp_path):
    lb = four_rows(tmp_path, seeds=(0,))
    inside = lb.boards[0]
    assert inside.smallest_p == pytest.approx(smallest_p(3, 3))  # 3 pairs, 3 comparisons
    assert inside.frame["p holm"].min() == pytest.approx(inside.smallest_p)
    lines = legend_lines(lb)
    assert any("inside: the smallest p" in line and "can be significant" in line for line in lines)


def test_a_design_that_can_reach_significance_says_so_differently(tmp_path):
    lb = four_rows(tmp_path)  # 9 pairs: 3 * 2^-8 = 0.0117
    assert lb.boards[0].smallest_p < 0.05
    assert not any("no difference on this board" in line for line in legend_lines(lb))


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_agreement():
    rng = np.random.default_rng(1)
    noisy = pd.DataFrame(0.7 + 0.1 * rng.standard_normal((6, 3)))
    low, high = bootstrap_ci(noisy)
    assert low < noisy.to_numpy().mean() < high
    calm = 0.7 + 0.1 * (noisy - 0.7)  # the same draws, a tenth of the spread
    assert bootstrap_ci(calm)[1] - bootstrap_ci(calm)[0] == pytest.approx((high - low) / 10)
    flat = pd.DataFrame(np.full((4, 2), 0.5))
    assert bootstrap_ci(flat) == (0.5, 0.5)


def test_bootstrap_resamples_sites_not_only_seeds():
    """Sites that disagree and seeds that agree: an interval over seeds alone would be a point."""
    table = pd.DataFrame([[0.2, 0.2, 0.2], [0.8, 0.8, 0.8]])
    low, high = bootstrap_ci(table)
    assert low == pytest.approx(0.2) and high == pytest.approx(0.8)


def test_board_rows_carry_their_interval(tmp_path):
    lb = four_rows(tmp_path)
    row = board_row(lb, "inside", "a")
    assert row["ci low"] <= row["mean"] <= row["ci high"]
    assert "95% CI" in to_markdown(lb)


def test_same_results_maps_each_repeat_to_the_first_row():
    blocks = pd.DataFrame(
        [[0.5, 0.6], [0.4, 0.6], [0.5, 0.6], [0.4, 0.6], [0.5, math.nan]], index=list("abcde")
    )
    assert same_results(blocks) == {2: 0, 3: 1}  # e ran fewer blocks: not the same result
    assert shared_ranks(5, {2: 0, 3: 1}) == [1, 2, 1, 2, 3]


def test_identical_rows_leave_holms_comparisons(tmp_path):
    """A row repeated under another name is one comparison, not two."""
    lb = four_rows(tmp_path, seeds=(0,))
    for seed in (0,):
        values = {s: 0.9 - 0.1 * 3 - 0.01 * i for i, s in enumerate(("x", "y", "z"))}
        write(tmp_path, make_record(f"e{seed}", "e", seed, values))
    again = build_leaderboard(load_records(tmp_path)[0])
    assert board_row(again, "inside", "e")["same as"] == "d"
    assert again.boards[0].smallest_p == pytest.approx(lb.boards[0].smallest_p)
    assert board_row(again, "inside", "d")["p holm"] == board_row(lb, "inside", "d")["p holm"]
    assert "= d" in to_markdown(again)


def costed(run_id, method, seed, steps, seconds):
    record = make_record(run_id, method, seed, {"x": 0.7, "y": 0.6 + 0.01 * steps / 100})
    for name, part in record["cost"]["federations"].items():
        part.update(client_steps=steps, train_s=seconds, adapt_s=0.5 if name != "inside" else 0)
    return record


def test_compute_columns_and_the_note_on_rows_unlike_fedavg(tmp_path):
    for seed in (0, 1):
        write(tmp_path, costed(f"f{seed}", "fedavg", seed, 100, 10.0 + seed))
        write(tmp_path, costed(f"d{seed}", "ditto", seed, 200, 20.0))
        write(tmp_path, costed(f"p{seed}", "fedprox", seed, 110, 11.0))
    lb = build_leaderboard(load_records(tmp_path)[0])
    fedavg = board_row(lb, "inside", "fedavg")
    assert fedavg["client_steps"] == 100 and fedavg["seconds"] == pytest.approx(10.5)
    outside = board_row(lb, "outside", "ditto")
    assert outside["client_steps"] == 400  # two held-out sites, each a federation
    assert outside["seconds"] == pytest.approx(2 * (20.0 + 0.5))
    note = [line for line in lb.notes if line.startswith("inside: client steps unlike fedavg")]
    assert note and "ditto (2.0x steps" in note[0] and "fedprox" not in note[0]
    markdown = to_markdown(lb)
    assert "steps" in markdown and "wall s" in markdown


def test_records_without_seconds_show_none(tmp_path):
    write(tmp_path, make_record("a0", "a", 0, {"x": 0.5}))
    row = board_row(build_leaderboard(load_records(tmp_path)[0]), "inside", "a")
    assert math.isnan(row["seconds"])


def test_the_reference_is_plain_fedavg_whatever_a_variant_of_it_scores():
    """A study board holds FedAvg at twice the steps too, possibly ranked above plain FedAvg."""
    frame = pd.DataFrame(
        {
            "method": ["ditto", "fedavg", "fedavg", "apfl"],
            "adapter": ["none"] * 4,
            "variant": ["methods", "fedavg 2x steps", "methods", "methods"],
            "client_steps": [1152.0, 1152.0, 576.0, 1152.0],
            "seconds": [20.0, 20.0, 10.0, 20.0],
        }
    )
    assert fedavg_reference(frame)["variant"] == "methods"
    sgd = pd.DataFrame(  # FedAvg on SGD has FedAvg's steps too, and may rank first
        {
            "method": ["fedavg", "fedavg", "ditto", "apfl"],
            "adapter": ["none"] * 4,
            "variant": ["sgd", "methods", "methods", "methods"],
            "client_steps": [576.0, 576.0, 1152.0, 1152.0],
            "seconds": [5.0, 10.0, 20.0, 20.0],
        }
    )
    assert fedavg_reference(sgd)["variant"] == "methods"


def test_seconds_alone_never_flag_a_row(tmp_path):
    """Seconds depend on the machine's load: a row with FedAvg's steps is not flagged however
    long it took."""
    for seed in (0, 1):
        write(tmp_path, costed(f"f{seed}", "fedavg", seed, 100, 10.0))
        write(tmp_path, costed(f"s{seed}", "slow", seed, 100, 30.0))
    lb = build_leaderboard(load_records(tmp_path)[0])
    assert not [line for line in lb.notes if "unlike fedavg" in line]


def test_off_by_less_than_a_fifth_either_way_is_not_noted(tmp_path):
    for seed in (0, 1):
        write(tmp_path, costed(f"f{seed}", "fedavg", seed, 100, 10.0))
        write(tmp_path, costed(f"c{seed}", "cheap", seed, 83, 8.3))  # 17% fewer
        write(tmp_path, costed(f"v{seed}", "verycheap", seed, 79, 7.9))  # 21% fewer
    lb = build_leaderboard(load_records(tmp_path)[0])
    (note,) = [line for line in lb.notes if line.startswith("inside: client steps unlike")]
    assert "verycheap (0.8x steps" in note and "cheap (0.8x" not in note.replace("verycheap", "")
