"""What a board's numbers can and cannot say: the paired Wilcoxon test of a row against the best
with Holm's correction, the smallest p that design can reach at all, a bootstrap confidence
interval of each row's mean, and which rows are the same result under another name."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd

ALPHA = 0.05
#: bootstrap resamples of a row's mean, and the seed that makes a board reproducible
RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def paired_p(row: pd.Series, best: pd.Series) -> float:
    """Two-sided Wilcoxon signed-rank p over matching (site, seed) pairs; nan if it cannot say."""
    from scipy.stats import wilcoxon

    pairs = pd.concat([row, best], axis=1, join="inner").to_numpy(dtype=float)
    diff = pairs[:, 0] - pairs[:, 1] if len(pairs) else np.array([])
    diff = diff[np.isfinite(diff)]
    if diff.size == 0:
        return math.nan
    if np.all(diff == 0):
        return 1.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = float(wilcoxon(diff).pvalue)
    except ValueError:
        return math.nan
    return p


def holm(p_values: pd.Series) -> pd.Series:
    """Holm's step-down correction of the finite p values (nan stays nan): the k-th smallest
    of m is multiplied by m - k + 1, made monotone, capped at 1."""
    from statsmodels.stats.multitest import multipletests

    finite = p_values.dropna()
    adjusted = pd.Series(math.nan, index=p_values.index, dtype=float)
    if not finite.empty:
        adjusted[finite.index] = multipletests(finite.to_numpy(), method="holm")[1]
    return adjusted


def smallest_p(pairs: int, comparisons: int) -> float:
    """The smallest Holm-corrected p a board of `comparisons` Wilcoxon tests over at most
    `pairs` pairs can show: the exact two-sided test's floor 2 / 2^pairs (every difference of
    one sign), times the comparisons Holm multiplies the smallest p by; nan without a test."""
    if pairs < 1 or comparisons < 1:
        return math.nan
    return min(1.0, comparisons * 2.0 ** (1 - pairs))


def bootstrap_ci(values: pd.DataFrame, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean over sites from a two-stage bootstrap of a (site x seed)
    table: sites drawn with replacement, then seeds within each drawn site. Sites come first
    because the board's claim is about sites like these, and they vary more than seeds."""
    table = values.to_numpy(dtype=float)
    table = table[np.isfinite(table).any(axis=1)]
    if table.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    sites, seeds = table.shape
    chosen_sites = rng.integers(0, sites, size=(RESAMPLES, sites))
    chosen_seeds = rng.integers(0, seeds, size=(RESAMPLES, sites, seeds))
    drawn = table[chosen_sites[..., None], chosen_seeds]
    with warnings.catch_warnings():  # a drawn site whose drawn seeds all lack a value
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(np.nanmean(drawn, axis=2), axis=1)
    means = means[np.isfinite(means)]
    if means.size == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def same_results(blocks: pd.DataFrame) -> dict[int, int]:
    """Rows (by position, in rank order) whose values in every (site, seed) block equal those of
    a higher row, mapped to the first such row: one result under two names."""
    table = blocks.to_numpy(dtype=float)
    twins: dict[int, int] = {}
    for i in range(len(table)):
        for j in range(i):
            if j not in twins and _identical(table[i], table[j]):
                twins[i] = j
                break
    return twins


def _identical(a: np.ndarray, b: np.ndarray) -> bool:
    """The same blocks ran and every value is equal (exactly: they are one computation)."""
    ran_a, ran_b = np.isfinite(a), np.isfinite(b)
    return bool(ran_a.any() and np.array_equal(ran_a, ran_b) and np.array_equal(a[ran_a], b[ran_b]))


def shared_ranks(rows: int, twins: dict[int, int]) -> list[int]:
    """1, 2, ... for distinct results; a row that repeats a higher row's result shares its rank."""
    ranks: list[int] = []
    for i in range(rows):
        ranks.append(ranks[twins[i]] if i in twins else 1 + len(set(ranks)))
    return ranks


def compare_with_best(
    out: pd.DataFrame, compared: pd.Series, twins: dict[int, int], reference: int = 0
) -> float:
    """p, Holm-corrected p and significance of each distinct row against the best, or against
    the row at position `reference` (a repeated result takes its twin's); returns the smallest
    corrected p the design can reach."""
    reference = twins.get(reference, reference)
    best = out.index[reference]
    distinct = [key for i, key in enumerate(out.index) if i not in twins and i != reference]
    pairs = {key: (pairs_of(compared, key), pairs_of(compared, best)) for key in distinct}
    raw = pd.Series(
        {key: paired_p(row, top) for key, (row, top) in pairs.items()}, dtype=float
    ).reindex(out.index)
    adjusted = holm(raw)
    for i, j in twins.items():
        raw.iloc[i], adjusted.iloc[i] = raw.iloc[j], adjusted.iloc[j]
    out["p"], out["p holm"] = raw, adjusted
    out["significant"] = [
        None if key == best or twins.get(i) == reference else bool(p < ALPHA)
        for i, (key, p) in enumerate(adjusted.items())
    ]
    tested = [
        len(pd.concat([row, top], axis=1, join="inner").dropna()) for row, top in pairs.values()
    ]
    tested = [n for n in tested if n > 0]
    return smallest_p(max(tested, default=0), len(tested))


def pairs_of(long: pd.Series, key: Any) -> pd.Series:
    """The (site, seed) -> value series of one row of a board (seed -> value for the pooled
    values)."""
    key = key if isinstance(key, tuple) else (key,)
    rows = long.index.droplevel(list(range(len(key), long.index.nlevels)))
    if (key if rows.nlevels > 1 else key[0]) not in rows:
        return pd.Series(dtype=float)  # a row with no values of this kind (no pooled rows)
    part = long.loc[key]
    return part.reorder_levels(["site", "seed"]) if part.index.nlevels == 2 else part
