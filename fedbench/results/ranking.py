"""Critical-difference diagrams (Demšar, "Statistical Comparisons of Classifiers over Multiple
Data Sets", JMLR 2006): each row's average rank over the (site, seed) blocks, the Friedman test
over all rows, and the Nemenyi post-hoc test for every pair. The statistics and the drawing are
scikit-posthocs' (and scipy's); this module chooses the blocks and lays out the figure."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fedbench.errors import FedbenchError
from fedbench.results.leaderboard import Board, Leaderboard
from fedbench.results.plots import check_figure_path, pyplot, save
from fedbench.results.statistics import ALPHA

CD_WIDTH = 11.0  # inches


@dataclass
class Ranking:
    """Average ranks (1 = best), the Friedman p value, the Nemenyi p value of each pair, the
    number of complete blocks and Nemenyi's critical difference of average ranks."""

    ranks: pd.Series
    friedman_p: float
    pairwise: pd.DataFrame
    blocks: int
    critical_difference: float


def critical_difference(rows: int, blocks: int, alpha: float = ALPHA) -> float:
    """Nemenyi's CD = q_alpha sqrt(k (k + 1) / (6 N)), q_alpha the studentized range quantile
    over sqrt(2), for k rows and N blocks."""
    from scipy.stats import studentized_range

    q_alpha = studentized_range.ppf(1 - alpha, rows, math.inf) / math.sqrt(2)
    return float(q_alpha * math.sqrt(rows * (rows + 1) / (6 * blocks)))


def rank_rows(board: Board, lower_is_better: bool) -> Ranking:
    """Rank every row within each (site, seed) block that all rows ran; one clear error when
    there are fewer than 3 rows or 2 such blocks."""
    import scikit_posthocs
    from scipy.stats import friedmanchisquare

    distinct = board.blocks[(board.frame["same as"] == "").to_numpy()]  # one row per result
    table = distinct.dropna(axis=1).T  # blocks x rows
    rows, blocks = table.shape[1], table.shape[0]
    if rows < 3 or blocks < 2:
        raise FedbenchError(
            f"a critical-difference diagram of the {board.regime} board needs at least 3 rows "
            f"and 2 (site, seed) blocks that every row ran; it has {rows} rows, {blocks} blocks"
        )
    ranks = table.rank(axis=1, ascending=lower_is_better).mean()
    friedman = float(friedmanchisquare(*(table[c].to_numpy() for c in table.columns)).pvalue)
    pairwise = scikit_posthocs.posthoc_nemenyi_friedman(table.to_numpy())
    pairwise.index = pairwise.columns = table.columns
    cd = critical_difference(rows, blocks)
    return Ranking(ranks.sort_values(), friedman, pairwise, blocks, cd)


def draw_ranking(ax: Any, board: Board, ranking: Ranking) -> None:
    """One board's diagram: ranks on the axis, bars joining rows Nemenyi cannot tell apart."""
    import scikit_posthocs

    scikit_posthocs.critical_difference_diagram(
        ranking.ranks,
        ranking.pairwise,
        ax=ax,
        alpha=ALPHA,
        label_props={"fontsize": 8},
    )
    regime = "Inside" if board.regime == "inside" else "Outside (unseen sites)"
    ax.set_title(
        f"{regime}: average rank over {ranking.blocks} (site, seed) blocks; Friedman "
        f"p = {ranking.friedman_p:.2g}\nbars join rows Nemenyi cannot separate (alpha {ALPHA}, "
        f"critical difference {ranking.critical_difference:.2f} ranks)",
        fontsize=9,
        loc="left",
    )


def panel_heights(rankings: list[Ranking]) -> list[float]:
    """Inches per diagram: room for the labels of every row, half on each side."""
    return [1.4 + 0.16 * len(r.ranks) for r in rankings]


def cd_figure(lb: Leaderboard, path: Path) -> Path:
    """Write one critical-difference diagram per board to `path`."""
    plt = pyplot()
    path = check_figure_path(path)
    rankings = [rank_rows(board, lb.lower_is_better) for board in lb.boards]
    heights = panel_heights(rankings)
    fig, axes = plt.subplots(
        len(rankings),
        1,
        figsize=(CD_WIDTH, sum(heights) + 0.6),
        squeeze=False,
        layout="constrained",
        gridspec_kw={"height_ratios": heights},
    )
    for ax, board, ranking in zip(axes[:, 0], lb.boards, rankings):
        draw_ranking(ax, board, ranking)
    fig.suptitle(f"{lb.dataset}: {lb.metric} ({lb.selection}), rank 1 = best", fontsize=11)
    save(fig, path)
    return path
